#!/usr/bin/env python3
"""Stage 2: validated ONNX -> TensorRT engine (+ <engine>.json). See --help."""
from iv2trt.build_cmd import main
from iv2trt.cli import exit_with

if __name__ == "__main__":
    exit_with(main)
