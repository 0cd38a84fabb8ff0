"""Presets: named lists of passes and schemes."""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from qpass.passes import (
    GPTQ,
    AbsorbHighBias,
    CorrectBias,
    EqualizeCrossLayer,
    FoldBatchNorm,
    FoldConstants,
    FoldPadIntoConv,
    FuseRequant,
    InsertQDQ,
    LowerForOnnxRuntime,
    LowerForTensorRT,
    LowerToMatMulNBits,
    RoundToNearest,
)
from qpass.schemes import FP8, WEIGHT_INT8, QuantScheme

DEFAULT_CALIBRATOR = "minmax"


def canonicalize() -> list[ir.passes.PassBase]:
    """Passes that expose patterns without changing the float function."""
    return [FoldConstants(), FoldPadIntoConv()]


def int8(
    calibrator: str | None = None, exclude: frozenset[str] = frozenset()
) -> list[ir.passes.PassBase]:
    """INT8 for ONNX Runtime: S8 symmetric per-channel weights, U8 per-tensor activations."""
    activations = QuantScheme(dtype="uint8", method=calibrator or DEFAULT_CALIBRATOR)
    return [
        *canonicalize(),
        FoldBatchNorm(),
        InsertQDQ(weights=WEIGHT_INT8, activations=activations, exclude=exclude),
        FuseRequant(),
        LowerForOnnxRuntime(),
    ]


WEIGHT_INT8_TENSOR = QuantScheme(dtype="int8", per_channel=False, symmetric=True)


def int8_tensor(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    allow_relu6: bool = False,
    data_free: bool = True,
) -> list[ir.passes.PassBase]:
    """INT8 with one scale per weight tensor (for targets without per-channel weight scales),
    recovered as in Nagel et al. 2019: cross-layer equalization, high-bias absorption, then
    empirical bias correction on the calibration data. `allow_relu6=True` lets equalization
    replace ReLU6 by ReLU between layers (changes the float model); `data_free=False` leaves the
    three passes out (the plain per-tensor baseline)."""
    activations = QuantScheme(dtype="uint8", method=calibrator or DEFAULT_CALIBRATOR)
    quantize = InsertQDQ(weights=WEIGHT_INT8_TENSOR, activations=activations, exclude=exclude)
    if not data_free:
        return [*canonicalize(), FoldBatchNorm(), quantize, FuseRequant(), LowerForOnnxRuntime()]
    correct = CorrectBias()
    return [
        *canonicalize(),
        FoldBatchNorm(),
        EqualizeCrossLayer(allow_relu6=allow_relu6),
        AbsorbHighBias(),
        correct.snapshot(),
        quantize,
        correct,
        FuseRequant(),
        LowerForOnnxRuntime(),
    ]


WEIGHT_FORMATS = ("dq", "matmulnbits")


def _w4_scheme(group_size: int | None, symmetric: bool) -> QuantScheme:
    """4-bit weights: int4 around 0 when symmetric, else uint4 with a zero point per group."""
    dtype = "int4" if symmetric else "uint4"
    return QuantScheme(dtype=dtype, symmetric=symmetric, group_size=group_size or 128)


def _w4_lowering(format: str, accuracy_level: int) -> list[ir.passes.PassBase]:
    if format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {format!r} is unknown; use one of {WEIGHT_FORMATS}")
    return [LowerToMatMulNBits(accuracy_level)] if format == "matmulnbits" else []


def w4a16_rtn(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    group_size: int | None = 128,
    format: str = "dq",
    symmetric: bool = False,
    lm_head: bool = False,
    accuracy_level: int = 0,
) -> list[ir.passes.PassBase]:
    """Weight-only 4-bit, round to nearest, one scale (and zero point) per group of input channels
    of every MatMul weight; lm_head and embeddings stay in float. `format`: "dq" (opset-21
    blockwise DequantizeLinear -> MatMul) or "matmulnbits" (com.microsoft.MatMulNBits).
    Needs no calibration data (`calibrator` is ignored)."""
    scheme = _w4_scheme(group_size, symmetric)
    return [
        RoundToNearest(scheme, exclude=exclude, lm_head=lm_head),
        *_w4_lowering(format, accuracy_level),
    ]


def w4a16_gptq(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    group_size: int | None = 128,
    format: str = "dq",
    symmetric: bool = False,
    lm_head: bool = False,
    accuracy_level: int = 0,
    act_order: bool = False,
    damp: float = 0.01,
    sequential: str = "block",
) -> list[ir.passes.PassBase]:
    """Weight-only 4-bit with GPTQ (block by block on the calibration data), same schemes and
    formats as `w4a16_rtn`."""
    scheme = _w4_scheme(group_size, symmetric)
    gptq = GPTQ(
        weights=scheme, exclude=exclude, lm_head=lm_head, act_order=act_order, damp=damp,
        sequential=sequential,
    )
    return [gptq, *_w4_lowering(format, accuracy_level)]


PRESETS: dict[str, Callable[..., list[ir.passes.PassBase]]] = {
    "int8": int8,
    "int8-tensor": int8_tensor,
    "w4a16-rtn": w4a16_rtn,
    "w4a16-gptq": w4a16_gptq,
}


def int8_tensorrt(
    calibrator: str | None = None, exclude: frozenset[str] = frozenset()
) -> list[ir.passes.PassBase]:
    """INT8 for TensorRT (explicit quantization, strongly typed): S8 symmetric per-channel
    weights, S8 symmetric per-tensor activations (TensorRT is symmetric only), Q/DQ on the inputs
    of every Conv, ConvTranspose, Gemm, MatMul, Add and average pool, then moved where TensorRT
    fuses them (`LowerForTensorRT`). Relu and Clip stay: a symmetric range does not absorb them,
    and TensorRT fuses them into the convolution itself."""
    activations = QuantScheme(dtype="int8", symmetric=True, method=calibrator or DEFAULT_CALIBRATOR)
    return [
        *canonicalize(),
        FoldBatchNorm(),
        InsertQDQ(weights=WEIGHT_INT8, activations=activations, exclude=exclude),
        FuseRequant(),
        LowerForTensorRT(),
    ]


PRESETS["int8-tensorrt"] = int8_tensorrt


def w8a8_smoothquant(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    alpha: float | None = None,
    keep_float: int = 0,
) -> list[ir.passes.PassBase]:
    """W8A8 for transformer MatMuls, static: SmoothQuant (alpha searched per layer when None),
    then S8 symmetric per-channel weights and U8 per-tensor calibrated activations on every
    MatMul/Gemm with a constant weight (attention's activation x activation MatMuls, Softmax,
    LayerNorm and residual Adds stay float); ORT runs them as MatMulIntegerToFloat.
    `keep_float=N` leaves the N layers most sensitive to quantization (on the calibration
    data, after smoothing) in float."""
    from qpass.passes.smoothquant import SmoothQuant

    activations = QuantScheme(dtype="uint8", method=calibrator or DEFAULT_CALIBRATOR)

    def quantize(excluded: frozenset[str]) -> list[ir.passes.PassBase]:
        return [
            InsertQDQ(
                weights=WEIGHT_INT8, activations=activations, op_types=("MatMul", "Gemm"),
                exclude=excluded, computed_weights=False,
            )
        ]

    insert = quantize(exclude)[0]
    return [
        *canonicalize(),
        SmoothQuant(alpha=alpha, activations=activations, exclude=exclude),
        *_keep_sensitive_float(insert, quantize, exclude, keep_float),
        insert,
        FuseRequant(),
        LowerForOnnxRuntime(),
    ]


def _keep_sensitive_float(target, quantize, exclude, keep_float: int) -> list[ir.passes.PassBase]:
    if not keep_float:
        return []
    from qpass.passes.sensitivity import KeepSensitiveFloat

    return [KeepSensitiveFloat(target, lambda ex: quantize(ex | exclude), keep_float)]


def w8a8_dynamic(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    smooth: bool = False,
    alpha: float | None = None,
    keep_float: int = 0,
) -> list[ir.passes.PassBase]:
    """W8A8 for transformer MatMuls with per-token dynamic activations (each row's range at run
    time) and S8 symmetric per-channel weights; `smooth=True` runs SmoothQuant first (needs
    calibration data). Lowered to ORT's MatMulIntegerToFloat. `calibrator` is unused.
    `keep_float=N` leaves the N most sensitive layers in float (needs calibration data)."""
    from qpass.passes.lower_integer_matmul import LowerIntegerMatMul
    from qpass.passes.quantize_dynamic import QuantizeDynamicPerToken
    from qpass.passes.smoothquant import SmoothQuant

    smoothing = [SmoothQuant(alpha=alpha, per_token=True, exclude=exclude)] if smooth else []

    def quantize(excluded: frozenset[str]) -> list[ir.passes.PassBase]:
        return [QuantizeDynamicPerToken(weights=WEIGHT_INT8, exclude=excluded)]

    dynamic = quantize(exclude)[0]
    return [
        *canonicalize(),
        *smoothing,
        *_keep_sensitive_float(dynamic, quantize, exclude, keep_float),
        dynamic,
        LowerIntegerMatMul(),
    ]


def fp8(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    scale_constraint: str = "float",
    correct_bias: bool = False,
) -> list[ir.passes.PassBase]:
    """FP8 E4M3 (symmetric, scale = amax / 448): per-channel weights, per-tensor calibrated
    activations, biases in float, Relu/Clip kept; opset raised to 19. ONNX Runtime runs it as
    simulation (DequantizeLinear, then float compute); TensorRT runs it natively on Ada/Hopper.
    `scale_constraint`: "float", "pow2" (every scale a power of two) or "pow2-group" (the
    scales of one weight tensor differ from its largest by powers of two). `correct_bias=True`
    adds empirical bias correction (`CorrectBias`) after quantization: on EfficientNet-Lite0
    FP8 loses 5.8 top-1 points without it, 2.8 with it."""
    weights = QuantScheme(
        dtype=FP8, per_channel=True, symmetric=True, scale_constraint=scale_constraint
    )
    activations = QuantScheme(
        dtype=FP8,
        symmetric=True,
        method=calibrator or DEFAULT_CALIBRATOR,
        scale_constraint=scale_constraint,
    )
    quantize = InsertQDQ(weights=weights, activations=activations, exclude=exclude)
    if not correct_bias:
        return [*canonicalize(), FoldBatchNorm(), quantize]
    correct = CorrectBias()
    return [*canonicalize(), FoldBatchNorm(), correct.snapshot(), quantize, correct]


PRESETS["fp8"] = fp8
PRESETS["w8a8-smoothquant"] = w8a8_smoothquant
PRESETS["w8a8-dynamic"] = w8a8_dynamic
