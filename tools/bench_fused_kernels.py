"""Time the fused path's Triton kernels against what they replace, at the S/14 32x8 shape (GPU only).

For each matrix product with a row-norm epilogue (qkv + q/k RMSNorm; proj and fc2 + residual, LayerScale
and the next RMSNorm), the baseline is cuBLAS plus TorchInductor's fused norm kernel (what the compiled
model runs today); the Triton kernel is swept over block and pipeline configurations. Attention: cuDNN over
[cls + 2048] tokens against the cls split. Prints a table and writes JSON.

    python tools/bench_fused_kernels.py --output fused_kernels.json
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


def gemm_cases(batch: int, tokens: int, dim: int, hidden: int):
    dev, dt = "cuda", torch.float16
    M = batch * tokens
    g = torch.Generator(device=dev).manual_seed(0)
    randn = lambda *s, std=1.0: (torch.randn(*s, device=dev, generator=g) * std).to(dt)  # noqa: E731
    ones = lambda n: (0.5 + torch.rand(n, device=dev, generator=g)).to(dt)  # noqa: E731

    x = randn(M, dim)
    w_qkv, qw, kw = randn(3 * dim, dim, std=0.05), ones(dim), ones(dim)

    def qkv_base(x):
        q, k, v = F.linear(x, w_qkv).chunk(3, -1)
        return torch.cat([F.rms_norm(q, (dim,), qw, 1e-6), F.rms_norm(k, (dim,), kw, 1e-6), v], -1)

    def qkv_ref():
        q, k, v = (x.float() @ w_qkv.float().T).chunk(3, -1)
        return torch.cat([rms(q, qw), rms(k, kw), v], -1)

    nw_qk = torch.cat([qw, kw])
    yield ("qkv + q/k RMSNorm", dim, torch.compile(qkv_base), (x,),
           lambda cfg: tk.linear_rownorm(x, w_qkv, None, width=dim, norm_weight=nw_qk, norm_sections=2, config=cfg),
           qkv_ref, 2 * M * dim * 3 * dim)
    for name, K in (("proj + residual + RMSNorm", dim), ("fc2 + residual + RMSNorm", hidden)):
        a, w, b = randn(M, K), randn(dim, K, std=0.05), randn(dim, std=0.1)
        res, gam, nw = randn(M, dim), (0.1 * ones(dim)).to(dt), ones(dim)

        def base(a, res, w=w, b=b, gam=gam, nw=nw):
            xo = torch.addcmul(res, F.linear(a, w, b), gam)
            return xo, F.rms_norm(xo, (dim,), nw, 1e-6)

        def ref(a=a, w=w, b=b, res=res, gam=gam, nw=nw):
            xo = res.float() + gam.float() * (a.float() @ w.float().T + b.float())
            return torch.cat([xo, rms(xo, nw)], -1)

        yield (name, K, torch.compile(base), (a, res),
               lambda cfg, a=a, w=w, b=b, res=res, gam=gam, nw=nw: torch.cat(
                   tk.linear_rownorm(a, w, b, width=dim, residual=res, gamma=gam, norm_weight=nw, config=cfg), -1),
               ref, 2 * M * dim * K)


def bench_gemms(args) -> list[dict]:
    rows = []
    configs = list(itertools.product((64, 128), (32, 64), (4, 8), (2, 3, 4)))
    for name, K, base, base_args, fused, ref, flops in gemm_cases(args.batch, args.tokens, 384, 1536):
        expected = ref()
        base_out = base(*base_args)
        base_out = torch.cat(base_out, -1) if isinstance(base_out, tuple) else base_out
        row = {"case": name, "K": K, "base_ms": median_ms(lambda: base(*base_args)),
               "base_max_err": (base_out.float() - expected).abs().max().item(), "configs": []}
        for cfg in configs:
            try:
                out = fused(cfg)
                err = (out.float() - expected).abs().max().item()
                ms = median_ms(lambda: fused(cfg))
                row["configs"].append({"config": cfg, "ms": ms, "max_err": err, "tflops": flops / ms / 1e9})
            except Exception as exc:  # out of shared memory or registers: a result too
                row["configs"].append({"config": cfg, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
        ok = [c for c in row["configs"] if "ms" in c]
        row["best"] = min(ok, key=lambda c: c["ms"]) if ok else None
        rows.append(row)
        best = row["best"]
        print(f"{name:28s} K={K:5d} base {row['base_ms']:.4f} ms (err {row['base_max_err']:.2e})  "
              f"triton best {best['ms']:.4f} ms {best['config']} (err {best['max_err']:.2e}, "
              f"{best['tflops']:.0f} TFLOP/s)" if best else "no config ran", flush=True)
        for c in sorted(ok, key=lambda c: c["ms"])[:6]:
            print(f"    {c['config']}: {c['ms']:.4f} ms", flush=True)
    return rows


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
        "cuDNN 2048 q x 2048 kv with LSE": lambda: with_lse(1),
        "cuDNN 2049 q x 2048 kv with LSE": lambda: with_lse(0),
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
    p.add_argument("--gemms", action="store_true", help="also sweep the Triton matrix products with row-norm epilogues")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "batch": args.batch, "tokens": args.tokens}
    results["attention"] = bench_attention(args)
    if args.gemms:
        results["gemms"] = bench_gemms(args)
    args.output.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
