"""The job's runners, built where a pipeline runs (this process, a pipeline process of the local job, or a Ray actor
on some node): the runner the settings name for this GPU, the --compare-pytorch reference, and what the executor
must know of the runner before it writes anything (`describe_runner`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import PipelineError
from ..model import ModelSettings, load_model
from .identity import job_identity
from .stages import check_frame_count


@dataclass(frozen=True)
class SettingsRunner:
    """Builds the job's runner wherever it is called (picklable, for pipeline processes and Ray actors):
    `create_runner` with the engine the engine map names for this GPU. `variant`: the PyTorch model's config as a
    dict, for machines without the YAML files under configs/ (Ray nodes). `where()` names the process in errors
    (the Ray executor adds the node)."""

    settings: Any
    variant: dict[str, Any] | None = None
    where: Callable[[], str] | None = None

    def __call__(self):
        from ..engine.engine_map import local_gpu_name, settings_for_this_gpu
        from ..models import VisionConfig
        from ..runners.choice import create_runner

        s = self.settings
        if self.variant is not None:
            s = dataclasses.replace(s, variant=VisionConfig(**self.variant))
        try:
            return create_runner(settings_for_this_gpu(s))
        except PipelineError as exc:
            gpu = local_gpu_name()
            hint = f"; to use another engine on {gpu}, add it to --engines as '{gpu}=PATH'" if gpu and s.engines else ""
            where = f"{self.where()}, " if self.where is not None else ""
            raise type(exc)(f"{exc} [{where}GPU {gpu or 'none'}{hint}]") from None

    def with_backend(self, backend: str) -> "SettingsRunner":
        """The same factory pinned to `backend` (every pipeline runs the backend the first one chose)."""
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, backend=backend))


def reference_runner(s, identity: dict[str, Any] | None = None) -> Any:
    """The PyTorch fp32 model that --compare-pytorch checks the backend against (settings `s`: compare_pytorch is a
    checkpoint path or 'random'), of the model file's variant where --variant was not given (`identity`: the
    runner's job identity)."""
    from ..runners.torch_runner import TorchRunner

    variant = s.variant
    if identity and identity.get("variant") and "variant" not in s.given:
        variant = identity["variant"]
    if s.compare_pytorch == "random":
        ref = ModelSettings(variant=variant, random_init=True, seed=s.seed)
    else:
        if not Path(s.compare_pytorch).is_file():
            raise PipelineError(f"--compare-pytorch {s.compare_pytorch}: no such checkpoint (or pass 'random')")
        ref = ModelSettings(variant=variant, checkpoint=s.compare_pytorch, align_checkpoint=s.align_checkpoint)
    return TorchRunner(load_model(ref), precision="fp32")


def describe_runner(runner, settings, frames: int) -> dict[str, Any]:
    """What the executor needs to know about a runner before the job: name, input size, frame range, max batch,
    feature size, device, and the job's identity (job.json). PipelineError when it does not take clips of
    `frames` frames."""
    from ..runners.base import infer_frames
    from ..runners.choice import runner_feature_dim, runner_img_size, runner_precision

    check_frame_count(runner, frames)
    img_size = runner_img_size(runner)
    feature_dim = runner_feature_dim(runner)  # (running a clip instead would start a compile of its shape)
    if feature_dim is None:
        feature_dim = infer_frames(runner, np.zeros((1, frames, img_size, img_size, 3), np.uint8)).shape[-1]
    return {"name": runner.name, "img_size": img_size, "frame_range": tuple(runner.frame_range),
            "max_batch": runner.max_batch, "feature_dim": int(feature_dim),
            "precision": runner_precision(runner), "device": str(getattr(runner, "device", "cpu")),
            "identity": job_identity(settings, runner, img_size)}


def close_runner(runner) -> None:
    """Free what a runner holds on the GPU (the TensorRT runner's engine and buffers)."""
    close = getattr(runner, "close", None)
    if close is not None:
        close()
