"""Models, checkpoints, ONNX export and verification, FP16 conversion, TensorRT engine builds."""
