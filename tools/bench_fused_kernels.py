"""Time the fused path's Triton kernels against what they replace, at the S/14 32x8 shape (GPU only).

Attention: cuDNN over [cls + 2048] tokens against the cls split (both query variants) and the merge kernel
over block sizes. With --qkv: the qkv projection + q/k RMSNorm, cuBLAS plus TorchInductor's fused norm
kernel (what the compiled model ran before) against the Triton kernel over a few configurations. GPU time
of CUDA-graph replays. Prints a table and writes JSON.

    python tools/bench_fused_kernels.py --qkv --output fused_kernels.json
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
from models import triton_kernels as tk  # noqa: E402


def median_ms(fn, repeats: int = 20, calls: int = 10) -> float:
    """GPU time of fn: `calls` calls captured in one CUDA graph, replayed `repeats` times (median / calls),
    so host-side launch cost is not counted."""
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
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def rms(x, w, eps=1e-6):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def qkv_case(batch: int, tokens: int, dim: int, buffers: int = 8):
    """The qkv projection + q/k RMSNorm: (baseline fn, fused fn of (config, rows_major), fp32 reference, flops).
    Successive calls read `buffers` different inputs in turn, so the input is not in L2 (as in the model,
    where it was written by the norm kernel)."""
    dev, dt = "cuda", torch.float16
    M = batch * tokens
    g = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(M, dim, device=dev, generator=g).to(dt) for _ in range(buffers)]
    turn = [0]

    def next_x():
        turn[0] = (turn[0] + 1) % buffers
        return xs[turn[0]]

    w_qkv = (torch.randn(3 * dim, dim, device=dev, generator=g) * 0.05).to(dt)
    qw, kw = ((0.5 + torch.rand(dim, device=dev, generator=g)).to(dt) for _ in range(2))

    def base_fn(x):
        q, k, v = F.linear(x, w_qkv).chunk(3, -1)
        return torch.cat([F.rms_norm(q, (dim,), qw, 1e-6), F.rms_norm(k, (dim,), kw, 1e-6), v], -1)

    compiled = torch.compile(base_fn)

    def ref():
        q, k, v = (xs[0].float() @ w_qkv.float().T).chunk(3, -1)
        return torch.cat([rms(q, qw), rms(k, kw), v], -1)

    return (lambda first=False: compiled(xs[0] if first else next_x()),
            lambda cfg, rows_major, first=False: tk.qkv_rmsnorm(xs[0] if first else next_x(), w_qkv, None, qw, kw,
                                                                1e-6, config=cfg, rows_major=rows_major),
            ref, 2 * M * dim * 3 * dim)


def bench_qkv(args) -> dict:
    """cuBLAS + TorchInductor's q/k norm (what the compiled model ran before) against the Triton kernel over
    a few configurations and both program orders; error against fp32."""
    configs = [(128, 32, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 8, 4), (64, 64, 4, 4), (64, 32, 8, 4)]
    base, fused, ref, flops = qkv_case(args.batch, args.tokens, 384)
    expected = ref()
    row = {"case": "qkv + q/k RMSNorm", "base_ms": median_ms(base),
           "base_max_err": (base(first=True).float() - expected).abs().max().item(), "configs": []}
    print(f"qkv + q/k RMSNorm: cuBLAS + Inductor norm {row['base_ms']:.4f} ms (max err {row['base_max_err']:.2e})")
    for cfg, rows_major in itertools.product(configs, (True, False)):
        entry = {"config": cfg, "rows_major": rows_major}
        try:
            entry["max_err"] = (fused(cfg, rows_major, first=True).float() - expected).abs().max().item()
            entry["ms"] = median_ms(lambda: fused(cfg, rows_major))
            entry["tflops"] = flops / entry["ms"] / 1e9
        except Exception as exc:  # out of shared memory or registers: a result too
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        row["configs"].append(entry)
        print(f"    Triton {cfg} rows_major={rows_major}: " + (
            f"{entry['ms']:.4f} ms, {entry['tflops']:.0f} TFLOP/s, max err {entry['max_err']:.2e}"
            if "ms" in entry else entry["error"]), flush=True)
    return row


def _config_of(name: str):
    return tuple(int(x) for x in name.split("(")[1].rstrip(")").split(",")) if "alone (" in name and "," in name \
        else None


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

    def q2048_kv2049():
        return torch.cat([flat(F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=scale)),
                          flat(cudnn(q[:, :, 1:], k, v))], 1)

    def with_lse(queries_from):
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q[:, :, queries_from:], k[:, :, 1:], v[:, :, 1:], None, True, 0.0, False, False, scale=scale)[:2]
        return o, lse.reshape(B, H, N - queries_from)

    o_all, lse_all = with_lse(0)
    cases = {
        "cuDNN, 2049 tokens (today)": lambda: flat(cudnn(q, k, v)),
        "cuDNN, 2048 tokens (bound)": lambda: flat(cudnn(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:])),
        "cuDNN 2048 q x 2048 kv with LSE": lambda: with_lse(1)[0],
        "cuDNN 2049 q x 2048 kv with LSE": lambda: with_lse(0)[0],
        "cls query alone (SDPA)": lambda: F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=scale),
        "2048 q x 2049 kv + cls query + cat": q2048_kv2049,
        "cls split, patch queries": lambda: tk.attention_cls_split(q, k, v, scale, queries="patches"),
        "cls split, all queries": lambda: tk.attention_cls_split(q, k, v, scale, queries="all"),
    }
    for cfg in itertools.product((32, 64, 128, 256), (2, 4, 8)):
        cases[f"  merge kernel alone {cfg}"] = lambda cfg=cfg: tk.cls_merge(o_all, lse_all, q, k, v, None, scale,
                                                                           config=cfg)
    rows = []
    for name, fn in cases.items():
        row = {"case": name, "config": list(cfg) if (cfg := _config_of(name)) else None}
        try:
            out = fn()
            if out.dim() == 3 and out.shape[1] == N:
                row["max_err"] = (out[:2].float() - ref).abs().max().item()
                row["rel_err"] = ((out[:2].float() - ref).norm() / ref.norm()).item()
            row["ms"] = median_ms(fn)
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
    p.add_argument("--output", type=Path, default=Path("fused_kernels.json"))
    p.add_argument("--qkv", action="store_true", help="also time the qkv projection + q/k norm kernel")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "batch": args.batch, "tokens": args.tokens}
    results["attention"] = bench_attention(args)
    if args.qkv:
        results["qkv"] = bench_qkv(args)
    args.output.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
