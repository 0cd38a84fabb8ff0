"""AWQ: activation-aware per-input-channel scaling of MatMul weights before 4-bit rounding."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.calibration import Context
from qpass.graph import constant, is_op, set_constant
from qpass.passes.groupwise import (
    TokenStatistics,
    dequantize,
    group_ranges,
    grouped,
    quantize_with_ranges,
)
from qpass.passes.matmul_weights import replace_weight
from qpass.passes.rtn import WEIGHT_UINT4_G128
from qpass.passes.scaling import only_read_by, scale_weight_rows, try_absorb_into_producer
from qpass.passes.staged import StagedWeightPass
from qpass.schemes import QuantScheme

logger = logging.getLogger(__name__)

ALPHA_GRID = tuple(i / 20 for i in range(20))
CLIP_GRID = tuple(1 - i / 100 for i in range(46))
"""1.0 down to 0.55 in steps of 0.01 (finer than 0.05 pays: docs/methods/weight-only.md)."""


class InputStatistics(TokenStatistics):
    """Streamed statistics of one MatMul input x [..., K]: Σ xxᵀ, Σ|x| and the row count."""

    def __init__(self, columns: int, normalize_tokens: bool = False):
        super().__init__(columns, normalize_tokens)
        self.abs_sum = np.zeros(columns)

    def update(self, x: np.ndarray) -> np.ndarray:
        x = super().update(x)
        self.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
        return x

    @property
    def hessian(self) -> np.ndarray:
        """E[xxᵀ]: ||x (W - Ŵ)||² averaged over rows is tr((W - Ŵ)ᵀ H (W - Ŵ))."""
        return self.xtx / max(self.rows, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)


def output_error(h: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    """Mean squared layer output error tr(Dᵀ H D) over the rows H was measured on, D = W - Ŵ."""
    d = (w - w_hat).astype(np.float32)
    return float(np.sum((h.astype(np.float32) @ d) * d, dtype=np.float64))


def group_errors(h: np.ndarray, d: np.ndarray, g: int) -> np.ndarray:
    """Output error of each group of g input channels on its own, [ceil(K/g), N]."""
    k = d.shape[0]
    return np.stack([
        np.sum((h[i : i + g, i : i + g] @ d[i : i + g]) * d[i : i + g], axis=0)
        for i in range(0, k, g)
    ])


class AWQ(StagedWeightPass):
    """Activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight
    Quantization for LLM Compression and Acceleration"), group-wise, weight-only.

    Rewrite rules, stage by stage (one transformer block, as in `GPTQ`; the inputs of stage k come
    from the graph whose earlier stages are already quantized), for each activation X read by
    MatMuls with constant weights W [K, N] (a group: q/k/v, or gate/up, share one X):

    1. Per input channel, s = mean|X|^alpha (normalized to geometric mean 1 of its extremes),
       alpha from `alphas` minimizing Σ_W ||X W - (X/s) Q(diag(s) W)||², Q round to nearest;
       the error comes exactly from E[xxᵀ] streamed over the calibration set (eq. 4-5), of
       unit-norm token rows unless `normalize_tokens=False` (see `StagedWeightPass`).
    2. X's producer absorbs 1/s, so that the float function is unchanged: the constant weight of
       a Mul (RMSNorm's gain), LayerNormalization's scale and bias, or the output columns of the
       MatMul(+Add) that computes X or one factor of a Mul that computes X (SwiGLU's up_proj).
       A group whose producer cannot absorb 1/s (o_proj after attention) keeps s = 1.
    3. W  ==>  diag(s) W, then per output channel and group the clipping ratio r in `clips`
       (range [r min, r max]) that minimizes that group's output error is chosen (§3.3), kept
       only if the layer's whole output error is lower than without clipping.
    4. MatMul(x, W)  ==>  MatMul(x, DequantizeLinear(q, scale, zero; axis=0, block_size=g)),
       round to nearest within the clipped range. lm_head stays in float unless `lm_head=True`.
    """

    label = "AWQ"

    def __init__(
        self,
        context: Context | None = None,
        *,
        weights: QuantScheme = WEIGHT_UINT4_G128,
        exclude: frozenset[str] = frozenset(),
        lm_head: bool = False,
        alphas: tuple[float, ...] = ALPHA_GRID,
        clips: tuple[float, ...] = CLIP_GRID,
        sequential: str = "block",
        normalize_tokens: bool = True,
    ):
        super().__init__(context, weights, exclude, lm_head, sequential, normalize_tokens)
        self.alphas, self.clips = tuple(alphas), tuple(clips)
        self.chosen: dict[str, float] = {}
        """alpha chosen per activation (after the pass ran; 0 where nothing absorbs 1/s)."""
        self.factors: dict[str, np.ndarray] = {}
        """s per scaled activation: its MatMuls now apply diag(s) W to x / s."""

    def _quantize_stage(self, model: ir.Model, runner, stage: list[ir.Node], description: str):
        stats = self._statistics(model, runner, stage, InputStatistics, description)
        groups: dict[str, list[ir.Node]] = {}
        for node in stage:
            groups.setdefault(node.inputs[0].name, []).append(node)
        factors = {}
        for name, group in groups.items():  # all scales first: down_proj's go into up_proj
            factors[name] = self._smooth(model.graph, group, stats[name])
        for name, group in groups.items():
            s = factors[name]
            h = (stats[name].hessian / np.outer(s, s)).astype(np.float32)  # E[x xᵀ] of x / s
            for node in group:
                q, scale, zero = self._clip(h, constant(node.inputs[1]).astype(np.float32))
                replace_weight(model.graph, node, q, scale, zero, self.weights)

    def _smooth(self, graph: ir.Graph, group: list[ir.Node], stats: InputStatistics):
        """Rules 1-3: choose s, fold 1/s into X's producer and s into the weights; return s."""
        x = group[0].inputs[0]
        s, alpha = np.ones(len(stats.abs_sum)), 0.0
        if _can_absorb(x, group):
            ws = [constant(node.inputs[1]).astype(np.float32) for node in group]
            s, alpha = self._search_scales(stats.hessian.astype(np.float32), stats.mean_abs, ws)
        if not (alpha and _absorb(graph, x, group, 1.0 / s)):
            self.chosen[x.name] = 0.0
            return np.ones_like(s)
        self.chosen[x.name], self.factors[x.name] = alpha, s
        for node in group:
            scale_weight_rows(graph, node, s)
        return s

    def _search_scales(self, h, mean_abs, ws) -> tuple[np.ndarray, float]:
        best = (np.inf, np.ones(len(h)), 0.0)
        for alpha in self.alphas:
            s = _normalized(np.maximum(mean_abs, 1e-8) ** alpha)
            error = 0.0
            for w in ws:
                scaled = w * s[:, None].astype(np.float32)
                w_hat = self._rtn(scaled, 1.0) / s[:, None].astype(np.float32)
                error += output_error(h, w, w_hat)
            if error < best[0]:
                best = (error, s, alpha)
        return best[1], best[2]

    def _rtn(self, w: np.ndarray, clip: float) -> np.ndarray:
        q, scale, zero = quantize_with_ranges(w, self.weights, clip)
        return dequantize(q, scale, zero, grouped(self.weights, len(w)))

    def _clip(self, h, w):
        g = grouped(self.weights, len(w))
        ranges = group_ranges(w, g)
        best_error, best = None, None
        for clip in self.clips:
            q, scale, zero = quantize_with_ranges(w, self.weights, clip, ranges)
            errors = group_errors(h, w - dequantize(q, scale, zero, g), g)
            if best is None:
                best_error, best = errors, (q.astype(np.int32), scale, zero)
                continue
            better = errors < best_error
            rows = better[np.arange(len(w)) // g]
            best_error = np.where(better, errors, best_error)
            best = (np.where(rows, q.astype(np.int32), best[0]),
                    np.where(better, scale, best[1]), np.where(better, zero, best[2]))
        q, scale, zero = best
        # the per-group choice ignores cross-group terms of H: keep it only if the whole is better
        unclipped = quantize_with_ranges(w, self.weights, 1.0, ranges)
        if output_error(h, w, dequantize(*unclipped, g)) <= output_error(
            h, w, dequantize(q, scale, zero, g)
        ):
            return unclipped
        return q.astype(self.weights.np_dtype), scale.astype(np.float32), zero


def _normalized(s: np.ndarray) -> np.ndarray:
    return s / np.sqrt(s.max() * s.min())


def _mul_factor(x: ir.Value) -> tuple[ir.Node, int] | None:
    """(Mul, input index) where X = Mul(a, b) and input i is a constant vector or the output of a
    MatMul with a constant weight, read by this Mul only; else None."""
    mul = x.producer()
    if not is_op(mul, "Mul"):
        return None
    for i, value in enumerate(mul.inputs):
        const = constant(value)
        if const is not None:  # a shared constant is copied by set_constant
            return (mul, i) if const.ndim == 1 else None
    for i, value in enumerate(mul.inputs):
        producer = value.producer()
        if is_op(producer, "MatMul") and len(value.uses()) == 1 and not value.is_graph_output():
            weight = constant(producer.inputs[1])
            if weight is not None and weight.ndim == 2:
                return mul, i
    return None


def _can_absorb(x: ir.Value, group: list[ir.Node]) -> bool:
    if not only_read_by(x, group):
        return False
    producer = x.producer()
    if _mul_factor(x) is not None:
        return True
    if is_op(producer, "LayerNormalization"):
        return True
    if is_op(producer, "MatMul") and constant(producer.inputs[1]) is not None:
        return len(producer.inputs[1].uses()) == 1
    return False


def _absorb(graph: ir.Graph, x: ir.Value, group: list[ir.Node], inverse: np.ndarray) -> bool:
    """Fold diag(1/s) into X's producer (rule 2); False when no producer can take it."""
    found = _mul_factor(x)
    if found is None:
        return try_absorb_into_producer(graph, x, group, inverse)
    mul, i = found
    factor = mul.inputs[i]
    if constant(factor) is not None:
        scaled = (constant(factor).astype(np.float64) * inverse).astype(np.float32)
        mul.replace_input_with(i, set_constant(graph, factor, scaled))
        return True
    matmul = factor.producer()
    weight = constant(matmul.inputs[1])
    scaled = (weight.astype(np.float64) * inverse[None, :]).astype(weight.dtype)
    matmul.replace_input_with(1, set_constant(graph, matmul.inputs[1], scaled))
    return True
