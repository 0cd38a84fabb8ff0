"""How a tensor is quantized: data type, granularity, symmetry and range method."""

from __future__ import annotations

import dataclasses
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

RangeMethod = Literal["minmax", "percentile", "entropy", "mse"]
RANGE_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")
ScaleConstraint = Literal["float", "pow2", "pow2-group"]
SCALE_CONSTRAINTS: tuple[str, ...] = ("float", "pow2", "pow2-group")

_INTEGER_TYPES = {
    "int8": (ir.DataType.INT8, np.int8, -128, 127),
    "uint8": (ir.DataType.UINT8, np.uint8, 0, 255),
    "int4": (ir.DataType.INT4, ml_dtypes.int4, -8, 7),
    "uint4": (ir.DataType.UINT4, ml_dtypes.uint4, 0, 15),
    # 3- and 2-bit integers stored in 4-bit tensors: weights are rounded into the narrow range;
    # an activation's QuantizeLinear saturates at the 4-bit limits, so InsertQDQ puts a Clip
    # to the narrow range before it (simulation: no runtime has 3- or 2-bit kernels)
    "int3": (ir.DataType.INT4, ml_dtypes.int4, -4, 3),
    "uint3": (ir.DataType.UINT4, ml_dtypes.uint4, 0, 7),
    "int2": (ir.DataType.INT4, ml_dtypes.int4, -2, 1),
    "uint2": (ir.DataType.UINT4, ml_dtypes.uint4, 0, 3),
}
_FLOAT_TYPES = {
    "float8e4m3fn": (ir.DataType.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, -448, 448),
    "float4e2m1": (ir.DataType.FLOAT4E2M1, ml_dtypes.float4_e2m1fn, -6, 6),
}
_TYPES = {**_INTEGER_TYPES, **_FLOAT_TYPES}
FLOAT_TYPE_OPSET = 19
"""Opset from which QuantizeLinear/DequantizeLinear take FLOAT8E4M3FN."""
INT4_OPSET = 21
"""Opset from which QuantizeLinear/DequantizeLinear take INT4/UINT4 and blockwise scales."""
FLOAT4_OPSET = 23
"""Opset from which DequantizeLinear takes FLOAT4E2M1 (ONNX Runtime 1.32's CPU provider has no
kernel for it: qpass simulates FP4 weights with their exact values in FLOAT8E4M3FN, see
`qpass.passes.block_scaled_fp4`)."""


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """A quantization scheme for one class of tensors.

    Attributes:
        dtype: type of the quantized tensor: "int8", "uint8", "int4", "uint4", "int3", "uint3",
            "int2", "uint2" (3 and 2 bits, stored as 4-bit tensors), or
            "float8e4m3fn" (FP8 E4M3, always symmetric: scale = amax / 448, zero point 0,
            saturating at +-448; Q/DQ need opset 19), or "float4e2m1" (FP4 E2M1 weights:
            scale = amax / 6, values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; opset 23).
        per_channel: one scale per slice along the tensor's channel axis (weights), else one scale.
        symmetric: zero point fixed at 0 (the middle of the range for unsigned types); 8-bit
            signed types then use the restricted range [-127, 127]; 4-bit types keep all 16
            levels, scale = max|w| / 7.5 (the GPTQ convention: [-8, 7], or [0, 15] around 8;
            3-bit types likewise: max|w| / 3.5, [-4, 3] or [0, 7] around 4).
        method: how the range is chosen from calibration statistics.
        percentile: the percentile kept by method="percentile".
        group_size: weights only: one scale (and zero point) per block of `group_size`
            consecutive input channels of each output channel (blockwise, opset 21).
        scale_constraint: symmetric schemes only: "float" (any scale), "pow2" (ZeroQuant-FP's
            M1: each scale rounded up to 2^ceil(log2 S)) or "pow2-group" (M2:
            S_max / 2^floor(log2(S_max / S_i)) over the channels of one tensor, or the blocks
            of one output channel: the scales differ from the largest by powers of two, each
            >= its float scale so that nothing saturates; InsertQDQ picks a per-channel
            weight's common base by its rounding error, see `InsertQDQ`).
            M2 is also written with ceil; with qpass's convention (q = x / S) ceil gives
            S_i' <= S_i and cuts a channel's range by up to 2x (measured in
            docs/methods/fp8.md).
    """

    dtype: str = "uint8"
    per_channel: bool = False
    symmetric: bool = False
    method: RangeMethod = "minmax"
    percentile: float = 99.999
    group_size: int | None = None
    scale_constraint: ScaleConstraint = "float"

    def __post_init__(self) -> None:
        if self.dtype not in _TYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {list(_TYPES)}")
        if self.dtype in _FLOAT_TYPES:
            object.__setattr__(self, "symmetric", True)  # FP8 has no zero-point offset
        if self.scale_constraint not in SCALE_CONSTRAINTS:
            raise ValueError(
                f"scale constraint {self.scale_constraint!r} is unknown; use one of "
                f"{SCALE_CONSTRAINTS}"
            )
        if self.scale_constraint != "float" and not self.symmetric:
            raise ValueError(f"scale constraint {self.scale_constraint!r} needs symmetric=True")
        if self.method not in RANGE_METHODS:
            raise ValueError(f"range method {self.method!r} is unknown; use one of {RANGE_METHODS}")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size must be an even number >= 2, not {self.group_size}")

    @property
    def bits(self) -> int:
        if self.is_float:
            return 4 if self.dtype == FP4 else 8
        low, high = _INTEGER_TYPES[self.dtype][2:]
        return int(high - low).bit_length()

    @property
    def narrow(self) -> bool:
        """An integer type narrower than its storage (3 or 2 bits in a 4-bit tensor)."""
        return self.dtype in ("int3", "uint3", "int2", "uint2")

    @property
    def is_float(self) -> bool:
        """A floating-point quantized type (FP8): values round to its grid, not to integers."""
        return self.dtype in _FLOAT_TYPES

    @property
    def min_opset(self) -> int:
        """The lowest ONNX opset whose QuantizeLinear/DequantizeLinear take this type (and,
        for weights, this granularity): 21 for INT4/UINT4 and blockwise scales."""
        if self.dtype == FP4:
            return FLOAT4_OPSET
        if self.bits <= 4 or self.group_size is not None:
            return INT4_OPSET
        return FLOAT_TYPE_OPSET if self.is_float else 13

    @property
    def ir_dtype(self) -> ir.DataType:
        return _TYPES[self.dtype][0]

    @property
    def np_dtype(self) -> type[np.generic]:
        return _TYPES[self.dtype][1]

    @property
    def qmin(self) -> int:
        low = _TYPES[self.dtype][2]
        if self.is_float:
            return low
        return low + 1 if self.symmetric and low < 0 and self.bits == 8 else low

    @property
    def qmax(self) -> int:
        return _TYPES[self.dtype][3]

    def scale_zero_point(self, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point that represent [low, high] (widened to hold 0 exactly)."""
        low = np.minimum(np.asarray(low, np.float64), 0.0)
        high = np.maximum(np.asarray(high, np.float64), 0.0)
        if self.symmetric:
            bound = np.maximum(-low, high)
            half = (self.qmax - self.qmin) / 2
            scale = bound / half
            zero_point = np.full_like(
                scale, (self.qmax + self.qmin + 1) // 2 if self.qmin >= 0 else 0
            )
        else:
            scale = (high - low) / (self.qmax - self.qmin)
            safe = np.where(scale > 0, scale, 1.0)
            zero_point = np.clip(np.round(self.qmin - low / safe), self.qmin, self.qmax)
        if self.scale_constraint != "float":
            scale = self.constrain(scale)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return scale, zero_point.astype(self.np_dtype)

    def constrain(self, scale: np.ndarray, largest: np.ndarray | None = None) -> np.ndarray:
        """Apply the scale constraint to the scales of one tensor (zeros stay zero).
        pow2-group: relative to `largest` (broadcast against `scale`; default: the largest
        scale of the tensor)."""
        scale = np.asarray(scale, np.float64)
        positive = scale > 0
        safe = np.where(positive, scale, 1.0)
        if self.scale_constraint == "pow2":
            safe = np.exp2(np.ceil(np.log2(safe)))
        elif self.scale_constraint == "pow2-group" and np.any(positive):
            largest = scale.max() if largest is None else np.asarray(largest, np.float64)
            safe = largest / np.exp2(np.floor(np.log2(largest / safe) + 1e-12))
        return np.where(positive, safe, scale)

    def quantize(self, x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        """Round-to-nearest-even quantization, saturating (numpy reference of QuantizeLinear).

        FP8: x / scale in float32 rounded to the nearest E4M3 value (ties to even), saturated at
        +-448, as ONNX Runtime's QuantizeLinear (saturate=1) does."""
        if self.is_float:
            y = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
            return np.clip(y, self.qmin, self.qmax).astype(self.np_dtype)
        q = np.rint(x / scale) + zero_point.astype(np.float64)
        return np.clip(q, self.qmin, self.qmax).astype(self.np_dtype)

    def fake_quantize(self, x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray):
        """quantize then dequantize, in float64 (the value the quantized graph computes with)."""
        q = self.quantize(x, scale, zero_point).astype(np.float64)
        return (q - np.asarray(zero_point).astype(np.float64)) * scale


WEIGHT_INT8 = QuantScheme(dtype="int8", per_channel=True, symmetric=True)
WEIGHT_INT8_TENSOR = QuantScheme(dtype="int8", per_channel=False, symmetric=True)
WEIGHT_INT4_CHANNEL = QuantScheme(dtype="int4", per_channel=True, symmetric=True)
ACTIVATION_UINT8 = QuantScheme(dtype="uint8")
FP8 = "float8e4m3fn"
FP4 = "float4e2m1"
