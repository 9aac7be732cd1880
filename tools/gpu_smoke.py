#!/usr/bin/env python3
"""GPU smoke test of the pycuda pieces trt_runtime.TensorRTRunner uses, WITHOUT TensorRT.

Run on a CUDA machine with torch (CUDA build) and pycuda:  python tools/gpu_smoke.py
Checks: pycuda and torch share the device's primary context; pinned (page-locked) host buffers
allocated once for a "profile maximum" and reused through views; one stream; async H2D/D2H copies of
fp32 -> fp16 host-converted data; a torch kernel reading pycuda memory in the same context; L2 norm.
Prints one line per check and exits non-zero on the first failure.
"""
from __future__ import annotations

import sys
import time

import numpy as np


def check(label: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {label}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        sys.exit(1)


def main() -> int:
    import pycuda.driver as cuda
    import torch

    cuda.init()
    check("CUDA devices visible", cuda.Device.count() > 0, f"{cuda.Device.count()} device(s)")
    dev = cuda.Device(0)
    cc = "{}.{}".format(*dev.compute_capability())
    print(f"     device 0: {dev.name()}, compute capability {cc}, {dev.total_memory() / 2**30:.1f} GiB", flush=True)

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # torch creates/uses the primary context
    ctx = dev.retain_primary_context()
    ctx.push()
    try:
        current = cuda.Context.get_current()
        check("pycuda's current context is the primary context torch uses",
              current is not None and current.handle == ctx.handle,
              f"pycuda {ctx.handle:#x}")
        try:
            from cuda.bindings import driver as cu  # cuda-python, optional
            err, torch_ctx = cu.cuCtxGetCurrent()
            check("cuda-python agrees on the current context", int(torch_ctx) == ctx.handle, f"{int(torch_ctx):#x}")
        except ImportError:
            print("     (cuda-python not installed: context handle cross-check skipped)")

        max_batch, max_frames, chw, dim = 8, 16, (3, 224, 224), 512
        host_in = cuda.pagelocked_empty((max_batch, max_frames, *chw), np.float16)
        host_out = cuda.pagelocked_empty((max_batch, dim), np.float16)
        dev_in, dev_out = cuda.mem_alloc(host_in.nbytes), cuda.mem_alloc(host_out.nbytes)
        stream = cuda.Stream()
        check("pinned buffers and device buffers allocated once", True,
              f"in {host_in.nbytes / 2**20:.1f} MiB fp16, out {host_out.nbytes / 2**10:.1f} KiB")

        rng = np.random.default_rng(0)
        for batch, frames in ((1, 1), (3, 8), (8, 16), (2, 4)):
            x = rng.standard_normal((batch, frames, *chw), dtype=np.float32)
            shape = (batch, frames, *chw)
            view = host_in.reshape(-1)[:int(np.prod(shape))].reshape(shape)
            np.copyto(view, x, casting="unsafe")
            started = time.perf_counter()
            cuda.memcpy_htod_async(dev_in, view, stream)
            # stand-in for the engine: torch reads pycuda's buffer in the same context, on the same stream
            torch_stream = torch.cuda.ExternalStream(stream.handle)
            with torch.cuda.stream(torch_stream):
                t_in = torch.as_tensor(_wrap(dev_in, shape, torch.float16))
                feats = t_in.float().mean(dim=(1, 3, 4))  # [B, 3]
                feats = feats.repeat(1, (dim + 2) // 3)[:, :dim].half()
                _wrap(dev_out, (batch, dim), torch.float16).copy_(feats)
            out = host_out[:batch]
            cuda.memcpy_dtoh_async(out, dev_out, stream)
            stream.synchronize()
            elapsed = (time.perf_counter() - started) * 1e3
            expected = x.astype(np.float16).astype(np.float32).mean(axis=(1, 3, 4))
            expected = np.tile(expected, (1, (dim + 2) // 3))[:, :dim]
            err = float(np.abs(out.astype(np.float32) - expected).max())
            check(f"async round trip {batch}x{frames} through one stream", err < 1e-2,
                  f"max err {err:.2e}, {elapsed:.1f} ms")
            features = out.astype(np.float32)
            normed = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
            norms = np.linalg.norm(normed, axis=-1)
            check("L2-normalised rows have unit norm", bool(np.allclose(norms, 1, atol=1e-5)),
                  f"norms {norms.min():.6f}..{norms.max():.6f}")
        del dev_in, dev_out
    finally:
        ctx.pop()
        ctx.detach()
    print("all pycuda checks passed", flush=True)
    return 0


def _wrap(allocation, shape, dtype):
    """A torch tensor over a pycuda allocation (no copy), via __cuda_array_interface__."""
    import torch

    class Interface:
        __cuda_array_interface__ = {"shape": tuple(shape), "typestr": "<f2" if dtype == torch.float16 else "<f4",
                                    "data": (int(allocation), False), "version": 3}

    return torch.as_tensor(Interface(), device="cuda")


if __name__ == "__main__":
    sys.exit(main())
