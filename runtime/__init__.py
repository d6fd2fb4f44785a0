"""Running artifacts: one Runner interface (torch | onnxruntime | openvino | tensorrt), validation, reports, benchmarks."""
