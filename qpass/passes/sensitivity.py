"""Mixed precision: rank layers by the model output error their quantization alone causes."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qpass.calibration import Context
from qpass.graph import constant, is_op
from qpass.metadata import SENSITIVITY
from qpass.passes.base import CalibratedPass, keep_float

logger = logging.getLogger(__name__)


class KeepSensitiveFloat(CalibratedPass):
    """Leave the `keep_float` most sensitive MatMul/Gemm layers in float.

    Rewrite rules (the graph itself is not changed here):

    1. For each MatMul/Gemm with a constant weight, quantize a copy of the model with only that
       layer quantized (`quantize(exclude=every other layer)`), run it on the calibration data and
       measure the SQNR of the model outputs against the float model.
    2. The `keep_float` layers with the lowest SQNR are marked to stay float (`keep_float`: the
       quantizing pass that runs next skips them), and the table goes to model.meta[SENSITIVITY]
       (the report shows it).

    One-at-a-time sensitivity as in mixed-precision PTQ practice (Nagel et al. 2021, "A White Paper
    on Neural Network Quantization", §4.4 debugging; Dong et al. 2019 rank layers similarly).
    """

    def __init__(
        self,
        quantize: Callable[[frozenset[str]], list[ir.passes.PassBase]],
        keep_float: int,
        context: Context | None = None,
    ):
        super().__init__(context)
        self.quantize = quantize
        self.keep_float = keep_float

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = [n.name for n in model.graph if _is_weight_layer(n) and n.name]
        outputs = [v.name for v in model.graph.outputs]
        reference = _flat_outputs(self.context.run(model, outputs, "float outputs", progress=False))
        signal = float(np.sum(reference**2))
        table = []
        for name in layers:
            copy = model.clone()
            for p in self.quantize(frozenset(layers) - {name}):
                if isinstance(p, CalibratedPass):
                    p.context = self.context
                copy = p(copy).model
            quantized = _flat_outputs(self.context.run(copy, outputs, progress=False))
            noise = float(np.sum((reference - quantized) ** 2))
            table.append((name, float(10 * np.log10(max(signal, 1e-30) / max(noise, 1e-30)))))
        table.sort(key=lambda row: row[1])
        keep = {name for name, _ in table[: self.keep_float]}
        for node in model.graph:
            if node.name in keep:
                keep_float(node, "among the most sensitive layers (KeepSensitiveFloat)")
        model.meta[SENSITIVITY] = [(n, db, n in keep) for n, db in table]
        logger.info("kept %d most sensitive layers in float: %s", len(keep), sorted(keep))
        return ir.passes.PassResult(model, modified=False)


def _is_weight_layer(node: ir.Node) -> bool:
    return is_op(node, "MatMul", "Gemm") and constant(node.inputs[1]) is not None


def _flat_outputs(batches) -> np.ndarray:
    """Each output over all batches, flattened in order (batches may be cut differently)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for name, array in batch.items():
            parts.setdefault(name, []).append(array.astype(np.float64).ravel())
    return np.concatenate([np.concatenate(p) for p in parts.values()])
