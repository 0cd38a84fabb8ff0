"""How a tensor is quantized: data type, granularity, symmetry and range method."""

from __future__ import annotations

import dataclasses
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

RangeMethod = Literal["minmax", "percentile", "entropy", "mse"]
RANGE_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")

_INTEGER_TYPES = {
    "int8": (ir.DataType.INT8, np.int8, -128, 127),
    "uint8": (ir.DataType.UINT8, np.uint8, 0, 255),
    "int4": (ir.DataType.INT4, ml_dtypes.int4, -8, 7),
    "uint4": (ir.DataType.UINT4, ml_dtypes.uint4, 0, 15),
}


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """A quantization scheme for one class of tensors.

    Attributes:
        dtype: integer type of the quantized tensor ("int8", "uint8", "int4" or "uint4").
        per_channel: one scale per slice along the tensor's channel axis (weights), else one scale.
        symmetric: zero point fixed at 0 (the middle of the range for unsigned types); 8-bit
            signed types then use the restricted range [-127, 127]; 4-bit types keep all 16
            levels, scale = max|w| / 7.5 (the GPTQ convention: [-8, 7], or [0, 15] around 8).
        method: how the range is chosen from calibration statistics.
        percentile: the percentile kept by method="percentile".
        group_size: weights only: one scale (and zero point) per block of `group_size`
            consecutive input channels of each output channel (blockwise, opset 21).
    """

    dtype: str = "uint8"
    per_channel: bool = False
    symmetric: bool = False
    method: RangeMethod = "minmax"
    percentile: float = 99.999
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _INTEGER_TYPES:
            raise ValueError(
                f"dtype {self.dtype!r} is not supported; use one of {list(_INTEGER_TYPES)}"
            )
        if self.method not in RANGE_METHODS:
            raise ValueError(f"range method {self.method!r} is unknown; use one of {RANGE_METHODS}")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size must be an even number >= 2, not {self.group_size}")

    @property
    def bits(self) -> int:
        return 4 if self.dtype.endswith("4") else 8

    @property
    def ir_dtype(self) -> ir.DataType:
        return _INTEGER_TYPES[self.dtype][0]

    @property
    def np_dtype(self) -> type[np.integer]:
        return _INTEGER_TYPES[self.dtype][1]

    @property
    def qmin(self) -> int:
        low = _INTEGER_TYPES[self.dtype][2]
        return low + 1 if self.symmetric and low < 0 and self.bits == 8 else low

    @property
    def qmax(self) -> int:
        return _INTEGER_TYPES[self.dtype][3]

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
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return scale, zero_point.astype(self.np_dtype)

    def quantize(self, x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        """Round-to-nearest-even quantization, saturating (numpy reference of QuantizeLinear)."""
        q = np.rint(x / scale) + zero_point.astype(np.float64)
        return np.clip(q, self.qmin, self.qmax).astype(self.np_dtype)


WEIGHT_INT8 = QuantScheme(dtype="int8", per_channel=True, symmetric=True)
ACTIVATION_UINT8 = QuantScheme(dtype="uint8")
