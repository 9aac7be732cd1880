"""Time the deferred blocks' q/k-norm attention kernel against what it replaces, at S/14's 32x8 shape (GPU).

Before: the q/k RMSNorm (compiled, as in the model) and the cls split (cuDNN + merge,
models.kernels.triton_kernels.attention_cls_split). After: models.kernels.triton_kernels.qk_norm_attention, which takes
the qkv product's raw rows and sums of squares, over a sweep of tiles. GPU time of CUDA-graph replays per layer,
error against float64 on the first two clips.

    python tools/bench_qk_norm_attention.py --output qk_norm_attention.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iv2trt.models.kernels import triton_kernels as tk  # noqa: E402
from tools.bench_cls_split import time_case  # noqa: E402

CONFIGS = [(128, 128, 4, 3), (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 3), (256, 128, 8, 2)]
H, D, PART, EPS = 6, 64, 192, 1e-6  # S/14's attention: 6 heads of 64, sums of squares in 192-column parts


def parser(description: str, output: str) -> argparse.ArgumentParser:
    """The arguments of this tool and tools/bench_flash_attn4.py: --batch and --tokens (S/14 at 32x8 by default),
    --output (default `output`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=2049)
    p.add_argument("--output", type=Path, default=Path(output))
    return p


def reference(q, k, v, wq, wk, heads, scale, eps, clips=2):
    N, C = q.shape[1:]
    rms = lambda x, w: x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w.double()  # noqa: E731
    q, k = rms(q[:clips].double(), wq), rms(k[:clips].double(), wk)
    q, k, v = (t.reshape(clips, N, heads, -1).transpose(1, 2) for t in (q, k, v[:clips].double()))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(clips, N, C)


def inputs(B: int, N: int, C: int, part: int) -> tuple:
    """Random fp16 q, k, v [B, N, C] and norm weights; the qkv product's rows with the weights folded in and their
    sums of squares without them, in parts of `part` columns (what the deferred blocks' attention takes)."""
    torch.manual_seed(0)
    cuda = dict(device="cuda", dtype=torch.float16)
    q, k, v = (torch.randn(B, N, C, **cuda) * 2 for _ in range(3))
    wq, wk = (torch.rand(C, device="cuda") + 0.5 for _ in range(2))
    folded = torch.cat([q * wq, k * wk, v], -1).half()
    parts = torch.stack([t.square().sum(-1) for t in torch.cat([q, k, v], -1).float().reshape(B * N, 3 * C)
                         .split(part, -1)], -1)
    return q, k, v, wq, wk, folded, parts


def problem(B: int, N: int) -> tuple:
    """inputs() at [B, N] of S/14's width (H heads of D, parts of PART columns) and their float64 reference on the
    first two clips (softmax scale D ** -0.5, eps EPS): q, k, v, wq, wk, folded, parts, reference."""
    q, k, v, wq, wk, folded, parts = inputs(B, N, H * D, PART)
    return q, k, v, wq, wk, folded, parts, reference(q, k, v, wq, wk, H, D ** -0.5, EPS)


def main() -> int:
    args = parser(__doc__.splitlines()[0], "qk_norm_attention.json").parse_args()
    B, N, C, scale, eps = args.batch, args.tokens, H * D, D ** -0.5, EPS
    cuda = dict(device="cuda", dtype=torch.float16)
    q, k, v, wq, wk, folded, parts, ref = problem(B, N)
    qkv = torch.cat([q, k, v], -1)  # before: the norms' input
    wq16, wk16 = wq.half(), wk.half()

    @torch.compile
    def qk_norm(qkv):
        q, k, v = qkv.chunk(3, -1)
        q, k = F.rms_norm(q, (C,), wq16, eps), F.rms_norm(k, (C,), wk16, eps)
        return [t.reshape(B, N, H, D).transpose(1, 2) for t in (q, k, v)]

    def before():
        return tk.attention_cls_split(*qk_norm(qkv), scale)

    from triton.tools.tensor_descriptor import TensorDescriptor

    from tools.bench_attention_kernels import LOG2E, _fa_tma
    flat = qkv.view(B * N, 3 * C)
    out = torch.zeros(B, N, C, **cuda)
    descs = [TensorDescriptor.from_tensor(t, [bm, D]) for t, bm in ((flat, 128), (flat, 64), (out.view(B * N, C), 128))]

    def third_pass():  # tools/bench_attention_kernels.py's kernel: no norms, no cls query
        _fa_tma[((N - 1) // 128, B * H)](*descs, qkv, N, H, C, scale * LOG2E, qkv.stride(0), D=D, BM=128, BN=64,
                                         EXP16=False, SUM16=False, WS=False, STAGES=4, num_warps=4)
        return None

    cases = [("before: q/k norm (compiled)", lambda: qk_norm(qkv), None, True),
             ("before: q/k norm + cls split", before, None, True),
             ("third pass's kernel: no norms, no cls", third_pass, None, False)]

    def after(cfg=CONFIGS[0], **kw):
        return lambda: tk.qk_norm_attention(folded, parts, H, scale, eps, eps, config=cfg, **kw)

    cases += [(f"after: qk_norm_attention {cfg}", after(cfg), cfg, True) for cfg in CONFIGS]
    cases += [(f"after: {CONFIGS[0]}, key norm {rows} rows a program", after(key_norm_rows=rows), CONFIGS[0], True)
              for rows in (16, 64)]
    rows = []
    for name, fn, cfg, with_cls in cases:
        row = {"case": name, "config": cfg}
        try:
            got = fn()
            if isinstance(got, torch.Tensor) and got.shape == (B, N, C):
                first = 0 if with_cls else 1
                err = (got[:2].double() - ref)[:, first:]
                row["max_err"] = err.abs().max().item()
                row["rel_err"] = (err.norm() / ref[:, first:].norm()).item()
                row["cls_max_err"] = err[:, 0].abs().max().item() if with_cls else None
        except Exception as exc:  # a tile this Triton cannot compile: record it and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if "error" not in row:
            row = time_case(fn, f"{name:48s}", **row)
            if "ms" in row:
                row["ms_x12"] = 12 * row["ms"]
                print(f"{'':48s} x12 {row['ms_x12']:.3f} ms  rel err {row.get('rel_err') or float('nan'):.2e}  "
                      f"cls max err {row.get('cls_max_err') or float('nan'):.2e}", flush=True)
        else:
            print(f"{name:48s} {row['error'][:200]}", flush=True)
        rows.append(row)
    args.output.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "triton": __import__("triton").__version__, "B": B, "N": N,
                                       "rows": rows}, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
