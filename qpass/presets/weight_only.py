"""Weight-only 4-bit presets for decoder LLMs (W4A16): w4a16-rtn, w4a16-gptq, w4a16-awq
(`--bits 3`: a 3-bit grid in the same 4-bit containers)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir

from qpass.passes import (
    AWQ,
    GPTQ,
    LowerToInt4Plugin,
    LowerToMatMulNBits,
    LowRankCompensation,
    QuantizeLMHead,
    QuantizeTiedEmbeddings,
    RoundToNearest,
)
from qpass.presets import Option, preset
from qpass.schemes import QuantScheme
from qpass.targets import Target

TARGETS = ("onnxruntime", "tensorrt")
FORMAT = Option("format", str, "blockwise DequantizeLinear -> MatMul (dq), ONNX Runtime's "
                "MatMulNBits, or qpass's INT4 GEMM TensorRT plugin node (plugin)", "dq",
                choices=("dq", "matmulnbits", "plugin"))
BITS = Option("bits", int, "weight bits: 4, or 3 (a 3-bit grid stored in the same 4-bit "
              "containers: ONNX has no 3-bit type and MatMulNBits takes 2, 4 or 8 bits)", 4,
              choices=(3, 4))
COMMON = (
    BITS,
    Option("group_size", int, "input channels per weight scale", 128, minimum=1),
    FORMAT,
    Option("symmetric", bool, "int4 weights, no zero point (TensorRT is symmetric only)",
           {"onnxruntime": False, "tensorrt": True}),
    Option("lm_head", str, "the final projection in float, 8-bit groups (int8: most of the "
           "1-token speed-up of int4 without its accuracy loss) or 4-bit like the rest; "
           "shared-int8/shared-int4: a table tied to the embeddings quantized once, read by "
           "both the lookup and the head (ONNX Runtime's GatherBlockQuantized, MatMulNBits)",
           "float", choices=("float", "int8", "int4", "shared-int8", "shared-int4")),
    Option("accuracy_level", int, "MatMulNBits accuracy level of the 4-bit layers (0: fp32 "
           "activations; 4: int8)", 0, choices=(0, 1, 2, 3, 4), cli=False),
    Option("lorc_rank", int, "add a rank-r float branch for each weight's quantization error "
           "(LoRC)", 0, minimum=0),
)
STAGED = (
    Option("sequential", str, "quantize block by block (block) or MatMul by MatMul (layer)",
           "block", choices=("block", "layer"), cli=False),
    Option("normalize_tokens", bool, "each calibration token's input row scaled to unit norm in "
           "the statistics, so tokens with massive activations do not outweigh the rest", True),
)


def _scheme(bits: int, group_size: int, symmetric: bool) -> QuantScheme:
    """b-bit weights: int4/int3 around 0 when symmetric, else uint4/uint3 with a zero point per
    group."""
    return QuantScheme(
        dtype=f"{'' if symmetric else 'u'}int{bits}", symmetric=symmetric, group_size=group_size
    )


def _pipeline(
    target: Target,
    quantize: Callable[[QuantScheme, bool], ir.passes.PassBase],
    bits: int,
    group_size: int,
    format: str,
    symmetric: bool,
    lm_head: str,
    accuracy_level: int,
    lorc_rank: int,
) -> list[ir.passes.PassBase]:
    """`quantize(scheme, lm_head == "int4")` (with LoRC's snapshot before it and branches after
    it when `lorc_rank`), the final projection per `lm_head` (float; int4 by the same pass; int8
    by `QuantizeLMHead`, in the scheme's groups and symmetry; shared-*: a tied table by
    `QuantizeTiedEmbeddings`, in ONNX Runtime's contrib ops whatever `format` says, since no
    standard op gathers a block-quantized table), then the lowering to `format`."""
    if lm_head.startswith("shared") and target.family != "onnxruntime":
        raise ValueError(f"--lm-head {lm_head} needs ONNX Runtime's contrib ops "
                         "(GatherBlockQuantized); for TensorRT keep the lm_head float")
    scheme = _scheme(bits, group_size, symmetric)
    passes = [quantize(scheme, lm_head == "int4")]
    if lorc_rank:
        lorc = LowRankCompensation(lorc_rank)
        passes = [lorc.snapshot(), *passes, lorc]
    eight_bit = dataclasses.replace(scheme, dtype="int8" if symmetric else "uint8")
    if lm_head == "int8":
        passes.append(QuantizeLMHead(eight_bit))
    elif lm_head.startswith("shared"):
        passes.append(QuantizeTiedEmbeddings(eight_bit if lm_head == "shared-int8" else scheme))
    if format == "plugin":  # qpass's INT4 GEMM TensorRT plugin node, MatMuls only
        passes.append(LowerToInt4Plugin(convolutions=False))
    elif format == "matmulnbits":
        passes.append(LowerToMatMulNBits(accuracy_level))
    return passes


@preset("w4a16-rtn", "4-bit group weights, round to nearest (no calibration needed)",
        options=COMMON, targets=TARGETS)
def w4a16_rtn(target: Target, exclude: frozenset[str], **options) -> list[ir.passes.PassBase]:
    """Weight-only 4-bit, round to nearest, one scale (and zero point) per group of input
    channels of every MatMul weight; embeddings stay in float."""
    return _pipeline(
        target,
        lambda scheme, head: RoundToNearest(scheme, exclude=exclude, lm_head=head),
        **options,
    )


@preset("w4a16-gptq", "4-bit group weights by GPTQ, block by block on the calibration data",
        options=(*COMMON, *STAGED,
                 Option("act_order", bool, "quantize columns in order of decreasing diag(H)",
                        True),
                 Option("damp", float, "GPTQ's dampening, a fraction of mean diag(H)", 0.01,
                        minimum=0.0, cli=False)),
        targets=TARGETS)
def w4a16_gptq(
    target: Target,
    exclude: frozenset[str],
    act_order: bool,
    damp: float,
    sequential: str,
    normalize_tokens: bool,
    **options,
) -> list[ir.passes.PassBase]:
    """GPTQ (Frantar et al. 2022), the same schemes, formats, `lm_head` and `lorc_rank` as
    `w4a16-rtn`. `act_order`: columns in order of decreasing diag H, so the input channels with
    the largest activations are rounded first and their error spread over the rest.
    `normalize_tokens`: H from unit-norm token rows, so that tokens with massive activations do
    not decide the weights alone."""
    return _pipeline(
        target,
        lambda scheme, head: GPTQ(
            weights=scheme, exclude=exclude, lm_head=head, act_order=act_order, damp=damp,
            sequential=sequential, normalize_tokens=normalize_tokens,
        ),
        **options,
    )


@preset("w4a16-awq", "4-bit group weights by AWQ's clipping search on the calibration data",
        options=(*COMMON, *STAGED,
                 Option("alphas", tuple, "the grid of AWQ's scale search ((0.0,): s = 1, "
                        "clipping search only)", (0.0,), cli=False)),
        targets=TARGETS)
def w4a16_awq(
    target: Target,
    exclude: frozenset[str],
    sequential: str,
    normalize_tokens: bool,
    alphas: tuple[float, ...],
    **options,
) -> list[ir.passes.PassBase]:
    """AWQ (Lin et al. 2023): activation-aware input-channel scales folded into the producers,
    clipping search, then round to nearest, block by block; the same schemes, formats, `lm_head`
    and `lorc_rank` as `w4a16-rtn`."""
    return _pipeline(
        target,
        lambda scheme, head: AWQ(
            weights=scheme, exclude=exclude, lm_head=head, sequential=sequential,
            alphas=tuple(alphas), normalize_tokens=normalize_tokens,
        ),
        **options,
    )
