"""Shared fixtures: tiny model configs for the many shape tests, the real S/14 for end-to-end ones."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iv2trt.models import InternVideo2CLIPVision, VisionConfig  # noqa: E402

# 56 px / patch 14 = 4x4 patches per frame; 2 blocks; same structure as S/14
TINY = VisionConfig(name="tiny_test", img_size=56, patch_size=14, num_frames=4, embed_dim=64, depth=2, num_heads=2,
                    attn_pool_num_heads=4, clip_embed_dim=48, align_dim=32)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (biases and norm weights too), so no term can hide behind a zero or a one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.05))
            else:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen) if "norm" in name or "gamma" in name
                        else 0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(autouse=True)
def _no_compile_outlives_its_test():
    """A background torch.compile a test started (GPU runners) ends inside that test, not in the next one or
    after pytest has closed its streams."""
    yield
    from iv2trt.runners.compile import finish_compiles

    finish_compiles()


@pytest.fixture(scope="session")
def tiny_cfg() -> VisionConfig:
    return TINY


@pytest.fixture(scope="session")
def tiny_model() -> InternVideo2CLIPVision:
    return randomize(InternVideo2CLIPVision(TINY)).eval()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """The tiny model exported in fp32 and fp16 (max batch 8, max frames 16)."""
    from iv2trt.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("tiny_onnx")
    return {p: export_onnx(tiny_model, out / f"tiny_{p}.onnx", p, max_batch=8, max_frames=16) for p in ("fp32", "fp16")}


@pytest.fixture(scope="session")
def s14_onnx(tmp_path_factory) -> dict[str, Path]:
    """The full S/14 (random weights) exported in fp32 and fp16 through export_onnx.py's own code path, each
    validated against PyTorch with ONNX Runtime at shapes that between them vary both dynamic axes: fp16 (the
    converted graph) at 1 frame and at 16 (past the trained 8), fp32 at a batch of 2. (Fewer shapes than the CLI's
    default: 51 s for the fixture on two cores instead of 67.)"""
    from iv2trt.cli.export import main

    out = tmp_path_factory.mktemp("s14_onnx")
    paths = {}
    for p, shapes in (("fp16", ["1x1", "1x16"]), ("fp32", ["2x4"])):
        paths[p] = out / f"s14_{p}.onnx"
        assert main(["--random-init", "--precision", p, "--output", str(paths[p]), "--validation-shapes", *shapes]) == 0
    return paths
