"""Integer presets for convolutional networks: int8, int8-tensor, w4a8, w4a8-rtn, w4a8-obq."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qpass.passes import (
    OBQ,
    AbsorbHighBias,
    AdaRound,
    BlockAdaRound,
    CorrectBias,
    EqualizeCrossLayer,
    FoldBatchNorm,
    InsertQDQ,
)
from qpass.presets import CALIBRATOR, Option, canonicalize, preset
from qpass.schemes import WEIGHT_INT4_CHANNEL, WEIGHT_INT8, WEIGHT_INT8_TENSOR
from qpass.targets import Target

ITERATIONS = Option("iterations", int, "AdaRound steps per block or layer", 500, minimum=1)
ADAROUND = Option("adaround", bool, "learn each weight's rounding (AdaRound)", False)
BITS = Option("bits", int, "weight bits: 4, or 3 (W3A8: 8 of the INT4 levels, [-4, 3])", 4,
              choices=(3, 4))


def weight_scheme(bits: int):
    """S4 per-channel weights, or S3 stored as INT4 (ONNX has no 3-bit type)."""
    return dataclasses.replace(WEIGHT_INT4_CHANNEL, dtype=f"int{bits}")


def integer_pipeline(
    target: Target, quantize: InsertQDQ, *refine, before: tuple[ir.passes.PassBase, ...] = ()
) -> list[ir.passes.PassBase]:
    """Canonicalization, BatchNorm folding, `before`, the quantizing pass and the `refine` passes
    in order (the snapshots of those that read the float model placed before quantization), then
    the target's lowering."""
    return [
        *canonicalize(),
        FoldBatchNorm(),
        *before,
        *(p.snapshot() for p in refine),
        quantize,
        *refine,
        *target.integer_lowering(),
    ]


@preset(
    "int8",
    "INT8: S8 per-channel weights, 8-bit per-tensor calibrated activations (the target's form)",
    options=(CALIBRATOR,),
    targets=("onnxruntime", "tensorrt"),
)
def int8(target: Target, exclude: frozenset[str], calibrator: str) -> list[ir.passes.PassBase]:
    """S8 symmetric per-channel weights and the target's 8-bit activations (U8 for ONNX Runtime,
    symmetric S8 for TensorRT) on every Conv, Gemm, MatMul, Add and average pool."""
    activations = target.int8_activations(calibrator)
    quantize = InsertQDQ(weights=WEIGHT_INT8, activations=activations, exclude=exclude)
    return integer_pipeline(target, quantize)


@preset(
    "int8-tensor",
    "INT8 with one scale per weight tensor, recovered by CLE, bias absorption, bias correction",
    options=(
        CALIBRATOR,
        Option("allow_relu6", bool, "let equalization replace ReLU6 by ReLU (changes the float "
               "model)", False),
        Option("data_free", bool, "run equalization, absorption and bias correction", True),
        ADAROUND,
        ITERATIONS,
    ),
)
def int8_tensor(
    target: Target,
    exclude: frozenset[str],
    calibrator: str,
    allow_relu6: bool,
    data_free: bool,
    adaround: bool,
    iterations: int,
) -> list[ir.passes.PassBase]:
    """Per-tensor weights (for targets without per-channel weight scales), recovered as in Nagel
    et al. 2019: cross-layer equalization, high-bias absorption, then empirical bias correction;
    `adaround` learns each weight's rounding before the bias correction."""
    activations = target.int8_activations(calibrator)
    quantize = InsertQDQ(weights=WEIGHT_INT8_TENSOR, activations=activations, exclude=exclude)
    if not data_free:
        return integer_pipeline(target, quantize)
    equalize = (EqualizeCrossLayer(allow_relu6=allow_relu6), AbsorbHighBias())
    rounding = [AdaRound(iterations=iterations)] if adaround else []
    return integer_pipeline(target, quantize, *rounding, CorrectBias(), before=equalize)


@preset(
    "w4a8",
    "S4 per-channel weights, U8 activations; rounding learned block by block (BlockAdaRound)",
    options=(
        CALIBRATOR,
        Option("adaround", bool, "learn each weight's rounding (AdaRound)", True),
        ITERATIONS,
        Option("block_layers", int, "layers whose rounding is learned together on their block's "
               "output (1: layer by layer)", 4, minimum=1),
        BITS,
    ),
)
def w4a8(
    target: Target,
    exclude: frozenset[str],
    calibrator: str,
    adaround: bool,
    iterations: int,
    block_layers: int,
    bits: int = 4,
) -> list[ir.passes.PassBase]:
    """S4 symmetric per-channel weights and U8 per-tensor activations on every Conv, Gemm and
    MatMul with a constant weight, the rounding learned on the calibration data on the output of
    blocks of up to `block_layers` layers (AdaRound, Nagel et al. 2020, as BRECQ, Li et al. 2021).
    ONNX Runtime has no INT4 convolution kernel: the weights are read through opset-21
    DequantizeLinear and the convolution runs in float on Q/DQ activations. `bits=3`: W3A8."""
    activations = target.int8_activations(calibrator)
    quantize = InsertQDQ(weights=weight_scheme(bits), activations=activations, exclude=exclude)
    rounding = (
        AdaRound(iterations=iterations)
        if block_layers == 1
        else BlockAdaRound(iterations=iterations, block_layers=block_layers)
    )
    return integer_pipeline(target, quantize, *([rounding] if adaround else []))


@preset("w4a8-rtn", "w4a8 with round-to-nearest weights (the baseline)",
        options=(CALIBRATOR, BITS))
def w4a8_rtn(target: Target, exclude: frozenset[str], calibrator: str, bits: int):
    return w4a8(target, exclude, calibrator, adaround=False, iterations=1, block_layers=1,
                bits=bits)


@preset(
    "w4a8-obq",
    "w4a8 with each weight's integer chosen by OBQ (exact greedy OBS quantization)",
    options=(
        CALIBRATOR,
        BITS,
        Option("max_row", int, "longest row (inputs x kernel) OBQ quantizes; longer ones get "
               "GPTQ's update", 4096, minimum=1),
    ),
)
def w4a8_obq(target: Target, exclude: frozenset[str], calibrator: str, bits: int, max_row: int):
    """w4a8's grid (S4, or S3 with `bits=3`, per channel; U8 activations) with the integers
    chosen layer by layer by OBQ (Frantar & Alistarh 2022) on the calibration data: each row's
    weights quantized greedily in the order that raises the layer's output error least, the
    rest updated through the exact inverse Hessian (`OBQ`). Layers with rows longer than
    `max_row` get GPTQ's update instead (OBQ's cost grows with the cube of the row length)."""
    activations = target.int8_activations(calibrator)
    scheme = weight_scheme(bits)
    quantize = InsertQDQ(weights=scheme, activations=activations, exclude=exclude)
    return integer_pipeline(target, quantize, OBQ(max_row=max_row))
