"""Stage 3's encoders: one module per backend (PyTorch, ONNX Runtime, TensorRT), each a runner that turns uint8 or
normalised frames into raw features; `base` holds what they share, `compile` the PyTorch runner's torch.compile,
and `choice` which backend serves a job (`--backend auto|tensorrt|onnxruntime|torch`)."""
