"""Staged calibration: the calibration set fed through the graph one stage (a transformer
block) at a time, each run resuming where the last stopped, for passes that quantize stage by
stage (`qpass.passes.staged.StagedWeightPass`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from qpass.calibration.context import is_fed
from qpass.calibration.observers import Observer
from qpass.graph import constant
from qpass.runtime import onnxruntime as ort_runtime


class StagedCalibration:
    """Feeds the calibration set through the graph one stage at a time, resuming each run where
    the last stopped, so the graph runs about twice in all instead of once per stage.

    `statistics(model, stage, ...)` runs the nodes between the previous stage's first MatMul
    and this stage's inputs, starting from the values that cross that point (the frontier: the
    residual stream, rotary tables, masks, ...), kept for every calibration batch from the last
    call. Nodes before a stage's first MatMul never depend on its weights, so the kept values
    stay valid after it is quantized. Memory: one frontier for the calibration set (tens of MB
    for a 135M-parameter decoder on 16 x 512 tokens), never the activations of every layer.
    """

    def __init__(self, context):
        self.context = context
        self.frontier: list[dict[str, np.ndarray]] | None = None  # per calibration batch

    def statistics(
        self,
        model: ir.Model,
        stage: list[ir.Node],
        make: Callable[[int], Observer],
        description: str,
    ) -> dict:
        """{input name: make(K)} fed every calibration batch of the stage's MatMul inputs."""
        names = list(dict.fromkeys(node.inputs[0].name for node in stage))
        nodes = list(model.graph)
        first = {id(node) for node in stage}
        cut = next(i for i, node in enumerate(nodes) if id(node) in first)
        crossing = _crossing(model.graph, nodes, cut)
        feeds = self.frontier if self.frontier is not None else list(self.context.data)
        wanted = list(dict.fromkeys(names + crossing))
        session = _slice_session(model, nodes, feeds[0], wanted)
        stats: dict[str, object] = {}
        kept = []
        show = self.context.progress
        for feed in tqdm(feeds, desc=description, unit="batch", disable=not show, leave=False):
            arrays = dict(zip(wanted, session.run(wanted, feed), strict=True))
            for name in names:
                stats.setdefault(name, make(arrays[name].shape[-1])).update(arrays[name])
            kept.append({name: arrays[name] for name in crossing})
        self.frontier = kept
        return stats


def _crossing(graph: ir.Graph, nodes: list[ir.Node], cut: int) -> list[str]:
    """Computed values (and graph inputs) made before node `cut` and read from it on."""
    made_before = {v.name for v in graph.inputs}
    for node in nodes[:cut]:
        made_before.update(o.name for o in node.outputs if constant(o) is None)
    read_after: set[str] = set()
    for node in nodes[cut:]:
        read_after.update(v.name for v in node.inputs if v is not None)
        read_after.update(_subgraph_reads(node))
    read_after.update(v.name for v in graph.outputs)
    return sorted(made_before & read_after)


def _subgraph_reads(node: ir.Node) -> set[str]:
    names: set[str] = set()
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        else:
            continue
        for sub in graphs:
            for inner in sub:
                names.update(v.name for v in inner.inputs if v is not None)
                names.update(_subgraph_reads(inner))
    return names


def _slice_session(model: ir.Model, nodes: list[ir.Node], feed: dict, outputs: list[str]):
    """An ORT session computing `outputs` from the arrays in `feed` (by name), with only the
    nodes that need to run and the initializers they read."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o.name in needed and o.name not in feed for o in node.outputs):
            kept.append(node)
            needed.update(v.name for v in node.inputs if v is not None)
            needed.update(_subgraph_reads(node))
    graph = model.graph
    initializers, weights = [], {}
    for name in sorted(needed):
        if name not in graph.initializers or name in feed:
            continue
        tensor = graph.initializers[name].const_value
        if is_fed(graph.initializers[name]):  # read in place: no copy in the session
            weights[name] = tensor.numpy()
        else:
            initializers.append(ir.serde.serialize_tensor(tensor))
            initializers[-1].name = name
    arrays = {**{name: feed[name] for name in feed if name in needed}, **weights}
    inputs = [
        onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
            array.shape if name in weights else None,
        )
        for name, array in arrays.items()
    ]
    proto = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in reversed(kept)], "stage", inputs,
        [onnx.ValueInfoProto(name=name) for name in outputs], initializers,
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    serialized = onnx.helper.make_model(proto, opset_imports=opsets, ir_version=model.ir_version)
    session = ort_runtime.session(serialized.SerializeToString(), arena=False)
    return _FedSession(session, [name for name in arrays if name not in weights], weights)


class _FedSession:
    """An ORT session that takes, from a feed, only the names its graph reads, and the large
    weights it reads as inputs."""

    def __init__(self, session, names: list[str], weights: dict[str, np.ndarray]):
        self.session, self.names, self.weights = session, names, weights

    def run(self, outputs, feed):
        return self.session.run(outputs, {**{name: feed[name] for name in self.names},
                                          **self.weights})
