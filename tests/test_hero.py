"""ZeroQuant-HERO levels of w8a8-smoothquant: M1 is the preset's former form, M2 adds attention's
two activation x activation MatMuls, M3 the residual Adds; each level runs in ONNX Runtime with
the integer kernels expected and stays close to float on a random post-LN encoder block."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_onnx, sqnr_db
from onnx import TensorProto, helper, numpy_helper
from qpass.runtime.onnxruntime import optimized_op_types

import qpass
from qpass.cli import main
from qpass.passes import HeroLevel, InsertQDQ, LowerIntegerMatMul, SmoothQuant
from qpass.presets import canonicalize
from qpass.schemes import WEIGHT_INT8

HIDDEN = 16


def encoder_block(seed: int) -> onnx.ModelProto:
    """A BERT-like post-LN block: LayerNorm -> q/k/v -> Q·Kᵀ, scale, + attention mask (computed
    from the `mask` input) -> Softmax -> ·V -> output MatMul -> residual Add -> LayerNorm ->
    up, Gelu, down -> residual Add -> LayerNorm. Weighted MatMuls: 6."""
    rng = np.random.default_rng(seed)
    h = HIDDEN
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def linear(x, out, k, n):
        w = const(f"{out}.w", rng.normal(0, 1 / np.sqrt(k), (k, n)))
        nodes.append(helper.make_node("MatMul", [x, w], [f"{out}.mm"], name=f"{out}_MatMul"))
        nodes.append(helper.make_node("Add", [f"{out}.mm", const(f"{out}.b",
                                                                  rng.normal(0, 0.1, n))], [out]))

    def layer_norm(x, out):
        gamma, beta = rng.uniform(0.5, 1.5, h), rng.normal(0, 0.2, h)
        nodes.append(helper.make_node("LayerNormalization",
                                      [x, const(f"{out}.g", gamma), const(f"{out}.beta", beta)],
                                      [out], axis=-1))

    layer_norm("x", "ln0")
    for name in ("q", "k", "v"):
        linear("ln0", name, h, h)
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores_MatMul"),
        helper.make_node("Mul", ["scores", const("scale", 1 / np.sqrt(h))], ["scaled"]),
        helper.make_node("Sub", [const("one", 1.0), "mask"], ["hidden_positions"]),
        helper.make_node("Mul", ["hidden_positions", const("big", -1e4)], ["additive"]),
        helper.make_node("Unsqueeze", ["additive", "axis1"], ["additive3"]),
        helper.make_node("Add", ["scaled", "additive3"], ["masked"], name="mask_Add"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="ctx_MatMul"),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    linear("ctx", "o", h, h)
    nodes.append(helper.make_node("Add", ["o", "ln0"], ["res1"], name="res1_Add"))
    layer_norm("res1", "ln1")
    linear("ln1", "up", h, 2 * h)
    nodes.append(helper.make_node("Gelu", ["up"], ["act"]))
    linear("act", "down", 2 * h, h)
    nodes.append(helper.make_node("Add", ["down", "ln1"], ["res2"], name="res2_Add"))
    layer_norm("res2", "y")
    graph = helper.make_graph(
        nodes, "encoder_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", h]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", h])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def encoder_data(seed: int, n: int = 16, seq: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, seq), np.float32)
    for i, length in enumerate(rng.integers(3, seq + 1, n)):
        mask[i, length:] = 0  # padded tails
    return {"x": rng.normal(0, 1, (n, seq, HIDDEN)).astype(np.float32), "mask": mask}


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """MatMuls with a constant dequantized weight, MatMuls and Adds with both inputs dequantized
    activations, in the QDQ graph."""
    graph = ir.from_proto(model).graph
    counts = {"weight MatMul": 0, "activation MatMul": 0, "Add": 0}

    def dequantized(value, constant: bool) -> bool:
        node = value.producer()
        return (node is not None and node.op_type == "DequantizeLinear"
                and (node.inputs[0].const_value is not None) == constant)

    for node in graph:
        if node.op_type not in ("MatMul", "Add"):
            continue
        if node.op_type == "MatMul" and dequantized(node.inputs[1], True):
            counts["weight MatMul"] += 1
        elif all(dequantized(v, False) for v in node.inputs):
            counts["activation MatMul" if node.op_type == "MatMul" else "Add"] += 1
    return counts


def qdq_form(level: str, data: dict, seed: int = 0) -> onnx.ModelProto:
    """The preset's passes up to the lowering (the standard-ONNX QDQ form)."""
    model = ir.from_proto(encoder_block(seed))
    from qpass.calibration import Context

    context = Context(data, model.graph, batch_size=8, progress=False)
    passes = [*canonicalize(), SmoothQuant(context, alpha=0.8), HeroLevel(level),
              InsertQDQ(context, weights=WEIGHT_INT8, op_types=("MatMul", "Gemm", "Add"))]
    for p in passes:
        model = p(model).model
    return ir.to_proto(model)


EXPECTED = {  # per level: QDQ ops, and the integer kernels ONNX Runtime runs
    "m1": ({"weight MatMul": 6, "activation MatMul": 0, "Add": 0},
           {"MatMulIntegerToFloat": 6, "QLinearAdd": 0}),
    "m2": ({"weight MatMul": 6, "activation MatMul": 2, "Add": 0},
           {"MatMulIntegerToFloat": 8, "QLinearAdd": 0}),
    "m3": ({"weight MatMul": 6, "activation MatMul": 2, "Add": 2},
           {"MatMulIntegerToFloat": 8, "QLinearAdd": 2}),
}


@pytest.mark.parametrize("level", ["m1", "m2", "m3"])
def test_each_level_quantizes_its_ops(level):
    data = encoder_data(1)
    qdq, kernels = EXPECTED[level]
    assert quantized_ops(qdq_form(level, data)) == qdq
    compiled = qpass.compile(encoder_block(0), preset="w8a8-smoothquant", level=level,
                             calibration=data, progress=False)
    ops = optimized_op_types(compiled.to_bytes())
    assert {k: ops.get(k, 0) for k in kernels} == kernels, ops
    assert ops.get("Softmax") == 1 and "QLinearSoftmax" not in ops  # softmax computes in float


@pytest.mark.parametrize("seed", range(3))
def test_each_level_stays_close_to_float(seed):
    """SQNR on held-out inputs; each level adds int8 tensors, so bounds step down."""
    calibration, test = encoder_data(seed + 10), encoder_data(seed + 20)
    model = encoder_block(seed)
    reference = run_onnx(model, test)[0]
    sqnr = {}
    for level in ("m1", "m2", "m3"):
        compiled = qpass.compile(model, preset="w8a8-smoothquant", level=level,
                                 calibration=calibration, progress=False)
        sqnr[level] = sqnr_db(reference, compiled.run(test)[0])
    assert sqnr["m1"] > 25 and sqnr["m2"] > 20 and sqnr["m3"] > 20, sqnr


def test_m1_is_the_former_weight_only_matmul_form():
    """Level M1 writes what InsertQDQ on MatMuls with constant weights wrote before levels."""
    data = encoder_data(1)
    model = ir.from_proto(encoder_block(0))
    from qpass.calibration import Context

    context = Context(data, model.graph, batch_size=8, progress=False)
    for p in [*canonicalize(), SmoothQuant(context, alpha=0.8),
              InsertQDQ(context, weights=WEIGHT_INT8, op_types=("MatMul", "Gemm"),
                        computed_weights=False), LowerIntegerMatMul()]:
        model = p(model).model
    former = ir.to_proto(model)
    level = qpass.compile(encoder_block(0), preset="w8a8-smoothquant", level="m1",
                          calibration=data, progress=False)
    test = encoder_data(5)
    np.testing.assert_array_equal(run_onnx(former, test)[0], level.run(test)[0])
    assert optimized_op_types(former.SerializeToString()) == optimized_op_types(level.to_bytes())


def test_an_unknown_level_is_refused():
    with pytest.raises(ValueError, match="m4"):
        HeroLevel("m4")


def test_cli_level_option(tmp_path, capsys):
    onnx.save(encoder_block(0), tmp_path / "block.onnx")
    np.savez(tmp_path / "calib.npz", **encoder_data(1))
    base = ["compile", str(tmp_path / "block.onnx"), "--preset", "w8a8-smoothquant",
            "--calib", str(tmp_path / "calib.npz"), "-q"]
    assert main([*base, "-o", str(tmp_path / "m3.onnx"), "--level", "m3"]) == 0
    ops = optimized_op_types(str(tmp_path / "m3.onnx"))
    assert ops.get("QLinearAdd") == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # argparse refuses a choice it does not list
        main([*base, "-o", str(tmp_path / "m4.onnx"), "--level", "m4"])
    assert exit_.value.code == 2 and "m4" in capsys.readouterr().err
