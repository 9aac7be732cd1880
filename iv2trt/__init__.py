"""iv2trt: InternVideo2-CLIP video embeddings with ONNX and TensorRT.

One module per stage of the data's path: settings -> transforms -> onnx_export -> engine_build ->
trt_runtime -> video -> job -> writer; results reads an output directory back. The model itself lives
in the top-level `models` package.
"""
__version__ = "0.1.0"

from .results import load_features  # noqa: E402 - the documented way to read features back
