"""Fold subgraphs that compute from constants alone (onnxscript's constant folding)."""

from __future__ import annotations

import onnx_ir as ir

from qpass.graph import constant
from qpass.passes.base import Pass


class FoldConstants(Pass):
    """Replace nodes whose inputs are all constants by their values, then drop dead nodes.

    Rewrite rules (delegated to `onnxscript.optimizer.fold_constants`):

    1. A node whose inputs are all constants (initializers or Constant outputs), for example the
       CastLike'd Clip bounds or the Shape/Concat arithmetic of an unoptimized export, becomes
       an initializer holding its output, so later passes see constant weights and bounds.
    2. Nodes that no longer feed any output are removed.

    onnxscript is imported only when rule 1 can fire: graphs exported with the optimizer on have
    nothing to fold, and the import has a cost (docs/methods/int8.md).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not any(self._computes_from_constants(node) for node in model.graph):
            return ir.passes.PassResult(model, modified=False)
        from onnx_ir.passes.common import RemoveUnusedNodesPass
        from onnxscript.optimizer import fold_constants

        folded = fold_constants(
            model, onnx_shape_inference=False, input_size_limit=1024, output_size_limit=1 << 20
        )
        RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=folded.modified)

    def _computes_from_constants(self, node: ir.Node) -> bool:
        if node.op_type == "Constant" or not node.inputs:
            return False
        return all(v is None or constant(v) is not None for v in node.inputs)
