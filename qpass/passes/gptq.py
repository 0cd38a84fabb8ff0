"""GPTQ: group-wise 4-bit weights that compensate each rounding error in the columns not yet
quantized, using second-order statistics of the layer's inputs."""

from __future__ import annotations

import logging

import numpy as np
from threadpoolctl import threadpool_limits

from qpass.calibration import Context
from qpass.calibration.staged import StagedCalibration
from qpass.graph import constant
from qpass.passes.groupwise import TokenStatistics, group_ranges, grouped
from qpass.passes.matmul_weights import replace_weight
from qpass.passes.rtn import WEIGHT_UINT4_G128
from qpass.passes.staged import StagedWeightPass
from qpass.schemes import QuantScheme

logger = logging.getLogger(__name__)


class GPTQSolver(TokenStatistics):
    """GPTQ for one layer input: H = 2/n Σ x xᵀ streamed by `update`, then `quantize`.

    Works on Wᵀ [N, K] like the paper (rows = output channels, columns = input channels): the
    columns are quantized one at a time, and the error of column i, divided by [H⁻¹]ᵢᵢ, is
    spread over the remaining columns along row i of the Cholesky factor of H⁻¹ (Alg. 1).
    """

    def quantize(
        self,
        w: np.ndarray,
        scheme: QuantScheme,
        *,
        block_size: int = 128,
        damp: float = 0.01,
        act_order: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Quantize W [K, N] (y = x @ W): (q [K, N], scale [nb, N], zero point [nb, N])."""
        # OpenBLAS's threads make LAPACK 5-20x slower on small shared machines; one is enough.
        with threadpool_limits(limits=1, user_api="blas"):
            return self._quantize(w, scheme, block_size, damp, act_order)

    def _quantize(self, w, scheme, block_size, damp, act_order):
        W = w.T.astype(np.float64)
        n, k = W.shape
        g = grouped(scheme, k)
        H = 2 * self.xtx / max(self.rows, 1)
        dead = np.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        # Group parameters from W; without act_order each group's are set again from the
        # updated weights when its first column comes (with act_order, groups stay static).
        scale, zero = scheme.scale_zero_point(*group_ranges(W.T, g))
        perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
        W, H = W[:, perm], H[np.ix_(perm, perm)]
        H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
        U = np.linalg.cholesky(np.linalg.inv(H)).T  # H⁻¹ = UᵀU, U upper triangular
        q = np.zeros((n, k), np.int32)
        step = max(block_size // g, 1) * g if not act_order else block_size  # groups in one block
        for i1 in range(0, k, step):
            i2 = min(i1 + step, k)
            W1, E1, U1 = W[:, i1:i2].copy(), np.zeros((n, i2 - i1)), U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = perm[i1 + i] // g
                if not act_order and (i1 + i) % g == 0:
                    span = W1[:, i : i + g]
                    scale[j], zero[j] = scheme.scale_zero_point(span.min(1), span.max(1))
                column = scheme.quantize(W1[:, i], scale[j], zero[j]).astype(np.int32)
                dequantized = (column - zero[j].astype(np.int32)).astype(np.float32) * scale[j]
                E1[:, i] = (W1[:, i] - dequantized) / U1[i, i]
                W1[:, i:] -= np.outer(E1[:, i], U1[i, i:])
                q[:, i1 + i] = column
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
        q = q[:, np.argsort(perm)].T
        return q.astype(scheme.np_dtype), scale, zero


class GPTQ(StagedWeightPass):
    """Quantize MatMul weights with GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training
    Quantization for Generative Pre-trained Transformers"), group-wise, weight-only.

    Rewrite rules, for each MatMul with a constant float weight W [K, N] that is not excluded:

    1. The model's opset is raised to 21 if it is lower.
    2. MatMuls are quantized stage by stage in graph order: a stage is one transformer block (the
       `layers.N` of the captured torch module path) or, without that metadata or with
       `sequential="layer"` (the paper's "true sequential" order), the MatMuls that read one
       tensor. Stage k's inputs are computed by the graph whose earlier stages are already
       quantized, so later layers see and compensate the error of earlier ones.
    3. For each MatMul input x of the stage, H = 2/n Σ xxᵀ is accumulated batch by batch over the
       calibration set, each token's row x scaled to unit norm first (`normalize_tokens`, the
       default; see `StagedWeightPass`); each run resumes from the values kept at the previous
       stage (`StagedCalibration`: the graph runs about twice in all; memory: one K x K matrix
       per input plus one frontier of activations).
    4. MatMul(x, W)  ==>  MatMul(x, DequantizeLinear(q, s, z; axis=0, block_size=g)) where q comes
       from GPTQ on H + λI (λ = `damp` x mean diag H), in lazy blocks of `block_size` columns,
       in order of decreasing diag H (`act_order`, the default; the input channels carrying
       massive activations go first), with groups fixed in the original order so that the
       blockwise export holds; s and z are the scheme's, per group, from the
       weights as updated when the group's first column comes (from W itself with act_order).
    5. The final projection stays in float unless `lm_head=True`.
    """

    label = "GPTQ"

    def __init__(
        self,
        context: Context | None = None,
        *,
        weights: QuantScheme = WEIGHT_UINT4_G128,
        exclude: frozenset[str] = frozenset(),
        lm_head: bool = False,
        block_size: int = 128,
        damp: float = 0.01,
        act_order: bool = True,
        sequential: str = "block",
        normalize_tokens: bool = True,
    ):
        super().__init__(context, weights, exclude, lm_head, sequential, normalize_tokens)
        self.options = {"block_size": block_size, "damp": damp, "act_order": act_order}

    def _quantize_stage(self, model, runner: StagedCalibration, stage, description) -> None:
        solvers = self._statistics(model, runner, stage, GPTQSolver, description)
        for node in stage:
            solver = solvers[node.inputs[0].name]
            q, scale, zero = solver.quantize(constant(node.inputs[1]), self.weights, **self.options)
            replace_weight(model.graph, node, q, scale, zero, self.weights)
