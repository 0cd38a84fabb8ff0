"""TensorRT (GPU): explicit, strongly typed quantization, checked statically by `qpass.lint`.

TensorRT cannot be installed on the machines qpass is developed on: the graph is checked by the
linter and its numerics in ONNX Runtime; `deploy` (the engine build) is untested here.
"""

from __future__ import annotations

from qpass.passes.fuse_requant import FuseRequant
from qpass.passes.lower_tensorrt import LowerForTensorRT
from qpass.passes.place_float8 import PlaceFloat8ForOnnxRuntime
from qpass.schemes import QuantScheme
from qpass.targets import Target, register


class TensorRT(Target):
    """S8 symmetric activations and weights (TensorRT is symmetric only), Q/DQ moved where
    TensorRT fuses them; the compiled graph must pass the TensorRT linter."""

    name = family = "tensorrt"
    title = "TensorRT"
    help = "TensorRT, GPU: symmetric Q/DQ, linted (engine build untested here)"
    default_preset = "int8"

    def int8_activations(self, method: str) -> QuantScheme:
        return QuantScheme(dtype="int8", symmetric=True, method=method)

    def integer_lowering(self):
        return [FuseRequant(), LowerForTensorRT()]

    def float8_lowering(self):
        # The same numbers in either placement, and TensorRT fuses both; qpass checks every
        # target's numerics in ONNX Runtime, whose fusions need this placement.
        return [PlaceFloat8ForOnnxRuntime()]

    def check(self, model):
        from qpass.lint import lint_tensorrt

        return lint_tensorrt(model)

    def deploy(self, onnx_path, out, **options):
        """Build a TensorRT engine (plan) at `out` (`qpass.runtime.tensorrt.build_engine`)."""
        from qpass.runtime import tensorrt as trt_runtime

        return trt_runtime.build_engine(onnx_path, out, **options)


register(TensorRT())
