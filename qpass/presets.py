"""Presets: named lists of passes and schemes."""

from __future__ import annotations

import dataclasses
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
    QuantizeLMHead,
    RoundToNearest,
)
from qpass.schemes import FP4, FP8, WEIGHT_INT8, QuantScheme

DEFAULT_CALIBRATOR = "minmax"


def canonicalize() -> list[ir.passes.PassBase]:
    """Passes that expose patterns without changing the float function."""
    return [FoldConstants(), FoldPadIntoConv()]


def int8(
    calibrator: str | None = None, exclude: frozenset[str] = frozenset()
) -> list[ir.passes.PassBase]:
    """INT8 for ONNX Runtime: S8 symmetric per-channel weights, U8 per-tensor activations."""
    activations = QuantScheme(dtype="uint8", method=calibrator or DEFAULT_CALIBRATOR)
    return _for_onnxruntime(
        InsertQDQ(weights=WEIGHT_INT8, activations=activations, exclude=exclude)
    )


def _for_onnxruntime(
    quantize: InsertQDQ, *refine, before: tuple[ir.passes.PassBase, ...] = ()
) -> list[ir.passes.PassBase]:
    """The CNN pipeline for ONNX Runtime: canonicalization, BatchNorm folding, `before`, the
    quantizing pass and the `refine` passes in order (passes that read the float model through
    their `snapshot()` placed before quantization: AdaRound, CorrectBias), then FuseRequant and
    the lowering."""
    return [
        *canonicalize(),
        FoldBatchNorm(),
        *before,
        *(p.snapshot() for p in refine),
        quantize,
        *refine,
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
    adaround: bool = False,
    iterations: int = 500,
) -> list[ir.passes.PassBase]:
    """INT8 with one scale per weight tensor (for targets without per-channel weight scales),
    recovered as in Nagel et al. 2019: cross-layer equalization, high-bias absorption, then
    empirical bias correction on the calibration data. `allow_relu6=True` lets equalization
    replace ReLU6 by ReLU between layers (changes the float model); `data_free=False` leaves the
    three passes out (the plain per-tensor baseline); `adaround=True` learns the rounding of
    each weight (AdaRound, layer by layer, `iterations` steps) before the bias correction."""
    from qpass.passes.adaround import AdaRound

    activations = QuantScheme(dtype="uint8", method=calibrator or DEFAULT_CALIBRATOR)
    quantize = InsertQDQ(weights=WEIGHT_INT8_TENSOR, activations=activations, exclude=exclude)
    if not data_free:
        return _for_onnxruntime(quantize)
    equalize = (EqualizeCrossLayer(allow_relu6=allow_relu6), AbsorbHighBias())
    rounding = [AdaRound(iterations=iterations)] if adaround else []
    return _for_onnxruntime(quantize, *rounding, CorrectBias(), before=equalize)


WEIGHT_INT4_CHANNEL = QuantScheme(dtype="int4", per_channel=True, symmetric=True)


def w4a8(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    adaround: bool = True,
    iterations: int = 500,
    block_layers: int = 4,
) -> list[ir.passes.PassBase]:
    """W4A8 for CNNs: S4 symmetric per-channel weights (one scale per output channel) and U8
    per-tensor activations on every Conv, Gemm and MatMul with a constant weight, the weights'
    rounding learned on the calibration data block by block (BlockAdaRound: AdaRound, Nagel et
    al. 2020, on the output of blocks of up to `block_layers` layers, as BRECQ, Li et al. 2021;
    1: layer by layer); `adaround=False` rounds to nearest (the baseline), `iterations` sets
    the optimization steps per block. ONNX Runtime has no INT4 convolution kernel: the int4
    weights are stored as int4 and read through opset-21 DequantizeLinear, the convolution
    runs in float on Q/DQ activations (adds and pools still fuse into QLinear kernels)."""
    from qpass.passes.adaround import AdaRound
    from qpass.passes.block_adaround import BlockAdaRound

    activations = QuantScheme(dtype="uint8", method=calibrator or DEFAULT_CALIBRATOR)
    quantize = InsertQDQ(weights=WEIGHT_INT4_CHANNEL, activations=activations, exclude=exclude)
    rounding = (
        AdaRound(iterations=iterations)
        if block_layers == 1
        else BlockAdaRound(iterations=iterations, block_layers=block_layers)
    )
    return _for_onnxruntime(quantize, *([rounding] if adaround else []))


def w4a8_rtn(
    calibrator: str | None = None, exclude: frozenset[str] = frozenset()
) -> list[ir.passes.PassBase]:
    """W4A8 with round-to-nearest weights: `w4a8` without AdaRound (the baseline)."""
    return w4a8(calibrator, exclude, adaround=False)


WEIGHT_FORMATS = ("dq", "matmulnbits", "plugin")


def _w4_scheme(group_size: int | None, symmetric: bool) -> QuantScheme:
    """4-bit weights: int4 around 0 when symmetric, else uint4 with a zero point per group."""
    dtype = "int4" if symmetric else "uint4"
    return QuantScheme(dtype=dtype, symmetric=symmetric, group_size=group_size or 128)


LM_HEAD_CHOICES = ("float", "int8", "int4")


def _w4_passes(
    quantize: Callable[[bool], ir.passes.PassBase],
    lm_head: str,
    scheme: QuantScheme,
    lorc_rank: int,
    format: str,
    accuracy_level: int,
) -> list[ir.passes.PassBase]:
    """A weight-only 4-bit pipeline: `quantize(lm_head)` (with LoRC's branches when
    `lorc_rank`), the final projection per `lm_head` (float; int4 by the same pass; int8
    by `QuantizeLMHead`, in `scheme`'s groups and symmetry), then the lowering to `format`."""
    if lm_head not in LM_HEAD_CHOICES:
        raise ValueError(f"lm_head {lm_head!r} is unknown; use one of {LM_HEAD_CHOICES}")
    passes = _with_lorc(quantize(lm_head == "int4"), lorc_rank)
    if lm_head == "int8":
        dtype = "int8" if scheme.symmetric else "uint8"
        passes.append(QuantizeLMHead(dataclasses.replace(scheme, dtype=dtype)))
    return [*passes, *_w4_lowering(format, accuracy_level)]


def _w4_lowering(format: str, accuracy_level: int) -> list[ir.passes.PassBase]:
    if format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {format!r} is unknown; use one of {WEIGHT_FORMATS}")
    if format == "plugin":  # qpass's INT4 GEMM TensorRT plugin (qpass.plugins), MatMuls only
        from qpass.passes.lower_int4_plugin import LowerToInt4Plugin

        return [LowerToInt4Plugin(convolutions=False)]
    return [LowerToMatMulNBits(accuracy_level)] if format == "matmulnbits" else []


def w4a16_rtn(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    group_size: int | None = 128,
    format: str = "dq",
    symmetric: bool = False,
    lm_head: str = "float",
    accuracy_level: int = 0,
    lorc_rank: int = 0,
) -> list[ir.passes.PassBase]:
    """Weight-only 4-bit, round to nearest, one scale (and zero point) per group of input channels
    of every MatMul weight; embeddings stay in float. `format`: "dq" (opset-21 blockwise
    DequantizeLinear -> MatMul), "matmulnbits" (com.microsoft.MatMulNBits) or "plugin" (qpass's
    INT4 GEMM TensorRT plugin node, `LowerToInt4Plugin`). `lm_head`: the final projection in
    "float" (default), "int8" (per group, `QuantizeLMHead`: SmolLM2's 1-token forward 0.65x ->
    about 0.5x FP32's, perplexity +0.03) or "int4" like the rest (+8 perplexity on SmolLM2).
    Needs no calibration data (`calibrator` is ignored). `lorc_rank=r` adds LoRC's rank-r float
    branch for each weight's quantization error (`LowRankCompensation`)."""
    scheme = _w4_scheme(group_size, symmetric)
    return _w4_passes(
        lambda head: RoundToNearest(scheme, exclude=exclude, lm_head=head),
        lm_head, scheme, lorc_rank, format, accuracy_level,
    )


def _with_lorc(quantize: ir.passes.PassBase, rank: int) -> list[ir.passes.PassBase]:
    """`quantize`, with LoRC's float-weight snapshot before it and its branches after it."""
    if not rank:
        return [quantize]
    from qpass.passes.lorc import LowRankCompensation

    lorc = LowRankCompensation(rank)
    return [lorc.snapshot(), quantize, lorc]


def w4a16_gptq(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    group_size: int | None = 128,
    format: str = "dq",
    symmetric: bool = False,
    lm_head: str = "float",
    accuracy_level: int = 0,
    act_order: bool = True,
    damp: float = 0.01,
    sequential: str = "block",
    lorc_rank: int = 0,
    normalize_tokens: bool = True,
) -> list[ir.passes.PassBase]:
    """Weight-only 4-bit with GPTQ (block by block on the calibration data), same schemes,
    formats, `lm_head` and `lorc_rank` as `w4a16_rtn`. `act_order` (default): columns in order of
    decreasing diag H, so the input channels with the largest activations are rounded first
    and their error spread over the rest. `normalize_tokens` (default): H from unit-norm token
    rows, so that tokens with massive activations do not decide the weights alone (see
    `StagedWeightPass`). SmolLM2-135M g128, WikiText-2 perplexity: 32.85 with both, 34.60 in
    index order, 35.36 with plain statistics, 38.40 with neither; round to nearest 38.33, FP32
    29.60."""
    scheme = _w4_scheme(group_size, symmetric)
    return _w4_passes(
        lambda head: GPTQ(
            weights=scheme, exclude=exclude, lm_head=head, act_order=act_order, damp=damp,
            sequential=sequential, normalize_tokens=normalize_tokens,
        ),
        lm_head, scheme, lorc_rank, format, accuracy_level,
    )


def w4a16_awq(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    group_size: int | None = 128,
    format: str = "dq",
    symmetric: bool = False,
    lm_head: str = "float",
    accuracy_level: int = 0,
    sequential: str = "block",
    lorc_rank: int = 0,
    alphas: tuple[float, ...] = (0.0,),
    normalize_tokens: bool = True,
) -> list[ir.passes.PassBase]:
    """Weight-only 4-bit with AWQ (activation-aware input-channel scales folded into the
    producers, clipping search, then round to nearest; block by block on the calibration data),
    same schemes, formats, `lm_head` and `lorc_rank` as `w4a16_rtn`. `alphas`: the grid of the scale
    search; the default `(0.0,)` keeps s = 1 and runs the clipping search only. SmolLM2-135M
    (g128, token-normalized statistics), perplexity: clipping alone 33.81 (RTN 38.33, FP32
    29.60). With clip ratios in steps of 0.05 (34.57 alone), the full grid
    (`qpass.passes.awq.ALPHA_GRID`, 0 to 0.95) lowered every layer's output error but gave 40.70
    (q/k/v scaled only 41.21; gate/up only 33.95, down_proj only 34.28, both 34.99: within the
    spread of rounding, not a lever)."""
    from qpass.passes.awq import AWQ

    scheme = _w4_scheme(group_size, symmetric)
    return _w4_passes(
        lambda head: AWQ(weights=scheme, exclude=exclude, lm_head=head, sequential=sequential,
                         alphas=tuple(alphas), normalize_tokens=normalize_tokens),
        lm_head, scheme, lorc_rank, format, accuracy_level,
    )


PRESETS: dict[str, Callable[..., list[ir.passes.PassBase]]] = {
    "int8": int8,
    "int8-tensor": int8_tensor,
    "w4a8": w4a8,
    "w4a8-rtn": w4a8_rtn,
    "w4a16-rtn": w4a16_rtn,
    "w4a16-gptq": w4a16_gptq,
    "w4a16-awq": w4a16_awq,
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
    alpha: float | str = 0.8,
    keep_float: int = 0,
) -> list[ir.passes.PassBase]:
    """W8A8 for transformer MatMuls, static: SmoothQuant (`alpha` 0.8, or "auto": searched per
    layer), then S8 symmetric per-channel weights and U8 per-tensor calibrated activations on
    every MatMul/Gemm with a constant weight (attention's activation x activation MatMuls,
    Softmax, LayerNorm and residual Adds stay float), lowered to ORT's MatMulIntegerToFloat
    with the bias in the kernel (the QDQ form before `LowerIntegerMatMul` is standard ONNX).
    `keep_float=N` leaves the N layers most sensitive to quantization (on the calibration
    data, after smoothing) in float. On MiniLM alpha 0.8 scores as well as the search (which
    picks 0.7-0.8 there) and compiles 3x faster."""
    from qpass.passes.lower_integer_matmul import LowerIntegerMatMul
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
        SmoothQuant(alpha=_alpha(alpha), activations=activations, exclude=exclude),
        *_keep_sensitive_float(insert, quantize, exclude, keep_float),
        insert,
        FuseRequant(),
        LowerForOnnxRuntime(),
        LowerIntegerMatMul(),
    ]


def _alpha(alpha: float | str | None) -> float | None:
    """SmoothQuant's alpha: a number, or None (searched per layer) for "auto"."""
    return None if alpha in ("auto", None) else float(alpha)


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
    alpha: float | str = "auto",
    keep_float: int = 0,
) -> list[ir.passes.PassBase]:
    """W8A8 for transformer MatMuls with per-token dynamic activations (each row's range at run
    time) and S8 symmetric per-channel weights; `smooth=True` runs SmoothQuant first (needs
    calibration data). Lowered to ORT's MatMulIntegerToFloat. `calibrator` is unused.
    `keep_float=N` leaves the N most sensitive layers in float (needs calibration data)."""
    from qpass.passes.lower_integer_matmul import LowerIntegerMatMul
    from qpass.passes.quantize_dynamic import QuantizeDynamicPerToken
    from qpass.passes.smoothquant import SmoothQuant

    smoothing = []
    if smooth:
        smoothing = [SmoothQuant(alpha=_alpha(alpha), per_token=True, exclude=exclude)]

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
    float_layers: int = 0,
) -> list[ir.passes.PassBase]:
    """FP8 E4M3 (symmetric, scale = amax / 448): per-channel weights, per-tensor calibrated
    activations, biases in float, Relu/Clip kept; opset raised to 19. ONNX Runtime runs it as
    simulation (DequantizeLinear, then float compute); TensorRT runs it natively on Ada/Hopper.
    `scale_constraint`: "float", "pow2" (every scale a power of two) or "pow2-group" (the
    scales of one weight tensor differ from its largest by powers of two). `correct_bias=True`
    adds empirical bias correction (`CorrectBias`) after quantization: on EfficientNet-Lite0
    FP8 loses 5.8 top-1 points without it, 2.8 with it. `float_layers=N` leaves the first N
    Conv/Gemm/MatMul layers in float (`KeepLeadingLayersFloat`; TensorRT runs them in FP16):
    FP8's 3 mantissa bits put a relative error of up to 1/16 on every value, which the first
    layers of EfficientNet-Lite0 amplify most (see benchmarks/cnn.py for the measured rows)."""
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
    leading = _leading_float(quantize, float_layers)
    if not correct_bias:
        return [*canonicalize(), FoldBatchNorm(), *leading, quantize]
    correct = CorrectBias()
    return [*canonicalize(), FoldBatchNorm(), *leading, correct.snapshot(), quantize, correct]


def _leading_float(quantize: ir.passes.PassBase, count: int) -> list[ir.passes.PassBase]:
    if not count:
        return []
    from qpass.passes.keep_leading_float import KeepLeadingLayersFloat

    return [KeepLeadingLayersFloat(quantize, count)]


PRESETS["fp8"] = fp8


def w4a8_fp(
    calibrator: str | None = None,
    exclude: frozenset[str] = frozenset(),
    *,
    group_size: int = 128,
    scale_constraint: str = "float",
    storage: str = "float8",
    float_layers: int = 0,
) -> list[ir.passes.PassBase]:
    """W4A8 in floating point (Wu et al. 2023, "ZeroQuant-FP"): FP4 E2M1 weights with one scale
    per block of `group_size` input channels of each output channel (one per output channel
    where a weight has fewer input channels), FP8 E4M3 per-tensor calibrated activations, biases
    and Relu/Clip as in `fp8`. `scale_constraint` applies to both ("pow2-group": block scales
    relative to the largest of their output channel). `storage`: "float8" (default: the E2M1
    values in FLOAT8E4M3FN, the form ONNX Runtime 1.32 runs; the same numbers) or "float4"
    (FLOAT4E2M1, opset 23, which ONNX Runtime 1.32's CPU provider cannot run).
    `float_layers=N` leaves the first N weighted layers in float, as in `fp8`."""
    weights = QuantScheme(
        dtype=FP4, symmetric=True, group_size=group_size, scale_constraint=scale_constraint
    )
    activations = QuantScheme(
        dtype=FP8,
        symmetric=True,
        method=calibrator or DEFAULT_CALIBRATOR,
        scale_constraint=scale_constraint,
    )
    quantize = InsertQDQ(
        weights=weights, activations=activations, exclude=exclude, fp4_storage=storage
    )
    return [*canonicalize(), FoldBatchNorm(), *_leading_float(quantize, float_layers), quantize]


PRESETS["w4a8-fp"] = w4a8_fp
PRESETS["w8a8-smoothquant"] = w8a8_smoothquant
PRESETS["w8a8-dynamic"] = w8a8_dynamic
