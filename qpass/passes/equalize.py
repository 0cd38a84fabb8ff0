"""Cross-layer range equalization: even out per-channel weight ranges of consecutive layers."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import constant
from qpass.metadata import BN_STATISTICS, RELU6_REPLACED
from qpass.passes.base import Pass
from qpass.passes.chains import (
    Pair,
    bias_of,
    find_pairs,
    input_ranges,
    output_ranges,
    replace_by_relu,
    scale_inputs,
    scale_outputs,
    set_bias,
    set_weight,
)

logger = logging.getLogger(__name__)

class EqualizeCrossLayer(Pass):
    """Rescale channels between consecutive layers so both have the same per-channel weight range.

    Per-tensor weight quantization fails when one channel's weights are much larger than
    another's (depthwise convolutions after BatchNorm folding); scaling channel i of the first
    layer's output by 1/s_i and the matching input channel of the second by s_i leaves the float
    function unchanged because Relu(x / s) = Relu(x) / s for s > 0 (Nagel et al. 2019,
    "Data-Free Quantization Through Weight Equalization and Bias Correction", cross-layer range
    equalization). Rewrite rules, for each pair first -> ops -> second where first and second
    are Conv (depthwise and grouped included) or Gemm with constant weights, the ops are Relu,
    zero Pad on spatial axes, MaxPool or Identity, and every tensor between them has one reader
    and is not a graph output:

    1. first(W1, b1) -> ops -> second(W2)  ==>  first(W1 / s, b1 / s) -> ops -> second(W2 * s)
       per channel i, s_i = sqrt(r1_i * r2_i) / r2_i, with r1_i = max |W1| over output channel i
       and r2_i = max |W2| over what input channel i multiplies; both ranges become
       sqrt(r1_i * r2_i). A channel with a zero range on either side keeps s_i = 1.
    2. Rule 1 is applied to all pairs in sweeps (a layer in two pairs is rescaled by both) until
       max |log s| < `tolerance` or `max_sweeps` sweeps; the scales of all sweeps compose.
    3. The first layer's BatchNorm statistics in `node.meta[BN_STATISTICS]` become gamma / s and
       beta / s, so AbsorbHighBias sees the rescaled pre-activation distribution.
    4. A Clip(0, max) (ReLU6) between the layers is not scale-equivariant: the pair is left
       alone, unless `allow_relu6=True`, which replaces the Clip by Relu (as the paper does for
       MobileNetV2), logs a warning and lists the Clip in `RELU6_REPLACED`. The float function
       then changes wherever the pre-activation exceeded max (on EfficientNet-Lite0 it costs
       most of the top-1: docs/methods/data-free.md), so this is off by default.
    """

    def __init__(self, *, allow_relu6: bool = False, tolerance: float = 1e-3, max_sweeps: int = 20):
        super().__init__()
        self.allow_relu6 = allow_relu6
        self.tolerance = tolerance
        self.max_sweeps = max_sweeps

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        pairs = [p for p in find_pairs(model.graph) if self.allow_relu6 or not p.clamps]
        if not pairs:
            return ir.passes.PassResult(model, modified=False)
        self._replace_clamps(model, pairs)
        layers = {id(n): n for p in pairs for n in (p.first, p.second)}
        weights = {key: constant(n.inputs[1]).astype(np.float64) for key, n in layers.items()}
        biases = {id(p.first): bias_of(p.first) for p in pairs}
        factors = {id(p.first): np.ones_like(biases[id(p.first)]) for p in pairs}
        sweeps, change = 0, np.inf
        while sweeps < self.max_sweeps and change >= self.tolerance:
            change = max(self._equalize(p, weights, biases, factors) for p in pairs)
            sweeps += 1
        logger.info("equalized %d layer pairs in %d sweeps", len(pairs), sweeps)
        for key, node in layers.items():
            set_weight(model.graph, node, weights[key])
            if key in biases and _has_bias(node):
                set_bias(model.graph, node, biases[key])
            if key in factors and BN_STATISTICS in node.meta:
                stats = node.meta[BN_STATISTICS]
                node.meta[BN_STATISTICS] = {
                    "gamma": stats["gamma"] * factors[key],
                    "beta": stats["beta"] * factors[key],
                }
        return ir.passes.PassResult(model, modified=True)

    def _equalize(self, pair: Pair, weights: dict, biases: dict, factors: dict) -> float:
        """Apply rule 1 to one pair on the working copies; return max |log s|."""
        first, second = id(pair.first), id(pair.second)
        r1 = output_ranges(pair.first, weights[first])
        r2 = input_ranges(pair.second, weights[second])
        usable = (r1 > 0) & (r2 > 0)
        s = np.where(usable, np.sqrt(r1 * r2) / np.where(usable, r2, 1.0), 1.0)
        weights[first] = scale_outputs(pair.first, weights[first], 1 / s)
        weights[second] = scale_inputs(pair.second, weights[second], s)
        biases[first] = biases[first] / s
        factors[first] = factors[first] / s
        return float(np.abs(np.log(s)).max())

    def _replace_clamps(self, model: ir.Model, pairs: list[Pair]) -> None:
        replaced = []
        for pair in pairs:
            for clip in pair.clamps:
                relu = replace_by_relu(model.graph, clip)
                pair.between[pair.between.index(clip)] = relu
                replaced.append(clip.name or relu.outputs[0].name)
        if not replaced:
            return
        model.meta[RELU6_REPLACED] = replaced
        model.metadata_props[RELU6_REPLACED] = ",".join(replaced)
        logger.warning(
            "EqualizeCrossLayer(allow_relu6=True) replaced %d Clip(0, max) by Relu to equalize "
            "across them: the float model changes where activations exceeded the Clip's max",
            len(replaced),
        )


def _has_bias(node: ir.Node) -> bool:
    return len(node.inputs) > 2 and node.inputs[2] is not None
