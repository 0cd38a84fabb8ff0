"""Learned rounding of integer weights, shared by AdaRound and BlockAdaRound (Nagel et al. 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization", §3.3).

A weight's integer is floor(W/s) + h(V) + z, clipped to the integer type's range, with h(V) the
rectified sigmoid clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1) (Louizos et al. 2018) of a
continuous V per weight, learned, then rounded to h = [V >= 0].
"""

from __future__ import annotations

import contextlib

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qpass.graph import attribute, constant
from qpass.metadata import GRID

ZETA, GAMMA = 1.1, -0.1
"""Stretch of the rectified sigmoid: h(V) reaches 0 and 1 at finite V."""

INTEGER_RANGES = {
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT4: (0, 15),
}
"""The integer weight types a learned rounding covers, with their (min, max)."""


def integer_grid(node: ir.Node, dtype: np.dtype) -> tuple[int, int]:
    """(min, max) of the integers a Q/DQ node's quantizer uses: its GRID metadata (InsertQDQ
    writes its scheme's qmin/qmax: 3- and 2-bit grids live in 4-bit tensors), else the whole
    range of its storage type `dtype`."""
    if GRID in node.metadata_props:
        low, high = node.metadata_props[GRID].split()
        return int(low), int(high)
    info = ml_dtypes.iinfo(dtype)
    return int(info.min), int(info.max)


def initial_logits(scaled: np.ndarray) -> np.ndarray:
    """V with h(V) equal to the fractional part of W/s (kept within [0.01, 0.99]): the learning
    starts at the float weight."""
    rest = np.clip(scaled - np.floor(scaled), 0.01, 0.99)
    return -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def rectified_sigmoid(v):
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), of a torch tensor."""
    import torch

    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def full_scale_zero(dq: ir.Node, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The DequantizeLinear's scale and zero point broadcast to the weight's full shape
    (per tensor, per axis, or blockwise)."""
    scale = constant(dq.inputs[1]).astype(np.float64)
    zero_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    zero = np.zeros_like(scale) if zero_value is None else constant(zero_value).astype(np.float64)
    if scale.ndim == 0 or scale.size == 1:
        return np.full(shape, float(scale.reshape(-1)[0])), np.full(shape, zero.reshape(-1)[0])
    axis = attribute(dq, "axis", 1) % len(shape)
    block = attribute(dq, "block_size", 0)
    if block:  # blockwise: same rank as the weight, `axis` cut into blocks
        return (
            np.repeat(scale, block, axis=axis).take(range(shape[axis]), axis=axis),
            np.repeat(zero, block, axis=axis).take(range(shape[axis]), axis=axis),
        )
    view = [1] * len(shape)
    view[axis] = -1
    return (np.broadcast_to(scale.reshape(view), shape).copy(),
            np.broadcast_to(zero.reshape(view), shape).copy())


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run torch with `threads` intra-op threads inside the block, then restore the setting."""
    import torch

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
