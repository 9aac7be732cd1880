"""Where the PyTorch encoder's GPU time goes: kernel time per group from a torch.profiler profile, per
compile mode, the time the GPU sits idle between a CUDA-graph replay's kernels, and the attention kernels
torch's SDPA offers at the model's shape (tools/profile_encoder.py).

Groups (first match wins, on the kernel's name): attention (SDPA's kernels, the cls split's merge), matmul
with a fused epilogue (TorchInductor's Triton templates), matmul (cuBLAS/CUTLASS, split-K reductions
included), norm/reduction (norm kernels, TorchInductor's reductions, which hold the fused residual adds),
elementwise/copies (everything else: GELU, adds, casts, layout copies, TorchInductor's pointwise kernels)."""
from __future__ import annotations

import re
import statistics
from typing import Any

GROUPS = ("attention", "matmul+epilogue (Triton)", "matmul (cuBLAS)", "norm/reduction", "elementwise/copies")
_RULES = (  # TorchInductor's kernels by kind first: their names list the ops fused in (attention's too)
    ("matmul+epilogue (Triton)", re.compile(r"^triton_tem")),
    ("attention", re.compile(r"^_cls_merge_kernel")),  # models.kernels.triton_kernels: the cls split's merge
    ("norm/reduction", re.compile(r"^triton_(per|red)_")),
    ("elementwise/copies", re.compile(r"^triton_")),
    ("attention", re.compile(r"sdpa|fmha|flash|attention|attn_fwd", re.I)),
    ("matmul (cuBLAS)", re.compile(r"gemm|nvjet|xmma|cutlass|wgmma|s16816|h16816|splitk", re.I)),
    ("norm/reduction", re.compile(r"norm|reduce|softmax", re.I)),
)


def kernel_group(name: str) -> str:
    """The group of a GPU kernel, by name."""
    for group, pattern in _RULES:
        if pattern.search(name):
            return group
    return "elementwise/copies"


def group_times(kernels: list[tuple[str, float]], calls: int) -> dict[str, Any]:
    """[(kernel name, microseconds)] over `calls` forward passes -> per-forward ms per group and per kernel."""
    groups = {g: 0.0 for g in GROUPS}
    per_kernel: dict[str, list[float]] = {}
    for name, us in kernels:
        groups[kernel_group(name)] += us
        per_kernel.setdefault(name, []).append(us)
    total = sum(groups.values())
    top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))
    return {"total_ms": total / calls / 1e3,
            "groups": {g: {"ms": t / calls / 1e3, "share": t / total if total else 0.0} for g, t in groups.items()},
            "kernels": [{"name": n, "group": kernel_group(n), "ms": sum(v) / calls / 1e3, "launches": len(v) // calls}
                        for n, v in top]}


def profile_kernels(torch, fn, x, calls: int = 5) -> list[tuple[str, float]]:
    """(name, µs) of every GPU kernel `fn(x)` launches over `calls` calls (after the caller's warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(x)
        torch.cuda.synchronize()
    return [(e.name, float(e.time_range.elapsed_us())) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]


def kernel_spans(torch, fn, calls: int = 5) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every GPU kernel of `calls` calls of fn() (CUDA-graph replays included), in
    start order."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    spans = [(e.name, float(e.time_range.start), float(e.time_range.end)) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    return sorted(spans, key=lambda s: s[1])


def idle_between_kernels(spans: list[tuple[str, float, float]], calls: int) -> dict[str, Any]:
    """Where the GPU sits idle between kernels, per call: spans from kernel_spans over `calls` calls ->
    {"kernels": a call's kernels, "idle_us": idle time a call, "overlap_us": time kernels overlapped (programmatic
    dependent launches), "transitions": idle µs a call by (kernel before, kernel after), largest first}. The idle
    time between calls is not counted."""
    if not spans or len(spans) % calls:
        return {"kernels": len(spans) / max(calls, 1), "idle_us": None, "overlap_us": None, "transitions": []}
    per_call = len(spans) // calls
    idle = overlap = 0.0
    by_pair: dict[tuple[str, str], float] = {}
    for c in range(calls):
        run = spans[c * per_call:(c + 1) * per_call]
        end = run[0][2]
        for (before, _, _), (name, start, stop) in zip(run, run[1:]):
            gap = start - end
            if gap > 0:
                idle += gap
                key = (short_name(before), short_name(name))
                by_pair[key] = by_pair.get(key, 0.0) + gap
            else:
                overlap -= gap
            end = max(end, stop)
    pairs = sorted(by_pair.items(), key=lambda kv: -kv[1])
    return {"kernels": per_call, "idle_us": idle / calls, "overlap_us": overlap / calls,
            "transitions": [{"before": a, "after": b, "idle_us": t / calls} for (a, b), t in pairs]}


def short_name(name: str) -> str:
    """A kernel's name cut to what tells kernels apart in a table (quack's epilogue, FA4, the Triton kernel)."""
    for pattern in (r"GemmMod__(\w+?)_[0-9a-f]{8}", r"(FlashAttentionForwardSm90|RowScaledForwardSm90)",
                    r"^(_\w+_kernel)", r"^(triton_\w+?)_\d+$"):
        m = re.search(pattern, name)
        if m:
            return m.group(1)
    return name[:60]


def median_ms(torch, fn, repeats: int = 30) -> float:
    """Median of `repeats` CUDA-event timings of fn() (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_runner(model, batch: int, frames: int, compile_mode: str, calls: int = 5) -> dict[str, Any]:
    """One TorchRunner (fp16) at (batch, frames): compile time, graph-replay median, kernel groups of the
    un-captured forward pass (the kernels the graph replays)."""
    import copy

    import torch

    from ..runners.torch_runner import TorchRunner

    runner = TorchRunner(copy.deepcopy(model), "cuda", "fp16", compile_mode=compile_mode)
    try:
        runner.prepare([(batch, frames)])
        size = model.cfg.img_size
        x = torch.randn(batch, frames, 3, size, size, device="cuda").to(runner.dtype)
        with torch.inference_mode():
            replay_ms = median_ms(torch, lambda: runner.forward_device(x))
            idle = idle_between_kernels(kernel_spans(torch, lambda: runner.forward_device(x), calls), calls)
            forward = runner.compiled.select(x) if runner.compiled is not None else runner.model
            forward(x)
            profile = group_times(profile_kernels(torch, forward, x, calls), calls)
        c = runner.compiled
        return {"compile": compile_mode, "batch": batch, "frames": frames, "graph_replay_ms": replay_ms,
                "clips_per_s": batch / replay_ms * 1e3,
                "compile_s": c.compile_seconds(x.shape) if c else None,
                "compile_failed": c.failed.get(c.key(x.shape)) if c else None, "replay_idle": idle, **profile}
    finally:
        runner.close()
        del runner
        torch.cuda.empty_cache()


def _attention_inputs(layout: str, batch: int, heads: int, tokens: int, head_dim: int) -> tuple:
    """q, k, v [B, heads, N, head_dim] fp16 views as they reach SDPA: `model` (q, k from the norms, [B, N, C];
    v a slice of the qkv tensor), `qkv slices` (all three slices of one [B, N, 3C] tensor), `BHSD` (contiguous)."""
    import torch

    def heads_first(t):
        return t.reshape(batch, tokens, heads, head_dim).transpose(1, 2)

    c = heads * head_dim
    randn = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.float16)  # noqa: E731
    if layout == "model":
        return heads_first(randn(batch, tokens, c)), heads_first(randn(batch, tokens, c)), \
            heads_first(randn(batch, tokens, 3 * c)[..., 2 * c:])
    if layout == "qkv slices":
        return tuple(heads_first(t) for t in randn(batch, tokens, 3 * c).chunk(3, dim=-1))
    return randn(batch, heads, tokens, head_dim), randn(batch, heads, tokens, head_dim), \
        randn(batch, heads, tokens, head_dim)


def sdpa_backends(batch: int, heads: int, head_dim: int, tokens: int, repeats: int = 20) -> list[dict]:
    """Time SDPA's backends at the model's attention shape (fp16; the model's q/k/v layout), cuDNN on other
    layouts and at one token fewer (a whole number of tiles); error against fp32 math on the first clip. The
    fused path's cls split is timed by tools/bench_cls_split.py."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cudnn, flash, efficient = SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION
    cases = [("model", tokens, b) for b in (cudnn, flash, efficient)]
    cases += [("qkv slices", tokens, cudnn), ("BHSD", tokens, cudnn), ("model", tokens - 1, cudnn)]
    rows = []
    for layout, n, backend in cases:
        q, k, v = _attention_inputs(layout, batch, heads, n, head_dim)
        ref = F.scaled_dot_product_attention(*(t[:1].float() for t in (q, k, v)))
        row = {"layout": layout, "tokens": n, "backend": backend.name, "batch": batch, "heads": heads,
               "head_dim": head_dim}
        try:
            call = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
            with sdpa_kernel([backend]):
                out = call()
                ms = median_ms(torch, call, repeats)
            err = ((out[:1].float() - ref).norm() / ref.norm()).item()
            row.update(ms=ms, tflops=4.0 * batch * heads * n * n * head_dim / ms / 1e9, rel_error=err)
        except Exception as exc:  # an unsupported backend or layout is a result too
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    """Kernel groups side by side per compile mode, the top kernels of each, and the SDPA table."""
    runs = results["runs"]
    lines = ["| kernel group | " + " | ".join(f"{r['compile']} ms (share)" for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for g in GROUPS:
        lines.append(f"| {g} | " + " | ".join(f"{r['groups'][g]['ms']:.2f} ({100 * r['groups'][g]['share']:.0f}%)"
                                               for r in runs) + " |")
    lines.append("| all kernels | " + " | ".join(f"{r['total_ms']:.2f}" for r in runs) + " |")
    lines.append("| graph replay (median) | " + " | ".join(f"{r['graph_replay_ms']:.2f}" for r in runs) + " |")
    lines.append("| clips/s (graph replay) | " + " | ".join(f"{r['clips_per_s']:.0f}" for r in runs) + " |")
    lines.append("| compile s (this process) | " + " | ".join(
        "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}" for r in runs) + " |")
    for r in runs:
        idle = r.get("replay_idle") or {}
        if idle.get("idle_us") is not None:
            lines += ["", f"Graph replay, {r['compile']}: {idle['kernels']} kernels a call, idle between them "
                      f"{idle['idle_us']:.0f} µs, kernels overlapping {idle['overlap_us']:.0f} µs. "
                      "Idle by transition:",
                      "", "| µs a call | kernel before | kernel after |", "|---|---|---|"]
            lines += [f"| {t['idle_us']:.1f} | `{t['before']}` | `{t['after']}` |" for t in idle["transitions"][:10]]
        lines += ["", f"Top kernels, {r['compile']} ({r['batch']}x{r['frames']}):", "",
                  "| ms | launches | group | kernel |", "|---|---|---|---|"]
        lines += [f"| {k['ms']:.3f} | {k['launches']} | {k['group']} | `{k['name'][:110]}` |"
                  for k in r["kernels"][:12]]
    if results.get("sdpa"):
        lines += ["", "| q/k/v layout | tokens | attention | ms | TFLOP/s | rel. error vs fp32 |",
                  "|---|---|---|---|---|---|"]
        for s in results["sdpa"]:
            head = f"| {s['layout']} | {s['tokens']} | {s['backend']} |"
            if "error" in s:
                lines.append(f"{head} failed: {s['error']} | | |")
            else:
                lines.append(f"{head} {s['ms']:.3f} | {s['tflops']:.0f} | {s['rel_error']:.1e} |")
    return "\n".join(lines)
