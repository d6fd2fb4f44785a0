"""xattn-deploy: take a cross-attention PyTorch model to ONNX, FP16/INT8 and TensorRT, and check it.

The library lives in floors, each importing only those below it (``tests/test_layers.py``): this package (what
every floor reads: the version, the exception family, shapes, atomic files, reading and writing ONNX, data sources,
the built-in models and the model registry, TensorRT plans, sidecars and caches), :mod:`runtime` (runners,
validation, benchmarks, serving), :mod:`exporter` (ONNX export and its verification, attention rewrites, FP16,
engine builds), :mod:`calibration` (ranges, quantization) and :mod:`tools` (the ``xattn`` command line).
"""

__version__ = "0.1.0"
