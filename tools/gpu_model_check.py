#!/usr/bin/env python3
"""On a CUDA machine: our PyTorch model's fp16 (SDPA) output against fp32 on the GPU, and the fp16 ONNX
graph's PyTorch twin, on fresh random inputs at several (B, T). Prints min cosine per shape."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from iv2trt.compare import compare  # noqa: E402
from iv2trt.models import create_model  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
ref = create_model("s14", random_init=True, device="cuda")
half = create_model("s14", random_init=True, device="cuda", dtype=torch.float16)
explicit = create_model("s14", random_init=True, device="cuda", dtype=torch.float16).set_fused_kernels(False)
worst = 1.0
for b, t in ((1, 1), (4, 4), (32, 8), (2, 16), (1, 32)):
    x = torch.randn(b, t, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        r = ref(x).double().cpu().numpy()
        for name, m in (("fp16 sdpa", half), ("fp16 explicit (ONNX form)", explicit)):
            c = compare(r, m(x.half()).double().cpu().numpy())
            worst = min(worst, c.min_cosine)
            print(f"{b}x{t:<3} {name:<26} max abs {c.max_abs_error:.2e} min cos {c.min_cosine:.6f}")
# the job's path: TorchRunner.submit_uint8 (copy stream, GPU normalisation, torch.compile, CUDA graphs),
# several batches in flight and shapes mixed, against the fp32 model on host-normalised frames
import numpy as np  # noqa: E402

from iv2trt.runners.torch_runner import TorchRunner  # noqa: E402
from iv2trt.transforms import normalize_frames  # noqa: E402

runner = TorchRunner(create_model("s14", random_init=True), precision="fp16")
rng = np.random.default_rng(0)
batches = [rng.integers(0, 256, (b, t, 224, 224, 3), dtype=np.uint8) for b, t in ((32, 8), (5, 8), (32, 8), (3, 1))]
buffers = [runner.new_host_buffer(u8.shape) for u8 in batches[:2]]
for buf, u8 in zip(buffers, batches[:2]):
    buf[...] = u8
inputs = buffers + batches[2:]  # pinned (caller's buffer) and plain (staging) sources
# first round: the runner's torch.compile runs in the background (eager model meanwhile); second: compiled
for phase in ("while compiling", "compiled"):
    waits = [runner.submit_uint8(u8) for u8 in inputs]
    for u8, wait in zip(inputs, waits):
        with torch.inference_mode():
            r = ref(normalize_frames(u8).cuda()).double().cpu().numpy()
        c = compare(r, wait())
        worst = min(worst, c.min_cosine)
        print(f"{u8.shape[0]}x{u8.shape[1]:<3} runner.submit_uint8 ({phase}, graphs: {len(runner._graphs)}) "
              f"max abs {c.max_abs_error:.2e} min cos {c.min_cosine:.6f}")
    if runner.compiled is not None:
        runner.compiled.wait()
print("worst cosine", worst)
sys.exit(0 if worst >= 0.999 else 1)
