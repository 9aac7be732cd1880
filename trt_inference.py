#!/usr/bin/env python3
"""Stage 3: videos -> L2-normalised InternVideo2-CLIP features (TensorRT, ONNX Runtime or PyTorch). See --help."""
from iv2trt.cli import exit_with
from iv2trt.cli.infer import main

if __name__ == "__main__":
    exit_with(main)
