"""Packed low-bit weight layouts: ONNX Runtime's `com.microsoft.MatMulNBits` and qpass's INT4
GEMM plugin (`qpass.plugins.int4_gemm`), in numpy.

Both take a blockwise weight in the opset-21 DequantizeLinear form: q [K, N] (int4/uint4, or
int8/uint8), scale [K/g, N] and zero point [K/g, N] (or none), one per block of g input
channels of one output channel. Packed, per output channel n:

- `b`: uint8 [N, K/g, g/2] for 4 bits, two values per byte, the value of the even input channel
  in the low nibble (low nibble first), unsigned 0..15; uint8 [N, K/g, g] for 8 bits. The last
  block is zero-padded.
- `scales`: float32 [N, K/g] (the transpose of scale).
- `zero_points`: uint8 [N, ceil((K/g)/2)] packed like b (4 bits) or [N, K/g] (8 bits). The
  weight is w = (u - z) * s. Signed values and zero points move to unsigned by adding 8 (4 bits)
  or 128 (8 bits): (q + 8) - (z + 8) = q - z.

MatMulNBits leaves out zero points that all equal its default (8 or 128); the plugin always
takes them (it has one signature).
"""

from __future__ import annotations

import numpy as np


def packable_group(g: int) -> bool:
    """A block size the packed 4-bit kernels take (MatMulNBits, the INT4 GEMM plugin)."""
    return g >= 16 and not g & (g - 1)


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """4-bit values 0..15 (last axis, even length) -> bytes, the even-indexed value in the low
    nibble."""
    u = np.asarray(u).astype(np.uint8)
    return (u[..., 0::2] & 0x0F) | ((u[..., 1::2] & 0x0F) << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_nibbles`: [..., m] uint8 -> [..., 2m] values 0..15."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack_4bit(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, g: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blockwise 4-bit (q [K, N] int4 or uint4, scale [K/g, N], zero [K/g, N] or None) -> the
    packed (b, scales, zero_points), zero points always present (a missing one is 0, 8 after
    the shift): the INT4 GEMM plugin's inputs."""
    k, n = q.shape
    blocks = -(-k // g)
    signed = np.dtype(q.dtype).name == "int4" or np.issubdtype(q.dtype, np.signedinteger)
    offset = 8 if signed else 0
    u = np.zeros((n, blocks * g), np.uint8)
    u[:, :k] = (q.astype(np.int32) + offset).T
    b = pack_nibbles(u.reshape(n, blocks, g))
    z = np.zeros((blocks, n), np.int32) if zero is None else zero.astype(np.int32)
    z = (z + offset).T
    if blocks % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.int32)], axis=1)
    return b, np.ascontiguousarray(np.asarray(scale).T, np.float32), pack_nibbles(z)


def unpack_4bit(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int) -> np.ndarray:
    """The float32 weight W [K, N] that a `pack_4bit` result stands for."""
    n, nb, half = b.shape
    g = 2 * half
    u = unpack_nibbles(b).reshape(n, nb * g)[:, :k].astype(np.int32)  # [N, K]
    z = unpack_nibbles(zero_points.reshape(n, -1))[:, :nb].astype(np.int32)  # [N, nb]
    groups = np.arange(k) // g
    w = (u - z[:, groups]).astype(np.float32) * scales.astype(np.float32)[:, groups]
    return np.ascontiguousarray(w.T)


def pack_matmulnbits(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, g: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blockwise 4-bit (q [K, N], scale [nb, N], zero [nb, N]) -> MatMulNBits (B, scales,
    zero_points): `pack_4bit`, with zero points None where they are all 8 (the op's default)."""
    b, scales, zero_points = pack_4bit(q, scale, zero, g)
    if (unpack_nibbles(zero_points)[:, : scales.shape[1]] == 8).all():
        zero_points = None
    return b, scales, zero_points


def pack_matmulnbits_8bit(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, g: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blockwise 8-bit (q [K, N] int8/uint8, scale [nb, N], zero [nb, N]) -> MatMulNBits bits=8
    (B uint8 [N, nb, g], the last block zero-padded; scales [N, nb]; zero points uint8 [N, nb],
    or None where they are all 128, the op's default). Signed values move up by 128."""
    k, n = q.shape
    blocks = -(-k // g)
    offset = 128 if np.issubdtype(q.dtype, np.signedinteger) else 0
    b = np.zeros((n, blocks * g), np.uint8)
    b[:, :k] = (q.astype(np.int32) + offset).T
    z = np.zeros((blocks, n), np.int32) if zero is None else zero.astype(np.int32)
    zero_points = (z + offset).T.astype(np.uint8)
    if (zero_points == 128).all():
        zero_points = None
    scales = np.ascontiguousarray(np.asarray(scale).T, np.float32)
    return b.reshape(n, blocks, g), scales, zero_points


def unpack_matmulnbits(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `pack_matmulnbits`, in uint4 terms: (u [K, N], scale [nb, N], zero [nb, N])."""
    n, nb, _ = b.shape
    u = unpack_nibbles(b).reshape(n, -1)[:, :k].T
    if zero_points is None:
        z = np.full((nb, n), 8, np.uint8)
    else:
        z = unpack_nibbles(zero_points.reshape(n, -1))[:, :nb].T
    return u, scales.T, z
