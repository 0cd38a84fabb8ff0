"""FP8 E4M3 schemes, Q/DQ insertion and the fp8 preset, checked against ONNX Runtime."""

import dataclasses

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_onnx, sqnr_db, tiny_cnn
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.lint import errors, lint_tensorrt
from qpass.passes.insert_qdq import weight_params
from qpass.schemes import FP4, FP8, QuantScheme

WEIGHTS = QuantScheme(dtype=FP8, per_channel=True, symmetric=True)


def fake_quantize_weight(scheme: QuantScheme, w: np.ndarray) -> np.ndarray:
    scale, zero = weight_params(scheme, w, 0)
    return scheme.fake_quantize(w, scale[:, None], zero[:, None])


def test_fp8_per_channel_weight_sqnr_on_a_gaussian_weight():
    w = np.random.default_rng(0).normal(0, 1, (64, 256)).astype(np.float32)
    assert sqnr_db(w, fake_quantize_weight(WEIGHTS, w)) >= 25


def test_fp8_scale_is_amax_over_448_with_zero_point_zero():
    scale, zero = WEIGHTS.scale_zero_point(np.array([-2.0, -1.0]), np.array([1.0, 4.48]))
    np.testing.assert_allclose(scale, [2 / 448, 4.48 / 448], rtol=1e-6)
    assert zero.dtype == ml_dtypes.float8_e4m3fn and np.all(zero.astype(np.float32) == 0)


@pytest.mark.parametrize("constraint", ["pow2", "pow2-group"])
def test_constrained_scales(constraint):
    """pow2: every scale is 2^k >= the float scale. pow2-group: every scale is S_max / 2^k,
    within a factor 2 above its float scale (no channel saturates)."""
    rng = np.random.default_rng(1)
    amax = np.exp(rng.uniform(-6, 2, 32))
    scheme = QuantScheme(dtype=FP8, per_channel=True, scale_constraint=constraint)
    free, _ = WEIGHTS.scale_zero_point(-amax, amax)
    scale, _ = scheme.scale_zero_point(-amax, amax)
    assert np.all(scale >= free * (1 - 1e-6)) and np.all(scale < 2 * free)
    if constraint == "pow2":
        exponent = np.log2(scale.astype(np.float64))
    else:
        assert scale.max() == pytest.approx(free.max(), rel=1e-6)
        exponent = np.log2(scale.max() / scale.astype(np.float64))
    np.testing.assert_array_equal(exponent, np.round(exponent))


def test_constrained_scales_keep_weight_accuracy():
    w = np.random.default_rng(2).normal(0, 1, (64, 256)) * np.exp(np.linspace(-3, 3, 64))[:, None]
    for constraint in ("pow2", "pow2-group"):
        scheme = QuantScheme(dtype=FP8, per_channel=True, scale_constraint=constraint)
        assert sqnr_db(w, fake_quantize_weight(scheme, w.astype(np.float32))) >= 25


@pytest.mark.parametrize("dtype", [FP8, "int8"])
def test_pow2_group_weights_take_the_base_with_the_least_error(dtype):
    """Per-channel pow2-group weight scales share one base B (every scale B / 2^k, within
    [S_i, 2 S_i) of its float scale, a zero channel keeps scale 1) and round the tensor with
    no more error than the plain M2 base B = S_max."""
    rng = np.random.default_rng(4)
    w = rng.standard_t(4, (48, 96)) * np.exp(rng.uniform(-4, 1, 48))[:, None]
    w[7] = 0.0
    w = w.astype(np.float32)
    scheme = QuantScheme(dtype=dtype, per_channel=True, symmetric=True,
                         scale_constraint="pow2-group")
    scale, zero = weight_params(scheme, w, 0)
    free, _ = dataclasses.replace(scheme, scale_constraint="float").scale_zero_point(
        w.min(1), w.max(1)
    )
    live = np.arange(48) != 7
    assert scale[7] == 1.0
    assert np.all(scale[live] >= free[live] * (1 - 1e-6)) and np.all(scale[live] < 2 * free[live])
    exponent = np.log2(scale[live].max() / scale[live].astype(np.float64))
    np.testing.assert_allclose(exponent, np.round(exponent), atol=1e-6)
    plain, _ = scheme.scale_zero_point(w.min(1), w.max(1))  # B = S_max
    error = {
        name: np.sum((w - scheme.fake_quantize(w, s[:, None], zero[:, None])) ** 2)
        for name, s in (("searched", scale), ("plain", plain))
    }
    assert error["searched"] <= error["plain"]
    if dtype == FP8:  # on a float grid the base decides where each channel's top binade falls
        assert error["searched"] < error["plain"]


def _ort_quantize_dequantize(x: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(scale, "s"),
        numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), "z"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [
            helper.make_tensor_value_info("q", TensorProto.FLOAT8E4M3FN, list(x.shape)),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape)),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return tuple(run_onnx(model, {"x": x}))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_reference_matches_onnxruntime_bit_for_bit(seed):
    """Round to nearest even, subnormals, saturation at +-448 (values far beyond it included)."""
    rng = np.random.default_rng(seed)
    scale = np.array(rng.uniform(0.01, 1.0), np.float32)
    x = np.concatenate(
        [
            rng.normal(0, 200, 20000) * scale,  # saturates often
            rng.normal(0, 1, 20000) * scale * 2.0 ** rng.integers(-12, 4, 20000),
            np.array([448, 464, 480, -1000, 1e30, -1e30, 0.0, -0.0]) * scale,
        ]
    ).astype(np.float32)
    q_ort, y_ort = _ort_quantize_dequantize(x, scale)
    q = QuantScheme(dtype=FP8).quantize(x, scale, np.zeros((), ml_dtypes.float8_e4m3fn))
    np.testing.assert_array_equal(q.view(np.uint8), np.asarray(q_ort).view(np.uint8))
    np.testing.assert_array_equal(q.astype(np.float32) * scale, y_ort)


@pytest.fixture(scope="module")
def calibration():
    return {"input": np.random.default_rng(1).normal(0, 1, (32, 3, 16, 16)).astype(np.float32)}


@pytest.mark.parametrize("constraint", ["float", "pow2", "pow2-group"])
def test_fp8_tiny_cnn_runs_in_onnxruntime(calibration, constraint):
    proto = tiny_cnn()
    compiled = qpass.compile(
        proto, preset="fp8", calibration=calibration, progress=False, scale_constraint=constraint,
        small_convs=True,
    )
    model = onnx.load_from_string(compiled.to_bytes())
    assert model.opset_import[0].version >= 19
    types = {
        init.data_type for init in model.graph.initializer if init.name.endswith("_quantized")
    }
    assert types == {TensorProto.FLOAT8E4M3FN}  # weights in FP8, no int32 bias
    ops = [n.op_type for n in model.graph.node]
    assert "Relu" in ops and "Clip" in ops
    x = np.random.default_rng(3).normal(0, 1, (8, 3, 16, 16)).astype(np.float32)
    assert sqnr_db(run_onnx(proto, {"input": x})[0], run_onnx(model, {"input": x})[0]) >= 20
    assert errors(lint_tensorrt(model)) == []


def test_fp8_with_bias_correction_keeps_the_output(calibration):
    proto = tiny_cnn()
    compiled = qpass.compile(
        proto, preset="fp8", calibration=calibration, progress=False, correct_bias=True,
        small_convs=True,
    )
    x = np.random.default_rng(3).normal(0, 1, (8, 3, 16, 16)).astype(np.float32)
    assert sqnr_db(run_onnx(proto, {"input": x})[0], compiled.run({"input": x})[0]) >= 20


def test_fp8_graph_means_the_same_in_onnxruntime_and_the_onnx_reference(calibration):
    """ORT's fusions must not change an FP8 graph (it drops a Relu before a Q, see InsertQDQ)."""
    from onnx.reference import ReferenceEvaluator

    compiled = qpass.compile(
        tiny_cnn(), preset="fp8", calibration=calibration, progress=False, small_convs=True
    )
    model = onnx.load_from_string(compiled.to_bytes())
    x = np.random.default_rng(4).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(model, {"input": x})[0],
        ReferenceEvaluator(model).run(None, {"input": x})[0],
        rtol=1e-4,
        atol=1e-5,
    )


def test_fp8_compiles_for_the_tensorrt_target(calibration):
    """With target="tensorrt", compile lints the graph and raises on errors."""
    compiled = qpass.compile(
        tiny_cnn(), preset="fp8", calibration=calibration, progress=False, target="tensorrt",
        small_convs=True,
    )
    assert errors(compiled.findings) == []


def _convs(channels: list[tuple[int, int, int]]) -> onnx.ModelProto:
    """A chain of Convs (out channels, group, kernel) from a 3-channel input, each named."""
    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "input", 3
    for index, (out, group, k) in enumerate(channels):
        w = rng.normal(0, 1 / np.sqrt(c * k * k), (out, c // group, k, k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{index}"))
        nodes.append(helper.make_node("Conv", [x, f"w{index}"], [f"c{index}"], name=f"conv{index}",
                                      group=group, pads=[k // 2] * 4))
        x, c = f"c{index}", out
    graph = helper.make_graph(
        nodes, "convs",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp8_leaves_the_convolutions_fp8_does_not_serve_in_float():
    """The 3-channel stem, a depthwise conv, a 7x7 conv and a 16-channel conv stay float by
    default; the 32-channel 1x1 and 3x3 convs are FP8; small_convs=True quantizes them all.
    Either way the model loads in ONNX Runtime, within the fp8 bound of the float model."""
    proto = _convs([(32, 1, 3), (32, 32, 3), (32, 1, 1), (32, 1, 3), (32, 1, 7), (16, 1, 1)])
    x = np.random.default_rng(1).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    every = {f"conv{i}" for i in range(6)}
    for small_convs, expected in [(False, {"conv2", "conv3"}), (True, every)]:
        compiled = qpass.compile(proto, preset="fp8", calibration={"input": x}, progress=False,
                                 small_convs=small_convs)
        quantized = {n.name for n in compiled.model.graph if n.op_type == "Conv"
                     and n.inputs[1].producer() is not None
                     and n.inputs[1].producer().op_type == "DequantizeLinear"}
        assert quantized == expected
        assert sqnr_db(run_onnx(proto, {"input": x})[0], compiled.run({"input": x})[0]) >= 20


def test_unknown_scale_constraint_is_refused():
    with pytest.raises(ValueError, match="scale constraint"):
        QuantScheme(dtype=FP8, scale_constraint="pow3")
    with pytest.raises(qpass.QpassError, match="scale_constraint"):
        qpass.compile(tiny_cnn(), preset="fp8", scale_constraint="pow3")


# ----------------------------------------------------------------------------- FP4 E2M1 (W4A8)

FP4_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def test_fp4_rounds_to_the_e2m1_grid_with_scale_amax_over_6():
    scheme = QuantScheme(dtype=FP4, symmetric=True)
    w = np.random.default_rng(0).normal(0, 1, 4096).astype(np.float32)
    scale, zero = scheme.scale_zero_point(w.min(), w.max())
    assert float(scale) == pytest.approx(np.abs(w).max() / 6, rel=1e-6)
    q = scheme.quantize(w, scale, zero).astype(np.float32)
    assert set(np.abs(q).tolist()) <= set(FP4_GRID.tolist()) and np.abs(q).max() == 6
    # round to nearest: no grid value is closer to w / scale than the chosen one
    candidates = np.concatenate([FP4_GRID, -FP4_GRID[1:]])
    best = np.abs(w[:, None] / scale - candidates[None, :]).min(axis=1)
    np.testing.assert_allclose(np.abs(w / scale - q), best, atol=1e-6)


def _matmul_model(k=64, n=16, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1 / np.sqrt(k), (k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("constraint", ["float", "pow2", "pow2-group"])
def test_fp4_block_scales(constraint):
    """One scale per block of g input channels per output channel; pow2: powers of two;
    pow2-group: powers of two below the largest block scale of the same output channel."""
    from qpass.passes.block_scaled_fp4 import quantize_blocks

    node = ir.from_proto(_matmul_model()).graph.node(0)
    w = np.random.default_rng(1).normal(0, 1, (64, 16)) * np.exp(np.linspace(-2, 2, 64))[:, None]
    scheme = QuantScheme(dtype=FP4, symmetric=True, group_size=16, scale_constraint=constraint)
    q, scale, axis, block = quantize_blocks(scheme, w.astype(np.float32), node)
    assert (axis, block, scale.shape) == (0, 16, (4, 16))
    free = np.abs(w.reshape(4, 16, 16)).max(axis=1) / 6
    assert np.all(scale >= free * (1 - 1e-6)) and np.all(scale < 2 * free)
    if constraint == "pow2":
        exponent = np.log2(scale.astype(np.float64))
    elif constraint == "pow2-group":
        np.testing.assert_allclose(scale.max(axis=0), free.max(axis=0), rtol=1e-6)
        exponent = np.log2(scale.max(axis=0) / scale.astype(np.float64))
    else:
        np.testing.assert_allclose(scale, free, rtol=1e-6)
        return
    np.testing.assert_allclose(exponent, np.round(exponent), atol=1e-6)
    dequantized = q * np.repeat(scale, 16, axis=0)
    assert sqnr_db(w, dequantized) >= 15


def test_w4a8_fp_simulation_equals_the_float4e2m1_graph(calibration):
    """storage="float8" (ORT runs it) and storage="float4" (FLOAT4E2M1, opset 23, which ORT 1.32
    cannot run: checked with the ONNX reference evaluator) compute the same numbers."""
    from onnx.reference import ReferenceEvaluator

    options = {"calibration": calibration, "progress": False, "group_size": 4}
    simulated = qpass.compile(tiny_cnn(), preset="w4a8-fp", **options)
    native = onnx.load_from_string(
        qpass.compile(tiny_cnn(), preset="w4a8-fp", storage="float4", **options).to_bytes()
    )
    onnx.checker.check_model(native)
    assert native.opset_import[0].version >= 23
    types = {i.data_type for i in native.graph.initializer if i.name.endswith("_quantized")}
    assert types == {TensorProto.FLOAT4E2M1}
    x = np.random.default_rng(5).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(
        simulated.run({"input": x})[0],
        ReferenceEvaluator(native).run(None, {"input": x})[0],
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("constraint", ["float", "pow2", "pow2-group"])
def test_w4a8_fp_tiny_cnn_runs_in_onnxruntime(calibration, constraint):
    proto = tiny_cnn()
    compiled = qpass.compile(
        proto, preset="w4a8-fp", calibration=calibration, progress=False, group_size=4,
        scale_constraint=constraint,
    )
    model = onnx.load_from_string(compiled.to_bytes())
    types = {i.data_type for i in model.graph.initializer if i.name.endswith("_quantized")}
    assert types == {TensorProto.FLOAT8E4M3FN}  # E2M1 values in FP8 storage
    x = np.random.default_rng(3).normal(0, 1, (8, 3, 16, 16)).astype(np.float32)
    assert sqnr_db(run_onnx(proto, {"input": x})[0], run_onnx(model, {"input": x})[0]) >= 12


def test_w4a8_fp_matmul_compiles_for_tensorrt_with_float4_storage():
    """FP4 weights (FLOAT4E2M1, blockwise) into a MatMul with FP8 data: TensorRT-legal."""
    rng = np.random.default_rng(0)
    compiled = qpass.compile(
        _matmul_model(), preset="w4a8-fp", calibration={"x": rng.normal(0, 1, (16, 64))
                                                        .astype(np.float32)},
        progress=False, group_size=16, storage="float4", target="tensorrt",
    )
    assert errors(compiled.findings) == []


def test_w4a8_fp_simulated_storage_is_refused_for_tensorrt():
    """Blockwise FP8 (the ORT simulation of FP4) is not something TensorRT reads."""
    rng = np.random.default_rng(0)
    with pytest.raises(qpass.QpassError, match="blockwise"):
        qpass.compile(
            _matmul_model(), preset="w4a8-fp", progress=False, group_size=16, target="tensorrt",
            storage="float8", calibration={"x": rng.normal(0, 1, (16, 64)).astype(np.float32)},
        )


def test_float_layers_leave_the_first_layers_in_float(calibration):
    """float_layers=N: the first N weighted layers read float data and float weights, no Q/DQ
    pair is left between them, the later layers stay FP8 and the graph lints clean."""
    proto = tiny_cnn()
    compiled = qpass.compile(
        proto, preset="fp8", calibration=calibration, progress=False, float_layers=1,
        target="tensorrt", small_convs=True,
    )
    assert errors(compiled.findings) == []
    model = onnx.load_from_string(compiled.to_bytes())
    producers = {o: n for n in model.graph.node for o in n.output}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    first, rest = weighted[0], weighted[1:]
    assert first.input[0] == "input" and first.input[1] not in producers
    for node in rest:  # DQ, or DQ -> Relu (InsertQDQ rule 6 moves FP8 pairs before a Relu)
        sources = [producers[i] for i in node.input[:2]]
        sources = [producers[s.input[0]] if s.op_type == "Relu" else s for s in sources]
        assert all(s.op_type == "DequantizeLinear" for s in sources)


def test_fp8_bias_correction_on_a_layer_with_large_weights():
    """Bias correction runs the quantized graph, whose FP8 initializers (here 64 KiB each) must
    reach ONNX Runtime as initializers: numpy float8 arrays cannot be fed as inputs."""
    rng = np.random.default_rng(0)
    c = 256
    inits = [
        numpy_helper.from_array(rng.normal(0, c**-0.5, (c, c, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, c**-0.5, (c, c, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"),
        ],
        "pointwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", c, 4, 4])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calibration = {"x": rng.normal(0, 1, (16, c, 4, 4)).astype(np.float32)}
    compiled = qpass.compile(
        proto, preset="fp8", calibration=calibration, progress=False, correct_bias=True,
        small_convs=True,
    )
    x = rng.normal(0, 1, (4, c, 4, 4)).astype(np.float32)
    assert sqnr_db(run_onnx(proto, {"x": x})[0], compiled.run({"x": x})[0]) >= 20


def _masked_attention():
    """scores = x @ W; softmax(scores + mask) @ x, the mask 0 or float32's lowest (as Hugging
    Face transformers write it)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"], name="scores"),
            helper.make_node("Add", ["scores", "mask"], ["masked"], name="mask_add"),
            helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
            helper.make_node("MatMul", ["p", "x"], ["y"], name="mix"),
        ],
        "attention",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _mask_feed(rng, n):
    mask = np.zeros((n, 1, 8), np.float32)
    mask[:, :, 6:] = np.finfo(np.float32).min  # the last two positions are padding
    return {"x": rng.normal(0, 1, (n, 8, 16)).astype(np.float32), "mask": mask}


@pytest.mark.parametrize("preset", ["fp8", "int8"])
def test_masking_sentinels_are_not_quantized(preset):
    """InsertQDQ rule 7: the mask and the masked scores (range ~3.4e38) stay float; quantizing
    them would round every real score to zero (uniform attention)."""
    rng = np.random.default_rng(1)
    proto = _masked_attention()
    compiled = qpass.compile(
        proto, preset=preset, calibration=_mask_feed(rng, 16), progress=False
    )
    model = onnx.load_from_string(compiled.to_bytes())
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert "scores" in quantized and not {"mask", "masked"} & quantized
    feed = _mask_feed(rng, 4)
    assert sqnr_db(run_onnx(proto, feed)[0], run_onnx(model, feed)[0]) >= 15
