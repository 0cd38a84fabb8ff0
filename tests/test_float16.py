"""float16 models: computed in float32 inside (ComputeInFloat32), their interface kept, and every
preset's output loads in ONNX Runtime and stays near the float16 model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import relative_error, run_onnx, sqnr_db, tiny_cnn
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.passes import ComputeInFloat32


def as_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with float16 weights, constants, inputs and outputs."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for tensor in proto.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return proto


def matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.1, (64, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.1, (64, 32)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="down"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])], [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_compute_in_float32_keeps_the_interface_and_the_function():
    """Against the float16 model the outputs differ by float16 rounding only (the float32
    computation is the more exact one)."""
    proto = as_float16(tiny_cnn())
    model = ir.from_proto(proto)
    assert ComputeInFloat32()(model).modified
    upcast = ir.to_proto(model)
    assert upcast.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert upcast.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert {t.data_type for t in upcast.graph.initializer} == {TensorProto.FLOAT}
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 16, 16)).astype(np.float16)
    reference = run_onnx(proto, {"input": x})[0].astype(np.float32)
    assert relative_error(run_onnx(upcast, {"input": x})[0].astype(np.float32), reference) < 5e-3
    assert not ComputeInFloat32()(ir.from_proto(tiny_cnn())).modified  # float32: unchanged


@pytest.mark.parametrize(
    ("preset", "target", "least_db"),
    [("int8", "onnxruntime", 30), ("int8", "tensorrt", 25), ("fp8", "onnxruntime", 15),
     ("int8-tensor", "onnxruntime", 30), ("w4a8-rtn", "onnxruntime", 12)],
)
def test_float16_cnn_under_every_cnn_preset(preset, target, least_db):
    proto = as_float16(tiny_cnn())
    rng = np.random.default_rng(0)
    calibration = {"input": rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float16)}
    compiled = qpass.compile(
        proto, preset=preset, target=target, calibration=calibration, progress=False
    )
    x = rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float16)
    output = run_onnx(onnx.load_from_string(compiled.to_bytes()), {"input": x})[0]
    assert output.dtype == np.float16
    reference = run_onnx(proto, {"input": x})[0]
    assert sqnr_db(reference.astype(np.float32), output.astype(np.float32)) >= least_db


@pytest.mark.parametrize(
    ("preset", "options", "least_db"),
    [("w4a16-rtn", {"lm_head": "int4", "group_size": 32}, 15), ("w8a8-dynamic", {}, 30),
     ("w8a8-smoothquant", {}, 20)],
)
def test_float16_matmuls_under_the_transformer_presets(preset, options, least_db):
    proto = as_float16(matmul_model())
    rng = np.random.default_rng(1)
    calibration = {"x": rng.normal(0, 1, (32, 64)).astype(np.float16)}
    compiled = qpass.compile(
        proto, preset=preset, calibration=calibration, progress=False, **options
    )
    x = rng.normal(0, 1, (8, 64)).astype(np.float16)
    output = run_onnx(onnx.load_from_string(compiled.to_bytes()), {"x": x})[0]
    assert output.dtype == np.float16
    reference = run_onnx(proto, {"x": x})[0]
    assert sqnr_db(reference.astype(np.float32), output.astype(np.float32)) >= least_db
