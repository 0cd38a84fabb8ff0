"""OBQ: each weight of a row quantized greedily in the order that costs least, the others updated
to compensate, with the exact inverse Hessian (Optimal Brain Quantization)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qpass.calibration import Context
from qpass.errors import QpassError
from qpass.graph import constant, set_constant
from qpass.passes.adaround import AdaRound, RoundableLayer
from qpass.passes.rounding import full_scale_zero, integer_grid, torch_threads

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerErrors:
    """A layer's output error on its calibration rows (mean over rows of the squared error,
    summed over outputs, ignoring the bias and the activation after it) with OBQ's weights, with
    GPTQ's on the same grid and Hessian (in order of decreasing diag H, and in input order), and
    round to nearest; `kept`: the weights the pass wrote (rule 5), `gptq_rows`: the share of
    rows where those are GPTQ's; `exact`: OBQ ran (False: the rows were longer than `max_row`
    and GPTQ's weights were kept)."""

    obq: float
    gptq: float
    gptq_input_order: float
    nearest: float
    kept: float
    gptq_rows: float
    exact: bool


class OBQ(AdaRound):
    """Quantize Conv/Gemm/MatMul weights by OBQ (Frantar & Alistarh 2022, "Optimal Brain
    Compression: A Framework for Accurate Post-Training Quantization and Pruning", §4-5).

    Runs after InsertQDQ, with its `snapshot()` before it, as AdaRound; keeps InsertQDQ's scale
    and zero point (so the int32 bias stays right) and chooses each weight's integer. Rewrite
    rules, for each layer AdaRound rounds (its rule 1), in graph order:

    1. H = Xᵀ X / n from n sampled input rows X of the layer in the quantized graph (activations
       quantized, layers above already done), per convolution group; inputs never nonzero are
       dropped (weight 0), and H += `damp` x mean diag H x I.
    2. Each output row w (a length-d row of [groups, outs, d]) starts at the float weight with
       H⁻¹ and is quantized one weight at a time (OBS): the next weight p is the one whose
       rounding raises (w - w~)ᵀ H (w - w~) least, (w_p - quant(w_p))² / [H⁻¹]_pp, except that a
       weight pushed outside the grid by earlier updates goes first (the paper's outlier rule);
       then w -= (w_p - quant(w_p)) / [H⁻¹]_pp x H⁻¹[p, :], w_p = quant(w_p), and p leaves H⁻¹:
       H⁻¹ -= H⁻¹[:, p] H⁻¹[p, :] / [H⁻¹]_pp. The integers are those of the final w.
    3. All rows of a layer run at once (each with its own copy of H⁻¹): O(rows x d³) work,
       rows processed in chunks whose H⁻¹ copies fit in `memory` bytes.
    4. A layer with rows longer than `max_row` (OBQ's cost grows with d³ per row) is quantized by
       GPTQ's update instead (one order for all rows: decreasing diag H; Frantar et al. 2022),
       with a warning naming it.
    5. With `best_of_gptq` (the default), each row keeps OBQ's integers unless GPTQ's (rule 4's
       order, on the same grid and H) give that row a lower output error: the error is a sum
       over rows, so the layer's is then at most both. OBQ's greedy order is myopic: it leaves
       the weights costliest to round for last, when few remain to compensate; on ResNet20's
       first layers and its classifier GPTQ's fixed order does better (docs/methods/obq.md).

    GPTQ's update is OBQ's with the order fixed in advance: a row quantized by GPTQ in the order
    OBQ chose for it gets OBQ's integers. Per-layer output errors of OBQ, GPTQ (same grid and
    H) and round to nearest are kept in `self.errors` (`LayerErrors`, by layer output name).
    Rows are sampled as AdaRound's (`rows`, `row_bytes`). Torch runs on `threads` threads (one
    by default: on a shared 2-core machine a second thread made a 64 x 144 layer 30x slower).
    """

    def __init__(
        self,
        context: Context | None = None,
        *,
        damp: float = 0.01,
        max_row: int = 4096,
        memory: int = 256 << 20,
        rows: int = 65536,
        row_bytes: int = 128 << 20,
        best_of_gptq: bool = True,
        threads: int | None = 1,
        seed: int = 0,
    ):
        super().__init__(context, rows=rows, row_bytes=row_bytes,
                         threads=threads, seed=seed)
        if max_row < 1 or 8 * max_row * max_row > memory:
            largest = int((memory // 8) ** 0.5)
            raise QpassError(f"OBQ: max_row {max_row} needs {8 * max_row * max_row >> 20} MB per "
                             f"row's inverse Hessian, over its memory ({memory >> 20} MB): use "
                             f"a max_row between 1 and {largest}")
        self.damp, self.max_row, self.memory = damp, max_row, memory
        self.best_of_gptq = best_of_gptq
        self.errors: dict[str, LayerErrors] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = [layer for n in model.graph if (layer := self._roundable(n)) is not None]
        with torch_threads(self.threads):
            for index, layer in enumerate(tqdm(layers, desc="OBQ", unit="layer",
                                               disable=not self.context.progress, leave=False)):
                self.errors[layer.output] = self._quantize_layer(model, layer, index)
        logger.info("OBQ quantized %d layers", len(layers))
        return ir.passes.PassResult(model, modified=bool(layers))

    def _quantize_layer(self, model: ir.Model, layer: RoundableLayer, index: int) -> LayerErrors:
        shape = layer.reference.shape
        inputs = self.layer_rows(model, layer, index)  # [groups, R, depth]
        integers = constant(layer.dq.inputs[0])
        scale, zero = full_scale_zero(layer.dq, integers.shape)
        weight, scale, zero = (shape.canonical(a) for a in (layer.reference.weight, scale, zero))
        limits = integer_grid(layer.dq, integers.dtype)
        exact = shape.depth <= self.max_row
        if not exact:
            logger.warning("%s: rows of %d weights are longer than OBQ's max_row %d: quantized "
                           "by GPTQ's update instead", layer.output, shape.depth, self.max_row)
        chosen = np.empty(weight.shape)
        errors, from_gptq = np.zeros(5), 0
        for g in range(shape.groups):
            chosen[g], group_errors, better = self._quantize_group(
                inputs[g], weight[g], scale[g], zero[g], limits, exact)
            errors += group_errors
            from_gptq += int(better.sum())
        learned = shape.original(chosen, integers.shape).astype(integers.dtype)
        layer.dq.replace_input_with(0, set_constant(model.graph, layer.dq.inputs[0], learned))
        result = LayerErrors(*(float(e) for e in errors),
                             from_gptq / (shape.groups * shape.outs), exact)
        logger.info("%s: output error OBQ %.4g, GPTQ %.4g (input order %.4g), round to nearest "
                    "%.4g; kept %.4g (%.0f%% of rows GPTQ's)", layer.output, result.obq,
                    result.gptq, result.gptq_input_order, result.nearest, result.kept,
                    100 * result.gptq_rows)
        return result


    def _quantize_group(self, x, weight, scale, zero, limits, exact: bool):
        """Rules 1-5 for one convolution group: (kept integers, errors of OBQ, GPTQ, GPTQ in input
        order, round to nearest and the kept ones, rows where GPTQ's were kept)."""
        x = x.astype(np.float64)
        hessian = x.T @ x / max(len(x), 1)
        grid = (scale, zero, limits)
        damped, w = damped_hessian(hessian, weight, self.damp)
        gptq = gptq_integers(w, damped, *grid, order=np.argsort(-np.diag(damped), kind="stable"))
        in_order = gptq_integers(w, damped, *grid, order=np.arange(len(damped)))
        obq = obq_integers(w, damped, *grid, memory=self.memory) if exact else gptq
        nearest = np.clip(np.rint(weight / scale) + zero, *limits)
        rows = [row_errors(weight, (q - zero) * scale, hessian)
                for q in (obq, gptq, in_order, nearest)]
        better = rows[1] < rows[0] if self.best_of_gptq else np.zeros(len(obq), bool)
        kept = np.where(better[:, None], gptq, obq)
        errors = [*(r.sum() for r in rows), np.where(better, rows[1], rows[0]).sum()]
        return kept, np.array(errors), better


def damped_hessian(hessian: np.ndarray, weight: np.ndarray, damp: float):
    """H with its dead inputs (zero diagonal) set to 1 and `damp` x mean diag H added to the
    diagonal, and the weight [rows, d] with those inputs' columns set to 0 (as GPTQ)."""
    hessian, weight = hessian.copy(), weight.astype(np.float64)
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    hessian[np.diag_indices_from(hessian)] += damp * np.mean(np.diag(hessian))
    return hessian, weight


def row_errors(weight: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """(w~ - w)ᵀ H (w~ - w) of each row: with H = XᵀX / n, the mean over the n input rows of the
    squared error of that output."""
    delta = quantized - weight
    return np.einsum("rd,de,re->r", delta, hessian, delta)


def output_error(weight: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> float:
    """The layer's output error: `row_errors` summed over the rows."""
    return float(row_errors(weight, quantized, hessian).sum())


def gptq_integers(weight, hessian, scale, zero, limits, order) -> np.ndarray:
    """GPTQ's integers for W [rows, d] on a fixed grid (scale and zero point [rows, d], integer
    `limits`), quantizing the columns in `order` and spreading each error over the columns not
    yet quantized along the Cholesky factor of H⁻¹ (Frantar et al. 2022, Alg. 1 without lazy
    blocks). `qpass.passes.gptq.GPTQSolver` sets its own group scales; here the grid is given."""
    w = weight[:, order].astype(np.float64)
    s, z = scale[:, order], zero[:, order]
    u = np.linalg.cholesky(np.linalg.inv(hessian[np.ix_(order, order)])).T  # H⁻¹ = UᵀU
    q = np.empty_like(w)
    for i in range(w.shape[1]):
        q[:, i] = np.clip(np.rint(w[:, i] / s[:, i]) + z[:, i], *limits)
        error = (w[:, i] - (q[:, i] - z[:, i]) * s[:, i]) / u[i, i]
        w[:, i:] -= np.outer(error, u[i, i:])
    return q[:, np.argsort(order)]


def obq_integers(weight, hessian, scale, zero, limits, *, memory: int = 256 << 20,
                 orders: list[np.ndarray] | None = None) -> np.ndarray:
    """OBQ's integers for W [rows, d] on a fixed grid (scale and zero point [rows, d], integer
    `limits`) and H [d, d] (damped): rules 2-3 of `OBQ`, in float64, in chunks of rows whose
    copies of H⁻¹ fit in `memory` bytes. `orders`, when given, receives each row's order."""
    import torch

    rows, depth = weight.shape
    inverse = torch.linalg.inv(torch.from_numpy(hessian.astype(np.float64)))
    chunk = max(1, memory // (8 * depth * depth))
    out = np.empty((rows, depth))
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        out[part], order = _obq_rows(
            *(torch.from_numpy(np.ascontiguousarray(a[part], np.float64))
              for a in (weight, scale, zero)), inverse, limits)
        if orders is not None:
            orders.extend(order)
    return out


def _obq_rows(w, scale, zero, inverse, limits):
    import torch

    rows, depth = w.shape
    w = w.clone()
    hinv = inverse.expand(rows, depth, depth).clone()
    remaining = torch.ones(rows, depth, dtype=torch.bool)
    q = torch.empty(rows, depth, dtype=torch.float64)
    order = torch.empty(rows, depth, dtype=torch.long)
    at = torch.arange(rows)
    for step in range(depth):
        ints = torch.clamp(torch.round(w / scale) + zero, *limits)  # round half to even
        error = w - (ints - zero) * scale
        outlier = error.abs() > scale / 2  # pushed outside the grid by earlier updates
        cost = torch.where(outlier, -error.abs(), error.square() / hinv.diagonal(dim1=1, dim2=2))
        p = cost.masked_fill(~remaining, torch.inf).argmin(dim=1)
        row = hinv[at, p]  # H⁻¹[p, :] of each row's own H⁻¹
        pivot = row[at, p]
        w -= (error[at, p] / pivot)[:, None] * row
        w[at, p] = (ints[at, p] - zero[at, p]) * scale[at, p]
        hinv.baddbmm_(row[:, :, None], (row / pivot[:, None])[:, None, :], alpha=-1)
        q[at, p], order[:, step] = ints[at, p], p
        remaining[at, p] = False
    return q.numpy(), list(order.numpy())
