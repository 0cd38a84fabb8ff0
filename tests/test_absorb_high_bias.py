"""AbsorbHighBias leaves the float function unchanged (1e-5 relative) where the pre-activations
stay above the absorbed c = max(0, beta - 3 |gamma|), and narrows the Relu's output range."""

import numpy as np
import onnx_ir as ir
from conftest import relative_error, run_onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qpass.calibration.context import with_outputs
from qpass.passes import AbsorbHighBias, EqualizeCrossLayer, FoldBatchNorm
from qpass.presets import canonicalize


def high_bias_graph(seed: int, channels: int, second: str, maxpool: bool):
    """x -> Conv (1x1) or Gemm -> BN (small gamma, large beta) -> Relu [-> MaxPool] -> second
    (Conv, depthwise Conv or Gemm, no padding). Outputs the BN output "h" and the result "y"."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    gemm = second == "gemm"
    w1 = const("w1", rng.normal(0, 0.3, (c, 6) if gemm else (c, 3, 1, 1)))
    b1 = const("b1", rng.normal(0, 0.1, c))
    first = helper.make_node(
        "Gemm" if gemm else "Conv", ["x", w1, b1], ["a"], **({"transB": 1} if gemm else {})
    )
    bn = helper.make_node(
        "BatchNormalization",
        [
            "a",
            const("gamma", rng.uniform(0.05, 0.3, c) * rng.choice([-1, 1], c)),
            const("beta", rng.uniform(-1, 3, c)),
            const("mean", np.zeros(c)),
            const("var", np.ones(c)),
        ],
        ["h"],
    )
    nodes = [first, bn, helper.make_node("Relu", ["h"], ["r"])]
    value = "r"
    if maxpool and not gemm:
        nodes.append(helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2]))
        value = "p"
    if gemm:
        w2, outputs, attrs = rng.normal(0, 1, (c, 4)), 4, {"alpha": 0.5, "beta": 2.0}
    elif second == "depthwise":
        w2, outputs, attrs = rng.normal(0, 1, (c, 1, 3, 3)), c, {"group": c}
    else:
        w2, outputs, attrs = rng.normal(0, 1, (5, c, 3, 3)), 5, {}
    inputs = [value, const("w2", w2), const("b2", rng.normal(0, 0.1, outputs))]
    nodes.append(helper.make_node("Gemm" if gemm else "Conv", inputs, ["y"], **attrs))
    x_shape = ["n", 6] if gemm else ["n", 3, 8, 8]
    graph = helper.make_graph(
        nodes,
        "high_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, None),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    gamma, beta = (numpy_helper.to_array(i) for i in inits if i.name in ("gamma", "beta"))
    return model, np.maximum(0, beta - 3 * np.abs(gamma))


def absorb(proto) -> tuple[ir.Model, bool]:
    """Fold BN (keeping its statistics) and absorb; the BN output "h" is no graph output then."""
    del proto.graph.output[1]
    model = ir.from_proto(proto)
    ir.passes.PassManager([*canonicalize(), FoldBatchNorm()])(model)
    return model, AbsorbHighBias()(model).modified


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    channels=st.sampled_from([1, 4, 8]),
    second=st.sampled_from(["conv", "depthwise", "gemm"]),
    maxpool=st.booleans(),
)
def test_absorption_preserves_outputs_where_preactivations_stay_above_c(
    seed, channels, second, maxpool
):
    proto, c = high_bias_graph(seed, channels, second, maxpool)
    shape = (4, 6) if second == "gemm" else (4, 3, 8, 8)
    x = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
    expected, h = run_onnx(proto, {"x": x})
    channel_min = np.moveaxis(h, 1, 0).reshape(len(c), -1).min(axis=1)
    assert np.all((channel_min >= c) | (c == 0))  # the precondition of the rewrite
    model, modified = absorb(proto)
    assert modified == bool(c.any())
    actual = run_onnx(ir.to_proto(model), {"x": x})[0]
    assert relative_error(actual, expected) < 1e-5


def test_absorption_narrows_the_relu_output_range():
    proto, c = high_bias_graph(1, 8, "conv", maxpool=False)
    assert c.min() == 0 < c.max()
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)
    relu_before = run_onnx(with_outputs(ir.from_proto(proto), ["r"]), {"x": x})[2]
    model, _ = absorb(proto)
    relu_after = run_onnx(with_outputs(model, ["r"]), {"x": x})[1]
    high_before = np.moveaxis(relu_before, 1, 0).reshape(8, -1).max(axis=1)
    high_after = np.moveaxis(relu_after, 1, 0).reshape(8, -1).max(axis=1)
    np.testing.assert_allclose(high_after, high_before - c, atol=1e-5)


def test_absorption_uses_statistics_rescaled_by_equalization():
    """Equalization first, as in the preset: the absorbed amounts follow the rescaled channels,
    so the function is still unchanged."""
    proto, c = high_bias_graph(2, 8, "conv", maxpool=True)
    assert c.any()
    x = np.random.default_rng(2).uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)
    expected = run_onnx(proto, {"x": x})[0]
    del proto.graph.output[1]
    model = ir.from_proto(proto)
    passes = [*canonicalize(), FoldBatchNorm(), EqualizeCrossLayer(), AbsorbHighBias()]
    assert all(p(model).modified for p in passes[-3:])  # canonicalize() may change nothing
    actual = run_onnx(ir.to_proto(model), {"x": x})[0]
    assert relative_error(actual, expected) < 1e-5
