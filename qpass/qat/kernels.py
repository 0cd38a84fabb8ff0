"""ONNX Runtime's integer kernels in torch: what QLinearConv and QLinearAdd compute.

Where ONNX Runtime fuses DequantizeLinear -> Conv/Add -> QuantizeLinear into one integer kernel
(int8 on the CPU provider), its result differs from the float computation of the same Q/DQ graph
by the rounding of the requantization: QLinearConv accumulates in int32 and multiplies the
accumulator by the float32 multiplier s_x s_w / s_y; QLinearAdd adds (a - z_a) s_a / s_y and
(b - z_b) s_b / s_y in float32 (onnxruntime/core/mlas, QLinearConv and QLinearAdd). A value
within float rounding of a rounding boundary then goes the other way, one step. `QATModule`
takes the forward value of such a QuantizeLinear from these functions and its gradient from the
float path, so that the trained module computes what the exported model computes.
"""

from __future__ import annotations

import torch


def requantize(accumulator: torch.Tensor, multiplier: torch.Tensor, zero: torch.Tensor,
               qmin: int, qmax: int) -> torch.Tensor:
    """round(accumulator * multiplier) + zero, saturated (MLAS's requantization, float32)."""
    return torch.clamp(torch.round(accumulator * multiplier) + zero, qmin, qmax)


def qlinear_conv(convolve, x, x_zero, x_scale, weight, bias, w_scale, y_scale, y_zero,
                 qmin: int, qmax: int) -> torch.Tensor:
    """QLinearConv: the int32 accumulator of (x - z_x) * w + b (computed in float32, exact while
    it stays below 2^24), times (s_x s_w) / s_y per output channel."""
    accumulator = convolve(x - x_zero, weight, bias)
    shape = [1, -1] + [1] * (accumulator.dim() - 2)
    multiplier = (x_scale * w_scale).reshape(shape) / y_scale
    return requantize(accumulator, multiplier, y_zero, qmin, qmax)


def qlinear_add(a, a_zero, a_scale, b, b_zero, b_scale, y_scale, y_zero, qmin: int,
                qmax: int) -> torch.Tensor:
    """QLinearAdd: (a - z_a) (s_a / s_y) + (b - z_b) (s_b / s_y) + z_y, rounded, saturated."""
    value = (a - a_zero) * (a_scale / y_scale) + (b - b_zero) * (b_scale / y_scale)
    return requantize(value, torch.ones(()), y_zero, qmin, qmax)
