"""SmoothQuant: migrate activation outliers into the weights of MatMul/Gemm layers."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.calibration import Context, MinMaxObserver
from qpass.graph import attribute, constant, initializer, is_op
from qpass.metadata import OBSERVED_RANGE, SMOOTHQUANT_MULS
from qpass.passes.base import CalibratedPass
from qpass.passes.scaling import has_scalable_weight, scale_weight_rows, try_absorb_into_producer
from qpass.schemes import ACTIVATION_UINT8, WEIGHT_INT8, QuantScheme

logger = logging.getLogger(__name__)

ALPHA_GRID = (0.4, 0.5, 0.6, 0.7, 0.8)
_MAX_ROWS = 128  # activation rows kept per tensor for the auto-alpha search


class SmoothQuant(CalibratedPass):
    """Divide each input channel of a MatMul/Gemm's activation by s_j and multiply the weight's
    row j by s_j (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
    Quantization for Large Language Models", eq. 4): s_j = max|X_j|^alpha / max|W_j|^(1-alpha).

    Rewrite rules, for each activation X read (as input A) by MatMul/Gemm ops with a constant
    2-D weight, not excluded (the group, e.g. q, k and v of one attention):

    1. max|X_j| comes from a per-channel min-max observer on the calibration data; max|W_j| is
       taken over the rows j of every weight in the group, so one s serves them all.
    2. alpha is the given one, or (alpha=None) the value in `alphas` minimizing the summed squared
       output error of the group's layers quantized with `activations` (per-tensor, range from
       the observed channel extrema / s) or per token (`per_token=True`) and `weights`, on
       128 rows of X sampled evenly from the first calibration batches.
    3. Each weight W becomes diag(s) W (Gemm with transB: W diag(s)).
    4. 1/s is folded into the producer of X when X has no other reader: a LayerNormalization's
       scale and bias, or the output columns (and bias) of a MatMul/Gemm (+ constant Add).
    5. Otherwise X -> Mul(X, 1/s) -> group, logged and listed in model.meta[SMOOTHQUANT_MULS].
    6. The smoothed tensor's calibration range (the observed channel extrema / s) is kept in its
       `meta[OBSERVED_RANGE]`, so a min-max InsertQDQ after it runs no calibration of its own.

    Before quantization the float function is unchanged (up to float rounding).
    """

    def __init__(
        self,
        context: Context | None = None,
        *,
        alpha: float | None = 0.5,
        alphas: tuple[float, ...] = ALPHA_GRID,
        activations: QuantScheme = ACTIVATION_UINT8,
        weights: QuantScheme = WEIGHT_INT8,
        per_token: bool = False,
        exclude: frozenset[str] = frozenset(),
    ):
        super().__init__(context)
        self.alpha = alpha
        self.alphas = tuple(alphas)
        self.activations = activations
        self.weights = weights
        self.per_token = per_token
        self.exclude = frozenset(exclude)
        self.chosen: dict[str, float] = {}
        """alpha used per smoothed activation (after the pass ran)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = self._groups(model.graph)
        if not groups:
            return ir.passes.PassResult(model, modified=False)
        names = [g[0].inputs[0].name for g in groups]
        stats = self.context.observe(model, names, lambda _: _ChannelStats(), "smoothquant stats")
        muls = []
        for group in groups:
            x = group[0].inputs[0]
            s = self._factors(group, stats[x.name])
            for node in group:
                scale_weight_rows(model.graph, node, s)
            if not try_absorb_into_producer(model.graph, x, group, 1.0 / s):
                _insert_mul(model.graph, x, group, 1.0 / s)
                muls.append(f"{x.name} -> {', '.join(n.name for n in group)}")
            minmax = stats[x.name].minmax
            group[0].inputs[0].meta[OBSERVED_RANGE] = (
                float(np.min(minmax.low / s)), float(np.max(minmax.high / s))
            )
        model.meta[SMOOTHQUANT_MULS] = muls
        if muls:
            logger.info(
                "SmoothQuant inserted %d Mul nodes (no producer could absorb 1/s)", len(muls)
            )
        logger.info("SmoothQuant smoothed %d activations", len(groups))
        return ir.passes.PassResult(model, modified=True)

    def _groups(self, graph: ir.Graph) -> list[list[ir.Node]]:
        """MatMul/Gemm nodes with a constant 2-D weight, grouped by the activation they read."""
        groups: dict[int, list[ir.Node]] = {}
        for node in graph:
            if node.name in self.exclude or not has_scalable_weight(node):
                continue
            groups.setdefault(id(node.inputs[0]), []).append(node)
        return list(groups.values())

    def _factors(self, group: list[ir.Node], stats: _ChannelStats) -> np.ndarray:
        x_max = np.maximum(np.abs(stats.minmax.low), np.abs(stats.minmax.high)).astype(np.float64)
        w = np.concatenate([_rows(n) for n in group], axis=1).astype(np.float32)  # [K, ΣN]
        w_max = np.abs(w).max(axis=1).astype(np.float64)
        key = group[0].inputs[0].name
        if self.alpha is not None:
            self.chosen[key] = self.alpha
            return _smoothing_factors(x_max, w_max, self.alpha)
        x = stats.rows()
        reference = x @ w
        errors = {
            a: self._group_error(stats, x, w, reference, _smoothing_factors(x_max, w_max, a))
            for a in self.alphas
        }
        self.chosen[key] = min(errors, key=errors.get)
        return _smoothing_factors(x_max, w_max, self.chosen[key])

    def _group_error(self, stats: _ChannelStats, x, w, reference, s: np.ndarray) -> float:
        """Squared error of the group's W8A8 outputs after smoothing by s, on the sampled rows x
        (the group's weights side by side: per-channel weight scales are per output column)."""
        s = s.astype(np.float32)
        xs, ws = x / s, w * s[:, None]
        if self.per_token:
            xq = _fake_quant_per_token(xs)
        else:
            low, high = np.min(stats.minmax.low / s), np.max(stats.minmax.high / s)
            scale, zero = self.activations.scale_zero_point(low, high)
            q = self.activations.quantize(xs, scale, zero).astype(np.float32)
            xq = (q - zero) * scale
        w_scale = np.maximum(np.abs(ws).max(axis=0), 1e-30) / 127.0
        wq = np.rint(ws / w_scale) * w_scale  # |ws / w_scale| <= 127 by construction
        return float(np.sum((reference - xq @ wq.astype(np.float32)) ** 2, dtype=np.float64))


class _ChannelStats:
    """Per-channel min/max along the last axis, plus a systematic sample of rows."""

    def __init__(self):
        self.minmax = MinMaxObserver(axis=-1)
        self.samples: list[np.ndarray] = []
        self.kept = 0

    def update(self, x: np.ndarray) -> None:
        self.minmax.update(x)
        if self.kept < _MAX_ROWS:
            rows = x.reshape(-1, x.shape[-1])
            rows = rows[:: max(1, len(rows) // 64)][: _MAX_ROWS - self.kept]
            self.samples.append(rows.astype(np.float32))
            self.kept += len(rows)

    def rows(self) -> np.ndarray:
        return np.concatenate(self.samples)


def _smoothing_factors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 where a channel is all zero."""
    usable = (x_max > 0) & (w_max > 0)
    s = np.ones_like(x_max)
    s[usable] = x_max[usable] ** alpha / w_max[usable] ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5)


def _fake_quant_per_token(x: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-30) / 127.0
    return np.clip(np.rint(x / scale), -127, 127) * scale


def _rows(node: ir.Node) -> np.ndarray:
    """The weight as [input channels, output channels]."""
    weight = constant(node.inputs[1])
    return weight.T if is_op(node, "Gemm") and attribute(node, "transB", 0) else weight


def _insert_mul(graph: ir.Graph, x: ir.Value, group: list[ir.Node], inverse: np.ndarray) -> None:
    factors = initializer(graph, f"{x.name}_smooth", inverse.astype(np.float32))
    mul = ir.node("Mul", [x, factors], name=f"{x.name}_SmoothQuant")
    mul.outputs[0].name = f"{x.name}_smoothed"
    mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype or ir.DataType.FLOAT, x.shape
    graph.insert_before(group[0], mul)
    for node in group:
        node.replace_input_with(0, mul.outputs[0])
    logger.info("SmoothQuant: %s has no producer that absorbs 1/s; inserted %s", x.name, mul.name)
