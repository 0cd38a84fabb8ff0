"""SqueezeLLM (per-channel lookup tables by sensitivity-weighted k-means, dense-and-sparse) and
the 3-bit grids of `--bits 3`."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from test_weight_only import correlated, mlp, run

import qpass
from qpass.graph import constant
from qpass.metadata import SQUEEZELLM_SENSITIVITY
from qpass.passes.squeezellm import (
    H_DIAGONAL,
    LookupWeight,
    compensate,
    squeeze,
    weighted_kmeans,
)


def weighted_error(w, w_hat, f) -> float:
    return float(np.sum(f * (w - w_hat) ** 2))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("seed", range(3))
def test_kmeans_recovers_a_weight_that_lies_on_2_to_the_bits_levels_per_channel(bits, seed):
    rng = np.random.default_rng(seed)
    levels = 2**bits
    channels, k = 24, 200
    grid = np.sort(rng.normal(0, 1, (channels, levels)), axis=1)
    picks = rng.integers(0, levels, (channels, k))
    picks[:, :levels] = np.arange(levels)  # every level used
    values = np.take_along_axis(grid, picks, 1)
    table, index = weighted_kmeans(values, rng.lognormal(0, 2, k), levels)
    np.testing.assert_allclose(table, grid, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(index, picks)


@pytest.mark.parametrize("seed", range(5))
def test_sensitivity_weighting_lowers_the_weighted_error(seed):
    """Input channels of uneven sensitivity (like diag H of a transformer layer): the table
    fitted with the weights has a lower weighted error than the plain k-means table."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (256, 32))
    f = rng.lognormal(0, 2, 256)
    plain = squeeze(w, np.ones(256), 3).dense()
    weighted = squeeze(w, f, 3).dense()
    assert weighted_error(w, weighted, f[:, None]) < 0.9 * weighted_error(w, plain, f[:, None])
    # and each column's plain k-means is itself at least as good as a uniform grid
    uniform = np.linspace(w.min(0), w.max(0), 8)
    nearest = uniform[np.abs(w[None] - uniform[:, None]).argmin(0), np.arange(32)]
    assert np.sum((w - plain) ** 2) <= np.sum((w - nearest) ** 2)


@pytest.mark.parametrize("seed", range(3))
def test_dense_and_sparse_beats_dense_only_on_a_matrix_with_outliers(seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, (512, 64)).astype(np.float32)
    spots = rng.choice(w.size, 40, replace=False)
    w.flat[spots] = rng.choice([-1, 1], 40) * rng.uniform(0.3, 1.0, 40)
    f = rng.lognormal(0, 1, 512)
    dense = squeeze(w, f, 3)
    sparse = squeeze(w, f, 3, outliers=0.002, sensitive=0.0005)
    assert len(dense.values) == 0
    assert len(sparse.values) == round(0.002 * w.size) + round(0.0005 * w.size)
    assert set(spots) <= set(sparse.rows * 64 + sparse.cols)  # every outlier kept in float
    w_hat = sparse.dequantize()
    np.testing.assert_allclose(w_hat[sparse.rows, sparse.cols], w[sparse.rows, sparse.cols],
                               rtol=1e-6)
    assert weighted_error(w, w_hat, f[:, None]) < 0.7 * weighted_error(w, dense.dense(), f[:, None])


def lookups(model: ir.Model) -> dict[str, LookupWeight]:
    """The lookup weight of each MatMul, read back from the compiled graph's initializers."""
    found = {}
    for node in model.graph:
        if node.op_type != "GatherElements":
            continue
        base = node.name.removesuffix(".weight_lookup")
        init = model.graph.initializers
        part = [init.get(f"{base}.sparse_{p}") for p in ("rows", "cols", "values")]
        sparse = ([constant(v).astype(t) for v, t in zip(part, (int, int, np.float32),
                                                             strict=True)]
                  if part[0] is not None else [np.zeros(0, int), np.zeros(0, int), np.zeros(0)])
        found[base] = LookupWeight(constant(init[f"{base}.weight_index"]),
                                   constant(init[f"{base}.weight_table"]).astype(np.float32),
                                   *sparse)
    return found


@pytest.mark.parametrize("options", [{"bits": 4}, {"bits": 3},
                                     {"bits": 3, "outliers": 0.0, "sensitive": 0.0},
                                     {"bits": 3, "compensate": True}])
def test_preset_runs_in_onnx_runtime_as_its_dequantized_weights(options):
    model = mlp()
    x = correlated(64, 96, seed=5).reshape(8, 8, 96)
    compiled = qpass.compile(model, preset="w4a16-squeezellm", calibration={"x": x},
                             progress=False, **options)
    found = lookups(compiled.model)
    assert sorted(found) == ["down", "up"]  # lm_head ("head") stays float
    assert compiled.model.metadata_props[SQUEEZELLM_SENSITIVITY] == H_DIAGONAL
    reference = model.clone()
    names = {"up": "w0", "down": "w1"}
    for base, lookup in found.items():
        index = compiled.model.graph.initializers[f"{base}.weight_index"]
        assert index.dtype == ir.DataType.UINT4 and lookup.index.max() < 2 ** options["bits"]
        assert lookup.table.shape[0] == 2 ** options["bits"]
        assert (len(lookup.values) > 0) == (options.get("outliers") != 0.0)
        reference.graph.initializers[names[base]].const_value = ir.tensor(lookup.dequantize())
    expected = run(reference, {"x": x})
    y = compiled.run({"x": x})[0]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    float_y = run(model, {"x": x})
    assert np.abs(y - float_y).max() < 0.25 * np.abs(float_y).max()


def test_sparse_part_after_a_matmul_writing_a_graph_output(tmp_path):
    """lm_head quantized too: the sparse add takes over the graph output and its name."""
    from qpass.passes import SqueezeLLM

    model = mlp(seed=3)
    x = correlated(32, 96, seed=4).reshape(4, 8, 96)
    context = qpass.Context({"x": x}, model.graph, batch_size=4, progress=False)
    quantized = model.clone()
    SqueezeLLM(context, bits=4, lm_head=True)(quantized)
    assert [v.name for v in quantized.graph.outputs] == ["y"]
    assert quantized.graph.outputs[0].producer().op_type == "ScatterElements"
    path = tmp_path / "q.onnx"
    ir.save(quantized, path)
    y = run(ir.load(path), {"x": x})
    float_y = run(model, {"x": x})
    assert y.shape == float_y.shape and np.abs(y - float_y).max() < 0.25 * np.abs(float_y).max()


def test_squeezellm_on_a_captured_llama_beats_rtn_at_3_bits():
    from test_weight_only import tiny_llama

    from benchmarks.llm import capture_llm

    model = capture_llm(tiny_llama(), example_length=8)
    ids = np.random.default_rng(0).integers(0, 256, (8, 32))
    calibration, feed = {"input_ids": ids}, {"input_ids": ids[:2]}
    float_y = run(model, feed)
    errors = {}
    for preset, options in (("w4a16-squeezellm", {}), ("w4a16-rtn", {"group_size": 32})):
        compiled = qpass.compile(model, preset=preset, calibration=calibration, bits=3,
                                 progress=False, **options)
        errors[preset] = float(np.mean((compiled.run(feed)[0] - float_y) ** 2))
        if preset == "w4a16-squeezellm":  # every linear layer of both blocks, lm_head float
            assert len(lookups(compiled.model)) == 14
    assert errors["w4a16-squeezellm"] < errors["w4a16-rtn"]


@pytest.mark.parametrize("preset", ["w4a16-rtn", "w4a16-gptq", "w4a16-awq"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bits_3_gives_3_bit_grids_that_run_in_both_formats(preset, symmetric):
    model = mlp()
    x = correlated(64, 96, seed=5).reshape(8, 8, 96)
    outputs = {}
    for fmt in ("dq", "matmulnbits"):
        compiled = qpass.compile(model, preset=preset, calibration={"x": x}, bits=3,
                                 group_size=32, symmetric=symmetric, format=fmt, progress=False)
        outputs[fmt] = compiled.run({"x": x})[0]
        if fmt == "matmulnbits":
            bits = [n.attributes["bits"].value for n in compiled.model.graph
                    if n.op_type == "MatMulNBits"]
            assert bits == [4, 4]  # MatMulNBits has no 3-bit form: the 4-bit one holds the grid
            continue
        for dq in (n for n in compiled.model.graph if n.op_type == "DequantizeLinear"):
            q = constant(dq.inputs[0]).astype(np.int32)
            assert dq.inputs[0].dtype == (ir.DataType.INT4 if symmetric else ir.DataType.UINT4)
            low, high = (-4, 3) if symmetric else (0, 7)
            assert low <= q.min() and q.max() <= high
            groups = q.reshape(-1, 32, q.shape[1])
            distinct = max(len(np.unique(groups[g, :, c])) for g in range(len(groups))
                           for c in range(q.shape[1]))
            assert distinct <= 8
    np.testing.assert_allclose(outputs["dq"], outputs["matmulnbits"], rtol=1e-5, atol=1e-5)
    float_y = run(model, {"x": x})
    assert np.abs(outputs["dq"] - float_y).max() < 0.3 * np.abs(float_y).max()


def test_three_bits_lose_more_than_four():
    model = mlp()
    x = correlated(64, 96, seed=5).reshape(8, 8, 96)
    float_y = run(model, {"x": x})
    error = {}
    for bits in (3, 4):
        compiled = qpass.compile(model, preset="w4a16-rtn", bits=bits, group_size=32)
        error[bits] = np.mean((compiled.run({"x": x})[0] - float_y) ** 2)
    assert error[4] < error[3] / 2


def test_bad_bits_and_fractions_are_one_line_errors(tmp_path, capsys):
    from qpass.cli import main

    for preset in ("w4a16-rtn", "w4a16-squeezellm"):
        with pytest.raises(qpass.QpassError, match=r"bits \(--bits\) must be one of 3, 4, not 5"):
            qpass.compile(mlp(), preset=preset, bits=5)
    with pytest.raises(qpass.QpassError, match=r"outliers \(--outliers\) must be >= 0"):
        qpass.compile(mlp(), preset="w4a16-squeezellm", outliers=-0.1)
    with pytest.raises(qpass.QpassError, match="sparse fractions"):
        qpass.compile(mlp(), preset="w4a16-squeezellm", sensitive=1.5)
    with pytest.raises(qpass.QpassError, match="takes no option group_size"):
        qpass.compile(mlp(), preset="w4a16-squeezellm", group_size=32)
    ir.save(mlp(), tmp_path / "mlp.onnx")
    argv = ["compile", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "q.onnx"), "--preset",
            "w4a16-rtn", "-q", "--bits", "5"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--bits: invalid choice: 5 (choose from 3, 4)" in err


@pytest.mark.parametrize("seed", range(3))
def test_compensation_keeps_the_tables_and_lowers_the_layer_error(seed):
    """Correlated inputs: GPTQ's error feedback onto the same tables lowers ||X (W - Ŵ)||²;
    with one input channel the feedback has nowhere to go and each value goes to its nearest
    table entry."""
    rng = np.random.default_rng(seed)
    x = correlated(2048, 128, seed=seed).astype(np.float64)
    w = rng.normal(0, 1, (128, 48))
    h = x.T @ x / len(x)
    lookup = squeeze(w, np.diag(h), 3, outliers=0.004, sensitive=0.001)
    compensated = compensate(w, h, lookup)
    np.testing.assert_array_equal(compensated.table, lookup.table)
    error = {name: np.sum((x @ (w - lw.dequantize())) ** 2)
             for name, lw in (("nearest", lookup), ("compensated", compensated))}
    assert error["compensated"] < 0.8 * error["nearest"]
    dense = squeeze(w, np.diag(h), 3)
    table = dense.table.astype(np.float64)
    alone = compensate(w[:1], np.ones((1, 1)), dataclasses.replace(dense, index=dense.index[:1]))
    np.testing.assert_allclose(np.abs(w[0] - alone.dense()[0]),
                               np.abs(w[0][None] - table).min(0), rtol=1e-6)


def test_onnx_runtime_folds_the_lookup_into_a_float_weight_at_load(tmp_path):
    """No lookup-table kernel: ONNX Runtime's constant folding turns Cast + GatherElements into
    a float weight when the session starts (the small file, float speed and memory)."""
    import onnx
    import onnxruntime as ort

    x = correlated(64, 96, seed=5).reshape(8, 8, 96)
    compiled = qpass.compile(mlp(), preset="w4a16-squeezellm", calibration={"x": x},
                             progress=False)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(compiled.to_bytes(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert "GatherElements" not in ops and "Cast" not in ops  # every Cast reads a constant
    assert ops.count("MatMul") == 3 and ops.count("ScatterElements") == 2
