"""The fused kernels' switches (one place, one switch for all) and their caches (models/kernels/switches.py)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from iv2trt.errors import PipelineError
from iv2trt.models.kernels import fused_ops, switches
from iv2trt.models.kernels.switches import GRAPH_STREAMS as GRAPH_STREAMS_ENV
from iv2trt.models.kernels.switches import flash_attn4_cache_env, quack_cache_dir
from iv2trt.runners.torch_runner import TorchRunner

ALL_SWITCHES = (switches.TRITON, switches.QK_NORM_ATTENTION, switches.QUACK, switches.FLASH_ATTN4,
                switches.FLASH_ATTN4_ROW_SCALES)


def test_each_switch_is_on_by_default_and_off_by_its_variable(monkeypatch):
    for var in (switches.ALL, *ALL_SWITCHES):
        monkeypatch.delenv(var, raising=False)
    assert all(switches.enabled(var) for var in ALL_SWITCHES)
    for var in ALL_SWITCHES:
        monkeypatch.setenv(var, "off")
        assert not switches.enabled(var) and all(switches.enabled(v) for v in ALL_SWITCHES if v != var)
        monkeypatch.delenv(var)


def test_one_switch_turns_every_kernel_off(monkeypatch):
    monkeypatch.setenv(switches.ALL, "off")
    assert not any(switches.enabled(var) for var in ALL_SWITCHES)
    assert switches.graph_streams(2) == 1
    # refused before CUDA is asked, so this holds on a CPU-only machine too
    cuda = torch.device("cuda")
    assert fused_ops.qk_norm_kernel(cuda, torch.float16) is None
    assert fused_ops.quack_gemms(cuda, torch.float16) is None
    assert not fused_ops.flash_attn4_serves(cuda, torch.float16)
    assert not fused_ops.available(cuda, torch.float16)
    monkeypatch.setenv(switches.ALL, "sometimes")
    with pytest.raises(ValueError, match=r"\$IV2TRT_FUSED_KERNELS must be on or off, got 'sometimes'"):
        switches.enabled(switches.QUACK)


def test_a_bad_switch_value_is_refused_by_the_runner_with_its_name(monkeypatch, tiny_model):
    monkeypatch.setenv(switches.ALL, "maybe")
    with pytest.raises(PipelineError, match=r"\$IV2TRT_FUSED_KERNELS must be on or off"):
        TorchRunner(copy.deepcopy(tiny_model), device="cpu")


def test_quack_cache_dir_is_persistent_and_overridable(monkeypatch, tmp_path, tiny_model):
    monkeypatch.setenv("QUACK_CACHE_DIR", "")  # recorded, so the variable is restored (or removed) after the test
    monkeypatch.delenv("QUACK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert quack_cache_dir() == tmp_path / "iv2trt" / "quack"
    TorchRunner(tiny_model, device="cpu")  # a GPU runner sets it for quack (read at import); a CPU one leaves it
    assert "QUACK_CACHE_DIR" not in os.environ
    monkeypatch.setenv("QUACK_CACHE_DIR", str(tmp_path / "mine"))
    assert quack_cache_dir() == tmp_path / "mine"


def test_flash_attn4_cache_is_on_persistent_and_left_to_the_user(monkeypatch, tmp_path):
    names = ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
    for name in names:
        monkeypatch.setenv(name, "")  # recorded, so the variables are restored (or removed) after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert flash_attn4_cache_env() == {names[0]: "1", names[1]: str(tmp_path / "iv2trt" / "flash_attn4")}
    monkeypatch.setenv(names[0], "0")  # the user turned it off: left so
    assert flash_attn4_cache_env() == {}


def test_graph_streams_from_env(tiny_model, monkeypatch):
    monkeypatch.delenv(switches.ALL, raising=False)
    monkeypatch.setenv(GRAPH_STREAMS_ENV, "3")
    assert TorchRunner(copy.deepcopy(tiny_model), device="cpu").graph_streams == 3
    assert TorchRunner(copy.deepcopy(tiny_model), device="cpu", graph_streams=1).graph_streams == 1
    for bad in ("0", "two", "-1", "9"):
        monkeypatch.setenv(GRAPH_STREAMS_ENV, bad)
        with pytest.raises(PipelineError, match=r"\$IV2TRT_GRAPH_STREAMS must be a whole number from 1 to 8"):
            TorchRunner(copy.deepcopy(tiny_model), device="cpu")
    monkeypatch.delenv(GRAPH_STREAMS_ENV)
    assert TorchRunner(copy.deepcopy(tiny_model), device="cpu").graph_streams == TorchRunner.GRAPH_STREAMS
