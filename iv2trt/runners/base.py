"""What every runner shares. A runner is one object per backend that turns preprocessed frames into raw
(unnormalised) features.

Every runner has `infer(float32 frames [B, T, 3, H, W]) -> float32 [B, D]` and
`infer_uint8(uint8 resized frames [B, T, H, W, 3]) -> float32 [B, D]`, the second equal to
`infer(normalize_frames(frames))` (within the backend's precision): it is what the extraction job
calls, so frames travel as uint8 and are normalised where it is cheapest (on the GPU for PyTorch,
straight into the backend's input dtype on the host otherwise). Optional: `submit_uint8(frames)` starts
a batch and returns a function that waits for its features (the job keeps two batches in flight with
it), and `close()` frees what the runner holds on the GPU. One module per backend: torch_runner.py,
onnxruntime_runner.py, tensorrt_runner.py (the only module that touches TensorRT's execution API)."""
from __future__ import annotations

import numpy as np

from ..errors import PipelineError


def check_uint8_frames(frames):
    """frames as a C-contiguous uint8 array [B, T, H, W, 3] (a CUDA tensor of that dtype and shape is returned
    as it is); PipelineError otherwise."""
    on_gpu = is_cuda_tensor(frames)
    if not on_gpu:
        frames = np.asarray(frames)
    if str(frames.dtype) not in ("uint8", "torch.uint8") or frames.ndim != 5 or frames.shape[-1] != 3:
        raise PipelineError(f"infer_uint8 takes uint8 frames [batch, frames, H, W, 3], got {frames.dtype} "
                            f"{tuple(frames.shape)}")
    return frames if on_gpu else np.ascontiguousarray(frames)


def normalized_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """[B, T, H, W, 3] -> [B, T, 3, H, W]."""
    return (*shape[:-3], 3, *shape[-3:-1])


def reusable_buffer(owner, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised host array of `shape`, carved from a buffer kept on `owner` and grown when needed:
    a fresh 100+ MB array per batch costs more in page faults than normalising into it."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    buf = getattr(owner, "_host_input", None)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = owner._host_input = np.empty(size, dtype)
    return buf[:size].reshape(shape)


class HostNormalize:
    """Default `infer_uint8`: normalise on the host (torch CPU ops, multi-threaded), written straight into
    the dtype the backend takes (`input_dtype`, float32 when absent), then `infer`. The normalised input
    lives in a buffer reused across calls (calls are synchronous; one thread per runner)."""

    def infer_uint8(self, frames: np.ndarray) -> np.ndarray:
        from ..transforms import normalize_frames

        frames = check_uint8_frames(frames)
        x = reusable_buffer(self, normalized_shape(frames.shape), getattr(self, "input_dtype", None) or np.float32)
        normalize_frames(frames, out=x)
        return self.infer(x)


def is_cuda_tensor(frames) -> bool:
    """Frames in a torch tensor on a GPU (GPU-decoded clips)."""
    return type(frames).__module__.startswith("torch") and getattr(frames, "is_cuda", False)


def infer_frames(runner, frames: np.ndarray) -> np.ndarray:
    """runner.infer_uint8 for uint8 [B, T, H, W, 3], runner.infer for float [B, T, 3, H, W]; runners without
    infer_uint8 get host-normalised frames. Frames in a CUDA tensor (GPU-decoded) go to runners that take them
    (`takes_cuda_frames`) as they are, to the others as a host copy."""
    if is_cuda_tensor(frames):
        if getattr(runner, "takes_cuda_frames", False):
            return runner.infer_uint8(frames)
        frames = frames.cpu().numpy()
    if np.asarray(frames).dtype != np.uint8:
        return runner.infer(frames)
    method = getattr(runner, "infer_uint8", None)
    return method(frames) if method is not None else HostNormalize.infer_uint8(runner, frames)
