"""Fold explicit zero padding into the convolution that reads it."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import attribute, constant, is_op, sole_consumer

logger = logging.getLogger(__name__)


class FoldPadIntoConv(ir.passes.InPlacePass):
    """Merge a constant zero Pad into the Conv that reads it.

    Rewrite rule:

    1. Pad(x, pads, value 0, mode constant) -> Conv(pads p)  ==>  Conv(x, pads p + spatial pads)
       when the Pad pads only spatial axes, by non-negative constants, and the Conv reads it as
       its data input and is its only reader (auto_pad NOTSET).

    Exporters write TensorFlow-style "same" padding as a separate Pad (EfficientNet-Lite has 17);
    left alone, it runs in float between a DequantizeLinear and the Conv and keeps ONNX Runtime
    from running the convolution as one QLinearConv on the padded integers.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = 0
        for node in list(model.graph):
            if is_op(node, "Pad") and self._try_fold(model.graph, node):
                folded += 1
        if folded:
            logger.info("folded %d Pad nodes into convolutions", folded)
        return ir.passes.PassResult(model, modified=folded > 0)

    def _try_fold(self, graph: ir.Graph, pad: ir.Node) -> bool:
        conv = sole_consumer(pad.outputs[0])
        if not is_op(conv, "Conv") or conv.inputs[0] is not pad.outputs[0]:
            return False
        spatial = self._spatial_pads(pad)
        if spatial is None or attribute(conv, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return False
        rank = len(spatial) // 2
        current = list(attribute(conv, "pads", [0] * (2 * rank)))
        conv.attributes["pads"] = ir.AttrInt64s(
            "pads", [a + b for a, b in zip(current, spatial, strict=True)]
        )
        conv.replace_input_with(0, pad.inputs[0])
        graph.remove(pad, safe=True)
        return True

    def _spatial_pads(self, pad: ir.Node) -> list[int] | None:
        """Begin and end pads of the spatial axes (Conv's layout), or None if not foldable."""
        if attribute(pad, "mode", "constant") not in ("constant", b"constant"):
            return None
        pads = constant(pad.inputs[1]) if len(pad.inputs) > 1 else None
        if pads is None:
            return None
        if len(pad.inputs) > 2 and pad.inputs[2] is not None:
            value = constant(pad.inputs[2])
            if value is None or np.any(value != 0):
                return None
        if len(pad.inputs) > 3 and pad.inputs[3] is not None:  # explicit axes: not handled
            return None
        pads = [int(p) for p in pads.ravel()]
        rank = len(pads) // 2
        begins, ends = pads[:rank], pads[rank:]
        if rank < 3 or any(p < 0 for p in pads) or any(begins[:2]) or any(ends[:2]):
            return None
        return begins[2:] + ends[2:]
