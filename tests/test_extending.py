"""Extending qpass: a new pass and preset, a new target, each one module, and the contracts
that hold them together (option checks, calibration precondition, failures naming the pass)."""

from __future__ import annotations

import importlib.util
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import tiny_cnn
from onnx import TensorProto, helper

import qpass
from qpass import presets, targets
from qpass.cli import main
from qpass.passes import InsertQDQ
from qpass.passes.base import Pass

KEEP_ONE_FLOAT = '''
"""A pass that keeps one named node float, and a preset that runs it before int8."""

import onnx_ir as ir

from qpass.passes.base import Pass, keep_float
from qpass.presets import Option, preset


class KeepNamedFloat(Pass):
    """Leave the node called `name` in float.

    Rewrite rules:

    1. The node named `name` is marked to stay float; the graph is not changed.
    """

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in model.graph:
            if self.name and node.name == self.name:
                keep_float(node, "named by KeepNamedFloat")
        return ir.passes.PassResult(model, modified=False)


@preset(
    "int8-keep-one",
    "int8 with one named layer left in float",
    options=(Option("node", str, "the layer to keep float", ""),),
    targets=("onnxruntime", "tensorrt"),
)
def int8_keep_one(target, exclude, node):
    from qpass.presets import passes

    return [KeepNamedFloat(node), *passes("int8", target, exclude)]
'''

EDGE_TARGET = '''
"""A CPU target that reuses ONNX Runtime's lowering, with dynamic W8A8 as its default."""

from qpass.targets import register
from qpass.targets.onnxruntime import OnnxRuntime


class EdgeCpu(OnnxRuntime):
    name = "edge-cpu"
    title = "Edge CPU"
    help = "ONNX Runtime on a small CPU: dynamic W8A8 by default"
    default_preset = "w8a8-dynamic"


register(EdgeCpu())
'''


def _add_module(monkeypatch, tmp_path, package, name: str, source: str) -> None:
    """Write one module into `package`'s search path and let the registry find it."""
    folder = tmp_path / package.__name__
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    registry = package.REGISTRY
    registry.discover()  # the built-in registrations, before the entries are copied
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    monkeypatch.setattr(registry, "entries", dict(registry.entries))  # restored after the test
    registry.discover(again=True)


def _matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 32], rng.normal(0, 1, 64 * 32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])], [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_new_pass_is_one_file_named_in_a_preset(monkeypatch, tmp_path, tiny_calibration):
    _add_module(monkeypatch, tmp_path, presets, "keep_one_float", KEEP_ONE_FLOAT)
    source, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    proto, first_conv = tiny_cnn(), "stem"
    proto.graph.node[0].name = first_conv
    onnx.save(proto, source)
    np.savez(calib, **tiny_calibration)
    argv = ["compile", str(source), "--calib", str(calib), "-q", "-o", str(out)]
    assert main([*argv, "--preset", "int8-keep-one", "--node", first_conv]) == 0
    model = ir.load(out)
    conv = next(n for n in model.graph if n.name == first_conv)
    assert conv.inputs[1].producer() is None  # its weight stayed a float initializer
    quantized = [n for n in model.graph if n.op_type == "QLinearConv" or (
        n.op_type == "Conv" and n.inputs[1].producer() is not None)]
    assert quantized, "the other convolution is quantized"
    assert main([*argv, "--preset", "int8-keep-one", "--node", first_conv, "--target",
                 "tensorrt"]) == 0


def test_a_new_target_is_one_module(monkeypatch, tmp_path):
    _add_module(monkeypatch, tmp_path, targets, "edge_cpu", EDGE_TARGET)
    source, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(_matmul_model(), source)
    assert main(["compile", str(source), "--target", "edge-cpu", "-q", "-o", str(out)]) == 0
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulIntegerToFloat" in ops  # w8a8-dynamic
    compiled = qpass.compile(
        source, preset="w4a16-rtn", target="edge-cpu", group_size=32, lm_head="int4"
    )
    assert any(n.op_type == "DequantizeLinear" for n in compiled.model.graph)  # its family's


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "int8", "--group-size", "64"],
         "preset 'int8' takes no option group_size (--group-size); presets that take it: "
         "w4a8-fp, w4a16-rtn, w4a16-gptq, w4a16-awq"),
        (["--preset", "w4a16-rtn", "--group-size", "0"], "group_size (--group-size) must be >= 1"),
        (["--preset", "w8a8-dynamic", "--keep-float", "-1"],
         "keep_float (--keep-float) must be >= 0"),
        (["--preset", "w4a8", "--target", "tensorrt"], "preset 'w4a8' is for onnxruntime"),
        (["--preset", "w4a16-rtn", "--calibrator", "entropy"], "presets that take it: int8"),
    ],
)
def test_options_are_checked_before_any_work(tmp_path, capsys, argv, message):
    """The model does not exist: the option is refused before anything is read."""
    out = tmp_path / "q.onnx"
    assert main(["compile", str(tmp_path / "missing.onnx"), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_help_lists_every_preset_with_its_line(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for p in presets.all_presets():
        assert f"{p.name} {' '.join(p.help.split())}" in out


def test_a_calibrated_pass_without_data_is_refused_by_its_precondition(tiny_calibration):
    model = ir.from_proto(tiny_cnn())
    with pytest.raises(ir.passes.PreconditionError, match="needs calibration data"):
        InsertQDQ()(model)
    with pytest.raises(qpass.CalibrationError, match="InsertQDQ needs calibration data"):
        qpass.compile(tiny_cnn(), [InsertQDQ()])


class _Broken(Pass):
    def call(self, model):
        raise RuntimeError("broken on purpose")


def test_a_failing_pass_is_named_with_the_passes_before_it(tiny_calibration):
    passes = [*presets.passes("int8")[:2], _Broken()]
    with pytest.raises(ir.passes.PassError, match=r"'_Broken' pass after.*FoldConstants"):
        qpass.compile(tiny_cnn(), passes, calibration=tiny_calibration, progress=False)


def test_each_target_deploys_a_saved_model(tmp_path, tiny_calibration):
    x = tiny_calibration["input"][:4]
    compiled = qpass.compile(tiny_cnn(), calibration=tiny_calibration, progress=False)
    session = compiled.deploy(tmp_path / "ort.onnx")
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], compiled.run({"input": x})[0])
    trt = qpass.compile(tiny_cnn(), calibration=tiny_calibration, progress=False, target="tensorrt")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(qpass.QpassError, match="pip install tensorrt"):
            trt.deploy(tmp_path / "trt.onnx", tmp_path / "trt.engine")
    assert (tmp_path / "trt.onnx").exists()
