"""An independent float64 forward of the InternVideo2-CLIP vision tower, written straight from the
state dict (no code shared with models/), following upstream's non-fused math step by step."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _mha(q, k, v, heads):
    B, Nq, C = q.shape
    d = C // heads
    split = lambda t: t.reshape(B, t.shape[1], heads, d).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    attn = ((q * d**-0.5) @ k.transpose(-1, -2))
    attn = torch.exp(attn - attn.amax(-1, keepdim=True))
    attn = attn / attn.sum(-1, keepdim=True)
    return (attn @ v).permute(0, 2, 1, 3).reshape(B, Nq, C)


def upstream_interpolate_pos(pos, old_t, new_t, per_frame):
    """Upstream's interpolate_pos_embed, temporal part: linear over time, align_corners=False."""
    C = pos.shape[-1]
    cls, tok = pos[:, :1], pos[:, 1:]
    tok = tok.view(1, old_t, per_frame, C).permute(0, 2, 3, 1).reshape(-1, C, old_t)
    tok = F.interpolate(tok, size=new_t, mode="linear")
    tok = tok.view(1, per_frame, C, new_t).permute(0, 3, 1, 2).reshape(1, -1, C)
    return torch.cat([cls, tok], 1)


def reference_encode_vision(sd: dict, cfg, frames: torch.Tensor) -> torch.Tensor:
    """frames [B, T, 3, H, W] -> [B, align_dim], float64.

    T == trained frames: the stored pos_embed; T == 1: cls + temporal mean (upstream's image path);
    otherwise: pos_embed interpolated to T with upstream's function, i.e. what upstream computes for a
    model configured with num_frames = T after loading this checkpoint.
    """
    p = {k: v.double() for k, v in sd.items()}
    e = "vision_encoder."
    x = frames.double().permute(0, 2, 1, 3, 4)
    B, _, T = x.shape[:3]
    x = F.conv3d(x, p[e + "patch_embed.proj.weight"], p[e + "patch_embed.proj.bias"],
                 stride=(1, cfg.patch_size, cfg.patch_size))
    C = x.shape[1]
    x = x.flatten(2).transpose(1, 2)  # [B, T*L, C], frame-major
    x = torch.cat([p[e + "cls_token"].expand(B, -1, -1), x], 1)
    pos = p[e + "pos_embed"]
    L = cfg.patches_per_frame
    if T == 1:
        pos = torch.cat([pos[:, :1], pos[:, 1:].view(1, cfg.num_frames, L, C).mean(1)], 1)
    elif T != cfg.num_frames:
        pos = upstream_interpolate_pos(pos, cfg.num_frames, T, L)
    x = x + pos
    for i in range(cfg.depth):
        b = f"{e}blocks.{i}."
        h = _rms(x, p[b + "norm1.weight"], cfg.norm_eps)
        qkv = h @ p[b + "attn.qkv.weight"].T
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        q = _rms(q, p[b + "attn.q_norm.weight"], cfg.norm_eps)
        k = _rms(k, p[b + "attn.k_norm.weight"], cfg.norm_eps)
        a = _mha(q, k, v, cfg.num_heads) @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"]
        x = x + a * p[b + "ls1.gamma"]
        h = _rms(x, p[b + "norm2.weight"], cfg.norm_eps)
        h = _gelu(h @ p[b + "mlp.fc1.weight"].T + p[b + "mlp.fc1.bias"], cfg.gelu_approximate)
        h = h @ p[b + "mlp.fc2.weight"].T + p[b + "mlp.fc2.bias"]
        x = x + h * p[b + "ls2.gamma"]
    c = e + "clip_projector."
    q_in = _ln(x.mean(1, keepdim=True), p[c + "norm1_q.weight"], p[c + "norm1_q.bias"])
    k_in = _ln(x, p[c + "norm1_k.weight"], p[c + "norm1_k.bias"])
    v_in = _ln(x, p[c + "norm1_v.weight"], p[c + "norm1_v.bias"])
    q = q_in @ p[c + "cross_attn.q.weight"].T + p[c + "cross_attn.q_bias"]
    k = k_in @ p[c + "cross_attn.k.weight"].T + p[c + "cross_attn.k_bias"]
    v = v_in @ p[c + "cross_attn.v.weight"].T + p[c + "cross_attn.v_bias"]
    pooled = _mha(q, k, v, cfg.attn_pool_num_heads) @ p[c + "cross_attn.proj.weight"].T + p[c + "cross_attn.proj.bias"]
    pooled = pooled[:, 0]
    h = _ln(pooled, p["vision_align.0.weight"], p["vision_align.0.bias"])
    return h @ p["vision_align.1.weight"].T + p["vision_align.1.bias"]
