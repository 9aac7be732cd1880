#!/usr/bin/env python3
"""On a CUDA machine: where the PyTorch fp16 encoder's time goes, per kernel group, for each torch.compile
mode, the idle time between a graph replay's kernels, and the SDPA attention backends at the model's attention
shape. Prints Markdown, writes JSON.

  python tools/profile_encoder.py --compile off default --shape 32x8 --sdpa --output profile.json
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from iv2trt.bench.profile import markdown, profile_runner, sdpa_backends  # noqa: E402
from iv2trt.export.onnx_export import parse_shape  # noqa: E402
from iv2trt.runners.compile import CHOICES  # noqa: E402
from iv2trt.settings import setup_logging  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="s14")
    p.add_argument("--compile", nargs="+", default=["off", "default"], choices=CHOICES,
                   help="compile modes to profile, one runner each (default: %(default)s)")
    p.add_argument("--shape", default="32x8", help="BATCHxFRAMES (default: %(default)s)")
    p.add_argument("--calls", type=int, default=5, help="profiled forward passes per mode (default: %(default)s)")
    p.add_argument("--sdpa", action="store_true", help="also time SDPA's backends at the attention shape")
    p.add_argument("--output", help="JSON file for every number")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args()
    setup_logging(a.verbose)
    import torch

    from iv2trt.models import create_model

    if not torch.cuda.is_available():
        print("profile_encoder.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    model = create_model(a.variant, random_init=True)
    batch, frames = parse_shape(a.shape)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [batch, frames],
               "runs": [profile_runner(model, batch, frames, mode, a.calls) for mode in a.compile]}
    if a.sdpa:
        cfg = model.cfg
        tokens = 1 + frames * cfg.patches_per_frame
        results["sdpa"] = sdpa_backends(batch, cfg.num_heads, cfg.embed_dim // cfg.num_heads, tokens)
    print(f"{results['gpu']}, torch {results['torch']}, S/14 fp16 {batch}x{frames}, kernel time per forward pass\n")
    print(markdown(results), flush=True)
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
