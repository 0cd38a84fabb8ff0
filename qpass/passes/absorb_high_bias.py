"""High-bias absorption: move the part of a bias that a Relu never clips into the next layer."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import constant, is_op
from qpass.metadata import BN_STATISTICS
from qpass.passes.base import Pass
from qpass.passes.chains import (
    Pair,
    bias_of,
    find_pairs,
    has_bias_input,
    set_bias,
    sum_over_inputs,
)

logger = logging.getLogger(__name__)

STD_RANGE = 3.0
"""The pre-activation is assumed to lie within beta ± 3 |gamma| (its BatchNorm statistics)."""


class AbsorbHighBias(Pass):
    """Shrink the activation range after a layer by moving bias through a Relu into the next one.

    After cross-layer equalization, some channels carry large biases, and so wide activation
    ranges. Where the BatchNorm statistics kept by FoldBatchNorm say a channel's pre-activation
    h is (almost) always >= c > 0, Relu(h) = Relu(h - c) + c, and the constant c can be added
    to the next layer's bias instead (Nagel et al. 2019, "Data-Free Quantization Through Weight
    Equalization and Bias Correction", absorbing high biases). Rewrite rules, for each pair
    first -> ops -> second (Conv, depthwise or grouped Conv, or Gemm, as in EqualizeCrossLayer)
    whose ops are one Relu plus any zero Pad, MaxPool or Identity, where the first layer has
    `node.meta[BN_STATISTICS]`:

    1. With c = max(0, beta - 3 |gamma|) per channel:
       first(W1, b1) -> ops -> second(W2, b2)  ==>  first(W1, b1 - c) -> ops -> second(W2, b2')
       with b2'[o] = b2[o] + sum over input channels i and kernel positions k of W2[o, i, k] c_i
       (within the group of o, so per channel for a depthwise Conv; times alpha for Gemm).
    2. The first layer's statistics become (gamma, beta - c).

    Exact where every pre-activation h_i >= c_i, except at the borders of a zero-padded second
    Conv (or after a Pad), whose padded taps do not carry the absorbed c.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        absorbed = sum(self._try_absorb(model.graph, pair) for pair in find_pairs(model.graph))
        if absorbed:
            logger.info("absorbed high biases of %d layers into the next", absorbed)
        return ir.passes.PassResult(model, modified=absorbed > 0)

    def _try_absorb(self, graph: ir.Graph, pair: Pair) -> bool:
        if not self._has_one_relu(pair) or not all(map(has_bias_input, (pair.first, pair.second))):
            return False
        stats = pair.first.meta.get(BN_STATISTICS)
        shift = bias_of(pair.first)
        if stats is None or np.shape(stats["beta"]) != shift.shape:
            return False
        c = np.maximum(0.0, stats["beta"] - STD_RANGE * np.abs(stats["gamma"]))
        if not c.any():
            return False
        weight = constant(pair.second.inputs[1]).astype(np.float64)
        set_bias(graph, pair.first, shift - c)
        set_bias(graph, pair.second, bias_of(pair.second) + sum_over_inputs(pair.second, weight, c))
        pair.first.meta[BN_STATISTICS] = {"gamma": stats["gamma"], "beta": stats["beta"] - c}
        return True

    def _has_one_relu(self, pair: Pair) -> bool:
        """Relu(h - c) + c = Relu(h) needs one Relu; a Clip's upper bound would move with c."""
        return sum(is_op(n, "Relu") for n in pair.between) == 1 and not any(
            is_op(n, "Clip") for n in pair.between
        )
