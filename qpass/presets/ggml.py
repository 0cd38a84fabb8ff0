"""ggml's formats as presets (weight-only, for decoder LLMs): q8_0, q4_k_m and the single
k-quant types; with calibration data, llama.cpp's importance matrix weights the rounding."""

from __future__ import annotations

import onnx_ir as ir

from qpass.passes import LowerToMatMulNBits, QuantizeGGML
from qpass.presets import Option, preset
from qpass.presets.weight_only import FORMAT
from qpass.targets import Target

OPTIONS = (
    Option("float_lm_head", bool, "keep the final projection in float (llama.cpp quantizes it: "
           "q8_0 in q8_0, Q4_K_M in Q6_K)", False),
    Option("importance", bool, "with --calib, weight the rounding by each input channel's mean "
           "squared activation (llama.cpp's imatrix)", True),
    FORMAT,  # dq: the mins by an exact Sub; matmulnbits: Q2_K/Q4_K mins as float zero points
)

def _build(type: str):
    def build(target: Target, exclude: frozenset[str], float_lm_head: bool, importance: bool,
              format: str) -> list[ir.passes.PassBase]:
        if format == "plugin":
            raise ValueError("ggml formats are lowered to dq or matmulnbits, not plugin")
        passes = [QuantizeGGML(type, exclude=exclude, lm_head=not float_lm_head,
                               importance=importance, format=format)]
        if format == "matmulnbits":  # the types without mins, from DequantizeLinear -> MatMul
            passes.append(LowerToMatMulNBits())
        return passes

    return build


preset("q8_0", "ggml's q8_0: 8-bit weights, one fp16 scale per 32 (calibration optional)",
       options=OPTIONS)(_build("q8_0"))
preset("q4_k_m", "ggml's Q4_K_M mix: Q4_K weights, Q6_K for the output and half of attn_v and "
       "ffn_down (with --calib: importance matrix)", options=OPTIONS)(_build("q4_k_m"))
for _type in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"):
    preset(_type, f"ggml's {_type.upper()} k-quant for every MatMul weight (with --calib: "
           "importance matrix)", options=OPTIONS)(_build(_type))
