"""AdaRound reconstructs every layer's float output at least as well as round to nearest; the
w4a8 preset (per-channel INT4 weights with AdaRound, U8 activations) compiles through the API
and the CLI into a model ONNX Runtime runs, with int4 weights and int32 biases."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import random_mlp, run_onnx, sqnr_db, tiny_cnn
from onnx import TensorProto
from qpass.runtime import onnxruntime as rt

import qpass
from qpass.calibration import Context
from qpass.calibration.context import with_outputs
from qpass.cli import main
from qpass.passes import FoldBatchNorm, InsertQDQ
from qpass.passes.adaround import AdaRound
from qpass.presets import canonicalize
from qpass.schemes import WEIGHT_INT4_CHANNEL

LAYERS = ("Conv", "Gemm", "MatMul")


def adarounded(proto: onnx.ModelProto, calibration: dict, kind=AdaRound, **options):
    """(float model after BN folding, W4A8 model with AdaRound (or `kind`), the pass)."""
    model = ir.from_proto(proto)
    context = Context(calibration, model.graph, progress=False)
    rounding = kind(context, **options)
    ir.passes.PassManager([*canonicalize(), FoldBatchNorm()])(model)
    reference = ir.to_proto(model)
    for p in (rounding.snapshot(), InsertQDQ(context, weights=WEIGHT_INT4_CHANNEL), rounding):
        p(model)
    return reference, model, rounding


def weight_dequantize(node: ir.Node) -> ir.Node:
    return node.inputs[1].producer()


def const(value: ir.Value) -> np.ndarray:
    return ir.convenience.get_const_tensor(value).numpy()


def nearest_integers(float_weight: np.ndarray, dq: ir.Node) -> np.ndarray:
    """Round to nearest on the DequantizeLinear's own scale (symmetric int4, per channel)."""
    scale = const(dq.inputs[1])
    axis = dq.attributes["axis"].value if "axis" in dq.attributes else 0
    view = [1] * float_weight.ndim
    view[axis] = -1
    return np.clip(np.rint(float_weight / scale.reshape(view)), -8, 7)


def observed(model: ir.Model, node: ir.Node) -> tuple[str, tuple[float, float]]:
    """The tensor a layer's reconstruction is measured on: the output of a Relu or Clip(0, 6)
    that alone follows it (with its bounds), else the layer's output."""
    value = node.outputs[0]
    readers = value.consumers()
    if len(readers) == 1 and readers[0].op_type == "Relu":
        return readers[0].outputs[0].name, (0.0, np.inf)
    if len(readers) == 1 and readers[0].op_type == "Clip":
        low, high = (float(const(v)) for v in readers[0].inputs[1:3])
        return readers[0].outputs[0].name, (low, high)
    return value.name, (-np.inf, np.inf)


def fetch(model, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    data = with_outputs(ir.from_proto(proto), names)
    return rt.session(data, optimize=False).run(names, {"input": x})


def reconstruction_errors(reference, model: ir.Model, x: np.ndarray):
    """Per layer (graph order): mean squared error of its (activated) output against the float
    model's, with the learned integers and with round to nearest in that layer alone; both read
    the same input (the quantized graph with the learned layers above)."""
    float_weights = {
        n.outputs[0].name: const(n.inputs[1])
        for n in ir.from_proto(reference).graph
        if n.op_type in LAYERS
    }
    layers = [n for n in model.graph if n.op_type in LAYERS]
    watched = [observed(model, n) for n in layers]
    names = [name for name, _ in watched]
    targets = fetch(reference, names, x)
    learned = fetch(model, names, x)
    errors = []
    for i, node in enumerate(layers):
        dq = weight_dequantize(node)
        kept = const(dq.inputs[0])
        nearest = nearest_integers(float_weights[node.outputs[0].name], dq)
        dq.inputs[0].const_value = ir.tensor(nearest.astype(kept.dtype))
        (rounded,) = fetch(model, [names[i]], x)
        dq.inputs[0].const_value = ir.tensor(kept)
        errors.append(
            (np.mean((learned[i] - targets[i]) ** 2), np.mean((rounded - targets[i]) ** 2))
        )
    return np.array(errors)


@pytest.mark.parametrize("seed", range(4))
def test_every_layer_reconstructs_at_least_as_well_as_round_to_nearest(seed):
    rng = np.random.default_rng(seed)
    proto = tiny_cnn(seed, channels=16)
    calibration = {"input": rng.uniform(-1, 2, (32, 3, 16, 16)).astype(np.float32)}
    reference, model, rounding = adarounded(proto, calibration, iterations=300)
    errors = reconstruction_errors(reference, model, calibration["input"])
    assert len(errors) == 3
    assert np.all(errors[:, 0] <= errors[:, 1] * (1 + 1e-5)), errors
    changed = [r.changed for r in rounding.results.values()]
    assert sum(c > 0 for c in changed) >= 2, rounding.results  # it did learn something
    assert np.sum(errors[:, 0] < errors[:, 1]) >= 2, errors


@pytest.mark.parametrize("held_out", [0.0, 0.2])
@pytest.mark.parametrize("seed", range(3))
def test_matmul_and_gemm_layers_reconstruct_at_least_as_well_as_round_to_nearest(seed, held_out):
    proto = random_mlp(seed)
    x = np.random.default_rng(seed).normal(0, 1, (48, 6, 24)).astype(np.float32)
    reference, model, _ = adarounded(proto, {"input": x}, iterations=300, held_out=held_out)
    errors = reconstruction_errors(reference, model, x)
    assert len(errors) == 2
    assert np.all(errors[:, 0] <= errors[:, 1] * (1 + 1e-5)), errors
    assert np.any(errors[:, 0] < errors[:, 1]), errors


def test_learned_integers_round_each_weight_up_or_down_with_int32_biases(
    tiny_model, tiny_calibration
):
    reference, model, rounding = adarounded(tiny_model, tiny_calibration, iterations=100)
    float_weights = {
        n.outputs[0].name: const(n.inputs[1])
        for n in ir.from_proto(reference).graph
        if n.op_type in LAYERS
    }
    layers = [n for n in model.graph if n.op_type in LAYERS]
    for node in layers:
        dq = weight_dequantize(node)
        assert dq.inputs[0].dtype == ir.DataType.INT4
        q, scale = const(dq.inputs[0]).astype(np.float64), const(dq.inputs[1])
        assert scale.shape == (q.shape[0],)  # per output channel (Conv, Gemm transB=1: axis 0)
        exact = float_weights[node.outputs[0].name] / scale.reshape([-1] + [1] * (q.ndim - 1))
        assert np.all((q == np.floor(exact)) | (q == np.ceil(exact)) | (q == -8) | (q == 7))
        bias = node.inputs[2].producer()
        assert bias.inputs[0].dtype == ir.DataType.INT32
        x_scale = const(node.inputs[0].producer().inputs[1])
        np.testing.assert_allclose(const(bias.inputs[1]), x_scale * scale, rtol=1e-6)
    assert set(rounding.results) == {n.outputs[0].name for n in layers}


def test_adaround_without_a_snapshot_says_what_to_do(tiny_model, tiny_calibration):
    model = ir.from_proto(tiny_model)
    context = Context(tiny_calibration, model.graph, progress=False)
    InsertQDQ(context, weights=WEIGHT_INT4_CHANNEL)(model)
    with pytest.raises(ir.passes.PreconditionError, match="snapshot"):
        AdaRound(context)(model)


@pytest.mark.parametrize(
    "options", [{"iterations": 0}, {"warmup": 1.0}, {"rows": 0}, {"held_out": 1.0}]
)
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        AdaRound(**options)


def test_w4a8_preset_runs_in_onnx_runtime_closer_to_float_than_round_to_nearest(tmp_path):
    proto = tiny_cnn(3, channels=16)
    rng = np.random.default_rng(3)
    calibration = {"input": rng.uniform(-1, 2, (64, 3, 16, 16)).astype(np.float32)}
    held_out = rng.uniform(-1, 2, (64, 3, 16, 16)).astype(np.float32)
    expected = run_onnx(proto, {"input": held_out})[0]
    learned = qpass.compile(proto, preset="w4a8", calibration=calibration, progress=False)
    nearest = qpass.compile(proto, preset="w4a8-rtn", calibration=calibration, progress=False)
    assert learned.model.opset_imports[""] >= 21
    int4 = [n for n in learned.model.graph
            if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT4]
    assert len(int4) == 3
    kernels = rt.optimized_op_types(learned.to_bytes())
    assert kernels.get("QLinearAdd") == 1 and kernels.get("Conv") == 2  # int4 conv runs in float
    good = sqnr_db(expected, learned.run({"input": held_out})[0])
    plain = sqnr_db(expected, nearest.run({"input": held_out})[0])
    assert good > 20 and good > plain + 1, (good, plain)


def test_cli_compiles_the_w4a8_preset(tiny_model, tiny_calibration, tmp_path):
    onnx.save(tiny_model, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **tiny_calibration)
    out = tmp_path / "model.w4a8.onnx"
    argv = ["compile", str(tmp_path / "model.onnx"), "-o", str(out), "--preset", "w4a8"]
    assert main([*argv, "--calib", str(tmp_path / "calib.npz"), "-q", "--iterations", "200"]) == 0
    model = onnx.load(out)
    int4 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.INT4}
    weights = [
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4
    ]
    assert len(weights) == 3
    x = tiny_calibration["input"][:8]
    expected = run_onnx(tiny_model, {"input": x})[0]
    assert sqnr_db(expected, rt.session(out).run(None, {"input": x})[0]) > 15


@pytest.mark.slow
def test_every_resnet20_layer_reconstructs_at_least_as_well_as_round_to_nearest(real_models):
    data = pytest.importorskip("benchmarks.data")
    calibration, _ = data.cifar10("calibration", limit=64)
    proto = onnx.load(real_models["resnet20"])
    reference, model, _ = adarounded(proto, {"input": calibration}, iterations=200)
    errors = reconstruction_errors(reference, model, calibration)
    assert len(errors) == 20
    assert np.all(errors[:, 0] <= errors[:, 1] * (1 + 1e-5)), errors
    assert np.sum(errors[:, 0] < errors[:, 1]) >= 15, errors


@pytest.mark.slow
def test_w4a8_adaround_recovers_resnet20_predictions(real_models):
    """Round to nearest at 4 bits changes ~15% of ResNet20's CIFAR-10 predictions; AdaRound
    keeps them much closer to FP32."""
    data = pytest.importorskip("benchmarks.data")
    calibration, _ = data.cifar10("calibration", limit=128)
    images, _ = data.cifar10("evaluation", limit=1000)
    model = real_models["resnet20"]

    def agreement(preset: str, **options) -> float:
        compiled = qpass.compile(
            model, preset=preset, calibration={"input": calibration}, progress=False, **options
        )
        return float(np.mean(compiled.run({"input": images})[0].argmax(1) == reference))

    reference = rt.session(model).run(None, {"input": images})[0].argmax(1)
    learned, nearest = agreement("w4a8", iterations=200), agreement("w4a8-rtn")
    assert learned >= max(nearest + 0.03, 0.9), (learned, nearest)


def test_cli_refuses_zero_iterations(tiny_model, tiny_calibration, tmp_path, capsys):
    onnx.save(tiny_model, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **tiny_calibration)
    argv = ["compile", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "out.onnx")]
    argv += ["--preset", "w4a8", "--calib", str(tmp_path / "calib.npz"), "--iterations", "0"]
    assert main(argv) == 2
    assert "iterations" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()
