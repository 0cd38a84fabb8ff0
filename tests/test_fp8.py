"""FP8 E4M3 schemes, Q/DQ insertion and the fp8 preset, checked against ONNX Runtime."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import run_onnx, sqnr_db, tiny_cnn
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.lint import errors, lint_tensorrt
from qpass.passes.insert_qdq import _weight_params
from qpass.schemes import FP8, QuantScheme

WEIGHTS = QuantScheme(dtype=FP8, per_channel=True, symmetric=True)


def fake_quantize_weight(scheme: QuantScheme, w: np.ndarray) -> np.ndarray:
    scale, zero = _weight_params(scheme, w, 0)
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
        proto, preset="fp8", calibration=calibration, progress=False, scale_constraint=constraint
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
        proto, preset="fp8", calibration=calibration, progress=False, correct_bias=True
    )
    x = np.random.default_rng(3).normal(0, 1, (8, 3, 16, 16)).astype(np.float32)
    assert sqnr_db(run_onnx(proto, {"input": x})[0], compiled.run({"input": x})[0]) >= 20


def test_fp8_graph_means_the_same_in_onnxruntime_and_the_onnx_reference(calibration):
    """ORT's fusions must not change an FP8 graph (it drops a Relu before a Q, see InsertQDQ)."""
    from onnx.reference import ReferenceEvaluator

    compiled = qpass.compile(tiny_cnn(), preset="fp8", calibration=calibration, progress=False)
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
        tiny_cnn(), preset="fp8", calibration=calibration, progress=False, target="tensorrt"
    )
    assert errors(compiled.findings) == []


def test_unknown_scale_constraint_is_refused():
    with pytest.raises(ValueError, match="scale constraint"):
        QuantScheme(dtype=FP8, scale_constraint="pow3")
    with pytest.raises(qpass.QpassError, match="scale constraint"):
        qpass.compile(tiny_cnn(), preset="fp8", scale_constraint="pow3")
