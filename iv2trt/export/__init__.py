"""Stage 1: the PyTorch encoder -> ONNX (dynamic batch and frame axes), precision conversions of ONNX graphs, and
the comparison of a runner's outputs with PyTorch fp32 that decides whether the file is written."""
