#!/usr/bin/env python3
"""Independent check: our model and ONNX graph against upstream's own InternVideo2 code.

Needs a checkout of OpenGVLab/InternVideo (not vendored here). Upstream's module imports flash_attn,
timm and einops at import time; none of them is used on its non-fused path, so this script stands in
minimal import stubs for them and builds upstream's `InternVideo2` with use_flash_attn = use_fused_rmsnorm
= use_fused_mlp = False. Upstream's weights are random (its own initialisation, seed chosen here, never
seen by our code), saved in upstream's full-CLIP layout, loaded by our loader, and compared:
  T = trained frames (video path), T = 1 (use_image=True, the image path),
  other T: upstream model configured for T frames with its pos_embed resampled by upstream's
  `interpolate_pos_embed` (what upstream does for a checkpoint trained at another frame count).

    python tools/check_against_upstream.py --upstream /path/to/InternVideo [--onnx build/x.onnx]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iv2trt.compare import compare  # noqa: E402
from iv2trt.models import create_model, load_vision_config  # noqa: E402

BACKBONE_DIR = "InternVideo2/multi_modality/models/backbones/internvideo2"


def _stub_modules() -> None:
    """Import-time stand-ins for packages that upstream's non-fused path never calls."""
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    def trunc_normal_(tensor, std=1.0, **_):
        with torch.no_grad():
            return tensor.normal_(0, std).clamp_(-2 * std, 2 * std)

    class Unused(nn.Module):
        def __init__(self, *a, **k):
            raise RuntimeError("fused module requested: the check must run upstream's non-fused path")

    module("timm"); module("timm.models")
    module("timm.models.layers", DropPath=nn.Identity, to_2tuple=lambda x: x if isinstance(x, tuple) else (x, x),
           trunc_normal_=trunc_normal_)
    module("timm.models.registry", register_model=lambda f: f)
    module("einops", rearrange=None)
    module("flash_attn"); module("flash_attn.modules")
    module("flash_attn.modules.mlp", FusedMLP=Unused); module("flash_attn.ops")
    module("flash_attn.ops.rms_norm", DropoutAddRMSNorm=Unused)


def load_upstream(root: Path):
    _stub_modules()
    pkg_dir = root / BACKBONE_DIR
    pkg = types.ModuleType("upstream_iv2")
    pkg.__path__ = [str(pkg_dir)]
    sys.modules["upstream_iv2"] = pkg
    sys.modules["upstream_iv2.flash_attention_class"] = types.SimpleNamespace(FlashAttention=None)
    mods = {}
    for name in ("pos_embed", "internvideo2_clip_vision"):
        spec = importlib.util.spec_from_file_location(f"upstream_iv2.{name}", pkg_dir / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mods[name]
        spec.loader.exec_module(mods[name])
    return mods["internvideo2_clip_vision"].InternVideo2, mods["pos_embed"].interpolate_pos_embed


def build_upstream(InternVideo2, cfg, frames):
    return InternVideo2(in_chans=3, patch_size=cfg.patch_size, img_size=cfg.img_size, qkv_bias=cfg.qkv_bias,
                        drop_path_rate=0.0, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                        mlp_ratio=cfg.mlp_ratio, init_values=cfg.init_values, qk_normalization=cfg.qk_normalization,
                        depth=cfg.depth, use_flash_attn=False, use_fused_rmsnorm=False, use_fused_mlp=False,
                        attn_pool_num_heads=cfg.attn_pool_num_heads, clip_embed_dim=cfg.clip_embed_dim,
                        layerscale_no_force_fp32=True, num_frames=frames, tubelet_size=1,
                        sep_pos_embed=False).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, type=Path, help="root of an OpenGVLab/InternVideo checkout")
    ap.add_argument("--variant", default="internvideo2_clip_s14")
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 1, 4, 16])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--onnx", type=Path, help="also run this ONNX export of the same weights? (exported here)")
    args = ap.parse_args()

    InternVideo2, interpolate_pos_embed = load_upstream(args.upstream)
    cfg = load_vision_config(args.variant)
    torch.manual_seed(args.seed)
    upstream = build_upstream(InternVideo2, cfg, cfg.num_frames)
    with torch.no_grad():  # upstream's init leaves biases and norms at 0/1: perturb every tensor
        for p in upstream.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    align = nn.Sequential(nn.LayerNorm(cfg.clip_embed_dim), nn.Linear(cfg.clip_embed_dim, cfg.align_dim)).eval()
    with torch.no_grad():
        for p in align.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = {f"vision_encoder.{k}": v for k, v in upstream.state_dict().items()}
    state.update({f"vision_align.{k}": v for k, v in align.state_dict().items()})
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "upstream_random.pth"
        torch.save({"module": state}, ckpt)
        ours = create_model(args.variant, checkpoint=ckpt)
        session = None
        if args.onnx:
            from iv2trt.export.onnx_export import export_onnx
            from iv2trt.runners.onnxruntime_runner import OnnxRuntimeRunner

            export_onnx(ours, args.onnx, "fp32", max_batch=8, max_frames=max(args.frames))
            session = OnnxRuntimeRunner(args.onnx, providers=["CPUExecutionProvider"])

    print(f"{'T':>3} {'path':<34} {'max abs err':>12} {'rel err':>9} {'min cos':>10}")
    worst = 0.0
    for frames in args.frames:
        x = torch.randn(args.batch, frames, 3, cfg.img_size, cfg.img_size)
        if frames in (cfg.num_frames, 1):
            model, path = upstream, "video" if frames > 1 else "image (use_image=True)"
        else:
            model = build_upstream(InternVideo2, cfg, frames)
            sd = {f"vision_encoder.{k}": v.clone() for k, v in upstream.state_dict().items()}
            holder = types.SimpleNamespace(patch_embed=model.patch_embed, pos_embed=model.pos_embed, T=model.T)
            interpolate_pos_embed(sd, holder, orig_t_size=cfg.num_frames)
            model.load_state_dict({k[len("vision_encoder."):]: v for k, v in sd.items()})
            path = f"interpolate_pos_embed {cfg.num_frames}->{frames}"
        with torch.no_grad():
            ref = align(model(x.permute(0, 2, 1, 3, 4), use_image=frames == 1)).numpy()
            got = ours(x).numpy()
        rows = [("PyTorch", got)] + ([("ONNX", session.infer(x.numpy()))] if session else [])
        for name, out in rows:
            c = compare(ref, out)
            worst = max(worst, c.max_rel_error)
            print(f"{frames:>3} {name + ': ' + path:<34} {c.max_abs_error:12.3e} {c.max_rel_error:9.2e} "
                  f"{c.min_cosine:10.7f}")
    ok = worst <= 1e-4
    print(f"worst relative error {worst:.2e}: {'agrees to fp32 rounding' if ok else 'DISAGREES'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
