"""Time FlashAttention-4's Hopper kernel (CuTe DSL, `flash-attn-4`) against the deferred blocks' q/k-norm
attention kernel at S/14's 32x8 shape (GPU; an experiment for issue 11).

FA4 takes normalised q and k, so its cases include the pass that writes them
(models.kernels.triton_kernels.qk_norm_rows; models.kernels.flash_attn4.qk_norm_attention is that pass and FA4).
GPU time of CUDA-graph replays per layer, error against float64 on the first two clips.

    python tools/bench_flash_attn4.py --output flash_attn4.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iv2trt.models.kernels import flash_attn4  # noqa: E402
from iv2trt.models.kernels import triton_kernels as tk  # noqa: E402
from tools.bench_cls_split import time_case  # noqa: E402
from tools.bench_qk_norm_attention import EPS, PART, D, H, parser, problem  # noqa: E402


def main() -> int:
    p = parser(__doc__.splitlines()[0], "flash_attn4.json")
    p.add_argument("--sweep", action="store_true", help="also the norm pass's tilings and FA4's tile options")
    args = p.parse_args()
    from flash_attn.cute.interface import _flash_attn_fwd

    B, N, C, part, scale, eps = args.batch, args.tokens, H * D, PART, D ** -0.5, EPS
    cuda = dict(device="cuda", dtype=torch.float16)
    folded, parts, ref = problem(B, N)[-3:]
    heads = folded.view(B, N, 3, H, D)
    v4 = heads[:, :, 2]
    out = torch.empty(B, N, H, D, **cuda)
    qkn_fixed = tk.qk_norm_rows(folded, parts, eps, eps)

    def fa4(q4, k4, v4, o4, **kw):
        return _flash_attn_fwd(q4, k4, v4, softmax_scale=scale, out=o4, **kw)[0]

    def split(qkn):
        qk = qkn.view(B, N, 2, H, D)
        return qk[:, :, 0], qk[:, :, 1]

    def fa4_case(**kw):
        def run():
            qn, kn = split(qkn_fixed)
            fa4(qn, kn, v4, out, **kw)
            return out.view(B, N, C)
        return run

    def patch_bound():
        qn, kn = split(qkn_fixed)
        return fa4(qn[:, 1:], kn[:, 1:], v4[:, 1:], None)

    cases = [("ours: qk_norm_attention (key norm + cls + attention)",
              lambda: tk.qk_norm_attention(folded, parts, H, scale, eps, eps), True),
             ("ours: the key-norm pass and cls merge alone", lambda: tk.key_norm(folded, parts, H, scale, eps, eps)[1],
              False),
             ("q/k norm rows pass alone", lambda: tk.qk_norm_rows(folded, parts, eps, eps), False),
             ("FA4 2049 x 2049, default tiles", fa4_case(), True),
             ("FA4 2048 x 2048 patches only (bound)", patch_bound, False)]
    flat = folded.view(B * N, 3 * C)
    qkn = torch.empty(B * N, 2 * C, **cuda)

    def rows_case(rows, cols, warps):
        def run():
            tk._qk_norm_rows_kernel[(triton.cdiv(B * N, rows),)](
                flat, parts, qkn, parts, B * N, flat.stride(0), parts.stride(0), qkn.stride(0), 1.0 / C, eps, eps, 1.0,
                C=C, PARTS=C // part, BR=rows, BC=cols, Q_SCALES=False, num_warps=warps)
        return run

    sweep = [(f"q/k norm rows pass: {rows} rows, {cols} columns, {warps} warps", rows_case(rows, cols, warps), False)
             for rows, cols, warps in ((16, 128, 4), (64, 128, 8), (32, 128, 8), (16, 128, 2), (8, 128, 1),
                                       (64, 64, 4), (128, 128, 8), (32, 64, 4))]
    for tile, rs, overlap in [((128, 128), True, True), ((192, 128), False, True), ((192, 128), True, False)]:
        sweep.append((f"FA4 2049 x 2049, tile {tile} rs={rs} overlap={overlap}",
                      fa4_case(tile_mn=tile, mma_pv_is_rs=rs, intra_wg_overlap=overlap), True))
    cases += sweep if args.sweep else []
    kn_fixed, scales_fixed = tk.key_norm_rows(folded, parts, eps, eps, scale * flash_attn4.LOG2E)

    def row_scaled():
        return flash_attn4.attend_row_scaled(heads[:, :, 0], kn_fixed.view(B, N, H, D), v4,
                                             scales_fixed).reshape(B, N, C)

    def model_path(row_scales):
        return lambda: flash_attn4.qk_norm_attention(folded, parts, H, scale, eps, eps, row_scales)

    cases += [("k norm rows pass alone (k and the queries' scales)",
               lambda: tk.key_norm_rows(folded, parts, eps, eps, scale * flash_attn4.LOG2E), False),
              ("FA4 with a softmax scale per query row, 2049 x 2049 (q as the product wrote it)", row_scaled, True),
              ("models.kernels.flash_attn4.qk_norm_attention, q/k norm pass + FA4", model_path(False), True),
              ("models.kernels.flash_attn4.qk_norm_attention, k norm pass + FA4 with row scales", model_path(True),
               True)]
    rows = []
    for name, fn, check in cases:
        row = {"case": name}
        try:
            got = fn()
            if check:
                err = got[:2].double() - ref
                row["max_err"] = err.abs().max().item()
                row["rel_err"] = (err.norm() / ref.norm()).item()
        except Exception as exc:  # a configuration this FA4 does not take: record it and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        if "error" not in row:
            row = time_case(fn, f"{name:60s}", **row)
            if "ms" in row:
                print(f"{'':60s} x12 {12 * row['ms']:.3f} ms  rel err {row.get('rel_err') or float('nan'):.2e}",
                      flush=True)
        else:
            print(f"{name:60s} {row['error'][:300]}", flush=True)
        rows.append(row)
    import flash_attn
    args.output.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "flash_attn_4": getattr(flash_attn, "__version__", "4.0.0b36"),
                                       "B": B, "N": N, "rows": rows}, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
