"""xattn-deploy: take a cross-attention PyTorch model to ONNX, FP16/INT8 and TensorRT, and check it.

The library lives in four packages: :mod:`exporter` (models, ONNX export, conversion, engine builds),
:mod:`calibration` (data, ranges, quantization), :mod:`runtime` (runners, validation, benchmarks) and
:mod:`tools` (the ``xattn`` command line). This package holds what all of them share: the version,
the exception family, shape parsing and atomic file writing.
"""

__version__ = "0.1.0"
