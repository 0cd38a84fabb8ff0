"""Models with external data compile without holding all their weights at once: the weights are
memory-mapped and each is quantized, then freed, in turn; staged calibration reads large weights
in place; outputs are written one large tensor at a time; a model over 2 GB is written with its
data file atomically. Memory is measured with tracemalloc (numpy's and Python's allocations;
memory-mapped file pages are not allocations)."""

from __future__ import annotations

import resource
import signal
import tracemalloc

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_onnx, sqnr_db
from onnx import TensorProto, helper, numpy_helper
from qpass.runtime.onnxruntime import session

import qpass
from qpass.capture import capture
from qpass.errors import OutputError
from qpass.passes import QuantizeDynamicPerToken


def decoder_like(
    folder, layers: int = 24, width: int = 1024, vocabulary: int = 0, seed: int = 0
) -> tuple:
    """x -> [Gather(table, ids) when `vocabulary`] -> (x + Relu(x @ W_i)) x `layers`, its
    float32 weights in `m.onnx.data`; (path, proto with its weights, weight bytes)."""
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    if vocabulary:
        table = rng.normal(0, 1, (vocabulary, width)).astype(np.float32)
        weights.append(numpy_helper.from_array(table, "table"))
        nodes.append(helper.make_node("Gather", ["table", "input"], ["h"], name="embed"))
        source = helper.make_tensor_value_info("input", TensorProto.INT64, ["b", "s"])
        shape = ["b", "s", width]
    else:
        source = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", width])
        nodes.append(helper.make_node("Identity", ["input"], ["h"], name="entry"))
        shape = ["b", width]
    x = "h"
    for i in range(layers):
        w = rng.normal(0, width**-0.5, (width, width)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        nodes.append(helper.make_node("Add", [x, f"r{i}"], [f"a{i}"], name=f"residual{i}"))
        x = f"a{i}"
    nodes.append(helper.make_node("Identity", [x], ["output"], name="exit"))
    graph = helper.make_graph(
        nodes, "decoder_like", [source],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], weights,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="m.onnx.data")
    total = sum(numpy_helper.to_array(t).nbytes for t in weights)
    return path, onnx.load(path), total


def traced_peak(work) -> tuple:
    """(work's result, peak bytes allocated while it ran, above what was allocated before)."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        result = work()
        return result, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_rtn_quantizes_external_weights_one_at_a_time(tmp_path):
    """w4a16-rtn over 96 MB of memory-mapped weights allocates under half of them at its peak
    (their 4-bit codes, one byte each until packed, are a quarter); copying every initializer
    out of the file up front would allocate all of them."""
    path, proto, total = decoder_like(tmp_path)
    compiled, peak = traced_peak(
        lambda: qpass.compile(path, preset="w4a16-rtn", keep_reference=False, progress=False)
    )
    assert peak < 0.5 * total, f"{peak / 1e6:.0f} MB allocated for {total / 1e6:.0f} MB of weights"
    x = np.random.default_rng(1).normal(0, 1, (4, 1024)).astype(np.float32)
    assert sqnr_db(run_onnx(proto, {"input": x})[0], compiled.run({"input": x})[0]) > 15


def test_save_writes_one_large_tensor_at_a_time(tmp_path):
    """A float model of 96 MB (24 weights of 4 MB) is saved allocating under a quarter of its
    size (`ir.to_proto` and its serialization hold every weight twice); the file reloads as the
    same model: the same weights, the same outputs."""
    path, proto, total = decoder_like(tmp_path)
    compiled = qpass.compile(path, passes=[], keep_reference=False, progress=False)
    out = tmp_path / "out" / "float.onnx"
    out.parent.mkdir()
    _, peak = traced_peak(lambda: compiled.save(out))
    assert peak < 0.25 * total, f"{peak / 1e6:.0f} MB allocated to save {total / 1e6:.0f} MB"
    assert not (out.parent / "float.onnx.data").exists()
    written = onnx.load(out)
    onnx.checker.check_model(written)
    source = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    saved = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert saved.keys() == source.keys()
    assert all(np.array_equal(saved[name], source[name]) for name in source)
    x = np.random.default_rng(1).normal(0, 1, (4, 1024)).astype(np.float32)
    np.testing.assert_array_equal(run_onnx(written, {"input": x})[0],
                                  run_onnx(proto, {"input": x})[0])


def test_staged_calibration_reads_large_weights_in_place(tmp_path):
    """GPTQ's staged calibration runs the first stage over a 64 MB embedding table: ONNX Runtime
    reads it in place (fed as an input) instead of from a serialized copy of the table."""
    path, proto, table = decoder_like(tmp_path, layers=0, width=512, vocabulary=32768)
    path, proto, _ = decoder_like(tmp_path, layers=3, width=512, vocabulary=32768)
    ids = np.random.default_rng(1).integers(0, 32768, (8, 16))
    compiled, peak = traced_peak(
        lambda: qpass.compile(path, preset="w4a16-gptq", calibration={"input": ids},
                              keep_reference=False, progress=False)
    )
    assert peak < 0.5 * table, f"{peak / 1e6:.0f} MB allocated beside a {table / 1e6:.0f} MB table"
    test = ids[:2]
    assert sqnr_db(run_onnx(proto, {"input": test})[0], compiled.run({"input": test})[0]) > 15


def test_dynamic_frees_each_float_weight_as_it_is_quantized(tmp_path):
    """QuantizeDynamicPerToken drops a float weight once no MatMul reads it (its memory, or its
    mapped pages, are freed during the pass, not when the compile ends)."""
    path, _, _ = decoder_like(tmp_path, layers=4, width=256)
    model = capture(path)
    QuantizeDynamicPerToken()(model)
    assert not {"w0", "w1", "w2", "w3"} & set(model.graph.initializers)


def test_dynamic_quantizes_a_large_weight_in_chunks_of_rows():
    """An 8192 x 1024 weight (34 MB) is quantized with temporaries of a few chunks of rows: under
    3x its size at the peak (whole-weight float64 temporaries take 6x), with the same int8
    values as the whole-weight formula."""
    w = np.random.default_rng(2).normal(0, 1, (8192, 1024)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", 8192]))
    weight = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    matmul = ir.node("MatMul", [x, weight], name="mm")
    matmul.outputs[0].name, matmul.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], [matmul.outputs[0]], nodes=[matmul], initializers=[weight],
                     opset_imports={"": 17})
    model = ir.Model(graph, ir_version=10)
    _, peak = traced_peak(lambda: QuantizeDynamicPerToken()(model))
    assert peak < 3 * w.nbytes, f"{peak / 1e6:.0f} MB to quantize a {w.nbytes / 1e6:.0f} MB weight"
    scale = np.abs(w.astype(np.float64)).max(axis=0) / 127
    expected = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(model.graph.initializers["w_quantized"].const_value.numpy(),
                                  expected)


@pytest.mark.slow
def test_model_over_2gb_is_written_with_its_data_file_atomically(tmp_path):
    """A float model of 2.4 GB (protobuf's limit is 2 GB) is saved as `out.onnx` beside
    `out.onnx.data`, both renamed into place at the end. A real write failure (the process's
    file size limit, RLIMIT_FSIZE, reached in the middle of the data file) leaves neither file,
    nor a temporary one; the next save writes both, and ONNX Runtime runs the result."""
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((8192, 8192), np.float32) / 90.5) for _ in range(9)]
    x = ir.Value(name="input", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", 8192]))
    values = [ir.Value(name=f"w{i}", const_value=ir.tensor(w, name=f"w{i}"))
              for i, w in enumerate(weights)]
    nodes, h = [], x
    for i, value in enumerate(values):
        nodes.append(ir.node("MatMul", [h, value], name=f"mm{i}"))
        h = nodes[-1].outputs[0]
        h.name, h.dtype = f"h{i}", ir.DataType.FLOAT
    graph = ir.Graph([x], [h], nodes=nodes, initializers=values, opset_imports={"": 17})
    compiled = qpass.compile(ir.Model(graph, ir_version=10), passes=[], keep_reference=False,
                             progress=False)
    out = tmp_path / "out" / "out.onnx"
    out.parent.mkdir()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, limit[1]))
        with pytest.raises(OutputError):
            compiled.save(out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert list(out.parent.iterdir()) == []
    compiled.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx", "out.onnx.data"]
    feed = {"input": rng.standard_normal((1, 8192), np.float32)}
    expected = feed["input"]
    for w in weights:
        expected = expected @ w
    del compiled, weights, values, graph
    assert sqnr_db(expected, session(str(out)).run(None, feed)[0]) > 60
