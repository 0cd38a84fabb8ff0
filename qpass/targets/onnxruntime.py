"""ONNX Runtime on CPU: the embedded default target."""

from __future__ import annotations

from qpass.passes.fuse_requant import FuseRequant
from qpass.passes.lower_onnxruntime import LowerForOnnxRuntime
from qpass.passes.place_float8 import PlaceFloat8ForOnnxRuntime
from qpass.runtime import onnxruntime as ort_runtime
from qpass.schemes import QuantScheme
from qpass.targets import Target, register


class OnnxRuntime(Target):
    """U8 activations with S8 weights (the form ORT's x86 QLinearConv/QGemm kernels fuse), requant
    pairs fused, FP8 pairs placed where ORT 1.32's fusions keep their numbers. No legality check:
    ORT runs every Q/DQ graph, fused or simulated."""

    name = family = "onnxruntime"
    title = "ONNX Runtime"
    help = "ONNX Runtime, CPU (default): fused QLinear kernels"
    default_preset = "int8"

    def int8_activations(self, method: str) -> QuantScheme:
        return QuantScheme(dtype="uint8", method=method)

    def integer_lowering(self):
        return [FuseRequant(), LowerForOnnxRuntime()]

    def float8_lowering(self):
        return [PlaceFloat8ForOnnxRuntime()]

    def deploy(self, onnx_path, out=None, **options):
        """An ONNX Runtime session of the saved model (`out` is unused)."""
        return ort_runtime.session(str(onnx_path), **options)


register(OnnxRuntime())
