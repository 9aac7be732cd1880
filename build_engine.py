#!/usr/bin/env python3
"""Stage 2: validated ONNX -> TensorRT engine (+ <engine>.json). See --help."""
from iv2trt.cli import exit_with
from iv2trt.cli.build import main

if __name__ == "__main__":
    exit_with(main)
