"""Bad input gets a clear QpassError naming the problem; the input model file is never changed."""

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.cli import main


@pytest.fixture
def model_file(tmp_path, tiny_model):
    path = tmp_path / "model.onnx"
    onnx.save(tiny_model, path)
    return path


def compile_with(model, calibration):
    return qpass.compile(model, calibration=calibration, progress=False)


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (None, "needs calibration data"),
        ({"input": np.zeros((0, 3, 16, 16), np.float32)}, "empty"),
        ([], "empty"),
        ({"image": np.zeros((2, 3, 16, 16), np.float32)}, "do not match the model inputs"),
        ({"input": np.zeros((2, 3, 8, 8), np.float32)}, "axis 2 must be 16"),
        ({"input": np.zeros((2, 16, 16), np.float32)[None, None]}, "rank 4"),
        ({"input": np.full((2, 3, 16, 16), np.nan, np.float32)}, "NaN or Inf"),
        ({"input": np.full((2, 3, 16, 16), np.inf, np.float32)}, "NaN or Inf"),
        ({"input": np.zeros((2, 3, 16, 16), np.complex64)}, "dtype complex64"),
        ("/nonexistent/calib.npz", "does not exist"),
    ],
)
def test_bad_calibration_data(model_file, calibration, message):
    with pytest.raises(qpass.CalibrationError, match=message):
        compile_with(model_file, calibration)


def test_unreadable_npz(model_file, tmp_path):
    bad = tmp_path / "calib.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(qpass.CalibrationError, match=r"not a readable \.npz"):
        compile_with(model_file, bad)


def test_unreadable_and_malformed_models(tmp_path, tiny_calibration):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf")
    with pytest.raises(qpass.ModelError, match="not a readable ONNX model"):
        compile_with(garbage, tiny_calibration)
    with pytest.raises(qpass.ModelError, match="does not exist"):
        compile_with(tmp_path / "missing.onnx", tiny_calibration)
    with pytest.raises(qpass.ModelError, match="cannot capture a dict"):
        compile_with({"not": "a model"}, tiny_calibration)


def test_model_without_quantizable_op(tiny_calibration):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 16, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(qpass.ModelError, match="no quantizable op"):
        compile_with(model, tiny_calibration)


def test_op_with_computed_weight_is_left_in_float(tiny_calibration):
    """A Conv whose weight is a run-time input cannot be quantized: it is left in float."""
    w = numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["input", "w_in"], ["c"]),
        helper.make_node("Conv", ["input", "w"], ["d"]),
        helper.make_node("Add", ["c", "d"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 3, 16, 16]),
        helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [4, 3, 3, 3]),
    ]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "computed", inputs, out, [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    weight = np.random.default_rng(0).normal(0, 0.1, (4, 3, 3, 3)).astype(np.float32)
    x = tiny_calibration["input"][:4]
    compiled = compile_with(model, [{"input": x, "w_in": weight}])
    convs = {n.outputs[0].name: n for n in compiled.model.graph if n.op_type == "Conv"}
    assert convs["d"].inputs[1].producer().op_type == "DequantizeLinear"
    assert convs["c"].inputs[1].name == "w_in"  # the float weight is read as is
    expected = onnx.reference.ReferenceEvaluator(model).run(None, {"input": x, "w_in": weight})[0]
    actual = compiled.run({"input": x, "w_in": weight})[0]
    assert np.abs(actual - expected).max() < 0.05 * np.abs(expected).max()


def test_unwritable_output_path(model_file, tiny_calibration, tmp_path):
    compiled = compile_with(model_file, tiny_calibration)
    with pytest.raises(qpass.OutputError, match="does not exist"):
        compiled.save(tmp_path / "no" / "such" / "dir" / "out.onnx")


def test_read_only_output_folder(model_file, tiny_calibration, read_only_folder):
    compiled = compile_with(model_file, tiny_calibration)
    with pytest.raises(qpass.OutputError, match="cannot write"):
        compiled.save(read_only_folder / "out.onnx")


def test_cli_reports_errors_without_traceback(model_file, tmp_path, capsys):
    code = main(
        [
            "compile",
            str(model_file),
            "-o",
            str(tmp_path / "o.onnx"),
            "--calib",
            str(tmp_path / "missing.npz"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "qpass: error: calibration file" in err and "Traceback" not in err


def test_cli_without_calibration_names_what_needs_it(model_file, tmp_path, capsys):
    """--calib is optional (w4a16-rtn needs none); a preset that needs data says so in one line."""
    code = main(["compile", str(model_file), "-o", str(tmp_path / "o.onnx")])
    assert code == 2
    err = capsys.readouterr().err
    assert "needs calibration data" in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_input_file_is_never_modified(model_file, tiny_calibration, tmp_path):
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    np.savez(tmp_path / "calib.npz", **tiny_calibration)
    out = tmp_path / "out.onnx"
    assert (
        main(
            [
                "compile",
                str(model_file),
                "-o",
                str(out),
                "--calib",
                str(tmp_path / "calib.npz"),
                "-q",
            ]
        )
        == 0
    )
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == digest
    assert out.is_file() and not list(tmp_path.glob(".out.onnx.*"))


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ({"input": np.ones((2, 3, 16, 16), bool)},
         "holds bool values; the model's input is float32"),
        ({"input": np.ones((2, 3, 16, 16), np.int64)}, "holds int64 values"),
        ({"input": np.stack([np.full((3, 16, 16), -3e38), np.full((3, 16, 16), 3e38)])
          .astype(np.float32)}, "overflows float32 scales"),
    ],
)
def test_calibration_data_of_the_wrong_kind_or_range(model_file, calibration, message):
    with pytest.raises(qpass.CalibrationError, match=message):
        compile_with(model_file, calibration)


def test_constant_calibration_input_is_named_in_a_warning(model_file, caplog):
    compile_with(model_file, {"input": np.zeros((4, 3, 16, 16), np.float32)})
    assert "calibration input 'input' holds the value 0 in every sample" in caplog.text


def test_huge_calibration_values_never_give_a_model_with_bad_scales(model_file, tmp_path):
    """Values near 1e37 overflow inside the network: refused by the final scale check, or
    left float with a warning; never a file with infinite scales."""
    data = {"input": np.random.default_rng(0).normal(0, 1e37, (4, 3, 16, 16)).astype(np.float32)}
    try:
        compiled = compile_with(model_file, data)
    except qpass.QpassError as e:
        assert "overflow" in str(e) or "NaN or Inf" in str(e)
        return
    for node in compiled.model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = node.inputs[1].const_value.numpy()
            assert np.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "batch size must be >= 1, not 0"),
        (["--exclude", "Conv_O"], "--exclude 'Conv_O' matches no node of the model; closest: "),
    ],
)
def test_option_values_the_model_cannot_take(tmp_path, tiny_model, tiny_calibration, capsys,
                                            argv, message):
    proto = tiny_model
    for index, node in enumerate(proto.graph.node):
        node.name = f"{node.op_type}_{index}"
    source, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    onnx.save(proto, source)
    np.savez(calib, **tiny_calibration)
    before = source.read_bytes()
    assert main(["compile", str(source), "--calib", str(calib), "-q", "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert "Conv_0" in err or "--exclude" not in argv
    assert not out.exists() and source.read_bytes() == before


def test_lorc_rank_above_the_weight_rank_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 1, (32, 16)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])], [weight],
    )
    source, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    argv = ["compile", str(source), "-q", "-o", str(out), "--preset", "w4a16-rtn"]
    assert main([*argv, "--group-size", "16", "--lm-head", "int4", "--lorc-rank", "64"]) == 2
    err = capsys.readouterr().err
    assert "exceeds min(K, N) = 16 of MatMul 'proj'" in err and err.count("\n") == 1
    assert not out.exists()


def test_an_already_quantized_model_is_refused(tmp_path, model_file, tiny_calibration, capsys):
    calib, once, twice = tmp_path / "c.npz", tmp_path / "once.onnx", tmp_path / "twice.onnx"
    np.savez(calib, **tiny_calibration)
    argv = ["compile", "--calib", str(calib), "-q"]
    assert main([*argv, str(model_file), "-o", str(once)]) == 0
    assert main([*argv, str(once), "-o", str(twice)]) == 2
    err = capsys.readouterr().err
    assert "the model is already quantized (" in err and "give qpass the float model" in err
    assert err.count("\n") == 1 and not twice.exists()


def _fixed_batch_model(batch: int) -> onnx.ModelProto:
    from conftest import tiny_cnn

    proto = tiny_cnn()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    return proto


def test_a_fixed_batch_size_above_one_calibrates_in_batches_of_that_size(tiny_calibration,
                                                                         caplog):
    data = {"input": tiny_calibration["input"][:10]}
    compiled = compile_with(_fixed_batch_model(4), data)
    assert "the last 2 calibration samples are left out" in caplog.text
    assert compiled.run({"input": data["input"][:4]})[0].shape[0] == 4
    with pytest.raises(qpass.CalibrationError, match="give at least 4 calibration samples"):
        compile_with(_fixed_batch_model(4), {"input": data["input"][:3]})


def test_custom_domain_ops_need_their_library(tmp_path, tiny_calibration, capsys):
    from conftest import tiny_cnn

    proto = tiny_cnn()
    custom = helper.make_node("Swish", ["input"], ["swished"], name="act", domain="my.ops")
    proto.graph.node.insert(0, custom)
    proto.graph.node[1].input[0] = "swished"
    proto.opset_import.append(helper.make_opsetid("my.ops", 1))
    source, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    onnx.save(proto, source)
    np.savez(calib, **tiny_calibration)
    garbage = tmp_path / "libmyops.so"
    garbage.write_bytes(b"not a shared library")
    argv = ["compile", str(source), "--calib", str(calib), "-q", "-o", str(out)]
    for extra, message in [
        ([], "node 'act' is Swish of domain 'my.ops', which ONNX Runtime runs only with its "
             "custom-op library: give it with --custom-op-library PATH"),
        (["--custom-op-library", str(tmp_path / "missing.so")], "missing.so does not exist"),
        (["--custom-op-library", str(garbage)], "libmyops.so cannot be loaded"),
    ]:
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_a_model_onnx_runtime_refuses_is_one_line(tmp_path, tiny_calibration, capsys):
    from conftest import tiny_cnn

    proto = tiny_cnn()
    bad = numpy_helper.from_array(np.ones(1, np.int64), "one")
    proto.graph.initializer.append(bad)
    proto.graph.node.insert(0, helper.make_node("Add", ["input", "one"], ["shifted"]))
    proto.graph.node[1].input[0] = "shifted"  # float + int64: ORT refuses the graph
    source, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    onnx.save(proto, source)
    np.savez(calib, **tiny_calibration)
    assert main(["compile", str(source), "--calib", str(calib), "-q", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ONNX Runtime cannot load the model" in err and err.count("\n") == 1, err


def test_an_internal_error_is_one_line_with_the_traceback_in_a_file(
    model_file, tmp_path, tiny_calibration, capsys, monkeypatch
):
    from qpass.passes.fuse_requant import FuseRequant

    def broken(self, model):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(FuseRequant, "call", broken)
    calib, out = tmp_path / "c.npz", tmp_path / "q.onnx"
    np.savez(calib, **tiny_calibration)
    argv = ["compile", str(model_file), "--calib", str(calib), "-q", "-o", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qpass: internal error: PassError" in err
    assert "'FuseRequant' pass after" in err
    path = err.split("the traceback is in ")[1].split(" ")[0]
    assert "broken on purpose" in Path(path).read_text()
    assert main(["--debug", *argv]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert not out.exists()


def _dangling():
    from conftest import tiny_cnn

    proto = tiny_cnn()
    proto.graph.node[3].input[0] = "nowhere"
    return proto


def _cyclic():
    from conftest import tiny_cnn

    proto = tiny_cnn()
    proto.graph.node[0].input[0] = proto.graph.node[2].output[0]
    return proto


def _without_inputs():
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["c"], value=numpy_helper.from_array(np.ones(2, np.float32))
            ),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("build", "calibration", "message"),
    [
        (_dangling, None, "reads 'nowhere', which no node, input or initializer produces"),
        (_cyclic, None, "not acyclic"),
        (_without_inputs, None, "the model has no inputs"),
        (None, np.float32(1.0), "is a single number: give samples on the first axis"),
    ],
)
def test_broken_graphs_and_scalar_calibration(tmp_path, tiny_calibration, capsys, build,
                                              calibration, message):
    from conftest import tiny_cnn

    source, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    onnx.save(build() if build else tiny_cnn(), source)
    np.savez(calib, **({"input": calibration} if calibration is not None else tiny_calibration))
    assert main(["compile", str(source), "--calib", str(calib), "-q", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("scale", [np.inf, 0.0, -1.0])
def test_a_scale_that_is_not_finite_and_positive_is_refused(scale):
    import onnx_ir as ir

    from qpass.checks import check_scales

    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="x_q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="x_dq"),
    ]
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z")]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], inits,
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(qpass.QpassError, match=r"x_q: scale .* is not finite and positive"):
        check_scales(model)
