"""Engines per GPU model: `engines: ["H100=build/s14_h100.engine", "L4=build/s14_l4.engine"]`.

A TensorRT engine runs only on the GPU model (and TensorRT version) it was built for. A job over
machines with several GPU models names one engine per model; each encoder picks the one whose key
matches its GPU's name (case-insensitive: the full name, e.g. "NVIDIA H100 80GB HBM3", or a part of
it, e.g. "H100"; the longest matching key wins) and falls back to `engine` when none matches. The
chosen engine is still checked against the GPU and TensorRT version when it loads (exit 5 with the
rebuild command when it does not fit).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..errors import PipelineError


def parse_engine_map(entries: list[str] | None) -> dict[str, str]:
    """{GPU model key: engine path} from "KEY=PATH" entries; PipelineError on a malformed one."""
    mapping: dict[str, str] = {}
    for entry in entries or []:
        key, sep, path = str(entry).partition("=")
        if not sep or not key.strip() or not path.strip():
            raise PipelineError(f"engines entry {entry!r} is not GPU_MODEL=PATH (e.g. \"H100=build/s14_h100.engine\")")
        mapping[key.strip()] = path.strip()
    return mapping


def engine_for_gpu(mapping: dict[str, str], gpu_name: str | None, default: str) -> str:
    """The engine for a GPU named `gpu_name`: the longest key it contains (case-insensitive), else `default`."""
    if gpu_name:
        matches = [k for k in mapping if k.lower() in gpu_name.lower()]
        if matches:
            return mapping[max(matches, key=len)]
    return default


def local_gpu_name() -> str | None:
    """The name of the first GPU this process sees (the one Ray gave it), or None without one: the name the
    engine's metadata records (cuda_env.gpu_info, through pycuda or the CUDA driver; no torch needed)."""
    from .cuda_env import gpu_info

    gpu = gpu_info()
    return gpu["name"] if gpu else None


def settings_for_this_gpu(s):
    """Settings `s` with `engine` replaced by the one `s.engines` names for this process's GPU."""
    mapping = parse_engine_map(s.engines)
    if not mapping:
        return s
    return dataclasses.replace(s, engine=engine_for_gpu(mapping, local_gpu_name(), s.engine))


def engine_map_identity(s, backend: str) -> dict[str, Any]:
    """What the engine map adds to job.json: each mapped engine's file and sha256 (TensorRT only)."""
    from ..fileio import sha256_file

    mapping = parse_engine_map(s.engines)
    if backend != "tensorrt" or not mapping:
        return {}
    missing = [p for p in mapping.values() if not Path(p).is_file()]
    if missing:
        raise PipelineError(f"engines: {', '.join(missing)} not found (build them with build_engine.py on a machine "
                            "with that GPU model)")
    return {"engines": {k: {"file": os.path.basename(p), "sha256": sha256_file(p)} for k, p in sorted(mapping.items())}}
