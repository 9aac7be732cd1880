"""Experiment: the block's matrix products with the norms in their epilogues (quack) against cuBLAS (GPU only).

Per product at M = 65,568 tokens (32x8) and the half batch of two graph streams: today's cuBLAS call and
the models.kernels.quack_gemms op that replaces it (its fixed tiles), and the same epilogue under other tiles, with
each op's error against the same arithmetic in float32. Then one whole block at
[32, 2049, 384] fp16, compiled: the block as written against the deferred-norm block, both against the
block in float32. GPU time of CUDA-graph replays.

    python tools/bench_quack_gemms.py --output quack_gemms.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iv2trt.models import deferred_norm
from iv2trt.models.config import VisionConfig  # noqa: E402
from iv2trt.models.internvideo2_clip import Block  # noqa: E402
from iv2trt.models.kernels import fused_ops  # noqa: E402
from tools.bench_cls_split import graph_ms, rotation, time_case  # noqa: E402

CANDIDATES = {}  # label -> quack GemmConfig, filled in main once quack imports


def hopper_candidates():
    from quack.gemm_config import GemmConfig
    common = dict(is_dynamic_persistent=False, device_capacity=9)

    def config(tile_m, cluster_m, cluster_n, pingpong=True, tile_n=192, **kw):
        return GemmConfig(tile_m=tile_m, tile_n=tile_n, pingpong=pingpong, cluster_m=cluster_m, cluster_n=cluster_n,
                          **common, **kw)

    return {
        "128x192 pp 1x2": config(128, 1, 2),
        "128x192 pp 2x1": config(128, 2, 1),
        "128x192 pp 2x2": config(128, 2, 2),
        "128x192 pp 4x1": config(128, 4, 1),
        "256x192 coop 1x2": config(256, 1, 2, pingpong=False),
        "256x192 coop 2x1": config(256, 2, 1, pingpong=False),
        "256x192 coop 2x2": config(256, 2, 2, pingpong=False),
        "128x192 pp 2x1 tile_k 128": config(128, 2, 1, tile_k=128),
        "128x192 pp 2x1 swizzle 2": config(128, 2, 1, max_swizzle_size=2),
        "128x192 pp 2x1 swizzle 16": config(128, 2, 1, max_swizzle_size=16),
        "128x128 pp 2x1": config(128, 2, 1, tile_n=128),
        "256x128 coop 1x2": config(256, 1, 2, pingpong=False, tile_n=128),
    }


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def products(qg, M: int, C: int, rows: list) -> None:
    cuda = dict(device="cuda", dtype=torch.float16)
    x = [torch.randn(M, C, **cuda) for _ in range(3)]
    h = [torch.randn(M, 4 * C, **cuda) for _ in range(2)]
    res = [torch.randn(M, C, **cuda) for _ in range(3)]
    w = {name: torch.randn(n, k, **cuda) * k ** -0.5
         for name, n, k in (("qkv", 3 * C, C), ("proj", C, C), ("fc1", 4 * C, C), ("fc2", C, 4 * C))}
    b = {name: torch.randn(t.shape[0], **cuda) for name, t in w.items()}
    rstd = torch.rand(M, device="cuda") + 0.5
    unfold = torch.rand(3 * C, device="cuda") + 0.5
    scale = torch.rand(C, device="cuda")
    shift = torch.randn(C, device="cuda")
    pick = rotation()

    ref = deferred_norm.TorchGemms
    f32 = {k: v.float() for k, v in w.items()}
    checks = {
        "qkv": (lambda: qg.row_scaled(x[0], w["qkv"], rstd), lambda: ref.row_scaled(x[0].float(), f32["qkv"], rstd)),
        "proj": (lambda: qg.residual_rms(x[0], w["proj"], scale, shift, res[0]),
                 lambda: ref.residual_rms(x[0].float(), f32["proj"], scale, shift, res[0].float())),
        "fc1": (lambda: qg.row_scaled_gelu(x[0], w["fc1"], rstd, b["fc1"]),
                lambda: ref.row_scaled_gelu(x[0].float(), f32["fc1"], rstd, b["fc1"])),
        "fc2": (lambda: qg.residual_rms(h[0], w["fc2"], scale, shift, res[0]),
                lambda: ref.residual_rms(h[0].float(), f32["fc2"], scale, shift, res[0].float())),
    }
    for name, (fn, reference) in checks.items():
        row = {"M": M, "case": f"quack {name} error"}
        try:
            out, want = fn(), reference()
            if isinstance(out, tuple):
                row["rel_err"] = rel_err(out[0], want[0])
                row["sqsum_rel_err"] = rel_err(out[1].sum(-1), want[1].sum(-1))
            else:
                row["rel_err"] = rel_err(out, want)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        print(f"M={M:6d} {row['case']:28s} {row.get('rel_err', row.get('error'))} {row.get('sqsum_rel_err', '')}",
              flush=True)

    def quack(mod, a, name, c=None, config=None, **ops):
        n = w[name].shape[0]
        out = torch.empty(M, n, **cuda)
        if mod in (qg._residual_rms, qg._row_scaled_sums):
            ops["sqsum"] = torch.empty(M, -(-n // config.tile_n), device="cuda")
        return lambda: qg._launch(mod, pick(a), w[name], out, None if c is None else pick(c), config, **ops)

    cases = {
        "cublas qkv mm": lambda: pick(x) @ w["qkv"].t(),
        "quack  qkv row_scaled (op)": lambda: qg.row_scaled(pick(x), w["qkv"], rstd),
        "quack  qkv row_scaled_sums (op)": lambda: qg.row_scaled_sums(pick(x), w["qkv"], rstd, unfold),
        "cublas proj addmm bias": lambda: torch.addmm(b["proj"], pick(x), w["proj"].t()),
        "quack  proj residual_rms (op)": lambda: qg.residual_rms(pick(x), w["proj"], scale, shift, pick(res)),
        "cublas fc1 gelu+bias (lt)": lambda: torch._addmm_activation(b["fc1"], pick(x), w["fc1"].t(), use_gelu=True),
        "quack  fc1 row_scaled_gelu (op)": lambda: qg.row_scaled_gelu(pick(x), w["fc1"], rstd, b["fc1"]),
        "cublas fc2 addmm bias": lambda: torch.addmm(b["fc2"], pick(h), w["fc2"].t()),
        "quack  fc2 residual_rms (op)": lambda: qg.residual_rms(pick(h), w["fc2"], scale, shift, pick(res)),
    }
    for label, config in CANDIDATES.items():
        cases[f"quack  qkv sums {label}"] = quack(qg._row_scaled_sums, x, "qkv", config=config, rstd=rstd,
                                                  unfold=unfold)
        cases[f"quack  proj {label}"] = quack(qg._residual_rms, x, "proj", res, config, scale=scale, shift=shift)
        cases[f"quack  fc1 {label}"] = quack(qg._row_scaled_gelu, x, "fc1", config=config, rstd=rstd, bias=b["fc1"])
        cases[f"quack  fc2 {label}"] = quack(qg._residual_rms, h, "fc2", res, config, scale=scale, shift=shift)
    for name, fn in cases.items():
        rows.append(time_case(fn, f"M={M:6d} {name:40s}", M=M, case=name))


def blocks(qg, rows: list, batch: int) -> None:
    cfg = VisionConfig()
    torch.manual_seed(0)
    block = Block(cfg).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape))
            elif name.endswith("gamma"):
                p.copy_(0.1 + 0.05 * torch.randn(p.shape))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape))
    ref_block = block.float().cuda()
    x = torch.randn(batch, 2049, cfg.embed_dim, device="cuda")
    with torch.no_grad():
        want = ref_block(x)
    fp16 = copy.deepcopy(ref_block).half()
    fp16.attn.cls_split = fused_ops.available(torch.device("cuda"), torch.float16)
    xh = x.half()
    plain = torch.compile(fp16)
    deferred = copy.deepcopy(fp16)
    deferred.gemms = qg.QuackGemms
    deferred_norm.fold(deferred)
    run_deferred = torch.compile(lambda t: deferred.forward_deferred(t, deferred_norm.sum_of_squares(t))[0])
    for name, fn in (("block as written, compiled", lambda: plain(xh)),
                     ("deferred-norm block (quack), compiled", lambda: run_deferred(xh)),
                     ("deferred-norm block (quack), eager", lambda: deferred.forward_deferred(
                         xh, deferred_norm.sum_of_squares(xh))[0])):
        row = {"batch": batch, "case": name}
        try:
            with torch.no_grad():
                row["rel_err"] = rel_err(fn(), want)
                row["ms"] = graph_ms(fn)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        rows.append(row)
        print(f"block B={batch} {name:40s} {row.get('ms', 0) * 1e3:8.1f} us  rel err {row.get('rel_err')} "
              f"{row.get('error', '')}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path("quack_gemms.json"))
    p.add_argument("--rows", type=int, nargs="+", default=[32 * 2049, 16 * 2049, 2 * 2049, 2049],
                   help="products' rows M (default: 32x8, its half, 2x8, 1x8)")
    p.add_argument("--no-blocks", action="store_true", help="the products alone, not the whole block")
    args = p.parse_args()
    if fused_ops.quack_gemms(torch.device("cuda"), torch.float16) is None:
        print("quack's products do not serve this machine (not a Hopper GPU, or quack missing / turned off)")
        return 1
    from iv2trt.models.kernels import quack_gemms as qg
    CANDIDATES.update(hopper_candidates())
    torch.manual_seed(0)
    rows: list = []
    for M in args.rows:
        products(qg, M, 384, rows)
    for batch in () if args.no_blocks else (32, 16):
        blocks(qg, rows, batch)
    args.output.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
