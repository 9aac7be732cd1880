"""Time the cls-split attention against cuDNN over all [cls + 2048] tokens, at S/14's 32x8 shape (GPU only).

Cases: cuDNN over 2,049 tokens (the model before), over 2,048 (the bound), cuDNN's part of the cls split,
the whole split, and the merge kernel alone over block sizes. GPU time of CUDA-graph replays; error against
float32. Prints a line per case and writes JSON.

    python tools/bench_cls_split.py --output cls_split.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iv2trt.bench.profile import median_ms  # noqa: E402
from iv2trt.models.kernels import triton_kernels as tk  # noqa: E402


def graph_ms(fn, repeats: int = 20, calls: int = 10) -> float:
    """GPU time of fn: `calls` calls captured in one CUDA graph, its replays timed by bench_profile.median_ms
    (divided by `calls`), so host-side launch cost is not counted."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(torch, graph.replay, repeats) / calls


def rotation():
    """pick(tensors): the next of the tensors on each call, so a timed product's inputs are not still in L2."""
    calls = itertools.count(1)
    return lambda tensors: tensors[next(calls) % len(tensors)]


def time_case(fn, label: str, **row) -> dict:
    """row with graph_ms(fn) as "ms" (or, for a case that cannot run, the error), printed after label."""
    try:
        row["ms"] = graph_ms(fn)
    except Exception as exc:  # a kernel that does not compile or run here: record it and go on
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    shown = f"{row['ms'] * 1e3:8.1f} us" if "ms" in row else row["error"]
    print(f"{label} {shown}", flush=True)
    return row


def bench_attention(args) -> list[dict]:
    B, N, H, D = args.batch, args.tokens, 6, 64
    C = H * D
    scale = D ** -0.5
    qkv = torch.randn(B, N, 3 * C, device="cuda", dtype=torch.float16)
    q, k, v = (t.reshape(B, N, H, D).transpose(1, 2) for t in qkv.chunk(3, -1))
    ref = F.scaled_dot_product_attention(q[:2].float(), k[:2].float(), v[:2].float(), scale=scale)
    ref = ref.transpose(1, 2).reshape(2, N, C)

    def flat(o):
        return o.transpose(1, 2).reshape(o.shape[0], -1, C)

    def cudnn(q, k, v):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False,
                                                                 scale=scale)[0]

    o_all, lse_all = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k[:, :, 1:], v[:, :, 1:], None, True, 0.0, False, False, scale=scale)[:2]
    lse_all = lse_all.reshape(B, H, N)
    cases = [
        ("cuDNN, 2049 tokens (before)", lambda: flat(cudnn(q, k, v)), None),
        ("cuDNN, 2048 tokens (bound)", lambda: flat(cudnn(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:])), None),
        ("cuDNN, 2049 queries x 2048 keys, with LSE", lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k[:, :, 1:], v[:, :, 1:], None, True, 0.0, False, False, scale=scale)[0], None),
        ("cls split (the above + merge)", lambda: tk.attention_cls_split(q, k, v, scale), None),
    ]
    cases += [(f"  merge kernel alone {cfg}", lambda cfg=cfg: tk.cls_merge(o_all, lse_all, q, k, v, scale, config=cfg),
               cfg) for cfg in itertools.product((32, 64, 128, 256), (2, 4, 8))]
    rows = []
    for name, fn, cfg in cases:
        row = {"case": name, "config": cfg}
        try:
            out = fn()
            if out.dim() == 3 and out.shape[1] == N:
                row["max_err"] = (out[:2].float() - ref).abs().max().item()
                row["rel_err"] = ((out[:2].float() - ref).norm() / ref.norm()).item()
            row["ms"] = graph_ms(fn)
            row["ms_per_forward"] = 12 * row["ms"]
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(f"{name:45s} " + (f"{row['ms']:.4f} ms  x12 {row['ms_per_forward']:.2f} ms  "
                                f"rel err {row.get('rel_err', float('nan')):.1e}" if "ms" in row else row["error"]),
              flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=2049)
    p.add_argument("--output", type=Path, default=Path("cls_split.json"))
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "batch": args.batch, "tokens": args.tokens}
    results["attention"] = bench_attention(args)
    args.output.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
