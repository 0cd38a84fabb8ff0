"""Tied embeddings quantized once: GatherBlockQuantized (lookup) and MatMulNBits (lm_head) read
one packed table (`QuantizeTiedEmbeddings`, `--lm-head shared-int4|shared-int8`)."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest
from conftest import sqnr_db
from test_weight_only import run, tiny_llama

import qpass
from qpass.errors import QpassError
from qpass.graph import constant
from qpass.passes import QuantizeTiedEmbeddings
from qpass.passes.groupwise import dequantize, grouped, quantize_rtn
from qpass.passes.matmul_weights import untie_final_projection
from qpass.schemes import QuantScheme

VOCAB, HIDDEN = 256, 64  # test_weight_only.tiny_llama
TABLE = "lm.lm_head.weight"


@pytest.fixture(scope="module")
def captured_llama():
    from benchmarks.llm import capture_llm

    return capture_llm(tiny_llama(), example_length=8)


def ids(seed: int = 0) -> dict:
    return {"input_ids": np.random.default_rng(seed).integers(0, VOCAB, (2, 16))}


def with_table(model: ir.Model, table: np.ndarray) -> ir.Model:
    """A copy of the float model whose tied table holds `table`."""
    copy = model.clone()
    value = copy.graph.initializers[TABLE]
    value.const_value = ir.tensor(table.astype(np.float32), name=TABLE)
    return copy


@pytest.mark.parametrize("scheme", [
    QuantScheme("uint4", group_size=32),
    QuantScheme("uint4", group_size=128),  # K = 64 < 128: one padded block per row
    QuantScheme("int4", symmetric=True, group_size=16),
    QuantScheme("uint8", group_size=32),
    QuantScheme("int8", symmetric=True, group_size=64),
], ids=str)
def test_lookup_and_head_read_one_table_with_the_dequantized_rows(captured_llama, scheme):
    """The rewritten model computes what the float model computes with E replaced by its
    round-to-nearest dequantized copy, and the file holds the table once, packed."""
    model = captured_llama.clone()
    QuantizeTiedEmbeddings(scheme, accuracy_level=0)(model)  # fp32 activations: exact
    graph = model.graph
    lookup = next(n for n in graph if n.op_type == "GatherBlockQuantized")
    head = graph.outputs[0].producer()
    assert head.op_type == "MatMulNBits" and head.attributes["bits"].value == scheme.bits
    packed = head.inputs[1]
    assert lookup.inputs[0].producer().op_type == "Reshape"
    assert lookup.inputs[0].producer().inputs[0] is packed
    assert lookup.inputs[2] is head.inputs[2]  # the same scales (and zero points)
    assert TABLE not in graph.initializers
    tables = [v for v in graph.initializers.values() if v.shape and v.shape[0] == VOCAB]
    assert {v.name for v in tables} <= {packed.name, head.inputs[2].name,
                                        *(v.name for v in head.inputs[3:] if v is not None)}
    assert not any(n.op_type in ("Gather", "Transpose") and n.inputs[0] is packed for n in graph)

    table = constant(captured_llama.graph.initializers[TABLE])
    q, scale, zero = quantize_rtn(table.T, scheme)
    zero = None if scheme.symmetric and scheme.bits == 4 else zero
    expected = dequantize(q, scale, zero, grouped(scheme, HIDDEN)).T
    reference = run(with_table(captured_llama, expected), ids())
    np.testing.assert_allclose(run(model, ids()), reference, rtol=1e-4, atol=1e-4)


def test_shared_table_presets_load_in_onnxruntime_smaller_than_an_int8_head(
    captured_llama, tmp_path
):
    """`w4a16-rtn --lm-head shared-int4|shared-int8` in both formats: one GatherBlockQuantized,
    the float table gone, the file smaller than `--lm-head int8`'s (which adds an 8-bit head
    beside the float table), logits within an SQNR bound of the float model's."""
    reference = run(captured_llama, ids(1))
    sizes, sqnr = {}, {}
    for head in ("int8", "shared-int8", "shared-int4"):
        for fmt in ("dq", "matmulnbits"):
            compiled = qpass.compile(captured_llama, preset="w4a16-rtn", group_size=32,
                                     format=fmt, lm_head=head, progress=False)
            path = compiled.save(tmp_path / f"{head}-{fmt}.onnx")
            sizes[head, fmt] = path.stat().st_size
            sqnr[head, fmt] = sqnr_db(reference, compiled.run(ids(1))[0])
            lookups = [n.op_type for n in compiled.model.graph
                       if n.op_type in ("Gather", "GatherBlockQuantized")
                       and n.inputs[0].shape[0] in (VOCAB, )]
            shared = head.startswith("shared")
            assert lookups == ["GatherBlockQuantized" if shared else "Gather"]
            assert (TABLE in compiled.model.graph.initializers) == (not shared)
            final = compiled.model.graph.outputs[0].producer()
            if shared or fmt == "matmulnbits":  # the head in MatMulNBits, int8 activations
                assert final.attributes.get_int("accuracy_level", 0) == 4
    for fmt in ("dq", "matmulnbits"):
        assert sizes["shared-int8", fmt] < sizes["int8", fmt], sizes
        assert sizes["shared-int4", fmt] < sizes["shared-int8", fmt], sizes
        # every other weight is RTN 4-bit in all three: the table's bits decide the difference
        assert sqnr["shared-int8", fmt] > sqnr["int8", fmt] - 1.0, sqnr
        assert sqnr["shared-int4", fmt] > 12.0, sqnr


def test_an_untied_head_is_left_alone_with_a_warning(captured_llama, caplog):
    model = captured_llama.clone()
    untie_final_projection(model.graph)  # the head now has its own weight Eᵀ
    before = [n.op_type for n in model.graph]
    with caplog.at_level(logging.WARNING):
        result = QuantizeTiedEmbeddings()(model)
    assert not result.modified and [n.op_type for n in model.graph] == before
    assert "no embedding table shared with the lm_head" in caplog.text


def test_a_shared_table_for_tensorrt_is_refused_in_one_line(captured_llama):
    with pytest.raises(QpassError, match=r"GatherBlockQuantized.*keep the lm_head float"):
        qpass.compile(captured_llama, preset="w4a16-rtn", target="tensorrt",
                      lm_head="shared-int4", progress=False)
