"""Time the patch embedding's forms at S/14's 32x8 shape (GPU): the fused path's patch matmul (the im2col copy
with each patch row padded to a multiple of 8, then cuBLAS; compiled, as in the model; PatchEmbed.patch_matmul)
against its earlier form (K padded to 592) and cuDNN's stride-14 convolution on NCHW and on channels-last frames.
GPU time of CUDA-graph replays, error against float32.

    python tools/bench_patch_embed.py --output patch_embed.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iv2trt.models.config import load_vision_config  # noqa: E402
from iv2trt.models.internvideo2_clip import PatchEmbed  # noqa: E402
from tools.bench_cls_split import time_case  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--output", type=Path, default=Path("patch_embed.json"))
    args = p.parse_args()
    cfg = load_vision_config("s14")
    torch.manual_seed(0)
    embed = PatchEmbed(cfg).cuda()
    x = torch.randn(args.batch, args.frames, 3, cfg.img_size, cfg.img_size, device="cuda")
    with torch.no_grad():
        ref = F.conv2d(x.flatten(0, 1), embed.proj.weight[:, :, 0], embed.proj.bias, stride=cfg.patch_size)
        ref = ref.flatten(2).transpose(1, 2).reshape(args.batch, -1, cfg.embed_dim).double()
    half = copy.deepcopy(embed).half()
    xh = x.half()
    w2 = half.proj.weight[:, :, 0].contiguous()
    p_, dim = cfg.patch_size, cfg.embed_dim
    model_pad = -p_ % 8  # what PatchEmbed.forward pads each patch row by on a GPU

    def conv(frames):
        y = F.conv2d(frames, w2, half.proj.bias, stride=cfg.patch_size)
        return y.flatten(2).transpose(1, 2).reshape(args.batch, -1, dim)

    @torch.compile
    def k_padded(x):  # the model's form before 48f4996: K = 588 padded to 592 after the im2col copy
        B, T, C, H, W = x.shape
        patches = x.reshape(B * T, C, H // p_, p_, W // p_, p_).permute(0, 2, 4, 1, 3, 5).reshape(-1, C * p_ * p_)
        pad = (0, -patches.shape[1] % 8)
        weight = F.pad(half.proj.weight.reshape(dim, -1), pad)
        return F.linear(F.pad(patches, pad), weight, half.proj.bias).reshape(B, -1, dim)

    patch_matmul, conv_compiled = torch.compile(half.patch_matmul), torch.compile(conv)
    cases = [("patch matmul, K 588 padded to 592 (before 48f4996)", lambda: k_padded(xh)),
             (f"patch matmul, patch rows padded by {model_pad} (the model's)", lambda: patch_matmul(xh, model_pad)),
             ("cuDNN conv, NCHW frames", lambda: conv(xh.flatten(0, 1))),
             ("cuDNN conv, compiled", lambda: conv_compiled(xh.flatten(0, 1))),
             ("cuDNN conv, channels-last copy first",
              lambda: conv(xh.flatten(0, 1).contiguous(memory_format=torch.channels_last)))]
    rows = []
    with torch.no_grad():
        for name, fn in cases:
            row = {"case": name}
            try:
                got = fn()
                row["rel_err"] = ((got.double() - ref).norm() / ref.norm()).item()
            except Exception as exc:  # a form this torch cannot run: record it and go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if "error" not in row:
                row = time_case(fn, f"{name:48s}", **row)
            else:
                print(f"{name:48s} {row['error']}")
            rows.append(row)
    args.output.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "shape": [args.batch, args.frames], "rows": rows}, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
