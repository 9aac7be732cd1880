"""Stage 2: ONNX -> TensorRT engine. `tensorrt` imports the TensorRT flavour (full TensorRT 10/11 or TensorRT-RTX;
shared with the runtime), `build` builds and describes engines, `cuda_env` asks the driver and GPU without
PyTorch, `engine_map` picks an engine per GPU model."""
