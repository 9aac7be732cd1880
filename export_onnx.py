#!/usr/bin/env python3
"""Stage 1: PyTorch InternVideo2-CLIP vision encoder -> validated ONNX. See --help."""
from iv2trt.cli import exit_with
from iv2trt.cli.export import main

if __name__ == "__main__":
    exit_with(main)
