"""Calibration data, activation ranges, TensorRT calibration caches, Q/DQ quantization, sensitivity."""
