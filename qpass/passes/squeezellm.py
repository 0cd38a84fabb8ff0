"""SqueezeLLM: per-output-channel lookup tables fitted by sensitivity-weighted k-means, with
the outliers and the most sensitive values kept in float as a sparse part."""

from __future__ import annotations

import dataclasses
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qpass.calibration import Context
from qpass.calibration.staged import StagedCalibration
from qpass.graph import constant, initializer
from qpass.metadata import SQUEEZELLM_SENSITIVITY
from qpass.passes.groupwise import TokenStatistics
from qpass.passes.staged import StagedWeightPass
from qpass.schemes import QuantScheme

logger = logging.getLogger(__name__)

H_DIAGONAL = "diag(E[x x^T]) of each layer's calibration inputs"
"""The sensitivity this pass uses (the Fisher information needs gradients of a torch module,
which the passes, working on the ONNX graph, do not have)."""


class _SortedRows:
    """Rows [R, M], each sorted ascending, searched all at once: row r's values are mapped into
    [2r, 2r + 1) so that one flat np.searchsorted serves every row."""

    def __init__(self, rows: np.ndarray, low: np.ndarray, high: np.ndarray):
        self.low = low[:, None]
        self.span = (high[:, None] - self.low) * 1.001 + 1e-30
        self.offset = 2.0 * np.arange(len(rows))[:, None]
        self.width = rows.shape[1]
        self.keys = ((rows - self.low) / self.span + self.offset).ravel()

    def searchsorted(self, queries: np.ndarray) -> np.ndarray:
        """np.searchsorted(rows[r], queries[r]) (side left) for every row r; the queries must
        lie within [low, high] of their row."""
        found = np.searchsorted(self.keys, (queries - self.low) / self.span + self.offset)
        return found - self.width * np.arange(len(queries))[:, None]


def weighted_kmeans(
    values: np.ndarray, weights: np.ndarray, levels: int, iterations: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of values [R, M]: a table of `levels` values (ascending) minimizing
    Σ_m weights[r, m] (values[r, m] - table[r, index[r, m]])²; returns (table [R, L], index
    [R, M]). Lloyd's algorithm in one dimension: the rows are sorted once, each cluster is a run
    of them and its weighted mean comes from cumulative sums; it starts from weighted quantiles,
    and a cluster left empty restarts at its row's worst-fitted value."""
    values = np.asarray(values, np.float64)
    weights = np.broadcast_to(np.asarray(weights, np.float64), values.shape)
    rows, m = values.shape
    order = np.argsort(values, axis=1, kind="stable")
    v = np.take_along_axis(values, order, 1)
    w = np.take_along_axis(weights, order, 1)
    zero = np.zeros((rows, 1))
    mass_before = np.concatenate([zero, np.cumsum(w, 1)], 1)  # [R, M + 1]
    moment_before = np.concatenate([zero, np.cumsum(w * v, 1)], 1)
    quantiles = mass_before[:, -1:] * (np.arange(levels) + 0.5) / levels
    cumulative = _SortedRows(mass_before[:, 1:], zero[:, 0], mass_before[:, -1])
    table = np.take_along_axis(v, np.clip(cumulative.searchsorted(quantiles), 0, m - 1), 1)
    sorted_values = _SortedRows(v, v[:, 0], v[:, -1])
    r = np.arange(rows)[:, None]
    first, last = np.zeros((rows, 1), int), np.full((rows, 1), m)
    for _ in range(iterations):
        table.sort(axis=1)
        middles = (table[:, 1:] + table[:, :-1]) / 2
        edges = np.concatenate([first, sorted_values.searchsorted(middles), last], 1)
        mass = mass_before[r, edges[:, 1:]] - mass_before[r, edges[:, :-1]]
        moment = moment_before[r, edges[:, 1:]] - moment_before[r, edges[:, :-1]]
        new = np.where(mass > 0, moment / np.where(mass > 0, mass, 1.0), table)
        for row in np.flatnonzero((mass <= 0).any(1)):
            new[row] = _restart_empty(v[row], w[row], new[row], mass[row] <= 0)
        if np.array_equal(np.sort(new, 1), table):
            break
        table = new
    table.sort(axis=1)
    # sorted value p belongs to cluster j when j middles lie at or below it
    edges = sorted_values.searchsorted((table[:, 1:] + table[:, :-1]) / 2)
    starts = np.zeros((rows, m + 1), np.int64)
    np.add.at(starts, (np.broadcast_to(r, edges.shape), edges), 1)
    index = np.empty((rows, m), np.int64)
    np.put_along_axis(index, order, np.cumsum(starts, 1)[:, :m], 1)
    return table, index


def _restart_empty(v: np.ndarray, w: np.ndarray, table: np.ndarray, empty: np.ndarray):
    """The row's table with each empty cluster moved to the value fitted worst (weighted)."""
    table = table.copy()
    kept = np.sort(table[~empty]) if (~empty).any() else table[:1]
    nearest = kept[np.clip(np.searchsorted((kept[1:] + kept[:-1]) / 2, v), 0, len(kept) - 1)]
    cost = w * (v - nearest) ** 2
    for level in np.flatnonzero(empty):
        worst = int(np.argmax(cost))
        table[level] = v[worst]
        cost[worst] = 0.0
    return table


@dataclasses.dataclass
class LookupWeight:
    """A weight W [K, N] as table[index[k, n], n] (dense: `index` [K, N] in 0..L-1, `table`
    [L, N] float32 holding float16 values, unless out of float16's range) plus a sparse part:
    W[rows[i], cols[i]] += values[i]."""

    index: np.ndarray
    table: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray

    def dense(self) -> np.ndarray:
        """The dense part as float32 [K, N] (what GatherElements(table, index, axis=0) gives)."""
        return np.take_along_axis(self.table, self.index.astype(np.int64), 0)

    def dequantize(self) -> np.ndarray:
        """Dense plus sparse part, float32 [K, N]."""
        w = self.dense()
        np.add.at(w, (self.rows, self.cols), self.values)
        return w


def squeeze(
    w: np.ndarray, sensitivity: np.ndarray, bits: int, outliers: float = 0.0,
    sensitive: float = 0.0,
) -> LookupWeight:
    """SqueezeLLM's dense-and-sparse decomposition of W [K, N] (y = x @ W), one table of 2^bits
    levels per output channel n, fitted by k-means weighted by `sensitivity` ([K] per input
    channel, or [K, N] per value).

    1. Outliers: the `outliers` fraction of W's values of largest magnitude go to the sparse
       part and leave the fit (their weight is zero).
    2. Each column W[:, n] gets its table by weighted k-means over the remaining values.
    3. Sensitive values: of the rest, the `sensitive` fraction with the largest weighted error
       sensitivity (w - ŵ)² goes to the sparse part too.
    The sparse part holds w - ŵ at its positions, so dense + sparse is exact there."""
    k, n = w.shape
    w = np.asarray(w, np.float32)
    f = np.broadcast_to(np.asarray(sensitivity, np.float64).reshape(k, -1), (k, n))
    f = f + 1e-6 * max(float(f.mean()), 1e-30)  # input channels never seen still count a little
    sparse = np.zeros((k, n), bool)
    count = round(outliers * w.size)
    if count:
        sparse.flat[np.argpartition(-np.abs(w).ravel(), count - 1)[:count]] = True
    table, index = weighted_kmeans(w.T, np.where(sparse, 0.0, f).T, 2**bits)
    table = table.T.astype(np.float32)
    if np.abs(table).max() < np.finfo(np.float16).max:  # stored in float16: round it here
        table = table.astype(np.float16).astype(np.float32)
    lookup = LookupWeight(index.T.astype(np.uint8), table, *_empty_sparse())
    error = np.where(sparse, 0.0, f * (w - lookup.dense()) ** 2)
    count = round(sensitive * w.size)
    if count:
        sparse.flat[np.argpartition(-error.ravel(), count - 1)[:count]] = True
    rows, cols = np.nonzero(sparse)
    lookup.rows, lookup.cols = rows.astype(np.int32), cols.astype(np.int32)
    lookup.values = (w - lookup.dense())[rows, cols].astype(np.float32)
    return lookup


def compensate(
    w: np.ndarray, h: np.ndarray, lookup: LookupWeight, block_size: int = 128,
    damp: float = 0.01,
) -> LookupWeight:
    """Round W [K, N] onto `lookup`'s tables again with GPTQ's error feedback (Frantar et al.
    2022, Alg. 1, with act-order), H = E[x xᵀ] [K, K]: input channels in order of decreasing
    H_kk, each rounded to its output channel's nearest table entry, its error spread over the
    channels not yet rounded along the Cholesky factor of (H + λI)⁻¹ (λ = `damp` x mean diag H),
    in lazy blocks of `block_size`. The sparse positions stay exact: they take the weight as
    updated when their input channel comes. Not in SqueezeLLM, whose rounding is to nearest."""
    n, k = w.shape[1], w.shape[0]
    W = np.asarray(w, np.float64).T.copy()  # [N, K]: rows are output channels, as in GPTQ
    H = np.array(h, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    perm = np.argsort(-np.diag(H), kind="stable")
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    keep = np.zeros((n, k), bool)
    keep[lookup.cols, np.argsort(perm)[lookup.rows]] = True
    table = lookup.table.T.astype(np.float64)  # [N, L]
    middles = (table[:, 1:] + table[:, :-1]) / 2
    index, final = np.zeros((n, k), np.uint8), np.zeros((n, k))
    rows = np.arange(n)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, E1, U1 = W[:, i1:i2].copy(), np.zeros((n, i2 - i1)), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = W1[:, i]
            index[:, i1 + i] = (column[:, None] > middles).sum(1)
            rounded = np.where(keep[:, i1 + i], column, table[rows, index[:, i1 + i]])
            final[:, i1 + i] = column
            E1[:, i] = (column - rounded) / U1[i, i]
            W1[:, i:] -= np.outer(E1[:, i], U1[i, i:])
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    back = np.argsort(perm)
    index, final = index[:, back].T, final[:, back].T
    result = LookupWeight(index, lookup.table, lookup.rows, lookup.cols, lookup.values)
    result.values = (final[lookup.rows, lookup.cols]
                     - result.dense()[lookup.rows, lookup.cols]).astype(np.float32)
    return result


def _empty_sparse() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)


def replace_with_lookup(graph: ir.Graph, matmul: ir.Node, lookup: LookupWeight) -> None:
    """MatMul(x, W)  ==>  MatMul(x, GatherElements(Cast(table, float), Cast(index, int64),
    axis=0)) and, when the sparse part is not empty, ScatterElements(y, Cast(cols),
    Gather(x, Cast(rows), axis=-1) * values, axis=-1, reduction=add) after it. The index is
    UINT4, the table float16, the sparse positions uint16 (int32 past 65535 channels): the
    Casts of constants are folded when the session starts."""
    old = matmul.inputs[1]
    base = matmul.name or old.name or "weight"
    index = initializer(graph, f"{base}.weight_index", lookup.index.astype(ml_dtypes.uint4))
    half = lookup.table.astype(np.float16)
    exact = np.array_equal(half.astype(np.float32), lookup.table)
    table = initializer(graph, f"{base}.weight_table", half if exact else lookup.table)
    cast = ir.node("Cast", [index], {"to": ir.DataType.INT64}, name=f"{base}.index_cast")
    widen = ir.node("Cast", [table], {"to": ir.DataType.FLOAT}, name=f"{base}.table_cast")
    gather = ir.node("GatherElements", [widen.outputs[0], cast.outputs[0]], {"axis": 0},
                     name=f"{base}.weight_lookup")
    gather.outputs[0].name = f"{base}.weight_dequantized"
    gather.outputs[0].dtype = ir.DataType.FLOAT
    gather.outputs[0].shape = ir.Shape(lookup.index.shape)
    graph.insert_before(matmul, [cast, widen, gather])
    matmul.replace_input_with(1, gather.outputs[0])
    if old.is_initializer() and not old.uses() and not old.is_graph_output():
        graph.initializers.pop(old.name)
    if len(lookup.values):
        _add_sparse(graph, matmul, lookup, base)


def _add_sparse(graph: ir.Graph, matmul: ir.Node, lookup: LookupWeight, base: str) -> None:
    y = matmul.outputs[0]
    uses = list(y.uses())
    small = max(lookup.index.shape) <= np.iinfo(np.uint16).max
    positions = []
    for name in ("rows", "cols"):
        stored = initializer(graph, f"{base}.sparse_{name}",
                             getattr(lookup, name).astype(np.uint16 if small else np.int32))
        positions.append(ir.node("Cast", [stored], {"to": ir.DataType.INT64},
                                 name=f"{base}.sparse_{name}_cast"))
    rows, cols = (node.outputs[0] for node in positions)
    values = initializer(graph, f"{base}.sparse_values", lookup.values)
    picked = ir.node("Gather", [matmul.inputs[0], rows], {"axis": -1}, name=f"{base}.sparse_x")
    products = ir.node("Mul", [picked.outputs[0], values], name=f"{base}.sparse_mul")
    shape = ir.node("Shape", [products.outputs[0]], name=f"{base}.sparse_shape")
    where = ir.node("Expand", [cols, shape.outputs[0]], name=f"{base}.sparse_cols_expand")
    scatter = ir.node(
        "ScatterElements", [y, where.outputs[0], products.outputs[0]],
        {"axis": -1, "reduction": "add"}, name=f"{base}.sparse_add",
    )
    scatter.outputs[0].dtype, scatter.outputs[0].shape = y.dtype, y.shape
    graph.insert_after(matmul, [*positions, picked, products, shape, where, scatter])
    for use in uses:
        use.node.replace_input_with(use.idx, scatter.outputs[0])
    if y.is_graph_output():
        outputs = graph.outputs
        outputs[outputs.index(y)] = scatter.outputs[0]
        name, y.name = y.name, f"{y.name}.dense"
        scatter.outputs[0].name = name


class SqueezeLLM(StagedWeightPass):
    """Quantize MatMul weights with SqueezeLLM (Kim et al. 2023, "SqueezeLLM: Dense-and-Sparse
    Quantization"): non-uniform, one lookup table per output channel, weight-only.

    Rewrite rules, for each MatMul with a constant float weight W [K, N] that is not excluded:

    1. The model's opset is raised to 21 if it is lower (UINT4).
    2. Stage by stage as GPTQ (`StagedWeightPass`), the sensitivity of each input channel k is
       h_k = diag(E[x xᵀ]) of the MatMul's calibration inputs (token rows at unit norm with
       `normalize_tokens`). The paper weighs by the Fisher information, squared gradients
       E[g²] of each weight; for a linear layer g_kn = x_k δ_n, and within one output channel
       n (one table) the δ_n factor is common, so h_k is the Fisher weight up to that factor
       and the assumption that x_k and δ_n are independent. Gradients need the torch module,
       which the passes do not see: this pass always uses h (model.metadata_props
       `qpass.squeezellm.sensitivity` says so in the file).
    3. W = D + S (`squeeze`): the `outliers` fraction of W's values of largest magnitude and the
       `sensitive` fraction with the largest weighted error go to the sparse part S (the paper's
       best: 0.40% + 0.05%); each column of D gets 2^bits levels by k-means weighted by h.
    4. MatMul(x, W)  ==>  MatMul(x, GatherElements(table [L, N] float16 as float, index
       [K, N] UINT4 as int64, axis 0)), then, if S is not empty, y  ==>  ScatterElements(y,
       cols, Gather(x, rows, axis=-1) * values, axis=-1, reduction=add), positions in uint16
       (`replace_with_lookup`). 3-bit indices are stored in UINT4 (ONNX has no 3-bit type).
       ONNX Runtime has no lookup-table MatMul kernel: it folds the constant lookup into a
       float weight when the session starts, so the file is small and the run is as fast (and
       as large in memory) as the float model's.
    5. With `compensate` (not in the paper), W is rounded onto the fitted tables once more in
       GPTQ's order with its error feedback from the full H (`compensate`).
    6. The final projection stays in float unless `lm_head=True`.
    """

    label = "SqueezeLLM"

    def __init__(
        self,
        context: Context | None = None,
        *,
        bits: int = 4,
        outliers: float = 0.004,
        sensitive: float = 0.0005,
        exclude: frozenset[str] = frozenset(),
        lm_head: bool = False,
        sequential: str = "block",
        normalize_tokens: bool = True,
        compensate: bool = False,
    ):
        if bits not in (3, 4):
            raise ValueError(f"SqueezeLLM takes 3 or 4 bits (UINT4 indices), not {bits}")
        if not (0 <= outliers < 1 and 0 <= sensitive < 1):
            raise ValueError("the sparse fractions (outliers, sensitive) must lie in [0, 1)")
        # the base class keeps the indices' scheme; the values come from the tables
        indices = QuantScheme(dtype=f"uint{bits}")
        super().__init__(context, indices, exclude, lm_head, sequential, normalize_tokens)
        self.bits, self.outliers, self.sensitive = bits, outliers, sensitive
        self.compensate = compensate

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if result.modified:
            model.metadata_props[SQUEEZELLM_SENSITIVITY] = H_DIAGONAL
            logger.info("SqueezeLLM sensitivity: %s", H_DIAGONAL)
        return result

    def _quantize_stage(self, model, runner: StagedCalibration, stage, description) -> None:
        stats = self._statistics(model, runner, stage, TokenStatistics, description)
        for node in stage:
            s = stats[node.inputs[0].name]
            h = s.xtx / max(s.rows, 1)
            w = constant(node.inputs[1])
            lookup = squeeze(w, np.diag(h), self.bits, self.outliers, self.sensitive)
            if self.compensate:
                lookup = compensate(w, h, lookup)
            replace_with_lookup(model.graph, node, lookup)
