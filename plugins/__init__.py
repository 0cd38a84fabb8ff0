"""Custom kernels and their ONNX node forms, importable as `qpass.plugins`.

- `int4_gemm`: the INT4 W4A16 GEMM (packed layout, numpy reference, Triton kernel, PTX).
- `onnx_node`: its ONNX node form for TensorRT's parser, and an ONNX Runtime stand-in.
- `tensorrt`: its registration with `tensorrt.plugin` (needs TensorRT; never run here).
"""
