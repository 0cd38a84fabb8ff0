"""FoldBatchNorm preserves the float function (1e-5 relative) and removes every foldable BN."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import relative_error, run_onnx, tiny_cnn
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qpass.metadata import BN_STATISTICS
from qpass.passes import FoldBatchNorm
from qpass.presets import canonicalize


def fold(proto: onnx.ModelProto) -> ir.Model:
    """Constant folding (as in every preset), then FoldBatchNorm."""
    model = ir.from_proto(proto)
    ir.passes.PassManager([*canonicalize(), FoldBatchNorm()])(model)
    return model


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def layer_bn_graph(op: str, channels: int, groups: int, seed: int, with_bias: bool):
    """x -> op (random weights) -> BatchNormalization -> y, as an ONNX model."""
    rng = np.random.default_rng(seed)
    inits = []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    c_in = 2 * groups
    if op == "Conv":
        w = rng.normal(size=(channels * groups, c_in // groups, 3, 3))
        x_shape, y_shape, attrs = [2, c_in, 6, 6], [2, channels * groups, 4, 4], {"group": groups}
    elif op == "ConvTranspose":
        w = rng.normal(size=(c_in, channels, 3, 3))
        x_shape, y_shape, attrs = [2, c_in, 4, 4], [2, channels * groups, 6, 6], {"group": groups}
    elif op == "Gemm":
        w = rng.normal(size=(channels, 5))
        x_shape, y_shape, attrs = [3, 5], [3, channels], {"transB": 1, "alpha": 0.7}
    else:
        w = rng.normal(size=(5, channels))
        x_shape, y_shape, attrs = [3, 5], [3, channels], {}
    n = y_shape[1]
    inputs = ["x", const("w", w)]
    if with_bias and op != "MatMul":
        inputs.append(const("bias", rng.normal(size=n)))
    bn_params = [
        const("g", rng.uniform(0.3, 2, n)),
        const("beta", rng.normal(size=n)),
        const("mean", rng.normal(size=n)),
        const("var", rng.uniform(0.1, 3, n)),
    ]
    nodes = [
        helper.make_node(op, inputs, ["h"], **attrs),
        helper.make_node("BatchNormalization", ["h", *bn_params], ["y"], epsilon=1e-3),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, y_shape))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, rng.normal(size=x_shape).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(
    op=st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul"]),
    channels=st.integers(1, 6),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 10**6),
    with_bias=st.booleans(),
)
def test_fold_preserves_outputs_on_random_graphs(op, channels, groups, seed, with_bias):
    if op in ("Gemm", "MatMul"):
        groups = 1
    proto, x = layer_bn_graph(op, channels, groups, seed, with_bias)
    model = fold(proto)
    assert "BatchNormalization" not in op_types(model)
    expected = run_onnx(proto, {"x": x})[0]
    actual = run_onnx(ir.to_proto(model), {"x": x})[0]
    assert relative_error(actual, expected) < 1e-5
    assert model.graph.outputs[0].name == "y"


def test_fold_keeps_bn_statistics_on_the_layer(tiny_model):
    model = fold(tiny_model)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert len(convs) == 2
    for conv in convs:
        stats = conv.meta[BN_STATISTICS]
        assert stats["gamma"].shape == stats["beta"].shape == (8,)


def test_fold_leaves_bn_whose_input_is_shared():
    proto = tiny_cnn()
    # make the first Conv's output also a graph output: folding would change that output
    proto.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    model = fold(proto)
    assert op_types(model).count("BatchNormalization") == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet20"])
def test_fold_preserves_real_models(real_models, name):
    proto = onnx.load(real_models[name])
    bn_count = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert bn_count > 10
    model = fold(proto)
    assert "BatchNormalization" not in op_types(model)
    size = 224 if name.startswith("efficient") else 32
    x = np.random.default_rng(0).normal(0, 1, (2, 3, size, size)).astype(np.float32)
    expected = run_onnx(proto, {"input": x})[0]
    actual = run_onnx(ir.to_proto(model), {"input": x})[0]
    assert relative_error(actual, expected) < 1e-5
