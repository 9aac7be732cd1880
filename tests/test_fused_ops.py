"""The fused path's cls-split attention (models.kernels.triton_kernels, models.kernels.fused_ops).

On CPU the merge kernel runs in Triton's interpreter (TRITON_INTERPRET=1, in a subprocess so no other test
sees it) against float64 references; on a GPU compiled, at the model's shapes, and inside the model."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from iv2trt.compare import compare
from iv2trt.errors import PipelineError
from iv2trt.models.internvideo2_clip import Attention
from iv2trt.models.kernels import fused_ops, switches
from iv2trt.runners.torch_runner import TorchRunner

ROOT = Path(__file__).resolve().parents[1]
has_triton = importlib.util.find_spec("triton") is not None

# float64 references shared by the interpreter script and the GPU tests
REFERENCES = textwrap.dedent('''
    import torch, torch.nn.functional as F

    def attention_reference(q, k, v, scale):
        B, H, N, D = q.shape
        out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
        return out.transpose(1, 2).reshape(B, N, H * D)

    def patch_attention(q, k, v, scale):
        """What cuDNN returns for all queries over the keys after token 0: output and natural-log LSE."""
        s = (q.double() @ k[:, :, 1:].double().transpose(-1, -2)) * scale
        return (s.softmax(-1) @ v[:, :, 1:].double()).to(q.dtype), s.logsumexp(-1).float()
''')
exec(REFERENCES)  # noqa: S102  (the same definitions here and in the interpreter's subprocess)

INTERPRETER_SCRIPT = REFERENCES + textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    from iv2trt.models.kernels import triton_kernels as tk

    torch.manual_seed(0)
    dt = torch.float16
    for B, H, N, D in ((2, 3, 70, 64), (1, 2, 33, 32)):
        q, k, v = (torch.randn(B, H, N, D).to(dt) for _ in range(3))
        scale = D ** -0.5
        ref = attention_reference(q, k, v, scale)
        o, lse = patch_attention(q, k, v, scale)
        for config in ((16, 4), (64, 2)):
            out = tk.cls_merge(o, lse, q, k, v, scale, config=config)
            err = (out.double() - ref).abs().max().item()
            print(f"merge B={B} H={H} N={N} D={D} config={config} max err {err:.2e}")
            assert out.shape == (B, N, H * D) and out.dtype == dt and err < 3e-3, err
    try:
        tk.cls_merge(o[:, :, 1:], lse[:, :, 1:], q, k, v, scale)  # rows that do not match q's
    except ValueError as exc:
        print("refused:", exc)
    else:
        raise AssertionError("cls_merge took o and lse of other shapes than q's")
    # the deferred blocks' attention: q and k with their norms' weights folded in, sums of squares without
    for B, H, D, N, part, config in ((2, 3, 32, 33, 48, (16, 16, 4, 2)), (1, 2, 16, 33, 32, (16, 8, 4, 2))):
        C = H * D
        q, k, v = (torch.randn(B, N, C, dtype=torch.float64) * 3 for _ in range(3))
        wq, wk = torch.rand(C, dtype=torch.float64) + 0.5, torch.rand(C, dtype=torch.float64) + 0.5
        qkv = torch.cat([q * wq, k * wk, v], -1).to(dt)
        parts = torch.cat([q, k, v], -1).reshape(B * N, 3 * C).split(part, -1)
        parts = torch.stack([p.square().sum(-1) for p in parts], -1).float()
        rms = lambda x, w: x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w
        ref = attention_reference(*(t.reshape(B, N, H, D).transpose(1, 2) for t in (rms(q, wq), rms(k, wk), v)),
                                  D ** -0.5)
        out = tk.qk_norm_attention(qkv, parts, H, D ** -0.5, 1e-6, 1e-6, config=config)
        err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
        print(f"qk_norm_attention B={B} H={H} N={N} D={D} config={config} max rel err {err:.2e}")
        assert out.shape == (B, N, C) and out.dtype == dt and err < 2e-3, err
    try:
        tk.qk_norm_attention(qkv[:, :-1].contiguous(), parts[:-1], H, D ** -0.5, 1e-6, 1e-6, config=config)
    except ValueError as exc:
        print("refused:", exc)
    else:
        raise AssertionError("qk_norm_attention took a token count that is not whole tiles")
    # FA4's path (models.kernels.flash_attn4): the Triton pass that normalises q and k, then FA4, here a stand-in
    # with FA4's signature ([B, N, heads, D] strided views in, (out, lse) back), so the views are checked
    from iv2trt.models import deferred_norm
    from iv2trt.models.kernels import flash_attn4
    calls = []

    def fake_fa4(q, k, v, softmax_scale=None):
        calls.append(softmax_scale)
        assert q.shape == k.shape == v.shape and q.stride(-1) == 1
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)), scale=softmax_scale)
        return out.transpose(1, 2).to(q.dtype), None

    def fake_row_scaled(q, k, v, scales):
        assert q.shape == k.shape == v.shape and q.stride(-1) == 1 and scales.shape == q.shape[:2]
        out = fake_fa4(q.float() * scales[:, :, None, None] / flash_attn4.LOG2E, k.float(), v.float(), 1.0)[0]
        out = out.to(q.dtype)
        calls.append("row scales")
        return out

    import types
    sys.modules["flash_attn"] = types.ModuleType("flash_attn")
    sys.modules["flash_attn.cute"] = types.SimpleNamespace(flash_attn_func=fake_fa4)
    flash_attn4.attend_row_scaled = fake_row_scaled
    for B, H, D, N, part in ((2, 3, 32, 37, 48), (1, 6, 64, 20, 192)):
        C = H * D
        qkv = torch.randn(B, N, 3 * C, dtype=torch.float64)
        qkv[..., :2 * C] *= torch.rand(2 * C, dtype=torch.float64) + 0.5
        parts = torch.stack([p.square().sum(-1) for p in (qkv * 0.7).reshape(B * N, 3 * C).split(part, -1)], -1)
        qkn = tk.qk_norm_rows(qkv.float(), parts.float(), 1e-6, 1e-5)
        q, k = qkv[..., :C], qkv[..., C:2 * C]
        want = torch.cat([q * torch.rsqrt(parts[:, :C // part].sum(-1) / C + 1e-6).reshape(B, N, 1),
                          k * torch.rsqrt(parts[:, C // part:2 * C // part].sum(-1) / C + 1e-5).reshape(B, N, 1)], -1)
        err = (qkn.double() - want).abs().max().item()
        print(f"qk_norm_rows B={B} N={N} C={C} part={part} max err {err:.2e}")
        assert qkn.shape == (B, N, 2 * C) and err < 1e-5, err
        kn, scales = tk.key_norm_rows(qkv.float(), parts.float(), 1e-6, 1e-5, 0.125)  # scales: rstd_q * 0.125
        err = max((kn.double() - want[..., C:]).abs().max().item(),
                  (scales.double() * q.norm(dim=-1) - 0.125 * want[..., :C].norm(dim=-1)).abs().max().item())
        print(f"key_norm_rows B={B} N={N} C={C} part={part} max err {err:.2e}")
        assert kn.shape == (B, N, C) and scales.shape == (B, N) and scales.dtype == torch.float32 and err < 1e-5, err
        ref = deferred_norm.qk_norm_attention(qkv, parts.float(), H, D ** -0.5, 1e-6, 1e-5).double()
        for row_scales in (False, True):  # FA4 after the q/k pass; FA4 with the queries' norms in its softmax
            out = flash_attn4.qk_norm_attention(qkv.to(dt), parts.float(), H, D ** -0.5, 1e-6, 1e-5, row_scales)
            err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
            print(f"flash_attn4.qk_norm_attention (stand-in FA4, row scales {row_scales}) B={B} H={H} N={N} D={D} "
                  f"max rel err {err:.2e}")
            assert out.shape == (B, N, C) and out.dtype == dt and err < 3e-3, err
            assert calls[-1] == ("row scales" if row_scales else D ** -0.5)
    try:
        tk.qk_norm_rows(qkv.float(), parts.float()[:-1], 1e-6, 1e-6)  # a row's sums missing
    except ValueError as exc:
        print("refused:", exc)
    else:
        raise AssertionError("qk_norm_rows took sums of squares of other rows than qkv's")
    print("ok")
''')


@pytest.mark.skipif(not has_triton, reason="Triton is not installed (requirements.txt installs it)")
def test_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT, str(ROOT)], env=env, capture_output=True,
                         text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok") and "refused: cls_merge" in run.stdout
    assert "refused: qk_norm_attention" in run.stdout and "refused: qk_norm_rows" in run.stdout


def test_cpu_and_fp32_models_keep_torch_ops(tiny_model, monkeypatch):
    model = copy.deepcopy(tiny_model).set_fused_kernels(True)
    assert not any(m.cls_split for m in model.modules() if isinstance(m, Attention))
    assert not fused_ops.available(torch.device("cpu"), torch.float16)
    assert not fused_ops.available(torch.device("cuda"), torch.float32)
    monkeypatch.setenv(switches.TRITON, "off")
    assert not fused_ops.available(torch.device("cuda"), torch.float16)  # refused before CUDA is asked
    monkeypatch.setenv(switches.TRITON, "fast")
    with pytest.raises(PipelineError, match=r"\$IV2TRT_TRITON_KERNELS must be on or off, got 'fast'"):
        TorchRunner(copy.deepcopy(tiny_model), device="cpu")


def test_cls_split_shape_rule():
    assert fused_ops.cls_split_shape_ok(torch.empty(2, 6, 2049, 64))
    assert not fused_ops.cls_split_shape_ok(torch.empty(2, 6, 1, 64))   # no token besides the cls
    assert not fused_ops.cls_split_shape_ok(torch.empty(2, 6, 9, 48))   # a head dim cuDNN's kernel lacks


def test_flash_attn4_rules(monkeypatch):
    from iv2trt.models.kernels import flash_attn4

    assert flash_attn4.shape_ok(384, 6, 192) and flash_attn4.shape_ok(768, 12, 192)
    assert not flash_attn4.shape_ok(384, 6, 256)  # sums of squares in parts that straddle q and k
    assert not flash_attn4.shape_ok(120, 10, 24)  # head dim 12: not a multiple of 8
    assert not fused_ops.flash_attn4_serves(torch.device("cpu"), torch.float16)
    assert fused_ops.qk_norm_kernel(torch.device("cpu"), torch.float16) is None
    monkeypatch.setenv("IV2TRT_FLASH_ATTN4", "maybe")
    with pytest.raises(ValueError, match="IV2TRT_FLASH_ATTN4"):
        fused_ops.flash_attn4_serves(torch.device("cuda"), torch.float16)
    monkeypatch.setenv("IV2TRT_FLASH_ATTN4", "off")  # off: asks nothing of CUDA
    assert not fused_ops.flash_attn4_serves(torch.device("cuda"), torch.float16)


def test_a_flash_attn4_that_fails_its_test_attention_is_not_used(monkeypatch, caplog):
    from iv2trt.models.kernels import flash_attn4

    def attention(error):  # torch's attention, its output times `error`
        return lambda q, k, v, s: F.scaled_dot_product_attention(
            *(t.transpose(1, 2).float() for t in (q, k, v)), scale=s).transpose(1, 2).half() * error

    def row_scaled(error):  # the same with scales per query row (times log2(e), as FA4's softmax takes them)
        return lambda q, k, v, scales: attention(error)(q.float() * scales[:, :, None, None] / flash_attn4.LOG2E, k,
                                                        v, 1.0)

    for error, passes in ((1.0, True), (1.1, False)):  # each kernel's test attention tests that kernel
        monkeypatch.setattr(flash_attn4, "attend", attention(error))
        monkeypatch.setattr(flash_attn4, "attend_row_scaled", row_scaled(1.1 if error == 1.0 else 1.0))
        assert fused_ops._flash_attn4_runs.__wrapped__("cpu") == passes
        assert fused_ops._flash_attn4_row_scales_run.__wrapped__("cpu") != passes
    assert "FlashAttention-4 is off on cpu: a test attention failed: RuntimeError: relative error" in caplog.text
    assert "FlashAttention-4 with the queries' norms in its softmax is off (a pass normalises q and k) on cpu: a " \
           "test attention failed: RuntimeError: relative error" in caplog.text


def test_the_q_k_norm_kernel_is_the_first_that_serves(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(fused_ops, "_triton_serves", lambda *args: True)
    for fa4, row_scales, want in ((True, True, "flash_attn4_row_scales"), (True, False, "flash_attn4"),
                                  (False, False, "triton")):
        monkeypatch.setattr(fused_ops, "flash_attn4_serves", lambda device, dtype: fa4)
        monkeypatch.setattr(fused_ops, "_flash_attn4_row_scales_run", lambda where: row_scales)
        monkeypatch.setattr(fused_ops, "_hopper_fp16", lambda var, device, dtype: "cuda:0")
        assert fused_ops.flash_attn4_row_scales_serve(cuda, torch.float16) == (fa4 and row_scales)
        assert fused_ops.qk_norm_kernel(cuda, torch.float16) == want
    monkeypatch.setattr(fused_ops, "flash_attn4_serves", lambda device, dtype: True)
    monkeypatch.setattr(fused_ops, "_flash_attn4_row_scales_run", lambda where: True)
    monkeypatch.setenv("IV2TRT_FLASH_ATTN4_ROW_SCALES", "off")
    assert fused_ops.qk_norm_kernel(cuda, torch.float16) == "flash_attn4"
    monkeypatch.setenv("IV2TRT_FLASH_ATTN4_ROW_SCALES", "maybe")
    with pytest.raises(ValueError, match="IV2TRT_FLASH_ATTN4_ROW_SCALES"):
        fused_ops.qk_norm_kernel(cuda, torch.float16)
    x = torch.empty(2, 300, 384)  # off the GPU every kernel's name takes any shape (torch ops)
    assert all(fused_ops.qk_norm_attention_takes(x, 6, 192, k) for k in ("flash_attn4_row_scales", "triton"))


def test_graph_parts_rule(tiny_model):
    runner = TorchRunner(copy.deepcopy(tiny_model), device="cpu", graph_streams=2)
    size = tiny_model.cfg.img_size
    parts = lambda b, t: runner._graph_parts(runner.model, torch.empty(b, t, 3, size, size))  # noqa: E731
    assert parts(32, 8) == [slice(0, 16), slice(16, 32)]
    assert parts(16, 8) == [slice(0, 8), slice(8, 16)]  # 8 clips x 8 frames = 64 frames a part
    for b, t in ((32, 1), (8, 8), (31, 8), (1, 8)):      # small parts, odd batch, one clip: one stream
        assert parts(b, t) == [slice(None)]
    assert TorchRunner(copy.deepcopy(tiny_model), device="cpu", graph_streams=1)._graph_parts(
        runner.model, torch.empty(32, 8, 3, size, size)) == [slice(None)]


# --- GPU -----------------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA GPU: the Triton kernel and cuDNN run there")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_attention_cls_split(dtype):
    from iv2trt.models.kernels import triton_kernels as tk

    g = torch.Generator(device="cuda").manual_seed(0)
    for B, H, N, D in ((32, 6, 2049, 64), (3, 6, 257, 64), (1, 6, 100, 64), (2, 4, 70, 32), (2, 2, 130, 128)):
        qkv = torch.randn(B, N, 3, H, D, device="cuda", generator=g).to(dtype)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # the model's strided views of one qkv tensor
        scale = D ** -0.5
        ref = attention_reference(q, k, v, scale)
        out = tk.attention_cls_split(q, k, v, scale)
        sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, H * D)
        err, sdpa_err = ((t.double() - ref).norm().item() / ref.norm().item() for t in (out, sdpa))
        print(f"cls split {B}x{H}x{N}x{D} {dtype}: rel err {err:.2e} (SDPA {sdpa_err:.2e})")
        assert out.shape == (B, N, H * D) and err <= 1.5 * sdpa_err + 1e-5


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)),
                    reason="the q/k-norm attention kernels need a Hopper (or later) GPU")
@pytest.mark.parametrize("kernel,clips,tokens", [
    ("triton", 2, 2049), ("triton", 3, 257), ("flash_attn4", 2, 2049), ("flash_attn4", 3, 300),
    ("flash_attn4_row_scales", 2, 2049), ("flash_attn4_row_scales", 3, 300)])
def test_gpu_qk_norm_attention_matches_float64(kernel, clips, tokens):
    from iv2trt.models.kernels import triton_kernels as tk

    serves = {"flash_attn4": fused_ops.flash_attn4_serves,
              "flash_attn4_row_scales": fused_ops.flash_attn4_row_scales_serve}.get(kernel)
    if serves and not serves(torch.device("cuda"), torch.float16):
        pytest.skip(f"{kernel}: flash-attn-4 is not installed (requirements-gpu.txt) or does not serve this GPU "
                    f"(see the log)")
    torch.manual_seed(0)
    H, D = 6, 64
    C = H * D
    q, k, v = (torch.randn(clips, tokens, C, device="cuda", dtype=torch.float64) * 2 for _ in range(3))
    wq, wk = (torch.rand(C, device="cuda", dtype=torch.float64) + 0.5 for _ in range(2))
    qkv = torch.cat([q * wq, k * wk, v], -1).half()
    parts = torch.stack([p.square().sum(-1) for p in torch.cat([q, k, v], -1).reshape(-1, 3 * C).split(192, -1)], -1)
    rms = lambda x, w: x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    ref = attention_reference(*(t.reshape(clips, tokens, H, D).transpose(1, 2) for t in (rms(q, wq), rms(k, wk), v)),
                              D ** -0.5)
    got = fused_ops.qk_norm_attention(qkv, parts.float(), H, D ** -0.5, 1e-6, 1e-6, kernel)
    plain = F.scaled_dot_product_attention(*(t.reshape(clips, tokens, H, D).transpose(1, 2).half()
                                             for t in (rms(q, wq), rms(k, wk), v)), scale=D ** -0.5)
    err = ((got.double() - ref).norm() / ref.norm()).item()
    err_sdpa = ((plain.transpose(1, 2).reshape(clips, tokens, C).double() - ref).norm() / ref.norm()).item()
    cls_err = (got[:, 0].double() - ref[:, 0]).abs().max().item()
    print(f"qk_norm_attention {kernel} {clips}x{tokens}: rel err {err:.2e} (SDPA on fp16 normalised q/k: "
          f"{err_sdpa:.2e}), cls row max err {cls_err:.2e}")
    assert err < 2 * err_sdpa + 1e-4 and cls_err < 1e-2
    x = torch.empty(clips, tokens, C, device="cuda", dtype=torch.float16)
    assert fused_ops.qk_norm_attention_takes(x, H, 192, kernel)
    if kernel == "triton":
        assert not tk.qk_norm_attention_shape_ok(tokens + 1, C, H, 192)


@needs_gpu
def test_gpu_model_uses_the_cls_split_and_matches_fp32(monkeypatch):
    from iv2trt.models import create_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref_model = create_model("s14", random_init=True, device="cuda")
    half = copy.deepcopy(ref_model).half().set_fused_kernels(True)
    assert all(m.cls_split for m in half.modules() if isinstance(m, Attention))
    x = torch.randn(4, 8, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        ref = ref_model(x).double().cpu().numpy()
        fused = half(x.half()).double().cpu().numpy()
        monkeypatch.setenv(switches.TRITON, "off")
        plain = half.set_fused_kernels(True)
        assert not any(m.cls_split for m in plain.modules() if isinstance(m, Attention))
        without = plain(x.half()).double().cpu().numpy()
    c, c_without = compare(ref, fused), compare(ref, without)
    print(f"eager fp16 with the cls split: min cos {c.min_cosine:.7f}; without: {c_without.min_cosine:.7f}")
    assert c.min_cosine >= 0.9999 and c.min_cosine >= c_without.min_cosine - 1e-6


@needs_gpu
def test_gpu_graph_streams_give_the_same_features():
    from iv2trt.models import create_model

    model = create_model("s14", random_init=True)
    x = torch.randn(32, 8, 3, 224, 224, device="cuda").half()
    outs = {}
    for streams in (1, 2):
        runner = TorchRunner(copy.deepcopy(model), precision="fp16", graph_streams=streams)
        try:
            runner.prepare([(32, 8)])
            assert len(runner._graph_parts(runner.compiled.run_compiled, x)) == streams
            outs[streams] = runner.forward_device(x).double().cpu().numpy()
        finally:
            runner.close()
    c = compare(outs[1], outs[2])
    print(f"1 vs 2 graph streams: min cos {c.min_cosine:.8f} max abs {c.max_abs_error:.2e}")
    assert c.min_cosine >= 0.999999
