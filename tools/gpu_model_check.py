#!/usr/bin/env python3
"""On a CUDA machine: our PyTorch model's fp16 (SDPA) output against fp32 on the GPU, and the fp16 ONNX
graph's PyTorch twin, on fresh random inputs at several (B, T). Prints min cosine per shape."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from iv2trt.compare import compare  # noqa: E402
from models import create_model  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
ref = create_model("s14", random_init=True, device="cuda")
half = create_model("s14", random_init=True, device="cuda", dtype=torch.float16)
explicit = create_model("s14", random_init=True, device="cuda", dtype=torch.float16).set_fused_attention(False)
worst = 1.0
for b, t in ((1, 1), (4, 4), (32, 8), (2, 16), (1, 32)):
    x = torch.randn(b, t, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        r = ref(x).double().cpu().numpy()
        for name, m in (("fp16 sdpa", half), ("fp16 explicit (ONNX form)", explicit)):
            c = compare(r, m(x.half()).double().cpu().numpy())
            worst = min(worst, c.min_cosine)
            print(f"{b}x{t:<3} {name:<26} max abs {c.max_abs_error:.2e} min cos {c.min_cosine:.6f}")
print("worst cosine", worst)
sys.exit(0 if worst >= 0.999 else 1)
