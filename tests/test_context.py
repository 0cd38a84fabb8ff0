"""The calibration Context: graph outputs on demand, weights fed in place, batch cutting."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from conftest import run_onnx
from onnx import TensorProto, helper, numpy_helper

from qpass.calibration import Context
from qpass.calibration.context import FED_BYTES, with_outputs, with_outputs_and_fed_weights


def mlp(seed: int = 0):
    """x -> MatMul(W1 [256, 256], 256 KB) -> Relu -> MatMul(W2 [256, 4], 4 KB) -> y."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.1, (256, 256)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.1, (256, 4)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_large_weights_are_fed_from_the_ir_arrays_not_serialized():
    proto = mlp()
    model = ir.from_proto(proto)
    w1 = model.graph.initializers["w1"].const_value
    model.graph.initializers["w1"].const_value = ir.Tensor(w1.numpy(), name="w1")
    serialized, weights = with_outputs_and_fed_weights(model, ["h"], only=False)
    assert list(weights) == ["w1"] and FED_BYTES <= 4 * 256 * 256
    assert len(serialized) < 16 * 1024  # W2 (4 KB) stays inside, W1 (256 KB) does not
    assert np.shares_memory(weights["w1"], model.graph.initializers["w1"].const_value.numpy())
    assert model.graph.initializers["w1"].const_value is not None  # the IR is left as it was


def test_context_run_with_fed_weights_matches_the_model():
    proto, x = mlp(), np.random.default_rng(1).normal(0, 1, (20, 256)).astype(np.float32)
    model = ir.from_proto(proto)
    context = Context({"x": x}, model.graph, batch_size=8, progress=False)
    h = np.concatenate([out["h"] for out in context.run(model, ["h"])])
    y = np.concatenate([out["y"] for out in context.run(model, ["y"], only=True)])
    expected_y, expected_h = run_onnx(with_outputs(ir.from_proto(proto), ["h"]), {"x": x})
    np.testing.assert_allclose(h, expected_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-6)


def test_pruned_run_feeds_only_the_weights_it_reads():
    model = ir.from_proto(mlp())
    _, weights = with_outputs_and_fed_weights(model, ["x"], only=True)
    assert weights == {}
