"""Bad input gets a clear QpassError naming the problem; the input model file is never changed."""

import hashlib

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
