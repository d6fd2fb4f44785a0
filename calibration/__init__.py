"""Activation ranges, Q/DQ quantization per target (TensorRT, ONNX Runtime, OpenVINO, FP8), bf16-grid weights, sensitivity."""
