"""Fold explicit zero padding into the convolution that reads it (onnxscript's rewrite rule)."""

from __future__ import annotations

import onnx_ir as ir

from qpass.graph import is_op
from qpass.passes.base import Pass


class FoldPadIntoConv(Pass):
    """Merge a constant zero Pad into the Conv that reads it.

    Rewrite rule (delegated to onnxscript's `fuse_pad_into_conv_rule`, whose checks say why a
    match is refused):

    1. Pad(x, pads, value 0, mode constant) -> Conv(pads p)  ==>  Conv(x, pads p + spatial pads)
       when the Pad pads only spatial axes, by non-negative constants, and the Conv reads it as
       its data input.

    Exporters write TensorFlow-style "same" padding as a separate Pad (EfficientNet-Lite has 17);
    left alone, it runs in float between a DequantizeLinear and the Conv and keeps ONNX Runtime
    from running the convolution as one QLinearConv on the padded integers. onnxscript's rewriter
    is imported only when the graph has a Pad.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not any(is_op(node, "Pad") for node in model.graph):
            return ir.passes.PassResult(model, modified=False)
        from onnxscript.rewriter import RewritePass
        from onnxscript.rewriter.rules.common import fuse_pad_into_conv_rule

        return RewritePass([fuse_pad_into_conv_rule])(model)
