"""Streaming range observers: running statistics and histograms, never the activations themselves.

`MinMaxObserver` keeps running extrema (per tensor or per channel). `HistogramObserver` keeps a
histogram whose range doubles when data falls outside it (bins are merged exactly, so no sample is
re-read; batches larger than `max_samples` are sampled systematically) and derives a range with
one of four methods:

- minmax: the exact extrema.
- percentile: the given percentile of each tail.
- entropy: the threshold minimizing the KL divergence between the |x| histogram and its 8-bit
  quantized copy (TensorRT's calibration method; Migacz 2017, "8-bit Inference with TensorRT").
- mse: the range (f * min, f * max), f on a grid in (0, 1], minimizing the squared error of
  quantizing the histogram (clipping of the tails and rounding inside, at bin resolution).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from qpass.schemes import QuantScheme


class Observer(Protocol):
    """What the Context and staged calibration feed: every batch of one tensor, in order.

    Range observers (below), SmoothQuant's channel statistics and GPTQ's/AWQ's token statistics
    all follow it; an observer keeps running statistics, never the batches themselves."""

    def update(self, x: np.ndarray) -> object: ...


class MinMaxObserver:
    """Running minimum and maximum, per tensor (axis=None) or along one channel axis."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        if self.axis is None:
            low, high = np.min(x), np.max(x)
        else:
            reduce = tuple(i for i in range(x.ndim) if i != self.axis % x.ndim)
            low, high = np.min(x, axis=reduce), np.max(x, axis=reduce)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)

    def range(self, scheme: QuantScheme | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.low is None:
            raise ValueError("the observer saw no data")
        return np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)


class HistogramObserver:
    """A histogram over [-bound, bound] that grows by powers of two; all four range methods."""

    def __init__(self, bins: int = 4096, max_samples: int = 1 << 20):
        if bins & (bins - 1):
            raise ValueError("bins must be a power of two (the range grows by exact bin merges)")
        self.bins = bins
        self.max_samples = max_samples
        self.bound = 0.0
        self.counts = np.zeros(bins, np.int64)
        self.extrema = MinMaxObserver()

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).ravel()
        if x.size == 0:
            return
        self.extrema.update(x)
        peak = float(max(-self.extrema.low, self.extrema.high))
        if peak > self.bound:
            self._grow(peak)
        if x.size > self.max_samples:  # a systematic sample; the extrema above stay exact
            x = x[:: -(-x.size // self.max_samples)]
        counts, _ = np.histogram(x, bins=self.bins, range=(-self.bound, self.bound))
        self.counts += counts

    def _grow(self, peak: float) -> None:
        if self.bound == 0.0:
            self.bound = peak if peak > 0 else 1e-12
            return
        factor = int(np.ceil(np.log2(peak / self.bound)))
        if factor <= 0:
            return
        merged = np.zeros_like(self.counts)
        if factor < int(np.log2(self.bins)):
            offset = self.bins // 2 - self.bins // 2 ** (factor + 1)
            np.add.at(merged, offset + (np.arange(self.bins) >> factor), self.counts)
        else:  # everything seen so far falls into the two centre bins
            merged[self.bins // 2 - 1] = self.counts[: self.bins // 2].sum()
            merged[self.bins // 2] = self.counts[self.bins // 2 :].sum()
        self.counts = merged
        self.bound *= 2.0**factor

    @property
    def centers(self) -> np.ndarray:
        edges = np.linspace(-self.bound, self.bound, self.bins + 1)
        return (edges[:-1] + edges[1:]) / 2

    def range(self, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
        low, high = self.extrema.range()
        if high - low <= 0 or scheme.method == "minmax":
            return low, high
        if scheme.method == "percentile":
            return self._percentile_range(scheme.percentile, low, high)
        if scheme.method == "entropy":
            levels = scheme.qmax - scheme.qmin + 1
            threshold = self._entropy_threshold(levels // 2 if low < 0 else levels)
            return np.maximum(low, -threshold), np.minimum(high, threshold)
        return self._mse_range(scheme, low, high)

    def _percentile_range(self, percentile: float, low, high):
        cdf = np.cumsum(self.counts) / self.counts.sum()
        tail = 1.0 - percentile / 100.0
        edges = np.linspace(-self.bound, self.bound, self.bins + 1)
        lo = edges[np.searchsorted(cdf, tail, side="right")]
        hi = edges[np.searchsorted(cdf, 1.0 - tail, side="left") + 1]
        return np.maximum(low, min(lo, 0.0)), np.minimum(high, max(hi, 0.0))

    def _entropy_threshold(self, levels: int) -> float:
        """KL-optimal threshold on the |x| histogram with `levels` steps (TensorRT's method)."""
        half = self.bins // 2
        hist = (self.counts[half:] + self.counts[:half][::-1]).astype(np.float64)
        # Exact zeros (a ReLU's spike) are represented exactly at any threshold; left in, they make
        # the narrowest candidate win because it is the only one that does not smear the spike.
        hist[0] = 0
        cum, cum_nonzero = np.cumsum(hist), np.cumsum(hist > 0)
        best, best_kl = half, np.inf
        for stop in range(levels, half + 1, max(1, half // 256)):
            reference = hist[:stop].copy()
            reference[-1] += cum[-1] - cum[stop - 1]
            bounds = (np.arange(levels + 1) * stop) // levels
            totals = np.diff(np.concatenate([[0.0], cum[:stop]])[bounds])
            counts = np.diff(np.concatenate([[0], cum_nonzero[:stop]])[bounds])
            chunk = np.searchsorted(bounds, np.arange(stop), side="right") - 1
            per_bin = totals[chunk] / np.maximum(counts[chunk], 1)
            candidate = np.where(hist[:stop] > 0, per_bin, 0.0)
            kl = _kl_divergence(reference, candidate)
            if kl < best_kl:
                best, best_kl = stop, kl
        return best * self.bound / half

    def _mse_range(self, scheme: QuantScheme, low, high, grid: int = 128):
        """The range (f*low, f*high) minimizing the squared quantization error of the histogram."""
        low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)  # the range always holds 0
        fractions = np.linspace(1.0 / grid, 1.0, grid)[:, None]
        if scheme.scale_constraint == "pow2-group":  # candidates, not channels of one tensor
            scheme = dataclasses.replace(scheme, scale_constraint="float")
        scale, zero = scheme.scale_zero_point(low * fractions, high * fractions)
        scale, zero = scale.astype(np.float64), zero.astype(np.float64)
        c = self.centers[None, :]
        if scheme.is_float:
            error = ((c - scheme.fake_quantize(c, scale, zero)) ** 2) @ self.counts.astype(
                np.float64
            )
        else:
            q = np.clip(np.rint(c / scale) + zero, scheme.qmin, scheme.qmax)
            error = ((c - (q - zero) * scale) ** 2) @ self.counts.astype(np.float64)
        best = fractions[int(np.argmin(error)), 0]
        return low * best, high * best


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q_sum = q.sum()
    if q_sum == 0:
        return np.inf
    q = q / q_sum
    mask = p > 0
    q = np.where(mask & (q == 0), 1e-6, q)  # smoothed, as TensorRT and ONNX Runtime do
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def make_observer(scheme: QuantScheme):
    """The cheapest observer that can answer `scheme`'s range method."""
    return MinMaxObserver() if scheme.method == "minmax" else HistogramObserver()
