"""ggml's block formats in numpy: q8_0, q5_0 and the k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

A tensor [rows, cols] is stored row by row in blocks along cols (for a MatMul weight W [K, N]
the rows are W's output channels: ggml's tensor is Wᵀ). `quantize(x, type)` returns a
`Quantized`: the GGUF bytes of the tensor (the layout that gguf-py's `quants.dequantize` and
llama.cpp read) and the same numbers in blockwise form, q [rows, cols] integers, one positive
float32 scale and (for the types with mins) one float32 min per sub-block of `group` values:

    x̂ = q * scale - min        (evaluated in float32, as ggml and gguf-py do)

which is exactly what gguf-py dequantizes from the bytes. The two-level scales of the
k-quants are resolved here: a sub-block's scale is d * sc (fp16 super-block scale d times the
6-bit, or 4-bit for Q2_K, sub-block scale sc), its min dmin * m.

| type | block | sub-block | values | per sub-block |
|------|-------|-----------|--------|---------------|
| q8_0 | 32    | 32        | -127..127 | fp16 d |
| q5_0 | 32    | 32        | -16..15 | fp16 d |
| Q2_K | 256   | 16        | 0..3   | 4-bit scale and min, fp16 d and dmin |
| Q3_K | 256   | 16        | -4..3  | 6-bit signed scale, fp16 d |
| Q4_K | 256   | 32        | 0..15  | 6-bit scale and min, fp16 d and dmin |
| Q5_K | 256   | 32        | 0..31  | 6-bit scale and min, fp16 d and dmin |
| Q6_K | 256   | 16        | -32..31 | 8-bit signed scale, fp16 d |

The quantizers follow the reference quantizers of llama.cpp's ggml-quants.c (q8_0, q5_0 bit for
bit, as gguf-py's `quants.quantize` does); the k-quants' searches:

- Q4_K, Q5_K, Q2_K (scale and min per sub-block): `make_qkx2_quants`: start from the sub-block's
  [min(x, 0), max] range, then try the grid of inverse scales (nmax + rmin + rdelta * i) / range,
  each followed by the weighted least-squares scale and min for the rounded values, keeping the
  one of least weighted error (absolute for Q2_K, squared otherwise). Weights |x| + rms(x) per
  value (Q2_K: |x|). With an importance vector (llama.cpp's imatrix: the mean squared activation
  of each input channel) the weights are importance * sqrt(σ² + x²), σ² = 2 mean(x²) over the
  super-block, on `make_qkx3_quants`'s finer grid (rmin -0.9, step 0.05, 37 points).
- Q6_K, Q3_K (signed scale per sub-block): `make_qx_quants`: the scale of the value of largest
  magnitude, nudged over 18 neighbours, keeping the one that maximizes (Σ w x l)² / Σ w l², w = x²
  (or the importance weights). q5_0 with an importance vector uses it too (weights importance *
  sqrt(σ² + x²), σ² the row's mean square); q8_0 ignores importance, as llama.cpp does.
- the sub-block scales (and mins) are quantized against the super-block's largest with
  round-to-nearest, and every value is rounded again against its final scale.

llama.cpp quantizes the super-block scales of an imatrix run with a further search
(`make_qp_quants`); here they are rounded as without one. Rows whose length is not a multiple of
256 cannot hold k-quants: llama.cpp then falls back to Q4_K -> q5_0, Q6_K -> q8_0
(`FALLBACK`); the fallbacks of Q2_K, Q3_K (IQ4_NL) and Q5_K (Q5_1) are not implemented here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256
TYPES = ("q8_0", "q5_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}
"""llama.cpp's type for a tensor whose rows are not a multiple of 256 (llama-quant.cpp)."""

GROUP = {"q8_0": 32, "q5_0": 32, "q2_k": 16, "q3_k": 16, "q4_k": 32, "q5_k": 32, "q6_k": 16}
"""Values per sub-block (one scale, and one min where there are mins)."""


@dataclasses.dataclass
class Quantized:
    """A tensor [rows, cols] in a ggml format: `data` uint8 [rows, bytes per row] (GGUF) and
    the blockwise form: q int8 [rows, cols], scale float32 [rows, cols / group] (> 0), min float32
    of the same shape or None; x̂ = q * scale - min."""

    type: str
    data: np.ndarray
    q: np.ndarray
    scale: np.ndarray
    min: np.ndarray | None
    group: int

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return ggml_type(self.type)

    def dequantize(self) -> np.ndarray:
        """x̂ [rows, cols] float32, as ggml computes it."""
        rows, cols = self.q.shape
        q = self.q.reshape(rows, -1, self.group).astype(np.float32)
        x = self.scale[..., None] * q
        if self.min is not None:
            x = x - self.min[..., None]
        return x.reshape(rows, cols)


def ggml_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def block_size(name: str) -> int:
    """Values per block of type `name` (32, or 256 for the k-quants)."""
    return GGML_QUANT_SIZES[ggml_type(name)][0]


def storable(name: str, cols: int) -> str | None:
    """The type that rows of `cols` values take for `name`: itself, llama.cpp's fallback
    (`FALLBACK`), or None when neither fits."""
    for candidate in (name, FALLBACK.get(name)):
        if candidate is not None and cols % block_size(candidate) == 0:
            return candidate
    return None


def quantize(x: np.ndarray, type: str, importance: np.ndarray | None = None) -> Quantized:
    """`x` [rows, cols] float in ggml format `type` (cols a multiple of its block size);
    `importance` [cols] >= 0 weights each column's error in the k-quants' searches."""
    if type not in TYPES:
        raise ValueError(f"unknown ggml type {type!r}; choose one of {', '.join(TYPES)}")
    x = np.asarray(x, np.float32)
    rows, cols = x.shape
    size = block_size(type)
    if cols % size:
        raise ValueError(f"{type} needs rows of a multiple of {size} values, not {cols}")
    blocks = x.reshape(-1, size)
    weights = None
    if importance is not None:
        importance = np.asarray(importance, np.float32)
        if importance.shape != (cols,):
            raise ValueError(f"importance must have shape ({cols},), not {importance.shape}")
        weights = np.broadcast_to(importance.reshape(-1, size), (rows, cols // size, size))
        weights = weights.reshape(-1, size)
        if type == "q5_0":  # llama.cpp's q5_0 weights: σ² is the row's mean square
            sigma2 = np.repeat((x * x).mean(1), cols // size)[:, None]
            weights = (weights * np.sqrt(sigma2 + blocks * blocks)).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN in, as in ggml: garbage out
        data, q, scale, minimum = _QUANTIZERS[type](blocks, weights)
    positive = _positive_scales(q, scale)
    return Quantized(
        type,
        data.reshape(rows, -1),
        positive[0].reshape(rows, cols),
        positive[1].reshape(rows, -1),
        None if minimum is None else minimum.reshape(rows, -1),
        GROUP[type],
    )


def _positive_scales(q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) with every scale > 0 and the same products: a negative scale's sub-block
    negated (ggml's signed scales), a zero scale's values set to 0 under scale 1."""
    groups = scale.size
    q = q.reshape(groups, -1).astype(np.int16)
    scale = scale.reshape(groups)
    sign = np.where(scale < 0, -1, 1).astype(np.int16)
    q = np.where((scale == 0)[:, None], 0, q * sign[:, None])
    scale = np.where(scale == 0, np.float32(1), np.abs(scale)).astype(np.float32)
    return q.astype(np.int8), scale


# -- rounding, as in ggml-quants.c --------------------------------------------------------------


def _nearest(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (the float32 add of 1.5 * 2^23)."""
    return np.rint(x).astype(np.int32)


def _round_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: round half away from zero (the fraction of a float32 is exact)."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + (a - whole >= 0.5))


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 value, that value as float32)."""
    with np.errstate(over="ignore"):
        half = np.asarray(x, np.float32).astype(np.float16)
    return half, half.astype(np.float32)


def _inverse(x: np.ndarray) -> np.ndarray:
    """1 / x where x != 0, else 0, in float32."""
    safe = np.where(x == 0, np.float32(1), x)
    return np.where(x == 0, np.float32(0), np.float32(1) / safe).astype(np.float32)


# -- searches -----------------------------------------------------------------------------------


def _scale_min_search(x, w, nmax, rmin, rdelta, nstep, absolute):
    """`make_qkx2_quants` on sub-blocks x [S, n], weights w [S, n]: (scale [S], min [S] >= 0)
    with x ≈ scale * l - min, l in 0..nmax. Each grid point spans [the best offset so far, max]."""
    f32 = np.float32
    low = np.minimum(x.min(1), 0)
    high = x.max(1)
    flat = high <= low
    sum_w = w.sum(1, dtype=f32)
    sum_x = (w * x).sum(1, dtype=f32)

    def error(scale, minimum, levels):
        diff = scale[:, None] * levels + minimum[:, None] - x
        return (w * (np.abs(diff) if absolute else diff * diff)).sum(1)

    def levels(inverse, start):
        return np.clip(_nearest(inverse[:, None] * (x - start[:, None])), 0, nmax).astype(f32)

    def span(start):
        return np.where(high > start, high - start, f32(1)).astype(f32)

    inverse = (f32(nmax) / span(low)).astype(f32)
    best_scale, best_min = (f32(1) / inverse).astype(f32), low.astype(f32)
    best = error(best_scale, best_min, levels(inverse, low))
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            inverse = (f32(rmin + rdelta * step + nmax) / span(best_min)).astype(f32)
            lv = levels(inverse, best_min)
            sum_l = (w * lv).sum(1)
            sum_l2 = (w * lv * lv).sum(1)
            sum_xl = (w * lv * x).sum(1)
            det = sum_w * sum_l2 - sum_l * sum_l
            scale = (sum_w * sum_xl - sum_x * sum_l) / det
            minimum = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = minimum > 0  # the min may only lower the range's start
            scale = np.where(positive, sum_xl / sum_l2, scale)
            minimum = np.where(positive, 0, minimum)
            current = error(scale, minimum, lv)
            better = (det > 0) & (current < best)
            best = np.where(better, current, best)
            best_scale = np.where(better, scale, best_scale).astype(f32)
            best_min = np.where(better, minimum, best_min).astype(f32)
    return np.where(flat, 0, best_scale).astype(f32), np.where(flat, -low, -best_min).astype(f32)


def _signed_scale_search(x, nmax, w):
    """`make_qx_quants` on sub-blocks x [S, n] with weights w: the scale [S] (signed) with
    x ≈ scale * l, l in -nmax..nmax-1."""
    f32 = np.float32
    pick = np.abs(x).argmax(1)
    peak = np.take_along_axis(x, pick[:, None], 1)[:, 0]
    small = np.abs(peak) < 1e-15
    peak = np.where(small, f32(1), peak)

    def fit(nudge):
        inverse = (-(f32(nmax) + f32(nudge)) / peak).astype(f32)
        lv = np.clip(_nearest(inverse[:, None] * x), -nmax, nmax - 1).astype(f32)
        return (w * x * lv).sum(1), (w * lv * lv).sum(1)

    sum_lx, sum_l2 = fit(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sum_l2 > 0, sum_lx / sum_l2, 0).astype(f32)
        best = scale * sum_lx
        for step in range(-9, 10):
            if step == 0:
                continue
            sum_lx, sum_l2 = fit(0.1 * step)
            better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
            scale = np.where(better, sum_lx / sum_l2, scale).astype(f32)
            best = np.where(better, scale * sum_lx, best)
    return np.where(small, 0, scale).astype(f32)


def _importance_weights(blocks, importance, n):
    """llama.cpp's imatrix weights: importance * sqrt(σ² + x²), σ² = 2 mean(x²) per block;
    as sub-blocks [S, n]."""
    sigma2 = 2 * (blocks * blocks).mean(1, keepdims=True)
    return (importance * np.sqrt(sigma2 + blocks * blocks)).reshape(-1, n).astype(np.float32)


def _quantize_super_scales(values, levels):
    """Sub-block scales (or mins) [B, S] >= 0 -> (fp16 d [B], its float32, integers [B, S] in
    0..levels), values ≈ d * integer."""
    top = values.max(1)
    integers = np.clip(_nearest(_inverse(top / levels)[:, None] * values), 0, levels)
    half, d = _f16(top / levels)
    return half, d, integers.astype(np.uint8)


def _quantize_signed_super_scales(values, levels):
    """Signed sub-block scales [B, S] -> (fp16 d [B], float32 d, integers [B, S] in
    -levels..levels-1), d = -max / levels for the scale of largest magnitude."""
    pick = np.abs(values).argmax(1)
    peak = np.take_along_axis(values, pick[:, None], 1)[:, 0]
    inverse = np.where(np.abs(peak) < 1e-15, 0, -levels * _inverse(peak)).astype(np.float32)
    integers = np.clip(_nearest(inverse[:, None] * values), -levels, levels - 1)
    half, d = _f16(_inverse(inverse))
    return half, d, integers


def _requantize(blocks, scale, minimum, group, low, high):
    """Every value rounded against its final sub-block scale (and min); 0 where the scale is 0."""
    b = len(blocks)
    x = blocks.reshape(b, -1, group)
    shifted = x if minimum is None else x + minimum[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = _nearest(shifted / np.where(scale == 0, 1, scale)[..., None])
    levels = np.where((scale == 0)[..., None], 0, np.clip(levels, low, high))
    return levels.reshape(b, -1)


# -- packing ------------------------------------------------------------------------------------


def _bits(values, width, per_row):
    """[B, 256] small integers packed `width` bits per value: value c*per_row*k + j*per_row + i
    of chunk c in byte c*per_row + i at bit j*width (ggml's interleaving)."""
    b = len(values)
    count = 8 // width
    v = values.astype(np.uint8).reshape(b, -1, count, per_row)
    shifts = (np.arange(count, dtype=np.uint8) * width)[None, None, :, None]
    return np.bitwise_or.reduce(v << shifts, axis=2).reshape(b, -1)


def _high_bits(values, shift):
    """Bit `shift` of [B, 256] values: byte i, bit j holds value j*32 + i."""
    return _bits((values >> shift) & 1, 1, 32)


def _half_bytes(half):
    return half.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _scale_bytes_k4(sc, m):
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    scales = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mins = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    return np.concatenate([scales, mins, (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], 1)


def _scale_bytes_q3(sc):
    """Q3_K's 12 bytes of sixteen 6-bit scales (stored + 32)."""
    u = (sc + 32).astype(np.uint8)
    low = (u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4)
    high = np.zeros((len(u), 4), np.uint8)
    for j in range(16):
        high[:, j % 4] |= (u[:, j] >> 4) << (2 * (j // 4))
    return np.concatenate([low, high], 1)


# -- the formats --------------------------------------------------------------------------------


def _q8_0(blocks, weights):
    d = (np.abs(blocks).max(1, keepdims=True) / np.float32(127)).astype(np.float32)
    q = _round_away(blocks * _inverse(d)).astype(np.int8)
    half, d32 = _f16(d[:, 0])
    return np.concatenate([_half_bytes(half), q.view(np.uint8)], 1), q, d32, None


def _q5_0(blocks, weights):
    if weights is not None:  # the weighted `make_qx_quants` search, rounded again against fp16 d
        _, d = _f16(_signed_scale_search(blocks, 16, weights))
        levels = np.clip(_nearest(blocks * _inverse(d)[:, None]), -16, 15)
        u = (levels + 16).astype(np.uint8)
    else:
        pick = np.abs(blocks).argmax(1)
        peak = np.take_along_axis(blocks, pick[:, None], 1)[:, 0]
        d = (peak / np.float32(-16)).astype(np.float32)
        u = np.trunc(blocks * _inverse(d)[:, None] + np.float32(16.5)).astype(np.uint8)
        u = u.clip(0, 31)
    qs = (u[:, :16] & 0xF) | (u[:, 16:] << 4)
    qh = np.packbits(u >> 4, axis=1, bitorder="little")
    half, d32 = _f16(d)
    data = np.concatenate([_half_bytes(half), qh, qs], 1)
    return data, u.astype(np.int8) - 16, d32, None


def _k_with_mins(blocks, weights, nmax, group, scale_levels):
    """Q2_K, Q4_K, Q5_K: sub-block scales and mins, both quantized against the super-block's."""
    b = len(blocks)
    x = blocks.reshape(-1, group)
    if weights is not None:
        w = _importance_weights(blocks, weights, group)
        fit = _scale_min_search(x, w, nmax, -0.9, 0.05, 36, absolute=False)
    elif nmax == 3:
        fit = _scale_min_search(x, np.abs(x), nmax, -0.5, 0.1, 15, absolute=True)
    else:
        rms = np.sqrt((x * x).mean(1, keepdims=True))
        grid = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        fit = _scale_min_search(x, rms + np.abs(x), nmax, *grid, absolute=False)
    d_half, d, sc = _quantize_super_scales(fit[0].reshape(b, -1), scale_levels)
    m_half, dmin, m = _quantize_super_scales(fit[1].reshape(b, -1), scale_levels)
    scale = (d[:, None] * sc.astype(np.float32)).astype(np.float32)
    minimum = (dmin[:, None] * m.astype(np.float32)).astype(np.float32)
    levels = _requantize(blocks, scale, minimum, group, 0, nmax)
    return d_half, m_half, sc, m, levels, scale, minimum


def _q2_k(blocks, weights):
    d, dmin, sc, m, levels, scale, minimum = _k_with_mins(blocks, weights, 3, 16, 15)
    data = np.concatenate(
        [sc | (m << 4), _bits(levels, 2, 32), _half_bytes(d), _half_bytes(dmin)], 1
    )
    return data, levels, scale, minimum


def _q4_k(blocks, weights):
    d, dmin, sc, m, levels, scale, minimum = _k_with_mins(blocks, weights, 15, 32, 63)
    data = np.concatenate(
        [_half_bytes(d), _half_bytes(dmin), _scale_bytes_k4(sc, m), _bits(levels, 4, 32)], 1
    )
    return data, levels, scale, minimum


def _q5_k(blocks, weights):
    d, dmin, sc, m, levels, scale, minimum = _k_with_mins(blocks, weights, 31, 32, 63)
    data = np.concatenate(
        [_half_bytes(d), _half_bytes(dmin), _scale_bytes_k4(sc, m), _high_bits(levels, 4),
         _bits(levels & 0xF, 4, 32)], 1,
    )
    return data, levels, scale, minimum


def _k_signed(blocks, weights, nmax, levels):
    """Q3_K, Q6_K: one signed scale per 16 values, quantized against the super-block's."""
    b = len(blocks)
    x = blocks.reshape(-1, 16)
    w = x * x if weights is None else _importance_weights(blocks, weights, 16)
    fit = _signed_scale_search(x, nmax, w).reshape(b, -1)
    half, d, sc = _quantize_signed_super_scales(fit, levels)
    scale = (d[:, None] * sc.astype(np.float32)).astype(np.float32)
    return half, sc, _requantize(blocks, scale, None, 16, -nmax, nmax - 1), scale


def _q3_k(blocks, weights):
    half, sc, levels, scale = _k_signed(blocks, weights, 4, 32)
    stored = levels + 4
    data = np.concatenate(
        [_high_bits(stored, 2), _bits(stored & 3, 2, 32), _scale_bytes_q3(sc), _half_bytes(half)],
        1,
    )
    return data, levels, scale, None


def _q6_k(blocks, weights):
    half, sc, levels, scale = _k_signed(blocks, weights, 32, 128)
    stored = (levels + 32).astype(np.uint8)
    b = len(blocks)
    low = stored & 0xF
    halves = low.reshape(b, 2, 128)
    ql = (halves[:, :, :64] | (halves[:, :, 64:] << 4)).reshape(b, 128)
    qh = _bits(stored >> 4, 2, 32)
    data = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _half_bytes(half)], 1)
    return data, levels, scale, None


_QUANTIZERS = {
    "q8_0": _q8_0, "q5_0": _q5_0, "q2_k": _q2_k, "q3_k": _q3_k, "q4_k": _q4_k, "q5_k": _q5_k,
    "q6_k": _q6_k,
}
