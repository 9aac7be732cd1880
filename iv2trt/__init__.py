"""iv2trt: InternVideo2-CLIP video embeddings with ONNX and TensorRT.

Subpackages along the data's path: `models` (the encoder as the paper reads, its fused kernels apart) ->
`export` (ONNX, stage 1) -> `engine` (TensorRT, stage 2) -> `runners` (one per backend), `decode` (inputs ->
clips) and `output` (shards and manifests) -> `job` (the executor core, the local executor) -> `distributed` (the
Ray executor); `cli` holds the commands and `bench` the benchmarks. Lower layers never import higher ones
(tests/test_structure.py). Read features back with `iv2trt.load_features`.
"""
from .output.results import load_features
from .version import __version__

__all__ = ["__version__", "load_features"]
