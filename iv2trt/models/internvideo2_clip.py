"""InternVideo2-CLIP vision tower: the ViT backbone of InternVideo2 with its attention-pooling
head, followed by CLIP's `vision_align` projection.

Module and parameter names follow upstream's state dict (`vision_encoder.*`, `vision_align.*`)
so released checkpoints load without renaming. Norms, softmax and reductions run in float32
whatever the parameter dtype, so an FP16 copy of the model exports the graph TensorRT's
strongly typed mode needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import deferred_norm
from .config import VisionConfig
from .kernels import fused_ops
from .pos_embed import pos_embed_for_frames, sincos_pos_embed_3d


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in float32.

    fused=True uses torch's rms_norm kernel (float32 accumulation inside); fused=False spells the
    float32 island out, the form exported to ONNX.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v over [B, heads, N, head_dim] tensors.

    fused=True uses torch's scaled_dot_product_attention (fast kernels in PyTorch);
    fused=False writes MatMul -> Softmax(float32) -> MatMul, the form exported to ONNX.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    scores = (q * scale) @ k.transpose(-2, -1)
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class PatchEmbed(nn.Module):
    """Frames [B, T, C, H, W] -> patch tokens [B, T * H/p * W/p, dim], frame-major.

    The weights are upstream's (1, p, p) Conv3d. With a tubelet of one frame that convolution is a
    2-D convolution of every frame (exported as such), or equally a matmul of flattened patches
    (fused=True: faster in PyTorch than cuDNN's stride-p convolution).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=kernel, stride=kernel)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if self.fused:
            # On a GPU each patch row is zero-padded to a multiple of 8 (14 -> 16, K = 672): cuBLAS's aligned
            # kernels, and an im2col copy whose strides are mostly powers of two (32x8 on an H100, copy and
            # product: 0.139 ms, against 0.192 with K = 588 padded to 592; tools/bench_patch_embed.py)
            return self.patch_matmul(x, -p % 8 if x.is_cuda else 0)
        B = x.shape[0]
        x = F.conv2d(x.flatten(0, 1), self.proj.weight[:, :, 0], self.proj.bias, stride=p)
        return x.flatten(2).transpose(1, 2).reshape(B, -1, self.proj.out_channels)

    def patch_matmul(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        """The convolution as a matmul of flattened patches, each patch row (and the weight's) zero-padded by
        `pad` elements."""
        B, T, C, H, W = x.shape
        p, dim = self.patch_size, self.proj.out_channels
        patches = x.reshape(B * T, C, H // p, p, W // p, p)
        weight = self.proj.weight.reshape(dim, C, p, p)
        if pad:
            patches, weight = F.pad(patches, (0, pad)), F.pad(weight, (0, pad))
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(-1, C * p * (p + pad))
        return F.linear(patches, weight.reshape(dim, -1), self.proj.bias).reshape(B, -1, dim)


class Attention(nn.Module):
    """Multi-head self-attention with RMS qk-normalisation over the full width.

    fused=True on a GPU in fp16/bf16 (`cls_split`, set by set_fused_kernels; see models.kernels.fused_ops): attention
    takes token 0's key (the cls token's) apart: cuDNN's flash kernel over the other keys, a whole number of
    its tiles, and the cls key merged in through the log-sum-exp. Exact: attention over a set of keys is the
    merge of attention over any split of them."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.scale = (dim // cfg.num_heads) ** -0.5
        self.fused = True
        self.cls_split = False  # set by set_fused_kernels from the model's device and dtype
        self.qk_norm_kernel = None  # likewise: the kernel for the deferred blocks' q/k norms inside attention
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg.qkv_bias)
        self.q_norm = RMSNorm(dim, cfg.norm_eps) if cfg.qk_normalization else nn.Identity()
        self.k_norm = RMSNorm(dim, cfg.norm_eps) if cfg.qk_normalization else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend_qkv(self.qkv(x)))

    def attend_qkv(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [B, N, 3 * C] -> q/k-normalised multi-head attention [B, N, C], before the output projection."""
        B, N, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(B, N, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        if self.fused and self.cls_split and fused_ops.cls_split_shape_ok(q):
            return fused_ops.attention_cls_split(q, k, v, self.scale)
        x = attend(q, k, v, self.scale, self.fused)
        return x.transpose(1, 2).reshape(B, N, C)

    def takes_deferred(self, x: torch.Tensor) -> bool:
        """Whether attend_deferred serves the deferred block of x [B, N, C] (models.deferred_norm)."""
        return (self.qk_norm_kernel is not None and isinstance(self.q_norm, RMSNorm)
                and fused_ops.qk_norm_attention_takes(x, self.num_heads, deferred_norm.TorchGemms.PART,
                                                      self.qk_norm_kernel))

    def attend_deferred(self, qkv: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """attend_qkv of the deferred block's qkv [B, N, 3C], the q/k norms' weights folded into its q and k,
        with its rows' sums of squares without them (parts [B * N, P]) -> [B, N, C]."""
        return fused_ops.qk_norm_attention(qkv, parts, self.num_heads, self.scale, self.q_norm.eps, self.k_norm.eps,
                                           self.qk_norm_kernel)


class LayerScale(nn.Module):
    """Residual branch scaled per channel: residual + x * gamma (one fused kernel)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(residual, x, self.gamma)


class Mlp(nn.Module):
    """fc2(GELU(fc1(x))).

    fused=True on a GPU in fp16/bf16: fc1's bias and GELU run in cuBLASLt's matmul epilogue
    (`torch._addmm_activation`), which saves a pass over the 4x-wide hidden activations. That GELU is the
    tanh form: within 4.7e-4 of the exact one (at x = 2.7, where fp16's rounding step is 2e-3). Elsewhere,
    and with fused=False, the configured GELU as a separate op.
    """

    def __init__(self, dim: int, hidden: int, gelu_approximate: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.fc2 = nn.Linear(hidden, dim)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(h.reshape(*x.shape[:-1], h.shape[-1]))
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + gamma1 * attn(norm1(x)), then x + gamma2 * mlp(norm2(x)).

    With `gemms` set (InternVideo2CLIPVision.defer_norms) the backbone runs `forward_deferred` instead: the
    norms, LayerScale and residual adds in the matrix products' epilogues (models.deferred_norm)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = RMSNorm(dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(dim, cfg.init_values)
        self.norm2 = RMSNorm(dim, cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.gelu_approximate)
        self.ls2 = LayerScale(dim, cfg.init_values)
        self.gemms = None
        self.deferred_on = None  # (device, dtype) the folded weights were made for (models.deferred_norm.fold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ls1(self.attn(self.norm1(x)), residual=x)
        return self.ls2(self.mlp(self.norm2(x)), residual=x)

    def forward_deferred(self, x: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, C] and its rows' float32 sums of squares (in parts, [B * N, parts]) -> the same pair after
        this block."""
        return deferred_norm.block_forward(self, x, sums, self.gemms)


class CrossAttention(nn.Module):
    """Single-query attention of the pooling head: separate q/k/v projections with free biases."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        B = query.shape[0]
        q = F.linear(query, self.q.weight, self.q_bias)
        k = F.linear(key, self.k.weight, self.k_bias)
        v = F.linear(value, self.v.weight, self.v_bias)
        q, k, v = (t.reshape(B, t.shape[1], self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        x = attend(q, k, v, self.scale, fused=False)  # one query: nothing for a fused kernel to win
        return self.proj(x.transpose(1, 2).reshape(B, q.shape[2], -1))


class AttentionPoolingHead(nn.Module):
    """Pools all tokens into one vector: the token mean queries the (normalised) tokens.

    fused=True takes the keys' and values' projections out of the token loop (`_pool_through_keys`), so no
    key or value is computed per token; fused=False computes them, the form exported to ONNX."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1_q = LayerNorm32(dim, eps=1e-5)
        self.norm1_k = LayerNorm32(dim, eps=1e-5)
        self.norm1_v = LayerNorm32(dim, eps=1e-5)
        self.cross_attn = CrossAttention(dim, cfg.attn_pool_num_heads, cfg.clip_embed_dim)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.norm1_q(x.float().mean(dim=1, keepdim=True).to(x.dtype))
        if self.fused and self.norm1_k.eps == self.norm1_v.eps:
            return self._pool_through_keys(x, query)
        pooled = self.cross_attn(query, self.norm1_k(x), self.norm1_v(x))
        return pooled.squeeze(1)

    def _pool_through_keys(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """The same attention with the projections moved to the one query. With n_j token j normalised
        without its affine, head h's score of token j is q_h . (W_k,h (n_j * g_k + b_k) + k_bias) * scale =
        u_h . n_j + (a term equal for every token, which softmax drops), u_h = scale * (W_k,h^T q_h) * g_k; and
        its output is W_v,h (g_v * sum_j p_hj n_j + b_v) + v_bias, as the p_hj sum to one. So the tokens are
        read twice (scores, weighted sum) and never projected."""
        attn = self.cross_attn
        B, N, C = x.shape
        H = attn.num_heads
        q = F.linear(query, attn.q.weight, attn.q_bias).reshape(B, H, C // H).float()
        u = torch.einsum("bhd,hdc->bhc", q, attn.k.weight.reshape(H, C // H, C).float())
        u = u * (attn.scale * self.norm1_k.weight.float())
        n = F.layer_norm(x.float(), (C,), eps=self.norm1_k.eps).to(x.dtype)
        p = torch.bmm(n, u.to(x.dtype).transpose(1, 2)).float().softmax(dim=1).to(x.dtype)  # [B, N, H]
        mixed = torch.bmm(p.transpose(1, 2), n).float() * self.norm1_v.weight.float() + self.norm1_v.bias.float()
        out = torch.einsum("bhc,hdc->bhd", mixed, attn.v.weight.reshape(H, C // H, C).float())
        out = out + attn.v_bias.float().reshape(H, C // H)
        return attn.proj(out.reshape(B, C).to(x.dtype))


# Batches of fewer tokens keep the blocks as written where they could defer their norms: at 2 x 2,049 rows
# quack's products ran slower than cuBLAS and TorchInductor's norm kernels (issue 11; the 2x8 and 1x8 rows of
# docs/benchmarks.md's H100 grid run this way).
DEFERRED_MIN_ROWS = 8192


class InternVideo2Backbone(nn.Module):
    """Patch embedding + cls token + joint (time x space) position embedding + blocks + pooling head."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_frames * cfg.patches_per_frame, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.clip_projector = AttentionPoolingHead(cfg)

    def defers_norms_for(self, x: torch.Tensor) -> bool:
        """Whether the blocks run tokens x [B, N, C] with their norms in the products' epilogues: set up for x's
        device and dtype (InternVideo2CLIPVision.defer_norms), and at least DEFERRED_MIN_ROWS tokens."""
        block = self.blocks[0] if len(self.blocks) else None
        return (block is not None and block.gemms is not None and block.deferred_on == (x.device, x.dtype)
                and x.shape[0] * x.shape[1] >= DEFERRED_MIN_ROWS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, T, C, H, W] -> pooled features [B, clip_embed_dim]."""
        B, T = frames.shape[:2]
        x = self.patch_embed(frames.to(self.patch_embed.proj.weight.dtype))
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        frame_index = torch.arange(T, dtype=torch.float32, device=x.device)
        pos = pos_embed_for_frames(self.pos_embed.float(), self.cfg.num_frames, frame_index)
        x = x + pos.to(x.dtype)
        if self.defers_norms_for(x):
            sums = deferred_norm.sum_of_squares(x)
            for block in self.blocks:
                x, sums = block.forward_deferred(x, sums)
        else:
            for block in self.blocks:
                x = block(x)
        return self.clip_projector(x)


class InternVideo2CLIPVision(nn.Module):
    """`encode_vision` of upstream InternVideo2_CLIP_small: frames [B, T, C, H, W] -> [B, align_dim].

    The output is not normalised; callers that want unit vectors L2-normalise it.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_encoder = InternVideo2Backbone(cfg)
        self.vision_align = nn.Sequential(LayerNorm32(cfg.clip_embed_dim), nn.Linear(cfg.clip_embed_dim, cfg.align_dim))
        self.register_load_state_dict_post_hook(self._fold_again)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.vision_align(self.vision_encoder(frames))

    def set_fused_kernels(self, fused: bool) -> "InternVideo2CLIPVision":
        """torch's fused kernels (SDPA, RMSNorm, patch matmul, on a GPU in half precision GELU in fc1's
        epilogue; fused=True, for PyTorch inference), or attention, norms and the patch convolution spelled
        out with explicit float32 islands (fused=False, for ONNX export). Attention's Triton kernel (see
        Attention) and the blocks' deferred norms on quack's products (see Block) are chosen here from the
        model's current device and dtype: call this after loading weights and moving the model."""
        param = self.vision_encoder.cls_token
        cls_split = fused and fused_ops.available(param.device, param.dtype)
        deferrable = fused and not self.cfg.qkv_bias  # the deferred qkv product has no bias term
        gemms = fused_ops.quack_gemms(param.device, param.dtype) if deferrable else None
        # only the deferred blocks attend through it, so its kernel (and FA4's test attention) is sought only then
        qk_norm_kernel = fused_ops.qk_norm_kernel(param.device, param.dtype) if gemms is not None else None
        for module in self.modules():
            if isinstance(module, (Attention, RMSNorm, PatchEmbed, Mlp, AttentionPoolingHead)):
                module.fused = fused
            if isinstance(module, Attention):
                module.cls_split = cls_split
                module.qk_norm_kernel = qk_norm_kernel
        return self.defer_norms(gemms)

    @property
    def defers_norms(self) -> bool:
        """Whether the blocks run their norms in the matrix products' epilogues (for batches of enough rows)."""
        return self.vision_encoder.blocks[0].gemms is not None

    def defer_norms(self, gemms) -> "InternVideo2CLIPVision":
        """Run the blocks with their norms in the matrix products' epilogues, through `gemms`
        (models.kernels.quack_gemms.QuackGemms, or models.deferred_norm.TorchGemms: GELU's tanh form either way), or as
        written (None). Folds the norm weights and LayerScale into copies of the weights, for the weights'
        current device and dtype: after moving the model the blocks run as written until this is called again;
        loading a state dict folds again by itself."""
        for block in self.vision_encoder.blocks:
            block.gemms = gemms
            (deferred_norm.fold if gemms is not None else deferred_norm.unfold)(block)
        return self

    def compile_variant(self, shape: tuple[int, ...]) -> str | None:
        """The name of the path inputs of `shape` [B, T, C, H, W] take through the blocks, where it is not the
        usual one (torch.compile keeps the paths apart: iv2trt.runners.compile.CompiledForward.key)."""
        B, T, _, H, W = shape
        p = self.cfg.patch_size
        tokens = B * (1 + T * (H // p) * (W // p))
        return "deferred norms" if self.defers_norms and tokens >= DEFERRED_MIN_ROWS else None

    @staticmethod
    def _fold_again(module: "InternVideo2CLIPVision", incompatible_keys) -> None:
        if module.defers_norms:
            module.defer_norms(module.vision_encoder.blocks[0].gemms)

    def init_random_weights(self, seed: int = 0) -> "InternVideo2CLIPVision":
        """Upstream's initialisation: truncated-normal linears, sin-cos positions, LayerScale at init_values."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("pos_embed"):
                    p.copy_(sincos_pos_embed_3d(self.cfg.embed_dim, self.cfg.grid_size, self.cfg.num_frames)[None])
                elif p.ndim >= 2 or name.endswith("cls_token"):
                    p.copy_(torch.randn(p.shape, generator=gen).clamp_(-2, 2) * 0.02)
                elif name.endswith("gamma"):
                    p.fill_(self.cfg.init_values)
                elif name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
        return self
