"""Small onnx_ir graph helpers shared by the passes, capture, the linter, the report and the
plugins."""

from __future__ import annotations

import ast
import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from qpass.errors import ModelError, first_line
from qpass.metadata import TORCH_NAME_SCOPES

MS_DOMAIN = "com.microsoft"
"""ONNX Runtime's contrib-op domain (MatMulNBits, MatMulIntegerToFloat, ...)."""


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array (initializer or Constant node), or None if it is computed."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a new initializer named after `name` (made unique)."""
    base, index = name, 0
    while name in graph.initializers:
        index += 1
        name = f"{base}_{index}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def set_constant(graph: ir.Graph, value: ir.Value, array: np.ndarray) -> ir.Value:
    """Replace a constant's content; a new initializer if others still use the old one."""
    if value.is_initializer() and len(value.uses()) == 1 and not value.is_graph_input():
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return value
    return initializer(graph, value.name or "constant", array)


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The only node reading `value`, or None if it has several readers or is a graph output."""
    consumers = value.consumers()
    if len(consumers) != 1 or value.is_graph_output() or len(value.uses()) != 1:
        return None
    return consumers[0]


def attribute(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


def output_channel_axis(node: ir.Node, ndim: int) -> int:
    """The weight axis that indexes the op's output channels (per-channel scales go there)."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return ndim - 1
    return 0


def infer_missing_types(model: ir.Model) -> None:
    """Type the values an exporter left untyped (the TorchScript exporter writes no value_info
    for a graph with dynamic axes) by onnx's shape inference, so that a pass that quantizes float
    tensors only can tell an int64 mask computation from a float activation. A model whose node
    outputs all carry a type is left as it is."""
    outputs = (v for node in model.graph for v in node.outputs if v is not None)
    if all(v.dtype is not None for v in outputs):
        return
    with quiet("onnx_ir.passes.common.shape_inference"):  # on failure the model stays as it is
        ShapeInferencePass(strict_mode=False, data_prop=False)(model)


def raise_opset(model: ir.Model, version: int) -> None:
    """Convert the model to at least `version` of the default ONNX domain (never lowers it) with
    onnx's version converter, which converts every node (ReduceMean's axes, Split, Slice, Resize,
    ...) from any opset from 7 up. The weights are set aside meanwhile and put back, never
    copied. The graph is rebuilt: `node.meta`, `node.metadata_props`
    (the exporter's module paths) and `value.meta` move to the new nodes and values of the same
    names."""
    current = model.opset_imports.get("", None)
    if current is None or current >= version:
        return
    logging.getLogger(__name__).info("converting the opset from %d to %d", current, version)
    weights = _set_weights_aside(model.graph)
    try:
        proto = onnx.version_converter.convert_version(ir.to_proto(model), version)
    except Exception as e:  # onnx raises its own errors for ops it cannot convert
        for value, tensor in weights.values():
            value.const_value = tensor
        raise ModelError(
            f"cannot convert the model from opset {current} to {version}: {first_line(e)}"
        ) from e
    # The old graph keeps the references without data: the weights live in the new one alone,
    # and are freed as soon as a pass replaces them (not when a garbage collection finds the
    # old graph's cycles).
    converted = ir.from_proto(proto)
    for name, (_, tensor) in weights.items():
        if name in converted.graph.initializers:
            converted.graph.initializers[name].const_value = tensor
    _carry_annotations(model.graph, converted.graph)
    model.graph = converted.graph


_ASIDE_BYTES = 1024


def _set_weights_aside(graph: ir.Graph) -> dict[str, tuple[ir.Value, ir.TensorProtocol]]:
    """Replace each initializer over 1 KB by a reference without data, so that the conversion
    copies no weight (a model's size in memory, twice, otherwise); {name: (value, tensor)}."""
    aside = {}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes > _ASIDE_BYTES:
            aside[name] = (value, tensor)
            value.const_value = ir.ExternalTensor(
                "qpass-weight-set-aside", 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                name=name,
            )
    return aside


def _carry_annotations(old: ir.Graph, new: ir.Graph) -> None:
    nodes = {node.name: node for node in new if node.name}
    for node in old:
        if node.name in nodes:  # onnx's converter keeps names, not metadata_props
            nodes[node.name].meta.update(node.meta)
            nodes[node.name].metadata_props.update(node.metadata_props)
    values = {v.name: v for v in all_values(new)}
    for value in all_values(old):
        if value.meta and value.name in values:
            values[value.name].meta.update(value.meta)


@contextlib.contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    """Silence a library's warnings meanwhile (qpass says what matters in its own words)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def tensors_left_out(values: list[ir.Value]) -> Iterator[None]:
    """Take the tensors of initializers `values` out meanwhile, then put them back: `ir.to_proto`
    serializes the model without their data (they keep their names, types and shapes; onnx-ir's
    warning of an initializer without data is silenced)."""
    tensors = [v.const_value for v in values]
    try:
        for value in values:
            value.const_value = None
        with quiet("onnx_ir.serde"):
            yield
    finally:
        for value, tensor in zip(values, tensors, strict=True):
            value.const_value = tensor


def retype(value: ir.Value, dtype: ir.DataType) -> None:
    """Give `value` a tensor type of `dtype` (a new type object: onnx-ir's `dtype` setter changes
    the type object in place, which a model's clones share with it)."""
    value.type = ir.TensorType(dtype)


def all_values(graph: ir.Graph):
    """The graph's inputs, initializers and node outputs (not those of subgraphs)."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def module_path(node: ir.Node) -> str:
    """The torch module path of a captured node ("model.layers.0.mlp.up_proj"), or ""."""
    scopes = node.metadata_props.get(TORCH_NAME_SCOPES)
    if not scopes:
        return ""
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return ""
    return names[-2] if len(names) >= 2 else ""
