"""Checks of a model before and after compilation: each failure is one line naming the problem
and the fix."""

from __future__ import annotations

import difflib
from collections import Counter

import numpy as np
import onnx_ir as ir

from qpass.errors import ModelError, QpassError
from qpass.graph import constant, is_op, module_path
from qpass.runtime import onnxruntime as ort_runtime

QUANTIZED_OPS = (
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "QLinearAdd", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "MatMulNBits", "GatherBlockQuantized",
)
"""Ops of quantized ONNX models, QDQ and QOperator forms (ONNX and com.microsoft)."""


def refuse_quantized(graph: ir.Graph) -> None:
    """An already-quantized model is not compiled again."""
    found = Counter(n.op_type for n in graph if n.op_type in QUANTIZED_OPS)
    if found:
        listed = ", ".join(f"{count} {op}" for op, count in found.most_common(3))
        raise ModelError(
            f"the model is already quantized ({listed}): give qpass the float model"
        )


def check_domains(graph: ir.Graph) -> None:
    """Ops of other domains need their custom-op library for ONNX Runtime to run the model."""
    if ort_runtime.CUSTOM_OP_LIBRARIES:
        return
    for node in graph:
        if node.domain not in ort_runtime.DOMAINS:
            raise ModelError(
                f"node {node.name!r} is {node.op_type} of domain {node.domain!r}, which ONNX "
                "Runtime runs only with its custom-op library: give it with "
                "--custom-op-library PATH (custom_op_libraries=[...])"
            )


def check_exclude(graph: ir.Graph, exclude) -> None:
    """Every name in `exclude` is a node's name or module path; else the closest names."""
    names = {n.name for n in graph if n.name} | {module_path(n) for n in graph} - {""}
    for name in exclude:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else "; `qpass inspect` lists them"
            raise QpassError(f"--exclude {name!r} matches no node of the model{hint}")


def check_scales(model: ir.Model) -> None:
    """Every constant Q/DQ scale of the compiled graph is finite and positive."""
    for node in model.graph:
        if is_op(node, "QuantizeLinear", "DequantizeLinear") and len(node.inputs) > 1:
            scale = constant(node.inputs[1])
            if scale is not None and not (np.isfinite(scale).all() and (scale > 0).all()):
                raise QpassError(
                    f"{node.name or node.op_type}: scale {scale.ravel()[:4]} is not finite and "
                    "positive: the calibrated range overflows float32; check the calibration "
                    "data's range"
                )


def check_graph(graph: ir.Graph) -> None:
    """A model has inputs, and every value a node reads is produced by something."""
    if not graph.inputs:
        raise ModelError("the model has no inputs: there is nothing to calibrate or run")
    for node in graph:
        for value in node.inputs:
            if value is None or value.producer() is not None or value.is_graph_input():
                continue
            if value.is_initializer() or value.const_value is not None:
                continue
            raise ModelError(
                f"node {node.name or node.op_type!r} reads {value.name!r}, which no node, input "
                "or initializer produces: the model is incomplete"
            )
