"""Group-wise (blockwise) weight quantization shared by the weight-only passes.

A MatMul weight W is [K, N] (y = x @ W). Its quantized form is the opset-21 blockwise
DequantizeLinear: q [K, N] int4/uint4 (int8/uint8 for an 8-bit lm_head), scale [ceil(K/g), N]
float32 and zero point (same shape, same type as q; absent when symmetric int4), axis 0,
block_size g. Input channels k of one output channel n share a scale when k // g is equal.
`com.microsoft.MatMulNBits` stores the same numbers transposed and packed (see
`pack_matmulnbits`).
"""

from __future__ import annotations

import ast
import functools
import logging
import re

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qpass.passes._graph import attribute, constant, initializer, is_op, raise_opset
from qpass.plugins.int4_gemm import pack, unpack_nibbles
from qpass.schemes import QuantScheme

WEIGHT_OPSET = 21
"""INT4/UINT4 and blockwise scales in DequantizeLinear need opset 21."""

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def grouped(scheme: QuantScheme, k: int) -> int:
    """The scheme's group size for a weight with `k` input channels (per channel: all of k)."""
    return scheme.group_size or k


def token_rows(x: np.ndarray, normalize: bool) -> np.ndarray:
    """Calibration activations x [..., K] as rows [n, K] (one per token); with `normalize`, every
    row scaled to unit L2 norm (zero rows stay zero): statistics of these rows weigh each token's
    output error relative to the token's own magnitude (see `StagedWeightPass`)."""
    rows = x.reshape(-1, x.shape[-1])
    if not normalize:
        return rows
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1).astype(rows.dtype)


class TokenStatistics:
    """Σ xxᵀ and the row count of one MatMul input x [..., K], streamed batch by batch, from
    unit-norm token rows when `normalize_tokens` (`token_rows`)."""

    def __init__(self, columns: int, normalize_tokens: bool = False):
        self.xtx = np.zeros((columns, columns))
        self.rows = 0
        self.normalize_tokens = normalize_tokens

    def add_batch(self, x: np.ndarray) -> np.ndarray:
        """Accumulate one batch; return its rows as they entered the statistics."""
        x = token_rows(x, self.normalize_tokens)
        self.xtx += (x.T @ x).astype(np.float64)
        self.rows += len(x)
        return x


def group_ranges(w: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of W [K, N] over each group of g input channels: two [ceil(K/g), N] arrays."""
    k, n = w.shape
    blocks = -(-k // g)
    padded = np.full((blocks * g, n), np.nan, w.dtype)
    padded[:k] = w
    padded = padded.reshape(blocks, g, n)
    return np.nanmin(padded, axis=1), np.nanmax(padded, axis=1)


def quantize_rtn(
    w: np.ndarray, scheme: QuantScheme
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest group-wise quantization of W [K, N]: (q [K, N], scale, zero point)."""
    g = grouped(scheme, w.shape[0])
    scale, zero = scheme.scale_zero_point(*group_ranges(w, g))
    rows = np.arange(w.shape[0]) // g
    return scheme.quantize(w, scale[rows], zero[rows]), scale, zero


def quantize_with_ranges(
    w: np.ndarray, scheme: QuantScheme, clip: float = 1.0, ranges=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group-wise quantization of W [K, N] within each group's [clip min, clip max] (saturating);
    `ranges`: W's `group_ranges`, when already computed."""
    g = grouped(scheme, w.shape[0])
    low, high = ranges if ranges is not None else group_ranges(w, g)
    scale, zero = scheme.scale_zero_point(low * clip, high * clip)
    rows = np.arange(w.shape[0]) // g
    return scheme.quantize(w, scale[rows], zero[rows]), scale, zero


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, g: int) -> np.ndarray:
    """Numpy reference of blockwise DequantizeLinear on axis 0, in float32 like ONNX Runtime."""
    rows = np.arange(q.shape[0]) // g
    shifted = q.astype(np.int32) - (0 if zero is None else zero.astype(np.int32)[rows])
    return shifted.astype(np.float32) * scale[rows]


def weight_matmuls(
    graph: ir.Graph, exclude: frozenset[str] = frozenset(), lm_head: bool = False
) -> list[ir.Node]:
    """MatMuls with a constant float 2-D weight [K, N], in graph order, minus the excluded ones.

    The final projection (module path ending in lm_head, or a MatMul writing a graph output) is
    left out unless `lm_head` is true; embeddings are Gathers and never match.
    """
    found = []
    for node in graph:
        if not is_op(node, "MatMul") or node.name in exclude or module_path(node) in exclude:
            continue
        weight = node.inputs[1]
        if weight is None or weight.dtype != ir.DataType.FLOAT or constant(weight) is None:
            continue
        if weight.shape is None or len(weight.shape) != 2:
            continue
        if not lm_head and is_final_projection(node):
            continue
        found.append(node)
    return found


def untie_final_projection(graph: ir.Graph) -> None:
    """Give a final projection that reads a transposed constant (tied embeddings: MatMul(x,
    Transpose(E)), E [vocab, K] also read by the embedding Gather) its own weight Eᵀ, so that a
    weight pass can quantize it; the Gather keeps reading E."""
    for node in list(graph):
        if not is_op(node, "MatMul") or not is_final_projection(node) or node.inputs[1] is None:
            continue
        transpose = node.inputs[1].producer()
        if transpose is None or not is_op(transpose, "Transpose"):
            continue
        table = constant(transpose.inputs[0])
        perm = list(attribute(transpose, "perm", [1, 0]))
        if table is None or table.ndim != 2 or perm != [1, 0]:
            continue
        base = node.name or "lm_head"
        node.replace_input_with(1, initializer(graph, f"{base}.weight", table.T.copy()))
        if not transpose.outputs[0].uses() and not transpose.outputs[0].is_graph_output():
            graph.remove(transpose, safe=True)


def module_path(node: ir.Node) -> str:
    """The torch module path of a captured node ("model.layers.0.mlp.up_proj"), or ""."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return ""
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return ""
    return names[-2] if len(names) >= 2 else ""


def block_index(node: ir.Node) -> int | None:
    """The transformer block a captured node belongs to (`layers.N` in its module path)."""
    match = _BLOCK_INDEX.search(module_path(node))
    return int(match.group(1)) if match else None


def quantization_stages(targets: list[ir.Node], sequential: str = "block") -> list[list[ir.Node]]:
    """`targets` cut into stages, in graph order: one transformer block each (`layers.N` in the
    module path) or, with `sequential="layer"` or without that metadata, the MatMuls that read
    one tensor."""
    if sequential not in ("block", "layer"):
        raise ValueError(f"sequential must be 'block' or 'layer', not {sequential!r}")
    stages: dict[tuple, list[ir.Node]] = {}
    for node in targets:
        block = block_index(node) if sequential == "block" else None
        key = ("block", block) if block is not None else ("input", node.inputs[0].name)
        stages.setdefault(key, []).append(node)
    return list(stages.values())


class StagedWeightPass(ir.passes.InPlacePass):
    """Base of the calibrated weight-only passes (GPTQ, AWQ): the constant-weight MatMuls
    (`weight_matmuls`) are quantized stage by stage (`quantization_stages`), each stage from the
    statistics of a `StagedCalibration` run of the graph whose earlier stages are already
    quantized. Subclasses name themselves in `label` and implement `_quantize_stage`.

    `normalize_tokens`: each calibration token's input row x_t enters the statistics as
    x_t / ||x_t|| (`token_rows`), so the layer error they measure counts every token's output
    error relative to its magnitude, as the RMSNorm after the residual add will. Without it, a
    few tokens with massive activations (Sun et al. 2024, "Massive Activations in Large Language
    Models": the first token of every window in SmolLM2 carries 99.8% of Σ||x||² at block 11's
    down_proj, 3 x 10⁵ times the median token) make E[xxᵀ] nearly rank one, and the weights are
    fitted to those tokens alone.
    """

    label = "weight quantization"

    def __init__(
        self, context, weights: QuantScheme, exclude, lm_head: bool, sequential: str,
        normalize_tokens: bool,
    ):
        super().__init__()
        if sequential not in ("block", "layer"):
            raise ValueError(f"sequential must be 'block' or 'layer', not {sequential!r}")
        self.context = context
        self.weights = weights
        self.exclude = frozenset(exclude)
        self.lm_head = lm_head
        self.sequential = sequential
        self.normalize_tokens = normalize_tokens

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.lm_head:
            untie_final_projection(model.graph)
        targets = weight_matmuls(model.graph, self.exclude, self.lm_head)
        if not targets:
            return ir.passes.PassResult(model, modified=False)
        if self.context is None:
            raise ValueError(f"{self.label} needs calibration data (a Context)")
        ensure_weight_opset(model)
        stages = quantization_stages(targets, self.sequential)
        runner = StagedCalibration(self.context)
        for index, stage in enumerate(stages):
            description = f"{self.label} stage {index + 1}/{len(stages)}"
            self._quantize_stage(model, runner, stage, description)
        logging.getLogger(type(self).__module__).info(
            "%s quantized %d MatMul weights in %d stages", self.label, len(targets), len(stages)
        )
        return ir.passes.PassResult(model, modified=True)

    def _quantize_stage(self, model: ir.Model, runner, stage: list[ir.Node], description: str):
        raise NotImplementedError

    def _statistics(self, model, runner, stage, kind, description: str) -> dict:
        """{MatMul input name: kind(K, normalize_tokens)} streamed over the calibration set."""
        make = functools.partial(kind, normalize_tokens=self.normalize_tokens)
        return runner.statistics(model, stage, make, description)


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

    def statistics(self, model: ir.Model, stage: list[ir.Node], make, description: str) -> dict:
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
                stats.setdefault(name, make(arrays[name].shape[-1])).add_batch(arrays[name])
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
    import onnx

    from qpass.runtime import onnxruntime as ort_runtime

    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o.name in needed and o.name not in feed for o in node.outputs):
            kept.append(node)
            needed.update(v.name for v in node.inputs if v is not None)
            needed.update(_subgraph_reads(node))
    graph = model.graph
    initializers = []
    for name in sorted(needed):
        if name in graph.initializers and name not in feed:
            initializers.append(ir.serde.serialize_tensor(graph.initializers[name].const_value))
            initializers[-1].name = name
    inputs = [
        onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(feed[name].dtype), None
        )
        for name in feed if name in needed
    ]
    proto = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in reversed(kept)], "stage", inputs,
        [onnx.ValueInfoProto(name=name) for name in outputs], initializers,
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    serialized = onnx.helper.make_model(proto, opset_imports=opsets, ir_version=model.ir_version)
    return _FedSession(ort_runtime.session(serialized.SerializeToString(), arena=False), inputs)


class _FedSession:
    """An ORT session that takes, from a feed, only the names its graph reads."""

    def __init__(self, session, inputs):
        self.session, self.names = session, [i.name for i in inputs]

    def run(self, outputs, feed):
        return self.session.run(outputs, {name: feed[name] for name in self.names})


def is_final_projection(node: ir.Node) -> bool:
    """lm_head: a node of a module path ending in lm_head, or one writing a graph output."""
    return module_path(node).endswith("lm_head") or node.outputs[0].is_graph_output()


def replace_weight(
    graph: ir.Graph,
    matmul: ir.Node,
    q: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    scheme: QuantScheme,
) -> ir.Node:
    """Read the MatMul's weight through DequantizeLinear(q, scale, zero point; axis 0, block g)."""
    old = matmul.inputs[1]
    base = matmul.name or old.name or "weight"
    g = grouped(scheme, q.shape[0])
    inputs = [
        initializer(graph, f"{base}.weight_q", q),
        initializer(graph, f"{base}.weight_scale", scale.astype(np.float32)),
    ]
    if not (scheme.symmetric and scheme.dtype == "int4"):  # int4 symmetric: zero point 0
        inputs.append(initializer(graph, f"{base}.weight_zero_point", zero))
    dq = ir.node(
        "DequantizeLinear", inputs, {"axis": 0, "block_size": g}, name=f"{base}.weight_dq"
    )
    dq.outputs[0].name = f"{base}.weight_dequantized"
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(q.shape)
    graph.insert_before(matmul, dq)
    matmul.replace_input_with(1, dq.outputs[0])
    if old.is_initializer() and not old.uses() and not old.is_graph_output():
        graph.initializers.pop(old.name)
    return dq


FOUR_BIT = (ir.DataType.INT4, ir.DataType.UINT4)
EIGHT_BIT = (ir.DataType.INT8, ir.DataType.UINT8)


def packable_group(g: int) -> bool:
    """A block size the packed 4-bit kernels take (MatMulNBits, the INT4 GEMM plugin)."""
    return g >= 16 and not g & (g - 1)


def is_packable_weight(dq: ir.Node, dtypes=FOUR_BIT) -> bool:
    """A DequantizeLinear of a constant [K, N] weight of one of `dtypes` (4-bit unless told),
    blockwise on axis 0 with a packable block size, constant scales (and zero points), read
    only as the weight of MatMuls."""
    if not is_op(dq, "DequantizeLinear") or dq.inputs[0].dtype not in dtypes:
        return False
    q = constant(dq.inputs[0])
    if q is None or q.ndim != 2 or attribute(dq, "axis", 1) != 0:
        return False
    if not packable_group(attribute(dq, "block_size", 0)) or constant(dq.inputs[1]) is None:
        return False
    if len(dq.inputs) > 2 and dq.inputs[2] is not None and constant(dq.inputs[2]) is None:
        return False
    readers = dq.outputs[0].uses()
    return (
        bool(readers)
        and not dq.outputs[0].is_graph_output()
        and all(is_op(use.node, "MatMul") and use.idx == 1 for use in readers)
    )


def ensure_weight_opset(model: ir.Model) -> None:
    """Raise the model to opset 21 (INT4 and blockwise DequantizeLinear) if it is below."""
    raise_opset(model, WEIGHT_OPSET)


# -------------------------------------------------------------- com.microsoft.MatMulNBits layout


def pack_matmulnbits(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, g: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blockwise (q [K, N], scale [nb, N], zero [nb, N]) -> MatMulNBits (B, scales, zero_points).

    B is uint8 [N, nb, g/2] (the last block zero-padded), scales float32 [N, nb], zero points
    uint8 [N, ceil(nb/2)] packed like B, or None where they are all 8 (the op's default).
    Signed int4 values and zero points move to uint4 by adding 8: (q + 8) - (z + 8) = q - z.
    """
    b, scales, zero_points = pack(q, scale, zero, g)  # the plugin's layout: zero points always
    if (unpack_nibbles(zero_points)[:, : scales.shape[1]] == 8).all():
        zero_points = None
    return b, scales, zero_points


def pack_matmulnbits_8bit(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, g: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blockwise 8-bit (q [K, N] int8/uint8, scale [nb, N], zero [nb, N]) -> MatMulNBits bits=8
    (B uint8 [N, nb, g], the last block zero-padded; scales [N, nb]; zero points uint8 [N, nb],
    or None where they are all 128, the op's default). Signed values move up by 128."""
    k, n = q.shape
    blocks = -(-k // g)
    offset = 128 if np.issubdtype(q.dtype, np.signedinteger) else 0
    b = np.zeros((n, blocks * g), np.uint8)
    b[:, :k] = (q.astype(np.int32) + offset).T
    z = np.zeros((blocks, n), np.int32) if zero is None else zero.astype(np.int32)
    zero_points = (z + offset).T.astype(np.uint8)
    if (zero_points == 128).all():
        zero_points = None
    scales = np.ascontiguousarray(np.asarray(scale).T, np.float32)
    return b.reshape(n, blocks, g), scales, zero_points


def unpack_matmulnbits(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `pack_matmulnbits`, in uint4 terms: (u [K, N], scale [nb, N], zero [nb, N])."""
    n, nb, _ = b.shape
    u = unpack_nibbles(b).reshape(n, -1)[:, :k].T
    if zero_points is None:
        z = np.full((nb, n), 8, np.uint8)
    else:
        z = unpack_nibbles(zero_points.reshape(n, -1))[:, :nb].T
    return u, scales.T, z
