"""One quantized table for tied embeddings: the lookup and the lm_head read the same packed
weights (ONNX Runtime's GatherBlockQuantized and MatMulNBits)."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import MS_DOMAIN, attribute, constant, initializer, is_op
from qpass.packing import pack_matmulnbits, pack_matmulnbits_8bit, packable_group
from qpass.passes.base import Pass, is_kept_float, refuse
from qpass.passes.groupwise import grouped, quantize_rtn
from qpass.passes.matmul_weights import is_final_projection
from qpass.schemes import QuantScheme

logger = logging.getLogger(__name__)

TABLE_UINT4_G128 = QuantScheme(dtype="uint4", group_size=128)
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


class QuantizeTiedEmbeddings(Pass):
    """Quantize a table shared by the embedding lookup and the final projection once, and have
    both read it.

    Rewrite rules, for a constant float table E [V, K] read only by Gather(E, ids; axis=0) and by
    Transpose(E; perm=[1, 0]) feeding final projections (`is_final_projection`) only:

    1. q, s, z = round to nearest of Eᵀ [K, V] per group of g input channels (`scheme`: 4 bits
       with a zero point, or 8 bits), packed as MatMulNBits packs it: B uint8 [V, K/g, g/2]
       (8 bits: [V, K/g, g]), scales [V, K/g] in E's type, zero points packed likewise (left out
       when all are the op's default).
    2. MatMul(x, Transpose(E))  ==>  MatMulNBits(x, B, s, z; K, N=V, bits, block_size=g,
       accuracy_level).
    3. Gather(E, ids)  ==>  GatherBlockQuantized(Reshape(B, [V, K'/2]), ids, s, z;
       gather_axis=0, quantize_axis=1, block_size=g, bits) (K' = K rounded up to g; 8 bits:
       [V, K']), then Slice(..., 0:K) on the last axis when K' > K. The Reshape only views B's
       bytes as the rows GatherBlockQuantized takes (its data and scales must have one rank,
       MatMulNBits wants B in three dimensions), so the file holds B once.

    The head runs at `accuracy_level` 4 by default (int8 activations, as `QuantizeLMHead`'s 8-bit
    head): in ONNX Runtime 1.32 on CPU a 4-bit head at level 0 took 2.0x the 8-bit head's
    1-token time at level 4 (a random decoder, vocabulary 60000, hidden 64; not a benchmark row).
    The lookup dequantizes (q - z) x s in float, as the head's weights are. The table
    is the largest tensor of a decoder with a large vocabulary (SmolLM2: 21%; 150k-262k tokens:
    a third to two thirds of all weights); in float it dominates a 4-bit file, and an 8-bit copy
    for the head alone (`QuantizeLMHead`) adds to it. Both ops are ONNX Runtime contrib ops
    (com.microsoft): there is no standard ONNX op that gathers rows of a block-quantized table.
    The layout follows ONNX Runtime's ContribOperators.md (GatherBlockQuantized: uint8 data with
    `bits` packs two values per byte, low nibble first, default zero point 8 or 128).
    """

    def __init__(
        self,
        scheme: QuantScheme = TABLE_UINT4_G128,
        accuracy_level: int = 4,
        exclude: frozenset[str] = frozenset(),
    ):
        super().__init__()
        if scheme.bits not in (4, 8):
            raise ValueError(f"a tied table is quantized to 4 or 8 bits, not {scheme.dtype}")
        self.scheme = scheme
        self.accuracy_level = accuracy_level
        self.exclude = frozenset(exclude)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        tables = [t for t in _tables(model.graph) if self._accepts(*t)]
        for table, gathers, heads in tables:
            self._share(model.graph, table, gathers, heads)
        if tables:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        else:
            logger.warning(
                "%r: no embedding table shared with the lm_head (tied) was found; the lm_head "
                "stays float (--lm-head int8 or int4 quantize an untied one)", self
            )
        return ir.passes.PassResult(model, modified=bool(tables))

    def _accepts(self, table: ir.Value, gathers: list[ir.Node], heads: list[ir.Node]) -> bool:
        node = heads[0]
        if any(is_kept_float(n, self.exclude) for n in gathers + heads):
            return refuse(self, node, "the lookup or the head is excluded or kept float")
        if table.dtype not in FLOAT_TYPES:
            return refuse(self, node, f"{table.name} is {table.dtype}, not float")
        if not packable_group(grouped(self.scheme, table.shape[1])):
            return refuse(self, node, "MatMulNBits takes groups of a power of two >= 16 only")
        return True

    def _share(
        self, graph: ir.Graph, table: ir.Value, gathers: list[ir.Node], heads: list[ir.Node]
    ) -> None:
        e = constant(table)
        vocab, k = e.shape
        g = grouped(self.scheme, k)
        q, scale, zero = quantize_rtn(e.T.astype(np.float32), self.scheme)
        pack = pack_matmulnbits if self.scheme.bits == 4 else pack_matmulnbits_8bit
        b, scales, zero_points = pack(q, scale, zero, g)
        base = table.name
        packed = [
            initializer(graph, f"{base}.B", b),
            initializer(graph, f"{base}.scales", scales.astype(e.dtype)),
        ]
        if zero_points is not None:
            packed.append(initializer(graph, f"{base}.zero_points", zero_points))
        bits = self.scheme.bits
        for head in heads:
            attrs = {"K": k, "N": vocab, "bits": bits, "block_size": g}
            if self.accuracy_level:
                attrs["accuracy_level"] = self.accuracy_level
            _replace(graph, head, ir.node(
                "MatMulNBits", [head.inputs[0], *packed], attrs, domain=MS_DOMAIN,
                name=head.name,
            ))
        rows = _reshape(graph, packed[0], [vocab, b.shape[1] * b.shape[2]], base)
        for gather in gathers:
            lookup = ir.node(
                "GatherBlockQuantized", [rows, gather.inputs[1], *packed[1:]],
                {"gather_axis": 0, "quantize_axis": 1, "block_size": g, "bits": bits},
                domain=MS_DOMAIN, name=gather.name,
            )
            graph.insert_before(gather, lookup)
            out = lookup.outputs[0]
            if b.shape[1] * g > k:  # the last block is padded: keep the first K columns
                out = _slice_columns(graph, gather, out, k)
            _replace(graph, gather, out.producer())
        for transpose in [use.node for use in table.uses()]:  # the heads' Transposes
            graph.remove(transpose, safe=True)
        if not table.uses() and not table.is_graph_output():
            graph.initializers.pop(table.name)
        logger.info("%r: %s [%d, %d] quantized once to %d bits for %d lookups and %d heads",
                    self, base, vocab, k, bits, len(gathers), len(heads))


def _tables(graph: ir.Graph) -> list[tuple[ir.Value, list[ir.Node], list[ir.Node]]]:
    """(E, its Gathers, its heads) for each constant 2-D table read only by Gathers on axis 0 and
    by Transposes (perm [1, 0]) that feed final-projection MatMuls only."""
    found = []
    for table in graph.initializers.values():
        if table.shape is None or len(table.shape) != 2 or table.is_graph_input():
            continue
        if constant(table) is None or table.is_graph_output():
            continue
        gathers, heads, other = [], [], False
        for use in table.uses():
            node = use.node
            if is_op(node, "Gather") and use.idx == 0 and attribute(node, "axis", 0) == 0:
                gathers.append(node)
            elif is_op(node, "Transpose") and list(attribute(node, "perm", [1, 0])) == [1, 0]:
                readers = node.outputs[0].uses()
                if node.outputs[0].is_graph_output() or not readers or not all(
                    is_op(r.node, "MatMul") and r.idx == 1 and is_final_projection(r.node)
                    for r in readers
                ):
                    other = True
                heads.extend(r.node for r in readers)
            else:
                other = True
        if gathers and heads and not other:
            found.append((table, gathers, heads))
    return found


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put `new` (already in the graph, or inserted before `old`) in place of `old`: its output
    takes the old output's readers, name, type and shape."""
    if new.graph is None:
        graph.insert_before(old, new)
    out, result = old.outputs[0], new.outputs[0]
    result.dtype, result.shape = out.dtype, out.shape
    ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
    name = out.name
    graph.remove(old, safe=True)
    out.name = None
    result.name = name
    new.metadata_props.update(old.metadata_props)


def _reshape(graph: ir.Graph, value: ir.Value, shape: list[int], base: str) -> ir.Value:
    """Reshape(value, shape), placed at the start of the graph."""
    node = ir.node(
        "Reshape", [value, initializer(graph, f"{base}.rows_shape", np.array(shape, np.int64))],
        name=f"{base}.rows",
    )
    graph.insert_before(next(iter(graph)), node)
    node.outputs[0].name = f"{base}.rows"
    node.outputs[0].dtype, node.outputs[0].shape = value.dtype, ir.Shape(shape)
    return node.outputs[0]


def _slice_columns(graph: ir.Graph, before: ir.Node, value: ir.Value, k: int) -> ir.Value:
    """value[..., :k], inserted before `before`."""
    base = before.name or "lookup"
    bounds = [initializer(graph, f"{base}.{n}", np.array([v], np.int64))
              for n, v in (("starts", 0), ("ends", k), ("axes", -1))]
    node = ir.node("Slice", [value, *bounds], name=f"{base}.columns")
    graph.insert_before(before, node)
    return node.outputs[0]
