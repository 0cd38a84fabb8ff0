"""Floating-point presets: fp8 (FP8 E4M3) and w4a8-fp (FP4 E2M1 weights, FP8 activations)."""

from __future__ import annotations

import onnx_ir as ir

from qpass.passes import (
    CorrectBias,
    FoldBatchNorm,
    InsertQDQ,
    KeepLeadingLayersFloat,
    KeepSmallConvsFloat,
)
from qpass.presets import CALIBRATOR, Option, canonicalize, preset
from qpass.schemes import FP4, FP8, QuantScheme
from qpass.targets import Target

SCALE_CONSTRAINT = Option(
    "scale_constraint", str, "scales any float, powers of two, or powers of two apart per tensor "
    "(per output channel for blocks)", "float", choices=("float", "pow2", "pow2-group"),
)
FLOAT_LAYERS = Option(
    "float_layers", int, "leave the first N Conv/Gemm/MatMul layers in float", 0, minimum=0
)


def _activations(calibrator: str, scale_constraint: str) -> QuantScheme:
    return QuantScheme(
        dtype=FP8, symmetric=True, method=calibrator, scale_constraint=scale_constraint
    )


def _leading_float(count: int) -> list[ir.passes.PassBase]:
    return [KeepLeadingLayersFloat(count)] if count else []


@preset(
    "fp8",
    "FP8 E4M3: per-channel weights, per-tensor calibrated activations (ORT simulates it)",
    options=(
        CALIBRATOR,
        SCALE_CONSTRAINT,
        Option("correct_bias", bool, "empirical bias correction after quantization", True),
        FLOAT_LAYERS,
        Option("small_convs", bool, "quantize the convolutions FP8 kernels do not serve too "
               "(<= 16 channels, depthwise, filters above 32 taps); by default they stay float",
               False),
    ),
    targets=("onnxruntime", "tensorrt"),
)
def fp8(
    target: Target,
    exclude: frozenset[str],
    calibrator: str,
    scale_constraint: str,
    correct_bias: bool,
    float_layers: int,
    small_convs: bool,
) -> list[ir.passes.PassBase]:
    """FP8 E4M3 (symmetric, scale = amax / 448): per-channel weights, per-tensor calibrated
    activations, biases in float, Relu/Clip kept; opset raised to 19. ONNX Runtime runs it as
    simulation (DequantizeLinear, then float compute); TensorRT runs it natively on Ada/Hopper.
    The convolutions FP8 does not serve stay float (`KeepSmallConvsFloat`) unless `small_convs`;
    `correct_bias` (on by default) adds empirical bias correction (`CorrectBias`);
    `float_layers=N` leaves the first N weighted layers in float (`KeepLeadingLayersFloat`)."""
    weights = QuantScheme(
        dtype=FP8, per_channel=True, symmetric=True, scale_constraint=scale_constraint
    )
    activations = _activations(calibrator, scale_constraint)
    quantize = InsertQDQ(weights=weights, activations=activations, exclude=exclude)
    lowered = [quantize, *target.float8_lowering()]
    head = [*canonicalize(), FoldBatchNorm(), *_leading_float(float_layers)]
    if not small_convs:
        head.append(KeepSmallConvsFloat())
    if not correct_bias:
        return [*head, *lowered]
    correct = CorrectBias()
    return [*head, correct.snapshot(), *lowered, correct]


@preset(
    "w4a8-fp",
    "FP4 E2M1 block-scaled weights, FP8 activations (ZeroQuant-FP)",
    options=(
        CALIBRATOR,
        Option("group_size", int, "input channels per weight scale", 128, minimum=1),
        SCALE_CONSTRAINT,
        Option(
            "storage", str, "FP4 weights stored as their exact FP8 values (float8: ONNX Runtime "
            "runs it) or as FLOAT4E2M1 (float4, opset 23: TensorRT)",
            {"onnxruntime": "float8", "tensorrt": "float4"}, choices=("float8", "float4"),
        ),
        FLOAT_LAYERS,
    ),
    targets=("onnxruntime", "tensorrt"),
)
def w4a8_fp(
    target: Target,
    exclude: frozenset[str],
    calibrator: str,
    group_size: int,
    scale_constraint: str,
    storage: str,
    float_layers: int,
) -> list[ir.passes.PassBase]:
    """W4A8 in floating point (Wu et al. 2023, "ZeroQuant-FP"): FP4 E2M1 weights with one scale
    per block of `group_size` input channels of each output channel, FP8 E4M3 per-tensor
    activations, biases and Relu/Clip as in `fp8`."""
    weights = QuantScheme(
        dtype=FP4, symmetric=True, group_size=group_size, scale_constraint=scale_constraint
    )
    activations = _activations(calibrator, scale_constraint)
    quantize = InsertQDQ(
        weights=weights, activations=activations, exclude=exclude, fp4_storage=storage
    )
    return [
        *canonicalize(),
        FoldBatchNorm(),
        *_leading_float(float_layers),
        quantize,
        *target.float8_lowering(),
    ]
