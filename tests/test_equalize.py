"""EqualizeCrossLayer leaves the float function unchanged (1e-5 relative) and evens out ranges."""

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import relative_error, run_onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qpass.metadata import BN_STATISTICS, RELU6_REPLACED
from qpass.passes import EqualizeCrossLayer, FoldBatchNorm
from qpass.presets import canonicalize

BETWEEN = {
    "relu": ["Relu"],
    "none": [],
    "relu-pad": ["Relu", "Pad"],
    "pad-relu-maxpool": ["Pad", "Relu", "MaxPool"],
    "relu6": ["Clip"],
}


def chain_graph(seed: int, channels: int, depthwise: bool, between: str, batchnorm: bool):
    """x -> Conv A [-> BN] -> `between` -> Conv B (full or depthwise) -> Relu -> Conv C (1x1)
    -> GlobalAveragePool -> Flatten -> Gemm D (transB) -> Relu -> Gemm E, with output channels
    of very different weight ranges."""
    rng = np.random.default_rng(seed)
    c = channels
    inits, nodes = [], []

    def const(name, array, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype), name))
        return name

    def weight(shape, axis=0):
        spread = np.exp(rng.normal(0, 1.5, shape[axis]))
        shape_1 = [1] * len(shape)
        shape_1[axis] = -1
        return rng.normal(0, 0.5, shape) * spread.reshape(shape_1)

    nodes.append(
        helper.make_node(
            "Conv",
            ["x", const("wa", weight((c, 3, 3, 3))), const("ba", rng.normal(0, 0.5, c))],
            ["a"],
            pads=[1] * 4,
        )
    )
    value = "a"
    if batchnorm:
        params = [
            const("g", rng.uniform(0.5, 1.5, c)),
            const("beta", rng.normal(0, 1, c)),
            const("mean", rng.normal(0, 1, c)),
            const("var", rng.uniform(0.2, 2, c)),
        ]
        nodes.append(helper.make_node("BatchNormalization", [value, *params], ["a_bn"]))
        value = "a_bn"
    for i, op in enumerate(BETWEEN[between]):
        out = f"between_{i}"
        if op == "Pad":
            pads = const(f"pads_{i}", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)
            nodes.append(helper.make_node("Pad", [value, pads], [out], mode="constant"))
        elif op == "MaxPool":
            nodes.append(helper.make_node("MaxPool", [value], [out], kernel_shape=[2, 2]))
        elif op == "Clip":
            nodes.append(helper.make_node("Clip", [value, const("lo", 0), const("hi", 6)], [out]))
        else:
            nodes.append(helper.make_node(op, [value], [out]))
        value = out
    wb = weight((c, 1, 3, 3)) if depthwise else weight((c, c, 3, 3))
    nodes += [
        helper.make_node(
            "Conv",
            [value, const("wb", wb), const("bb", rng.normal(0, 0.5, c))],
            ["b"],
            pads=[1] * 4,
            group=c if depthwise else 1,
        ),
        helper.make_node("Relu", ["b"], ["b_relu"]),
        helper.make_node("Conv", ["b_relu", const("wc", weight((4, c, 1, 1)))], ["cc"]),
        helper.make_node("GlobalAveragePool", ["cc"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node(
            "Gemm", ["flat", const("wd", weight((5, 4))), const("bd", np.ones(5))], ["d"], transB=1
        ),
        helper.make_node("Relu", ["d"], ["d_relu"]),
        helper.make_node("Gemm", ["d_relu", const("we", weight((5, 3), axis=1))], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def prepare(proto: onnx.ModelProto) -> ir.Model:
    model = ir.from_proto(proto)
    ir.passes.PassManager([*canonicalize(), FoldBatchNorm()])(model)
    return model


def weights_by_input(model: ir.Model) -> dict[str, np.ndarray]:
    """{name of the layer's data input: weight} for every Conv and Gemm."""
    return {
        n.inputs[0].name: ir.convenience.get_const_tensor(n.inputs[1]).numpy()
        for n in model.graph
        if n.op_type in ("Conv", "Gemm")
    }


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    channels=st.sampled_from([1, 3, 8]),
    depthwise=st.booleans(),
    between=st.sampled_from(["relu", "none", "relu-pad", "pad-relu-maxpool"]),
    batchnorm=st.booleans(),
)
def test_equalization_preserves_outputs_on_random_graphs(
    seed, channels, depthwise, between, batchnorm
):
    proto = chain_graph(seed, channels, depthwise, between, batchnorm)
    model = prepare(proto)
    assert EqualizeCrossLayer()(model).modified
    x = np.random.default_rng(seed).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    expected = run_onnx(proto, {"x": x})[0]
    actual = run_onnx(ir.to_proto(model), {"x": x})[0]
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("depthwise", [False, True])
def test_equalized_pairs_have_equal_channel_ranges(depthwise):
    """Output channel i of the first layer and input channel i of the second end with the same
    max |w| (both layers of every pair, Conv -> Conv, Conv -> depthwise and Gemm -> Gemm)."""
    model = prepare(chain_graph(7, 8, depthwise, "relu-pad", True))
    before = weights_by_input(model)
    EqualizeCrossLayer()(model)
    after = weights_by_input(model)
    first_out = np.abs(after["x"]).max(axis=(1, 2, 3))
    second = np.abs(list(after.values())[1])  # the second Conv (its zero Pad folded in)
    second_in = second.max(axis=(1, 2, 3)) if depthwise else second.max(axis=(0, 2, 3))
    np.testing.assert_allclose(first_out, second_in, rtol=1e-2)
    np.testing.assert_allclose(
        np.abs(after["flat"]).max(axis=1), np.abs(after["d_relu"]).max(1), rtol=1e-2
    )
    spread = {k: np.ptp(np.log(np.abs(w).reshape(len(w), -1).max(1))) for k, w in before.items()}
    assert np.ptp(np.log(first_out)) < spread["x"]


def test_batchnorm_statistics_follow_the_channel_scale():
    model = prepare(chain_graph(3, 8, True, "relu", True))
    conv = next(n for n in model.graph if n.op_type == "Conv")
    weight_before = ir.convenience.get_const_tensor(conv.inputs[1]).numpy()
    stats_before = conv.meta[BN_STATISTICS]
    EqualizeCrossLayer()(model)
    weight_after = ir.convenience.get_const_tensor(conv.inputs[1]).numpy()
    scale = weight_after[:, 0, 0, 0] / weight_before[:, 0, 0, 0]
    assert np.ptp(np.log(scale)) > 0.1  # the channels were rescaled differently
    for key in ("gamma", "beta"):
        np.testing.assert_allclose(
            conv.meta[BN_STATISTICS][key], stats_before[key] * scale, rtol=1e-5
        )


def test_relu6_blocks_equalization_unless_allowed(caplog):
    proto = chain_graph(5, 8, True, "relu6", False)
    model = prepare(proto)
    before = weights_by_input(model)["x"]
    EqualizeCrossLayer()(model)  # equalizes the later pairs, not Conv A -> Clip -> Conv B
    np.testing.assert_array_equal(weights_by_input(model)["x"], before)
    assert "Clip" in [n.op_type for n in model.graph]

    with caplog.at_level(logging.WARNING, logger="qpass.passes.equalize"):
        assert EqualizeCrossLayer(allow_relu6=True)(model).modified
    assert "Clip" not in [n.op_type for n in model.graph]
    assert model.meta[RELU6_REPLACED] and model.metadata_props[RELU6_REPLACED]
    assert any("Relu" in r.message for r in caplog.records if r.levelno == logging.WARNING)


def test_shared_intermediate_tensor_is_left_alone():
    proto = chain_graph(2, 8, False, "relu", False)
    proto.graph.output.append(helper.make_tensor_value_info("between_0", TensorProto.FLOAT, None))
    model = prepare(proto)
    before = weights_by_input(model)["x"]
    EqualizeCrossLayer()(model)  # equalizes the later pairs, not Conv A -> Relu -> Conv B
    np.testing.assert_array_equal(weights_by_input(model)["x"], before)


def channel_spread(model: ir.Model) -> float:
    """Mean over depthwise Convs of log(max / median) of the per-channel weight ranges."""
    spreads = []
    for node in model.graph:
        group = node.attributes.get("group")
        if node.op_type == "Conv" and group is not None and group.value > 1:
            w = ir.convenience.get_const_tensor(node.inputs[1]).numpy()
            r = np.abs(w).reshape(len(w), -1).max(axis=1)
            spreads.append(np.log(r.max() / np.median(r)))
    return float(np.mean(spreads))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "efficientnet_lite0"])
def test_equalization_preserves_real_models(real_models, name):
    """ResNet20 (Conv-BN-Relu-Conv inside each block) and EfficientNet-Lite0, whose ReLU6s
    equalization must not cross by default (only its two Conv -> Conv pairs change)."""
    proto = onnx.load(real_models[name])
    model = prepare(proto)
    clips = [n.op_type for n in model.graph].count("Clip")
    assert EqualizeCrossLayer()(model).modified
    assert [n.op_type for n in model.graph].count("Clip") == clips
    size = 224 if name.startswith("efficient") else 32
    x = np.random.default_rng(0).normal(0, 1, (2, 3, size, size)).astype(np.float32)
    expected = run_onnx(proto, {"input": x})[0]
    actual = run_onnx(ir.to_proto(model), {"input": x})[0]
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.slow
def test_efficientnet_is_equalized_across_relu6_when_allowed(real_models, caplog):
    model = prepare(onnx.load(real_models["efficientnet_lite0"]))
    spread = channel_spread(model)
    with caplog.at_level(logging.WARNING, logger="qpass.passes.equalize"):
        EqualizeCrossLayer(allow_relu6=True)(model)
    assert channel_spread(model) < 0.5 * spread
    assert len(model.meta[RELU6_REPLACED]) > 20
    assert any("Relu" in r.message for r in caplog.records if r.levelno == logging.WARNING)
