"""W8A8 presets for transformer MatMuls: w8a8-smoothquant (static), w8a8-dynamic (per token)."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qpass.passes import (
    HeroLevel,
    InsertQDQ,
    KeepSensitiveFloat,
    LowerIntegerMatMul,
    QuantizeDynamicPerToken,
    SmoothQuant,
)
from qpass.presets import CALIBRATOR, Option, canonicalize, preset
from qpass.schemes import WEIGHT_INT8
from qpass.targets import Target


def smoothing_strength(value) -> float | str:
    """SmoothQuant's alpha: a number in [0, 1], or "auto" (searched per layer)."""
    if value == "auto":
        return value
    try:
        alpha = float(value)
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{value!r} is not a number in [0, 1] or 'auto'")
    return alpha


ALPHA = Option(
    "alpha", smoothing_strength, "SmoothQuant migration strength in [0, 1], or 'auto' to search "
    "it per layer", 0.8,
)
LEVEL = Option(
    "level", str, "ZeroQuant-HERO level: m1 (GEMMs with weights in int8), m2 (also attention's "
    "Q·Kᵀ and softmax·V), m3 (also the residual Adds before LayerNorm)", "m1",
    choices=("m1", "m2", "m3"),
)
KEEP_FLOAT = Option(
    "keep_float", int, "leave the N layers most sensitive to quantization in float", 0, minimum=0
)


def _searched(alpha: float | str) -> float | None:
    return None if alpha == "auto" else alpha


def _sensitive_float(quantize, exclude: frozenset[str], count: int) -> list[ir.passes.PassBase]:
    if not count:
        return []
    return [KeepSensitiveFloat(lambda excluded: quantize(excluded | exclude), count)]


@preset(
    "w8a8-smoothquant",
    "W8A8 static for transformers: SmoothQuant, then S8 weights and U8 activations on MatMuls",
    options=(CALIBRATOR, ALPHA, KEEP_FLOAT, LEVEL),
)
def w8a8_smoothquant(
    target: Target,
    exclude: frozenset[str],
    calibrator: str,
    alpha: float | str,
    keep_float: int,
    level: str = "m1",
) -> list[ir.passes.PassBase]:
    """SmoothQuant (Xiao et al. 2023; `alpha`, or "auto": searched per layer), then S8 symmetric
    per-channel weights and U8 per-tensor calibrated activations on every MatMul/Gemm with a
    constant weight (attention's activation x activation MatMuls, Softmax, LayerNorm and residual
    Adds stay float), lowered to ORT's MatMulIntegerToFloat with the bias in the kernel (the QDQ
    form before `LowerIntegerMatMul` is standard ONNX). `keep_float=N` leaves the N layers most
    sensitive to quantization (on the calibration data, after smoothing) in float. `level`:
    ZeroQuant-HERO's M1 (the above), M2 (also attention's activation x activation MatMuls) or
    M3 (also the residual Adds), per-tensor U8 activations throughout (`HeroLevel`)."""
    activations = target.int8_activations(calibrator)

    def quantize(excluded: frozenset[str]) -> list[ir.passes.PassBase]:
        return [
            HeroLevel(level),
            InsertQDQ(
                weights=WEIGHT_INT8, activations=activations, op_types=("MatMul", "Gemm", "Add"),
                exclude=excluded,
            ),
        ]

    return [
        *canonicalize(),
        SmoothQuant(alpha=_searched(alpha), activations=activations, exclude=exclude),
        *_sensitive_float(quantize, exclude, keep_float),
        *quantize(exclude),
        *target.integer_lowering(),
        LowerIntegerMatMul(),
    ]


@preset(
    "w8a8-dynamic",
    "W8A8 for transformers with per-token dynamic activations (no calibration needed)",
    options=(
        Option("smooth", bool, "run SmoothQuant first (needs calibration data)", False),
        dataclasses.replace(ALPHA, default="auto"),
        KEEP_FLOAT,
    ),
)
def w8a8_dynamic(
    target: Target, exclude: frozenset[str], smooth: bool, alpha: float | str, keep_float: int
) -> list[ir.passes.PassBase]:
    """S8 symmetric per-channel weights and per-token dynamic activations (each row's range at
    run time) on every MatMul with a constant weight; `smooth` runs SmoothQuant first. Lowered to
    ORT's MatMulIntegerToFloat. `keep_float=N` leaves the N most sensitive layers in float (needs
    calibration data)."""
    smoothing = [SmoothQuant(alpha=_searched(alpha), per_token=True, exclude=exclude)]

    def quantize(excluded: frozenset[str]) -> list[ir.passes.PassBase]:
        return [QuantizeDynamicPerToken(weights=WEIGHT_INT8, exclude=excluded)]

    return [
        *canonicalize(),
        *(smoothing if smooth else []),
        *_sensitive_float(quantize, exclude, keep_float),
        *quantize(exclude),
        LowerIntegerMatMul(),
    ]
