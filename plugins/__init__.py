"""Custom kernels and their ONNX node forms, importable as `qpass.plugins` (none yet)."""
