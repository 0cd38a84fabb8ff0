"""Custom kernels and their ONNX node forms, importable as `qpass.plugins`.

- `int4_gemm`: the INT4 W4A16 GEMM (numpy reference, Triton kernel, PTX); its packed weight
  layout is `qpass.packing`.
- `onnx_node`: checks of its ONNX node (the node form is `qpass.plugin_spec`), and an ONNX
  Runtime stand-in.
- `tensorrt`: its registration with `tensorrt.plugin` (needs TensorRT; never run here).
"""
