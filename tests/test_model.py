"""The PyTorch model against an independent float64 reference on fresh random inputs and weights."""
import copy

import numpy as np
import pytest
import torch
from conftest import TINY, randomize
from reference_impl import reference_encode_vision, upstream_interpolate_pos

from iv2trt.compare import compare
from iv2trt.models import InternVideo2CLIPVision, create_model, list_variants, load_vision_config
from iv2trt.models.pos_embed import pos_embed_for_frames, sincos_pos_embed_3d


@pytest.mark.parametrize("frames", [4, 1, 2, 3, 7, 16])
@pytest.mark.parametrize("fused", [True, False])
def test_fp32_matches_float64_reference(tiny_model, frames, fused):
    torch.manual_seed(100 + frames)
    x = torch.randn(3, frames, 3, TINY.img_size, TINY.img_size)
    tiny_model.set_fused_kernels(fused)
    with torch.no_grad():
        ours = tiny_model(x).numpy()
    ref = reference_encode_vision(tiny_model.state_dict(), TINY, x).numpy()
    tiny_model.set_fused_kernels(True)
    assert compare(ref, ours).max_rel_error < 1e-5


def test_tanh_gelu_variant_matches_reference():
    cfg = TINY.__class__(**{**TINY.__dict__, "gelu_approximate": "tanh"})
    model = randomize(InternVideo2CLIPVision(cfg), seed=3).eval()
    x = torch.randn(2, 4, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        ours = model(x).numpy()
    assert compare(reference_encode_vision(model.state_dict(), cfg, x).numpy(), ours).max_rel_error < 1e-5


def test_batch_items_are_independent(tiny_model):
    x = torch.randn(4, 4, 3, TINY.img_size, TINY.img_size)
    with torch.no_grad():
        together = tiny_model(x)
        alone = torch.cat([tiny_model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 8, 13, 32])
def test_in_graph_pos_embed_follows_upstream_interpolation(frames):
    per_frame, trained = 16, 4
    pos = torch.randn(1, 1 + trained * per_frame, 24, dtype=torch.float64)
    ours = pos_embed_for_frames(pos.float(), trained, torch.arange(frames, dtype=torch.float32)).double()
    if frames == 1:
        expected = torch.cat([pos[:, :1], pos[:, 1:].view(1, trained, per_frame, 24).mean(1)], 1)
    else:
        expected = upstream_interpolate_pos(pos, trained, frames, per_frame)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_trained_frame_count_uses_pos_embed_exactly():
    pos = torch.randn(1, 1 + 8 * 16, 32)
    torch.testing.assert_close(pos_embed_for_frames(pos, 8, torch.arange(8.0)), pos, rtol=0, atol=0)


def test_sincos_init_layout():
    table = sincos_pos_embed_3d(16, grid=2, frames=3)
    assert table.shape == (1 + 3 * 4, 16)
    assert torch.all(table[0] == 0)
    # temporal quarter is constant within a frame and differs across frames
    t = table[1:, :4].view(3, 4, 4)
    assert torch.allclose(t, t[:, :1].expand_as(t)) and not torch.allclose(t[0], t[1])
    # spatial part repeats across frames
    s = table[1:, 4:].view(3, 4, 12)
    assert torch.allclose(s[0], s[2])


def test_variants_are_data():
    assert {"internvideo2_clip_s14", "internvideo2_clip_b14", "internvideo2_clip_l14"} <= set(list_variants())
    s14, b14, l14 = (load_vision_config(v) for v in ("s14", "b14", "l14"))
    assert (s14.embed_dim, s14.depth, s14.num_heads) == (384, 12, 6)
    assert (b14.embed_dim, b14.depth, b14.num_heads) == (768, 12, 12)
    assert (l14.embed_dim, l14.depth, l14.num_heads) == (1024, 24, 16)
    assert s14.attn_pool_num_heads == 16 and s14.clip_embed_dim == 768 and s14.align_dim == 512


def test_s14_parameter_layout_matches_upstream_names():
    model = create_model("s14", random_init=True)
    sd = model.state_dict()
    assert sd["vision_encoder.pos_embed"].shape == (1, 1 + 8 * 256, 384)
    assert sd["vision_encoder.patch_embed.proj.weight"].shape == (384, 3, 1, 14, 14)
    assert sd["vision_encoder.blocks.11.attn.qkv.weight"].shape == (1152, 384)
    assert "vision_encoder.blocks.0.attn.qkv.bias" not in sd
    assert sd["vision_encoder.clip_projector.cross_attn.proj.weight"].shape == (768, 384)
    assert sd["vision_align.1.weight"].shape == (512, 768)
    n = sum(v.numel() for v in sd.values())
    assert 20e6 < n < 30e6, n


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model variant"):
        load_vision_config("x99")


def test_fp16_model_keeps_norms_in_fp32(tiny_model):
    x = torch.randn(2, 4, 3, TINY.img_size, TINY.img_size)
    half = InternVideo2CLIPVision(TINY)
    half.load_state_dict(tiny_model.state_dict())
    half = half.half().eval()
    with torch.no_grad():
        ref = tiny_model(x).numpy()
        out = half.set_fused_kernels(False)(x.half()).float().numpy()
    assert compare(ref, out).min_cosine > 0.999
    assert np.isfinite(out).all()


@pytest.mark.parametrize("pad", [0, 2, 5])
def test_patch_matmul_with_padded_patch_rows_is_the_convolution(tiny_model, pad):
    """The fused path's patch embedding (on a GPU each patch row padded to a multiple of 8) against the
    convolution the ONNX export keeps, in float64."""
    embed = copy.deepcopy(tiny_model.vision_encoder.patch_embed).double()
    x = torch.randn(2, 3, 3, TINY.img_size, TINY.img_size, dtype=torch.float64)
    embed.fused = False
    want = embed(x)
    got = embed.patch_matmul(x, pad)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)
