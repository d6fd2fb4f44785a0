"""Running artifacts: one Runner interface (torch | onnxruntime | tensorrt), validation, reports, benchmarks."""
