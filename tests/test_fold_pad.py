"""FoldPadIntoConv preserves the float function and removes the exporters' "same" Pads."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import relative_error, run_onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qpass.passes import FoldPadIntoConv
from qpass.presets import canonicalize


def pad_conv_graph(pads: list[int], conv_pads: list[int], value: float, seed: int):
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array([0, 0, *pads[:2], 0, 0, *pads[2:]], np.int64), "pads"),
        numpy_helper.from_array(np.array(value, np.float32), "value"),
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads", "value"], ["p"]),
        helper.make_node("Conv", ["p", "w"], ["y"], pads=conv_pads),
    ]
    graph = helper.make_graph(
        nodes,
        "pad_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@settings(max_examples=20, deadline=None)
@given(
    pads=st.lists(st.integers(0, 2), min_size=4, max_size=4),
    conv_pads=st.lists(st.integers(0, 1), min_size=4, max_size=4),
    seed=st.integers(0, 99),
)
def test_zero_pad_folds_and_preserves_outputs(pads, conv_pads, seed):
    proto = pad_conv_graph(pads, conv_pads, 0.0, seed)
    model = ir.from_proto(proto)
    assert FoldPadIntoConv()(model).modified
    assert [n.op_type for n in model.graph] == ["Conv"]
    x = np.random.default_rng(seed).normal(size=(2, 3, 9, 9)).astype(np.float32)
    expected = run_onnx(proto, {"x": x})[0]
    assert relative_error(run_onnx(ir.to_proto(model), {"x": x})[0], expected) < 1e-5


def test_nonzero_pad_value_is_kept():
    model = ir.from_proto(pad_conv_graph([1, 1, 1, 1], [0, 0, 0, 0], 1.0, 0))
    assert not FoldPadIntoConv()(model).modified
    assert [n.op_type for n in model.graph] == ["Pad", "Conv"]


@pytest.mark.slow
def test_efficientnet_same_pads_fold(real_models):
    proto = onnx.load(real_models["efficientnet_lite0"])
    assert sum(n.op_type == "Pad" for n in proto.graph.node) == 17
    model = ir.from_proto(proto)
    for p in canonicalize():
        p(model)
    assert "Pad" not in [n.op_type for n in model.graph]
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    expected = run_onnx(proto, {"input": x})[0]
    assert relative_error(run_onnx(ir.to_proto(model), {"input": x})[0], expected) < 1e-5
