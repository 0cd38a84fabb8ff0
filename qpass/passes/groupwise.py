"""Group-wise (blockwise) weight math, in numpy, shared by the weight-only passes.

A MatMul weight W is [K, N] (y = x @ W). Its quantized form is the opset-21 blockwise
DequantizeLinear: q [K, N] int4/uint4 (int8/uint8 for an 8-bit lm_head), scale [ceil(K/g), N]
float32 and zero point (same shape, same type as q; absent when symmetric int4), axis 0,
block_size g. Input channels k of one output channel n share a scale when k // g is equal.
"""

from __future__ import annotations

import numpy as np

from qpass.schemes import QuantScheme


def grouped(scheme: QuantScheme, k: int) -> int:
    """The scheme's group size for a weight with `k` input channels (per channel: all of k)."""
    return scheme.group_size or k


def group_ranges(w: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of W [K, N] over each group of g input channels: two [ceil(K/g), N] arrays."""
    k, n = w.shape
    blocks = -(-k // g)
    padded = np.full((blocks * g, n), np.nan, w.dtype)
    padded[:k] = w
    padded = padded.reshape(blocks, g, n)
    return np.nanmin(padded, axis=1), np.nanmax(padded, axis=1)


def quantize_rtn(
    w: np.ndarray, scheme: QuantScheme
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest group-wise quantization of W [K, N]: (q [K, N], scale, zero point)."""
    return quantize_with_ranges(w, scheme)


def quantize_with_ranges(
    w: np.ndarray, scheme: QuantScheme, clip: float = 1.0, ranges=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group-wise quantization of W [K, N] within each group's [clip min, clip max] (saturating);
    `ranges`: W's `group_ranges`, when already computed."""
    g = grouped(scheme, w.shape[0])
    low, high = ranges if ranges is not None else group_ranges(w, g)
    scale, zero = scheme.scale_zero_point(low * clip, high * clip)
    rows = np.arange(w.shape[0]) // g
    return scheme.quantize(w, scale[rows], zero[rows]), scale, zero


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, g: int) -> np.ndarray:
    """Numpy reference of blockwise DequantizeLinear on axis 0, in float32 like ONNX Runtime."""
    rows = np.arange(q.shape[0]) // g
    shifted = q.astype(np.int32) - (0 if zero is None else zero.astype(np.int32)[rows])
    return shifted.astype(np.float32) * scale[rows]


def token_rows(x: np.ndarray, normalize: bool) -> np.ndarray:
    """Calibration activations x [..., K] as rows [n, K] (one per token); with `normalize`, every
    row scaled to unit L2 norm (zero rows stay zero): statistics of these rows weigh each token's
    output error relative to the token's own magnitude (see `StagedWeightPass`)."""
    rows = x.reshape(-1, x.shape[-1])
    if not normalize:
        return rows
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1).astype(rows.dtype)


class TokenStatistics:
    """Σ xxᵀ and the row count of one MatMul input x [..., K], streamed batch by batch, from
    unit-norm token rows when `normalize_tokens` (`token_rows`)."""

    def __init__(self, columns: int, normalize_tokens: bool = False):
        self.xtx = np.zeros((columns, columns))
        self.rows = 0
        self.normalize_tokens = normalize_tokens

    def update(self, x: np.ndarray) -> np.ndarray:
        """Accumulate one batch; return its rows as they entered the statistics."""
        x = token_rows(x, self.normalize_tokens)
        self.xtx += (x.T @ x).astype(np.float64)
        self.rows += len(x)
        return x
