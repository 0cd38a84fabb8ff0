"""Bad input gets a clear QpassError naming the problem; the input model file is never changed."""

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import pytest
from conftest import assert_refused
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


# ------------------------------------------------------------------ the bad-input suite (CLI)
# Each case: `qpass compile` on one bad input ends with exit code 2 and one line naming the
# problem (matching the regex), no traceback, nothing written, the inputs' bytes unchanged
# (`assert_refused`). Output paths that would replace an input or a device: tests/test_outputs.py.


def _save(w: Path, proto: onnx.ModelProto, name: str = "bad.onnx") -> Path:
    onnx.save(proto, w / "in" / name)
    return w / "in" / name


def _npz(w: Path, **arrays) -> Path:
    np.savez(w / "in" / "bad.npz", **arrays)
    return w / "in" / "bad.npz"


def _args(w: Path, *extra, model=None, calib=None) -> list:
    return [model or w / "in" / "model.onnx", "-o", w / "out" / "q.onnx",
            "--calib", calib or w / "in" / "calib.npz", *extra]


def _input(n: int = 4, shape=(3, 16, 16), dtype=np.float32, value=None) -> np.ndarray:
    x = np.random.default_rng(0).normal(0, 1, (n, *shape))
    return (x if value is None else np.full((n, *shape), value)).astype(dtype)


def _mlp(w: Path) -> Path:
    """x [*, 32] -> MatMul 'proj' [32, 16] -> y, for the transformer and weight-only presets."""
    weight = numpy_helper.from_array(
        np.random.default_rng(0).normal(0, 1, (32, 16)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])], [weight],
    )
    path = _save(w, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                 "mlp.onnx")
    np.savez(w / "in" / "mlp.npz", x=_input(8, (32,)))
    return path


def _mlp_args(w: Path, preset: str, *extra) -> list:
    return [_mlp(w), "-o", w / "out" / "q.onnx", "--calib", w / "in" / "mlp.npz",
            "--preset", preset, *extra]


def _named(w: Path) -> Path:
    from conftest import tiny_cnn

    proto = tiny_cnn()
    for index, node in enumerate(proto.graph.node):
        node.name = f"{node.op_type}_{index}"
    return _save(w, proto)


def _quantized(w: Path) -> Path:
    out = w / "in" / "quantized.onnx"
    qpass.compile(w / "in" / "model.onnx", calibration=w / "in" / "calib.npz",
                  progress=False).save(out)
    return out


def _qoperator(w: Path) -> Path:
    from conftest import tiny_cnn

    proto = tiny_cnn()
    proto.graph.node.insert(0, helper.make_node(
        "DynamicQuantizeLinear", ["input"], ["q", "q_scale", "q_zero"], name="dql"))
    return _save(w, proto)


def _custom_op(w: Path) -> Path:
    from conftest import tiny_cnn

    proto = tiny_cnn()
    proto.graph.node.insert(0, helper.make_node("Swish", ["input"], ["swished"], name="act",
                                                domain="my.ops"))
    proto.graph.node[1].input[0] = "swished"
    proto.opset_import.append(helper.make_opsetid("my.ops", 1))
    return _save(w, proto)


def _ort_refuses(w: Path) -> Path:
    from conftest import tiny_cnn

    proto = tiny_cnn()
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.int64), "one"))
    proto.graph.node.insert(0, helper.make_node("Add", ["input", "one"], ["shifted"]))
    proto.graph.node[1].input[0] = "shifted"  # float + int64: ORT refuses the graph
    return _save(w, proto)


def _unknown_op(w: Path) -> Path:
    from conftest import tiny_cnn

    proto = tiny_cnn()
    proto.graph.node.insert(0, helper.make_node("Frobnicate", ["input"], ["frobbed"], name="frob"))
    proto.graph.node[1].input[0] = "frobbed"
    return _save(w, proto)


def _redeclared() -> onnx.ModelProto:
    from conftest import tiny_cnn

    proto = tiny_cnn()
    proto.graph.node.insert(0, helper.make_node("Relu", ["input"], ["f"]))  # f: Flatten's too
    proto.graph.node[1].input[0] = "f"
    return proto


def _relu_only(w: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["y"])], "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 16, 16])],
    )
    return _save(w, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _external(w: Path, location: str) -> Path:
    from conftest import tiny_cnn

    folder = w / "in" / "external"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(tiny_cnn(), path, save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    (w / "in" / "secret.bin").write_bytes((folder / "m.onnx.data").read_bytes())
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path)
    return path


def _garbage(w: Path, name: str) -> Path:
    (w / "in" / name).write_bytes(b"\x00\x01 definitely not what the name says")
    return w / "in" / name


OVERFLOW = np.stack([np.full((3, 16, 16), -3e38), np.full((3, 16, 16), 3e38)]).astype(np.float32)

BAD_INPUTS = {
    # the model
    "model missing": (lambda w: _args(w, model=w / "in" / "missing.onnx"), "does not exist"),
    "model not ONNX": (lambda w: _args(w, model=_garbage(w, "m.onnx")),
                       "not a readable ONNX model"),
    "model already quantized (QDQ)": (lambda w: _args(w, model=_quantized(w)),
                                      r"already quantized \(.*QuantizeLinear"),
    "model already quantized (operators)": (lambda w: _args(w, model=_qoperator(w)),
                                            r"already quantized \(1 DynamicQuantizeLinear"),
    "custom-domain op": (lambda w: _args(w, model=_custom_op(w)),
                         "node 'act' is Swish of domain 'my.ops'.*--custom-op-library PATH"),
    "custom-op library missing": (
        lambda w: _args(w, "--custom-op-library", w / "in" / "missing.so", model=_custom_op(w)),
        "missing.so does not exist"),
    "custom-op library not a library": (
        lambda w: _args(w, "--custom-op-library", _garbage(w, "lib.so"), model=_custom_op(w)),
        "lib.so cannot be loaded"),
    "value nothing produces": (lambda w: _args(w, model=_save(w, _dangling())),
                               "reads 'nowhere', which no node, input or initializer produces"),
    "cyclic graph": (lambda w: _args(w, model=_save(w, _cyclic())), "not acyclic"),
    "model without inputs": (lambda w: _args(w, model=_save(w, _without_inputs())),
                             "the model has no inputs"),
    "graph ONNX Runtime refuses": (lambda w: _args(w, model=_ort_refuses(w)),
                                   "ONNX Runtime cannot load the model"),
    "op no runtime knows": (lambda w: _args(w, model=_unknown_op(w)), "Frobnicate"),
    "graph that redeclares a value": (lambda w: _args(w, model=_save(w, _redeclared())),
                                      "not a readable ONNX model .*'f' is redeclared"),
    "no quantizable op": (lambda w: _args(w, model=_relu_only(w)), "no quantizable op"),
    "external data missing": (lambda w: _args(w, model=_external(w, "gone.data")),
                              "which does not exist"),
    "external data outside the model's folder": (
        lambda w: _args(w, model=_external(w, "../secret.bin")), "outside the model's folder"),
    # the calibration data
    "no calibration data": (lambda w: [w / "in" / "model.onnx", "-o", w / "out" / "q.onnx"],
                            "needs calibration data"),
    "calibration file missing": (lambda w: _args(w, calib=w / "in" / "missing.npz"),
                                 "does not exist"),
    "calibration file not npz": (lambda w: _args(w, calib=_garbage(w, "c.npz")),
                                 r"not a readable \.npz"),
    "calibration empty": (lambda w: _args(w, calib=_npz(w, input=_input(0))), "empty"),
    "calibration names no input": (lambda w: _args(w, calib=_npz(w, image=_input())),
                                   "do not match the model inputs"),
    "calibration of the wrong size": (lambda w: _args(w, calib=_npz(w, input=_input(4, (3, 8, 8)))),
                                      "axis 2 must be 16"),
    "calibration of the wrong rank": (
        lambda w: _args(w, calib=_npz(w, input=_input(4, (1, 3, 16, 16)))), "rank 4"),
    "calibration a single number": (lambda w: _args(w, calib=_npz(w, input=np.float32(1))),
                                    "is a single number: give samples on the first axis"),
    "calibration with NaN": (lambda w: _args(w, calib=_npz(w, input=_input(value=np.nan))),
                             "NaN or Inf"),
    "calibration with Inf": (lambda w: _args(w, calib=_npz(w, input=_input(value=np.inf))),
                             "NaN or Inf"),
    "calibration complex": (lambda w: _args(w, calib=_npz(w, input=_input(dtype=np.complex64))),
                            "dtype complex64"),
    "calibration of bools": (lambda w: _args(w, calib=_npz(w, input=_input(dtype=bool))),
                             "holds bool values; the model's input is float32"),
    "calibration of integers": (lambda w: _args(w, calib=_npz(w, input=_input(dtype=np.int64))),
                                "holds int64 values"),
    "calibration range overflowing float32 scales": (
        lambda w: _args(w, calib=_npz(w, input=OVERFLOW)), "overflows float32 scales"),
    # the options
    "batch size 0": (lambda w: _args(w, "--batch-size", "0"), "batch size must be >= 1, not 0"),
    "exclude matching no node": (lambda w: _args(w, "--exclude", "Conv_O", model=_named(w)),
                                 "--exclude 'Conv_O' matches no node of the model; closest: "
                                 ".*Conv_0"),
    "keep-float -1": (lambda w: _mlp_args(w, "w8a8-smoothquant", "--keep-float", "-1"),
                      r"keep_float \(--keep-float\) must be >= 0, not -1"),
    "group size 0": (lambda w: _mlp_args(w, "w4a16-rtn", "--group-size", "0"),
                     r"group_size \(--group-size\) must be >= 1, not 0"),
    "LoRC rank above the weight's": (
        lambda w: _mlp_args(w, "w4a16-rtn", "--group-size", "16", "--lm-head", "int4",
                            "--lorc-rank", "64"),
        r"exceeds min\(K, N\) = 16 of MatMul 'proj'"),
    "float-layers -1": (lambda w: _args(w, "--preset", "fp8", "--float-layers", "-1"),
                        "must be >= 0, not -1"),
    "option the preset does not take": (
        lambda w: _args(w, "--group-size", "32"),
        "preset 'int8' takes no option group_size .*presets that take it: "),
    "unknown preset": (lambda w: _args(w, "--preset", "int9"), "invalid choice: 'int9'"),
    "unknown target": (lambda w: _args(w, "--target", "tpu"), "invalid choice: 'tpu'"),
    "choice out of the option's": (lambda w: _args(w, "--calibrator", "bogus"),
                                   "invalid choice: 'bogus'"),
    "option value not a number": (lambda w: _args(w, "--batch-size", "eight"),
                                  "invalid int value: 'eight'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(workspace, case, capsys):
    arguments, message = BAD_INPUTS[case]
    assert_refused(capsys, workspace, ["compile", *arguments(workspace), "-q"], message)
