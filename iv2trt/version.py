"""The package's version (pyproject.toml reads it; ONNX files and engines record it as their producer)."""
__version__ = "0.1.0"
