"""InsertQDQ, FuseRequant and LowerForOnnxRuntime: error bounds, exactness, ORT fusion."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_onnx, sqnr_db, tiny_cnn
from hypothesis import given, settings
from hypothesis import strategies as st
from qpass.runtime import onnxruntime as rt

import qpass
from qpass.calibration import Context
from qpass.passes import FoldBatchNorm, FuseRequant, InsertQDQ, LowerForOnnxRuntime
from qpass.presets import canonicalize
from qpass.schemes import QuantScheme


def quantize(proto, calibration, fuse=True, lower=True, activations=None):
    model = ir.from_proto(proto)
    context = Context(calibration, model.graph, progress=False)
    passes = [
        *canonicalize(),
        FoldBatchNorm(),
        InsertQDQ(context, activations=activations or QuantScheme()),
    ]
    passes += [FuseRequant()] if fuse else []
    passes += [LowerForOnnxRuntime()] if lower else []
    for p in passes:
        model = p(model).model
    return ir.to_proto(model)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    channels=st.sampled_from([4, 8, 16]),
    method=st.sampled_from(["minmax", "percentile", "entropy", "mse"]),
)
def test_int8_error_is_bounded_on_random_cnns(seed, channels, method):
    """W8A8 on a random Conv/BN/Relu/Add/Clip/MaxPool/GAP/Gemm graph keeps output SQNR >= 20 dB."""
    proto = tiny_cnn(seed, channels)
    rng = np.random.default_rng(seed)
    calibration = {"input": rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32)}
    quantized = quantize(proto, calibration, activations=QuantScheme(method=method))
    x = rng.normal(0, 1, (8, 3, 16, 16)).astype(np.float32)
    assert sqnr_db(run_onnx(proto, {"input": x})[0], run_onnx(quantized, {"input": x})[0]) >= 20


def test_every_conv_gemm_and_add_fuses_into_integer_kernels(tiny_model, tiny_calibration):
    kernels = rt.optimized_op_types(quantize(tiny_model, tiny_calibration).SerializeToString())
    assert kernels.get("QLinearConv") == 2
    assert kernels.get("QGemm") == 1
    assert kernels.get("QLinearAdd") == 1
    assert "Conv" not in kernels and "Gemm" not in kernels


def test_fuse_requant_drops_clamps_exactly(tiny_model, tiny_calibration):
    """Rule 1: removing Relu/Clip before a Q whose range lies inside the clamp changes nothing."""
    unfused = quantize(tiny_model, tiny_calibration, fuse=False, lower=False)
    fused = quantize(tiny_model, tiny_calibration, fuse=True, lower=False)
    ops = [n.op_type for n in fused.graph.node]
    assert "Relu" not in ops and "Clip" not in ops
    x = tiny_calibration["input"][:8]
    np.testing.assert_array_equal(
        run_onnx(unfused, {"input": x})[0], run_onnx(fused, {"input": x})[0]
    )


def test_fuse_requant_shares_scale_through_maxpool_and_flatten(tiny_model, tiny_calibration):
    """Rule 2: the Q after MaxPool/Flatten reuses the scale of the DQ before it."""
    model = ir.from_proto(quantize(tiny_model, tiny_calibration, lower=False))
    for node in model.graph:
        if node.op_type in ("MaxPool", "Flatten"):
            dq = node.inputs[0].producer()
            q = node.outputs[0].consumers()[0]
            assert dq.op_type == "DequantizeLinear" and q.op_type == "QuantizeLinear"
            for i in (1, 2):
                np.testing.assert_array_equal(
                    q.inputs[i].const_value.numpy(), dq.inputs[i].const_value.numpy()
                )


def test_lowering_shifts_int8_activations_to_uint8_exactly(tiny_model, tiny_calibration):
    """Rule 1 of the lowering: s8 activations become u8 with z + 128, the same real values."""
    signed = QuantScheme(dtype="int8", symmetric=True)
    s8 = quantize(tiny_model, tiny_calibration, lower=False, activations=signed)
    u8 = quantize(tiny_model, tiny_calibration, lower=True, activations=signed)
    activation_types = {n.output[0]: n for n in u8.graph.node if n.op_type == "QuantizeLinear"}
    assert activation_types
    for value in ir.from_proto(u8).graph:
        if value.op_type == "QuantizeLinear":
            assert value.outputs[0].dtype == ir.DataType.UINT8
    x = tiny_calibration["input"][:8]
    np.testing.assert_allclose(
        run_onnx(s8, {"input": x})[0], run_onnx(u8, {"input": x})[0], rtol=1e-5, atol=1e-5
    )
    # The Relu after the first Conv stays (a symmetric range is not inside [0, inf)), so only the
    # second Conv's output is quantized directly; with s8 activations neither Conv fuses.
    assert rt.optimized_op_types(u8.SerializeToString()).get("QLinearConv") == 1
    assert rt.optimized_op_types(s8.SerializeToString()).get("QLinearConv", 0) == 0


def test_weights_are_per_channel_int8_and_bias_int32(tiny_model, tiny_calibration):
    model = ir.from_proto(quantize(tiny_model, tiny_calibration))
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm"):
            w_dq = node.inputs[1].producer()
            assert w_dq.inputs[0].dtype == ir.DataType.INT8
            assert w_dq.inputs[1].const_value.numpy().shape == (w_dq.inputs[0].shape[0],)
            assert np.abs(w_dq.inputs[0].const_value.numpy()).max() <= 127
            assert node.inputs[2].producer().inputs[0].dtype == ir.DataType.INT32


def test_compile_accepts_a_torch_module():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 14 * 14, 4),
    )
    module.eval()
    x = torch.randn(2, 3, 16, 16)
    calibration = [
        np.random.default_rng(i).normal(size=(4, 3, 16, 16)).astype(np.float32) for i in range(4)
    ]
    compiled = qpass.compile(module, calibration=calibration, example_inputs=x, progress=False)
    assert compiled.model.graph.inputs[0].shape[0] != 2  # batch stays dynamic
    y = compiled.run({compiled.model.graph.inputs[0].name: np.ones((5, 3, 16, 16), np.float32)})
    assert y[0].shape == (5, 4)
    expected = module(x).detach().numpy()
    actual = compiled.run({compiled.model.graph.inputs[0].name: x.numpy()})[0]
    assert sqnr_db(expected, actual) > 25


def test_report_lists_every_quantized_op(tiny_model, tiny_calibration, tmp_path):
    compiled = qpass.compile(tiny_model, calibration=tiny_calibration, progress=False)
    report = compiled.report()
    assert sorted(r.op_type for r in report.layers) == [
        "Add",
        "Conv",
        "Conv",
        "Gemm",
        "GlobalAveragePool",
    ]
    assert all(15 < r.sqnr_db < 80 for r in report.layers)
    assert report.outputs["logits"] > 20
    assert report.kernels["QLinearConv"] == 2
    html = report.save(tmp_path / "r.html").read_text()
    assert "<svg" in html and "QLinearConv" in html
    assert "| Conv |" in report.save(tmp_path / "r.md").read_text()


def test_saved_model_passes_the_checker_and_runs(tiny_model, tiny_calibration, tmp_path):
    compiled = qpass.compile(tiny_model, calibration=tiny_calibration, progress=False)
    path = compiled.save(tmp_path / "q.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    unused = [v.name for v in compiled.model.graph.initializers.values() if not v.uses()]
    assert not unused  # the float weights replaced by int8 copies are gone
    x = tiny_calibration["input"][:3]
    np.testing.assert_array_equal(
        rt.session(path).run(None, {"input": x})[0], compiled.run({"input": x})[0]
    )


def test_fold_constants_exposes_clip_bounds_and_preserves_outputs(tiny_model, tiny_calibration):
    """CastLike'd Clip bounds (as unoptimized exports write them) become constants."""
    from onnx import TensorProto, helper

    from qpass.passes import FoldConstants

    graph = tiny_model.graph
    clip = next(n for n in graph.node if n.op_type == "Clip")
    graph.node.insert(0, helper.make_node("Cast", ["hi"], ["hi_cast"], to=TensorProto.FLOAT))
    clip.input[2] = "hi_cast"
    model = ir.from_proto(tiny_model)
    assert FoldConstants()(model).modified
    assert "Cast" not in [n.op_type for n in model.graph]
    x = tiny_calibration["input"][:4]
    np.testing.assert_array_equal(
        run_onnx(tiny_model, {"input": x})[0], run_onnx(ir.to_proto(model), {"input": x})[0]
    )


def test_fold_constants_skips_onnxscript_when_nothing_folds(tmp_path, tiny_model):
    """Nothing to fold: onnxscript (0.5 s, 30 MB) is not imported at all."""
    import subprocess
    import sys

    onnx.save(tiny_model, tmp_path / "m.onnx")
    code = (
        "import sys, onnx_ir as ir; from qpass.passes import FoldConstants; "
        f"m = ir.load({str(tmp_path / 'm.onnx')!r}); "
        "assert not FoldConstants()(m).modified; print('onnxscript' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_capture_falls_back_to_torchscript_with_a_warning():
    torch = pytest.importorskip("torch")

    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.relu() if y.sum() > 0 else -y

    with pytest.warns(UserWarning, match="falling back to the TorchScript ONNX exporter"):
        model = qpass.capture(DataDependent().eval(), torch.randn(2, 3, 8, 8))
    assert "Conv" in [n.op_type for n in model.graph]
    assert not isinstance(model.graph.inputs[0].shape[0], int)  # batch stays dynamic


def image_model(nodes, initializers) -> onnx.ModelProto:
    """Opset-17 model from `nodes` reading "input" [b, 3, 16, 16] and writing "y"."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "graph",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_concat_inputs_share_the_output_scale(tiny_calibration):
    """Rule 5: the Q/DQ pairs feeding a Concat take the Concat output's scale and zero point."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(0, s, (4, 3, 3, 3)).astype(np.float32), f"w{i}")
        for i, s in enumerate((0.1, 1.0))
    ]
    head = numpy_helper.from_array(rng.normal(0, 0.3, (2, 8, 1, 1)).astype(np.float32), "wh")
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["a"], pads=[1] * 4),
        helper.make_node("Conv", ["input", "w1"], ["b"], pads=[1] * 4),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Conv", ["c", "wh"], ["y"]),
    ]
    proto = image_model(nodes, [*weights, head])
    model = ir.from_proto(quantize(proto, tiny_calibration, lower=False))
    concat = next(n for n in model.graph if n.op_type == "Concat")
    out_q = concat.outputs[0].consumers()[0]
    for value in concat.inputs:
        source_q = value.producer().inputs[0].producer()
        assert source_q.inputs[1].const_value.numpy() == out_q.inputs[1].const_value.numpy()
    x = tiny_calibration["input"][:4]
    expected = run_onnx(proto, {"input": x})[0]
    assert sqnr_db(expected, run_onnx(ir.to_proto(model), {"input": x})[0]) > 25


def test_scale_is_shared_through_a_chain_of_scale_preserving_ops(tiny_calibration):
    """Rule 2 through ResNet's option-A shortcut (Slice -> Slice -> Pad with zero channels): the
    Q after the chain takes the scale of the DQ before it, so the shortcut's integers are
    exactly the strided, zero-padded integers of its input (no second rounding)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "w2")
    ints = {name: numpy_helper.from_array(np.array(v, np.int64), name) for name, v in {
        "start": [0, 0], "end": [2**31, 2**31], "axes": [2, 3], "step": [2, 2],
        "cstart": [0], "cend": [4], "caxis": [1], "pads": [0, 2, 0, 0, 0, 2, 0, 0],
    }.items()}
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["a"], pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["branch"], pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Slice", ["r", "start", "end", "axes", "step"], ["s1"]),
        helper.make_node("Slice", ["s1", "cstart", "cend", "caxis"], ["s2"]),
        helper.make_node("Pad", ["s2", "pads"], ["shortcut"]),
        helper.make_node("Add", ["branch", "shortcut"], ["y"]),
    ]
    proto = image_model(nodes, [w, w2, *ints.values()])
    model = ir.from_proto(quantize(proto, tiny_calibration, lower=False))
    pad = next(n for n in model.graph if n.op_type == "Pad")
    pad_q = pad.outputs[0].consumers()[0]
    source = pad
    while source.op_type != "DequantizeLinear":
        source = source.inputs[0].producer()
    for i in (1, 2):
        np.testing.assert_array_equal(
            pad_q.inputs[i].const_value.numpy(), source.inputs[i].const_value.numpy()
        )
    probe = ir.to_proto(model)
    probe.graph.output.extend([
        helper.make_tensor_value_info(source.outputs[0].name, TensorProto.FLOAT, None),
        helper.make_tensor_value_info(pad_q.outputs[0].consumers()[0].outputs[0].name,
                                      TensorProto.FLOAT, None),
    ])
    _, dequantized, shortcut = run_onnx(probe, {"input": tiny_calibration["input"][:4]})
    expected = np.pad(dequantized[:, :, ::2, ::2], [(0, 0), (2, 2), (0, 0), (0, 0)])
    np.testing.assert_array_equal(shortcut, expected)


def test_capture_restores_the_modules_training_mode():
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    qpass.capture(module, torch.randn(2, 3, 8, 8))
    assert module.training and all(m.training for m in module.modules())
    qpass.capture(module.eval(), torch.randn(2, 3, 8, 8))
    assert not any(m.training for m in module.modules())
