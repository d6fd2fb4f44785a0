"""ONNX export and its verification, attention rewrites per backend, FP16 conversion, TensorRT engine builds."""
