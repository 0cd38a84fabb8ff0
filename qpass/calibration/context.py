"""The calibration context: runs the current graph on the calibration set and streams statistics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from qpass.calibration.data import CalibrationData, CalibrationSource
from qpass.calibration.observers import Observer
from qpass.graph import tensors_left_out
from qpass.runtime import onnxruntime as ort_runtime

logger = logging.getLogger(__name__)


class Context:
    """Calibration data plus the machinery to observe any tensor of the current graph.

    `observe` adds the requested values as extra graph outputs of a copy of the model, runs it batch
    by batch in ONNX Runtime and feeds each batch to one observer per value, so memory is bounded by
    one batch of activations and the observers' running statistics. After the first run, batches
    are cut so that one run fetches at most `fetch_bytes` (when the batch axis is dynamic): peak
    RSS grows with the rows one run takes (measured in docs/benchmarks.md).
    """

    fetch_bytes = 8 << 20

    def __init__(
        self,
        data: CalibrationSource | CalibrationData,
        graph: ir.Graph | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ):
        if not isinstance(data, CalibrationData):
            if graph is None:
                raise ValueError("Context needs the model graph to check raw calibration data")
            data = CalibrationData(data, graph, batch_size=batch_size)
        self.data = data
        self.progress = progress
        self.rows_per_run: int | None = None

    def observe(
        self,
        model: ir.Model,
        values: Iterable[str],
        make_observer: Callable[[str], Observer],
        description: str = "calibrating",
    ) -> dict:
        """Run the model on the calibration set; return {value name: observer fed every batch}."""
        names = list(dict.fromkeys(values))
        observers = {name: make_observer(name) for name in names}
        for outputs in self.run(model, names, description):
            for name, array in outputs.items():
                observers[name].update(array)
        return observers

    def run(
        self,
        model: ir.Model | bytes,
        names: list[str],
        description: str = "running",
        progress: bool = True,
        only: bool = False,
    ):
        """Yield {name: array} for each calibration batch, with `names` fetched from the graph.

        `only=True` runs just the part of the graph that computes `names` (the graph's own
        outputs are dropped): the cheap way to reach an early layer of a deep model.
        """
        # ORT keeps every requested tensor; it may still fuse what nobody asked to see.
        serialized, weights = with_outputs_and_fed_weights(model, names, only)
        session = ort_runtime.session(serialized, arena=False)
        show = self.progress and progress
        for feed in tqdm(self.data, desc=description, unit="batch", disable=not show, leave=False):
            for part in self._cut(feed):
                arrays = session.run(names, {**part, **weights})
                self._learn_rows_per_run(part, arrays)
                yield dict(zip(names, arrays, strict=True))

    def _cut(self, feed: dict[str, np.ndarray]):
        rows = len(next(iter(feed.values())))
        step = self.rows_per_run or (1 if self.data.splittable else rows)  # 1: a probe run
        if not self.data.splittable or step >= rows:
            yield feed
            return
        for start in range(0, rows, step):
            yield {k: v[start : start + step] for k, v in feed.items()}

    def _learn_rows_per_run(self, feed: dict[str, np.ndarray], arrays: list[np.ndarray]) -> None:
        if self.rows_per_run is None and self.data.splittable:
            per_row = sum(a.nbytes for a in arrays) / len(next(iter(feed.values())))
            self.rows_per_run = max(1, int(self.fetch_bytes // max(per_row, 1)))


def with_outputs(model: ir.Model | bytes, names: list[str], only: bool = False) -> bytes:
    """A serialized copy of `model` (IR or serialized) whose graph also outputs `names`.

    With `only`, the graph outputs just `names`, without the nodes and initializers that do not
    lead to them.
    """
    return with_outputs_and_fed_weights(model, names, only, feed_weights=False)[0]


def with_outputs_and_fed_weights(
    model: ir.Model | bytes, names: list[str], only: bool, feed_weights: bool = True
) -> tuple[bytes, dict[str, np.ndarray]]:
    """`with_outputs`, where the float initializers of an IR model of `FED_BYTES` or more (read
    by standard ONNX ops only: contrib ops may need constants) become graph inputs, returned as
    the arrays to feed with every run: ONNX Runtime reads fed arrays in place, so the weights
    are not copied into a protobuf, its serialization and the session (three copies of the
    model otherwise)."""
    weights: dict[str, np.ndarray] = {}
    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    elif feed_weights:
        proto, weights = _proto_without_large_weights(model)
    else:
        proto = ir.to_proto(model)
    if only:
        del proto.graph.output[:]
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.add().name = name
    if only:
        _prune(proto.graph, set(names))
        nodes = proto.graph.node
        read = set(names).union(*(n.input for n in nodes), *(_subgraph_reads(n) for n in nodes))
        inputs = [i for i in proto.graph.input if i.name not in weights or i.name in read]
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
        weights = {k: v for k, v in weights.items() if k in read}
    return proto.SerializeToString(), weights


FED_BYTES = 1 << 16
_FED_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)  # numpy-native types


def is_fed(value: ir.Value) -> bool:
    """Whether an initializer is given to ONNX Runtime as an input array, read in place, rather
    than copied into the session: a float tensor of `FED_BYTES` or more read by standard ONNX
    ops only (contrib ops may need constants)."""
    tensor = value.const_value
    return (
        tensor is not None
        and tensor.dtype in _FED_TYPES
        and tensor.nbytes >= FED_BYTES
        and all(u.node.domain in ("", "ai.onnx") for u in value.uses())
    )


def _proto_without_large_weights(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`ir.to_proto(model)` with the large float initializers turned into graph inputs."""
    graph = model.graph
    inputs = {v.name for v in graph.inputs}
    large = [v for v in graph.initializers.values() if v.name not in inputs and is_fed(v)]
    tensors = [v.const_value for v in large]
    with tensors_left_out(large):
        proto = ir.to_proto(model)
    for v, tensor in zip(large, tensors, strict=True):
        proto.graph.input.append(
            onnx.helper.make_tensor_value_info(v.name, tensor.dtype.value, tensor.shape.numpy())
        )
    return proto, {v.name: t.numpy() for v, t in zip(large, tensors, strict=True)}


def _prune(graph: onnx.GraphProto, needed: set[str]) -> None:
    """Drop the nodes and initializers of `graph` that no name in `needed` depends on."""
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every value name read inside the node's subgraphs (outer-scope reads included)."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                names.update(inner.input)
                names.update(_subgraph_reads(inner))
    return names
