"""Leave in float the convolutions that FP8 kernels do not serve."""

from __future__ import annotations

import logging
import math

import onnx_ir as ir

from qpass.graph import is_op
from qpass.passes.base import Pass, keep_float

logger = logging.getLogger(__name__)


class KeepSmallConvsFloat(Pass):
    """Leave in float the convolutions FP8 gains nothing on: narrow ones (depthwise included) and
    those with large filters.

    Rewrite rules (the graph itself is not changed here):

    1. A Conv with a constant weight [O, I/group, k...] is marked to stay float (`keep_float`)
       when O <= `min_channels` or I/group <= `min_channels` (the 3-channel stem, every
       depthwise convolution: one input channel per group), or when its filter has more than
       `max_taps` taps (prod(k...) > 32: a 7x7 kernel).
    2. Any other node is left alone.

    Why: these convolutions are memory-bound or have no FP8 tensor-core kernel, so TensorRT runs
    them as fast in FP16, and their few channels carry FP8's relative error (up to 1/16 per
    value) straight into the output. The thresholds are NVIDIA's (ModelOpt 0.47's ONNX FP8 mode
    leaves Convs with <= 16 input or output channels, or filters above 32 taps, in float:
    `modelopt.onnx.quantization.graph_utils.find_nodes_from_convs_to_exclude`); on
    EfficientNet-Lite0 they leave 19 of 50 weighted layers float (docs/methods/fp8.md).
    """

    def __init__(self, min_channels: int = 16, max_taps: int = 32):
        super().__init__()
        self.min_channels = min_channels
        self.max_taps = max_taps

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        kept = []
        for node in model.graph:
            why = self._why_float(node)
            if why:
                keep_float(node, f"{why} (KeepSmallConvsFloat)")
                kept.append(node.name)
        logger.info("left %d convolutions in float: %s", len(kept), kept)
        return ir.passes.PassResult(model, modified=False)

    def _why_float(self, node: ir.Node) -> str | None:
        if not is_op(node, "Conv") or len(node.inputs) < 2:
            return None
        weight = ir.convenience.get_const_tensor(node.inputs[1])
        if weight is None or len(weight.shape) < 3:
            return None
        out_channels, in_channels = weight.shape[0], weight.shape[1]
        if min(out_channels, in_channels) <= self.min_channels:
            return (f"{in_channels} input channel(s) per group, {out_channels} output channels: "
                    f"<= {self.min_channels}")
        taps = math.prod(weight.shape.dims[2:])
        if taps > self.max_taps:
            return f"a {taps}-tap filter: > {self.max_taps}"
        return None
