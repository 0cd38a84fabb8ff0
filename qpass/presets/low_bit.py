"""Low-bit integer presets for convolutional networks: w4a4, w3a3, w2a2 (also the starting points
of quantization-aware training, `qpass.qat`).

ONNX Runtime has no kernels for activations below 8 bits: it runs these graphs through opset-21
QuantizeLinear/DequantizeLinear in float, as a simulation of the accuracy. No speed is claimed.
"""

from __future__ import annotations

import onnx_ir as ir

from qpass.passes import BlockAdaRound, InsertQDQ, KeepEdgeLayersWide
from qpass.presets import CALIBRATOR, Option, preset
from qpass.presets.cnn import ITERATIONS, integer_pipeline
from qpass.schemes import QuantScheme
from qpass.targets import Target

EDGE_BITS = Option("edge_bits", int, "bits of the first and last layer's weights and input "
                   "activations (8, as LSQ; or the preset's own bits)", 8, choices=(2, 3, 4, 8))
ADAROUND = Option("adaround", bool, "learn each weight's rounding block by block "
                  "(BlockAdaRound)", False)

_SIGNED = {8: "int8", 4: "int4", 3: "int3", 2: "int2"}


def low_bit(
    bits: int, target: Target, exclude: frozenset[str], calibrator: str, edge_bits: int,
    adaround: bool, iterations: int,
) -> list[ir.passes.PassBase]:
    """`bits`-bit symmetric per-channel weights and `bits`-bit asymmetric per-tensor activations
    (unsigned, as the target's 8-bit ones), the first and last layer at `edge_bits`."""

    def schemes(width: int) -> tuple[QuantScheme, QuantScheme]:
        activations = target.int8_activations(calibrator)
        if width != 8:
            activations = QuantScheme(dtype="u" + _SIGNED[width], method=calibrator)
        return QuantScheme(dtype=_SIGNED[width], per_channel=True, symmetric=True), activations

    (weights, activations), (edge_weights, edge_activations) = schemes(bits), schemes(edge_bits)
    quantize = InsertQDQ(
        weights=weights, activations=activations, exclude=exclude,
        edge_weights=edge_weights, edge_activations=edge_activations,
    )
    rounding = [BlockAdaRound(iterations=iterations)] if adaround else []
    return integer_pipeline(target, quantize, *rounding, before=(KeepEdgeLayersWide(),))


def _register(bits: int) -> None:
    name = f"w{bits}a{bits}"

    @preset(
        name,
        f"S{bits} per-channel weights, U{bits} activations, first and last layer at 8 bits "
        "(simulated in ONNX Runtime: no speed claim)",
        options=(CALIBRATOR, EDGE_BITS, ADAROUND, ITERATIONS),
    )
    def build(target, exclude, calibrator, edge_bits, adaround, iterations):
        return low_bit(bits, target, exclude, calibrator, edge_bits, adaround, iterations)


for _bits in (4, 3, 2):
    _register(_bits)
