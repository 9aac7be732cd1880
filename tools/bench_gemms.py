"""Experiment: S/14's four matrix products at 32x8 under cuBLAS/cuBLASLt variants (GPU only).

For qkv, proj, fc1 (+bias+GELU) and fc2 at M = 65,568 tokens (and the half batch of two graph streams):
weight layout (the nn.Linear weight transposed as a view, or a contiguous [K, N] copy), bias in the
epilogue or not, the residual added by the product itself (addmm with beta=1 into the residual), and
torch's BLAS library choice. GPU time of CUDA-graph replays (inputs rotated so they do not sit in L2).

    python tools/bench_gemms.py --output gemms.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_cls_split import rotation, time_case  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path("gemms.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    C, rows = 384, []
    for M in (32 * 2049, 16 * 2049):
        x = [torch.randn(M, C, device="cuda", dtype=torch.float16) for _ in range(3)]
        h = [torch.randn(M, 4 * C, device="cuda", dtype=torch.float16) for _ in range(2)]
        res = [torch.randn(M, C, device="cuda", dtype=torch.float16) for _ in range(3)]
        w = {name: torch.randn(n, k, device="cuda", dtype=torch.float16) * k ** -0.5
             for name, n, k in (("qkv", 3 * C, C), ("proj", C, C), ("fc1", 4 * C, C), ("fc2", C, 4 * C))}
        b = {name: torch.randn(t.shape[0], device="cuda", dtype=torch.float16) for name, t in w.items()}
        wt = {name: t.t().contiguous() for name, t in w.items()}  # [K, N]
        pick = rotation()

        cases = {
            "qkv  mm W.t()": lambda: pick(x) @ w["qkv"].t(),
            "qkv  mm Wt(contig)": lambda: pick(x) @ wt["qkv"],
            "proj addmm bias W.t()": lambda: torch.addmm(b["proj"], pick(x), w["proj"].t()),
            "proj addmm bias Wt": lambda: torch.addmm(b["proj"], pick(x), wt["proj"]),
            "proj mm W.t()": lambda: pick(x) @ w["proj"].t(),
            "proj residual addmm_ (beta=1) W.t()": lambda: pick(res).addmm_(pick(x), w["proj"].t()),
            "proj residual addmm_ (beta=1) Wt": lambda: pick(res).addmm_(pick(x), wt["proj"]),
            "fc1  gelu+bias W.t()": lambda: torch._addmm_activation(b["fc1"], pick(x), w["fc1"].t(), use_gelu=True),
            "fc1  gelu+bias Wt": lambda: torch._addmm_activation(b["fc1"], pick(x), wt["fc1"], use_gelu=True),
            "fc1  bias W.t()": lambda: torch.addmm(b["fc1"], pick(x), w["fc1"].t()),
            "fc1  bias Wt": lambda: torch.addmm(b["fc1"], pick(x), wt["fc1"]),
            "fc2  addmm bias W.t()": lambda: torch.addmm(b["fc2"], pick(h), w["fc2"].t()),
            "fc2  addmm bias Wt": lambda: torch.addmm(b["fc2"], pick(h), wt["fc2"]),
            "fc2  residual addmm_ (beta=1) W.t()": lambda: pick(res).addmm_(pick(h), w["fc2"].t()),
            "fc2  residual addmm_ (beta=1) Wt": lambda: pick(res).addmm_(pick(h), wt["fc2"]),
        }
        for lib in ("default", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            for name, fn in cases.items():
                rows.append(time_case(fn, f"M={M:6d} {lib:8s} {name:40s}", M=M, lib=lib, case=name))
        torch.backends.cuda.preferred_blas_library("default")
    args.output.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
