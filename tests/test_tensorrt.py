"""TensorRT target: every linter rule fails on a graph that breaks exactly it, LowerForTensorRT
repairs what it can, the int8 preset's TensorRT output is clean, the CLI refuses illegal graphs.

TensorRT itself cannot be installed here: these checks are static; numerics run in ONNX Runtime.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_onnx, sqnr_db, tiny_cnn
from onnx import TensorProto, helper
from qpass.runtime import tensorrt as trt_runtime

import qpass
from qpass import presets
from qpass.cli import main
from qpass.lint import RULES, errors, format_findings, lint_tensorrt
from qpass.passes import LowerForTensorRT
from qpass.passes.tensorrt_rules import is_quantized_weighted

SHAPE = [1, 4, 8, 8]


class Graph:
    """A tiny ONNX graph builder: float input x [1, 4, 8, 8], Q/DQ pairs, int8 weights."""

    def __init__(self, inputs=("x",)):
        self.nodes, self.inits = [], []
        self.inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, SHAPE) for n in inputs]
        self.count = 0

    def name(self, base):
        self.count += 1
        return f"{base}{self.count}"

    def tensor(self, base, dtype, dims, values):
        name = self.name(base)
        self.inits.append(helper.make_tensor(name, dtype, dims, np.ravel(values).tolist()))
        return name

    def op(self, op_type, inputs, **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def qdq(self, x, scale=0.02, zero=0, dtype=TensorProto.INT8, axis=None, zero_dims=None):
        scale = np.atleast_1d(np.asarray(scale, np.float32))
        dims = [] if scale.size == 1 else [scale.size]
        s = self.tensor("s", TensorProto.FLOAT, dims, scale)
        z = self.tensor(
            "z", dtype, dims if zero_dims is None else zero_dims, np.full(scale.size, zero)
        )
        attrs = {} if axis is None else {"axis": axis}
        return self.op(
            "DequantizeLinear", [self.op("QuantizeLinear", [x, s, z], **attrs), s, z], **attrs
        )

    def weight(self, shape, axis=0, dtype=TensorProto.INT8, block_size=None, scale_shape=None):
        values = np.random.default_rng(self.count).integers(-7, 8, shape)
        w = self.tensor("w", dtype, list(shape), values)
        scale_shape = [shape[axis]] if scale_shape is None else scale_shape
        s = self.tensor("ws", TensorProto.FLOAT, scale_shape, np.full(scale_shape, 0.01))
        z = self.tensor("wz", dtype, scale_shape, np.zeros(scale_shape))
        attrs = {"axis": axis} | ({"block_size": block_size} if block_size else {})
        return self.op("DequantizeLinear", [w, s, z], **attrs)

    def conv(self, x, w=None, op_type="Conv", **weight):
        return self.op(op_type, [x, w or self.weight((4, 4, 3, 3), **weight)], pads=[1] * 4)

    def model(self, output, opset=17):
        graph = helper.make_graph(
            self.nodes,
            "g",
            self.inputs,
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def legal_conv(opset=17, **qdq):
    g = Graph()
    return g.model(g.conv(g.qdq("x", **qdq)), opset)


def matmul_w4(shape=(8, 6), block_size=4, opset=21, quantize_input=False, dtype=TensorProto.INT4):
    g = Graph()
    x = g.op("Reshape", ["x", g.tensor("shape", TensorProto.INT64, [2], [-1, shape[0]])])
    if quantize_input:
        x = g.qdq(x, dtype=TensorProto.INT4)
    blocks = [-(-shape[0] // block_size), shape[1]] if block_size else [shape[1]]
    w = g.weight(
        shape,
        axis=0 if block_size else 1,
        dtype=dtype,
        block_size=block_size,
        scale_shape=blocks,
    )
    return g.model(g.op("MatMul", [x, w]), opset)


def fp4_matmul(opset=23, block_size=4):
    """W4A8 in floating point: FP8 data, blockwise FP4 weight [8, 6]."""
    g = Graph()
    x = g.op("Reshape", ["x", g.tensor("shape", TensorProto.INT64, [2], [-1, 8])])
    x = g.qdq(x, dtype=TensorProto.FLOAT8E4M3FN)
    w = g.weight(
        (8, 6),
        axis=0 if block_size else 1,
        dtype=TensorProto.FLOAT4E2M1,
        block_size=block_size,
        scale_shape=[2, 6] if block_size else [6],
    )
    return g.model(g.op("MatMul", [x, w]), opset)


def fp4_conv():
    g = Graph()
    w = g.weight((4, 4, 3, 3), dtype=TensorProto.FLOAT4E2M1)
    return g.model(g.conv(g.qdq("x", dtype=TensorProto.FLOAT8E4M3FN), w), 23)


def int4_conv():
    g = Graph()
    w = g.weight(
        (4, 4, 3, 2), axis=1, dtype=TensorProto.INT4, block_size=2, scale_shape=[4, 2, 3, 2]
    )
    return g.model(g.op("Conv", [g.qdq("x"), w]), 21)


def int32_bias():
    g = Graph()
    b = g.tensor("b", TensorProto.INT32, [4], [100, -50, 7, 0])
    s = g.tensor("bs", TensorProto.FLOAT, [4], [2e-4] * 4)
    bias = g.op("DequantizeLinear", [b, s], axis=0)
    return g.model(g.op("Conv", [g.qdq("x"), g.weight((4, 4, 3, 3)), bias], pads=[1] * 4))


def computed_scale():
    g = Graph(inputs=("x", "s"))
    g.inputs[1] = helper.make_tensor_value_info("s", TensorProto.FLOAT, [])
    z = g.tensor("z", TensorProto.INT8, [], [0])
    x = g.op("DequantizeLinear", [g.op("QuantizeLinear", ["x", "s", z]), "s", z])
    return g.model(g.conv(x))


def weight_on_add():
    g = Graph()
    bias = g.weight((1, 4, 1, 1), axis=1)
    return g.model(g.op("Add", [g.conv(g.qdq("x")), bias]))


def float_data_conv():
    g = Graph()
    return g.model(g.conv("x"))


def float_weight_conv():
    g = Graph()
    w = g.tensor("wf", TensorProto.FLOAT, [4, 4, 3, 3], np.full(144, 0.1))
    return g.model(g.conv(g.qdq("x"), w))


def residual(quantize_residual: bool, conv_output_qdq: bool):
    g = Graph()
    x = g.qdq("x")
    y = g.conv(x)
    y = g.qdq(y) if conv_output_qdq else y
    return g.model(g.op("Add", [y, x if quantize_residual else "x"]))


def output_qdq():
    g = Graph()
    return g.model(g.qdq(g.conv(g.qdq("x"))))


def concat(scales=(0.02, 0.05)):
    g = Graph(inputs=("x", "x2"))
    joined = g.op("Concat", [g.qdq("x", scales[0]), g.qdq("x2", scales[1])], axis=1)
    w = g.weight((4, 8, 3, 3))
    return g.model(g.op("Conv", [g.qdq(joined, max(scales)), w], pads=[1] * 4))


def fp8_activation(opset):
    g = Graph()
    return g.model(g.conv(g.qdq("x", dtype=TensorProto.FLOAT8E4M3FN)), opset)


def int4_plugin(version="1", block_size=8, quantize_input=False, domain=True):
    """x [1, 4, 8, 8] -> Reshape [-1, 8] -> (Q/DQ) -> qpass::Int4GroupGemm (K 8, N 6, g 8)."""
    from qpass.plugin_spec import DOMAIN, DOMAIN_VERSION

    g = Graph()
    x = g.op("Reshape", ["x", g.tensor("shape", TensorProto.INT64, [2], [-1, 8])])
    if quantize_input:
        x = g.qdq(x)
    b = g.tensor("b", TensorProto.UINT8, [6, 1, 4], np.arange(24) * 7 % 256)
    s = g.tensor("s", TensorProto.FLOAT, [6, 1], np.full(6, 0.01))
    z = g.tensor("z", TensorProto.UINT8, [6, 1], np.full(6, 8))
    out = g.name("gemm")
    g.nodes.append(
        helper.make_node(
            "Int4GroupGemm", [x, b, s, z], [out], name=out, domain=DOMAIN,
            plugin_namespace="qpass", plugin_version=version, block_size=block_size,
        )
    )
    model = g.model(out, 21)
    if domain:
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


def third_party_plugin(quantize_input=False):
    """x -> Reshape [-1, 8] -> acme::FancyGemm: a plugin of another namespace than qpass's."""
    g = Graph()
    x = g.op("Reshape", ["x", g.tensor("shape", TensorProto.INT64, [2], [-1, 8])])
    if quantize_input:
        x = g.qdq(x)
    out = g.name("fancy")
    g.nodes.append(
        helper.make_node(
            "FancyGemm", [x], [out], name=out, domain="acme",
            plugin_namespace="acme", plugin_version="1",
        )
    )
    model = g.model(out, 17)
    model.opset_import.append(helper.make_opsetid("acme", 1))
    return model


def implicit_uint8():
    """QuantizeLinear(x, s) with no zero point and no output_dtype -> DQ -> Conv."""
    g = Graph()
    s = g.tensor("s", TensorProto.FLOAT, [], [0.02])
    x = g.op("DequantizeLinear", [g.op("QuantizeLinear", ["x", s]), s])
    return g.model(g.conv(x))


def nvfp4_matmul(block_size=16, static_activation=False, opset=23):
    """W4A4 NVFP4: x [1, 4, 8, 8] -> Reshape [8, 32] -> FP4 activation -> MatMul with an FP4
    weight [32, 6] in blocks of 16 and two-level scales (FP8 E4M3 per block, float per tensor).

    The activation in TensorRT's form: trt::TRT_FP4DynamicQuantize (block scales computed at run
    time) -> DequantizeLinear of the FP8 block scales -> blockwise DequantizeLinear of the data;
    `static_activation` quantizes it with a plain FP4 QuantizeLinear and one calibrated scale."""
    g = Graph()
    x = g.op("Reshape", ["x", g.tensor("shape", TensorProto.INT64, [2], [-1, 32])])
    if static_activation:
        x = g.qdq(x, scale=0.1, dtype=TensorProto.FLOAT4E2M1)
    else:
        double = g.tensor("gs", TensorProto.FLOAT, [], [0.01])
        data, scales = g.name("xf4"), g.name("xs8")
        g.nodes.append(
            helper.make_node(
                "TRT_FP4DynamicQuantize", [x, double], [data, scales], name=data, domain="trt",
                axis=-1, block_size=block_size, scale_type=TensorProto.FLOAT8E4M3FN,
            )
        )
        scale = g.op("DequantizeLinear", [scales, double])
        x = g.op("DequantizeLinear", [data, scale], axis=-1, block_size=block_size)
    values = np.random.default_rng(0).choice([-6, -2, -0.5, 0, 0.5, 1, 3, 4], 32 * 6)
    w = g.tensor("w", TensorProto.FLOAT4E2M1, [32, 6], values)
    block_scales = g.tensor("ws8", TensorProto.FLOAT8E4M3FN, [2, 6], np.full(12, 1.5))
    per_tensor = g.tensor("wg", TensorProto.FLOAT, [], [0.01])
    w_scale = g.op("DequantizeLinear", [block_scales, per_tensor])
    w = g.op("DequantizeLinear", [w, w_scale], axis=0, block_size=16)
    model = g.model(g.op("MatMul", [x, w]), opset)
    model.opset_import.append(helper.make_opsetid("trt", 1))
    return model


def pooled_gemm(quantize_weight: bool):
    """x -> Q/DQ -> GlobalAveragePool -> Reshape [1, 4] -> Gemm (weight [6, 4], transB)."""
    g = Graph()
    pooled = g.op("GlobalAveragePool", [g.qdq("x")])
    flat = g.op("Reshape", [pooled, g.tensor("shape", TensorProto.INT64, [2], [1, 4])])
    if quantize_weight:
        w = g.weight((6, 4))
    else:
        w = g.tensor("wf", TensorProto.FLOAT, [6, 4], np.full(24, 0.1))
    return g.model(g.op("Gemm", [flat, w], transB=1))


def float_conv():
    """A float graph: no Q/DQ, no plugin."""
    g = Graph()
    return g.model(g.conv("x", g.tensor("wf", TensorProto.FLOAT, [4, 4, 3, 3], np.full(144, 0.1))))


# (rule, graph that breaks exactly that rule)
VIOLATIONS = [
    ("opset", lambda: legal_conv(opset=25)),
    ("opset", lambda: fp8_activation(opset=17)),
    ("opset", lambda: matmul_w4(opset=20)),
    ("qdq-dtype", lambda: legal_conv(dtype=TensorProto.UINT8)),
    ("qdq-dtype", lambda: legal_conv(dtype=TensorProto.FLOAT8E5M2, opset=19)),
    ("qdq-dtype", int32_bias),
    ("zero-point", lambda: legal_conv(zero=3)),
    ("scale", lambda: legal_conv(scale=0.0)),
    ("scale", lambda: legal_conv(scale=-0.02)),
    ("scale", lambda: legal_conv(scale=np.nan)),
    ("scale", computed_scale),
    ("activation-per-tensor", lambda: legal_conv(scale=[0.02] * 4, axis=1)),
    ("weight-axis", lambda: _conv_with_axis("Conv", 1)),
    ("weight-axis", lambda: _conv_with_axis("ConvTranspose", 0)),
    ("weight-axis", weight_on_add),
    ("blockwise", lambda: _conv_with_axis("Conv", 1, block_size=2, scale_shape=[4, 2, 3, 3])),
    ("int4", int4_conv),
    ("int4", lambda: matmul_w4(shape=(8, 5))),
    ("int4", lambda: matmul_w4(block_size=None)),
    ("int4", lambda: matmul_w4(quantize_input=True)),
    ("opset", lambda: fp4_matmul(opset=21)),
    ("fp4", fp4_conv),
    ("fp4", lambda: fp4_matmul(block_size=None)),
    ("fp4", lambda: nvfp4_matmul(block_size=32)),
    ("fp4-activation", lambda: nvfp4_matmul(static_activation=True)),
    ("implicit-type", implicit_uint8),
    ("weighted-op-inputs", float_data_conv),
    ("weighted-op-inputs", float_weight_conv),
    ("residual-add", lambda: residual(quantize_residual=False, conv_output_qdq=False)),
    ("epilogue", lambda: residual(quantize_residual=True, conv_output_qdq=True)),
    ("unused-qdq", output_qdq),
    ("unused-qdq", lambda: pooled_gemm(quantize_weight=False)),
    ("concat-scales", concat),
    ("plugin", lambda: int4_plugin(version="2")),
    ("plugin", lambda: int4_plugin(block_size=16)),
    ("plugin", lambda: int4_plugin(domain=False)),
    ("plugin-qdq", lambda: int4_plugin(quantize_input=True)),
    ("plugin-unchecked", third_party_plugin),
    ("no-qdq", float_conv),
]


def _conv_with_axis(op_type, axis, **weight):
    g = Graph()
    return g.model(g.conv(g.qdq("x"), op_type=op_type, axis=axis, **weight), 21)


def rules_of(model) -> set[str]:
    return {f.rule for f in lint_tensorrt(model)}


def test_every_rule_has_a_violating_graph():
    assert {rule for rule, _ in VIOLATIONS} == set(RULES)


@pytest.mark.parametrize(
    "build",
    [
        legal_conv,
        lambda: fp8_activation(opset=19),
        lambda: _conv_with_axis("ConvTranspose", 1),
        matmul_w4,
        lambda: residual(quantize_residual=True, conv_output_qdq=False),
        lambda: concat(scales=(0.05, 0.05)),
        int4_plugin,
        fp4_matmul,
        nvfp4_matmul,
        lambda: pooled_gemm(quantize_weight=True),
    ],
    ids=[
        "conv", "fp8", "conv-transpose", "w4a16-matmul", "residual-add", "concat", "plugin",
        "fp4-matmul", "nvfp4-w4a4", "pooled-gemm",
    ],
)
def test_legal_graphs_are_clean(build):
    assert lint_tensorrt(build()) == []


@pytest.mark.parametrize(("rule", "build"), VIOLATIONS, ids=[r for r, _ in VIOLATIONS])
def test_each_rule_catches_its_violation(rule, build):
    findings = lint_tensorrt(build())
    assert {f.rule for f in findings} == {rule}, [str(f) for f in findings]
    for f in findings:
        assert f.node and f.fix and f.message
        assert f.severity == RULES[rule][0]


@pytest.mark.parametrize(
    ("rule", "build"),
    [
        ("qdq-dtype", int32_bias),
        ("epilogue", lambda: residual(quantize_residual=True, conv_output_qdq=True)),
        ("unused-qdq", output_qdq),
    ("unused-qdq", lambda: pooled_gemm(quantize_weight=False)),
        ("concat-scales", concat),
    ],
)
def test_lower_for_tensorrt_repairs_its_rules_and_keeps_the_function(rule, build):
    """Rules 1-4 of LowerForTensorRT: the linted problem is gone, outputs stay within the
    removed rounding (rule 1 exactly), and the graph output keeps its name."""
    proto = build()
    assert rule in rules_of(proto)
    model = LowerForTensorRT()(ir.from_proto(proto)).model
    assert rules_of(model) <= {"no-qdq"}  # the pooled Gemm's only Q/DQ pair is gone
    lowered = ir.to_proto(model)
    assert [o.name for o in lowered.graph.output] == [o.name for o in proto.graph.output]
    rng = np.random.default_rng(0)
    feed = {i.name: rng.normal(0, 1, SHAPE).astype(np.float32) for i in proto.graph.input}
    before, after = run_onnx(proto, feed)[0], run_onnx(lowered, feed)[0]
    if rule == "qdq-dtype":
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    else:
        assert sqnr_db(before, after) > 25


def test_epilogue_rewrite_leaves_the_add_reading_the_conv():
    model = LowerForTensorRT()(ir.from_proto(residual(True, True))).model
    add = next(n for n in model.graph if n.op_type == "Add")
    producers = sorted(v.producer().op_type for v in add.inputs)
    assert producers == ["Conv", "DequantizeLinear"]


@pytest.fixture
def tiny_trt(tiny_calibration):
    return qpass.compile(
        tiny_cnn(), target="tensorrt", calibration=tiny_calibration, progress=False
    )


def test_tensorrt_target_defaults_to_its_preset_and_is_clean(tiny_trt, tiny_calibration):
    assert tiny_trt.findings == [] and lint_tensorrt(tiny_trt.model) == []
    ops = [n.op_type for n in tiny_trt.model.graph]
    assert ops.count("Relu") == 1 and ops.count("Clip") == 1  # not absorbed: symmetric ranges
    for node in tiny_trt.model.graph:
        if node.op_type in ("Conv", "Gemm"):
            assert is_quantized_weighted(node), node.name
    x = tiny_calibration["input"][:8]
    assert sqnr_db(run_onnx(tiny_cnn(), {"input": x})[0], tiny_trt.run({"input": x})[0]) >= 30


def test_onnxruntime_target_keeps_the_int8_preset(tiny_calibration):
    compiled = qpass.compile(tiny_cnn(), calibration=tiny_calibration, progress=False)
    zero_types = {n.inputs[2].dtype for n in compiled.model.graph if n.op_type == "QuantizeLinear"}
    assert zero_types == {ir.DataType.UINT8}
    assert rules_of(compiled.model) >= {"qdq-dtype", "zero-point"}


def test_int8_preset_takes_the_tensorrt_form_for_that_target(tiny_calibration):
    """A preset names a format, the target its legal form: int8 for TensorRT is symmetric S8."""
    compiled = qpass.compile(
        tiny_cnn(), preset="int8", target="tensorrt", calibration=tiny_calibration, progress=False
    )
    zero_types = {n.inputs[2].dtype for n in compiled.model.graph if n.op_type == "QuantizeLinear"}
    assert zero_types == {ir.DataType.INT8} and errors(compiled.findings) == []


def test_compile_refuses_a_graph_tensorrt_would_reject(tiny_calibration):
    ort_passes = presets.passes("int8", "onnxruntime")
    with pytest.raises(qpass.LintError, match="TensorRT would refuse") as caught:
        qpass.compile(
            tiny_cnn(), ort_passes, target="tensorrt", calibration=tiny_calibration, progress=False
        )
    assert {f.rule for f in caught.value.findings} >= {"qdq-dtype", "zero-point"}


def test_a_preset_for_another_target_is_refused_before_any_work(tiny_calibration):
    with pytest.raises(qpass.QpassError, match="presets for tensorrt: int8"):
        qpass.compile("missing.onnx", preset="w4a8", target="tensorrt")


def test_cli_compile_and_lint(tmp_path, tiny_calibration, capsys):
    source, calib = tmp_path / "model.onnx", tmp_path / "calib.npz"
    onnx.save(tiny_cnn(), source)
    np.savez(calib, **tiny_calibration)
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 32], rng.normal(0, 1, 64 * 32))
    matmul = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])], [weight],
    ), opset_imports=[helper.make_opsetid("", 17)])
    matmul_source, matmul_calib = tmp_path / "matmul.onnx", tmp_path / "matmul.npz"
    onnx.save(matmul, matmul_source)
    np.savez(matmul_calib, x=rng.normal(0, 1, (16, 64)).astype(np.float32))
    refused = tmp_path / "refused.onnx"
    simulated = ["--preset", "w4a8-fp", "--storage", "float8", "--group-size", "16"]
    assert main(["compile", str(matmul_source), "--calib", str(matmul_calib), "-q", "--target",
                 "tensorrt", "-o", str(refused), *simulated]) == 2  # ORT's simulation of FP4
    assert not refused.exists()
    err = capsys.readouterr().err
    assert "TensorRT would refuse" in err and "was not written" in err and "blockwise" in err

    args = ["compile", str(source), "--calib", str(calib), "--target", "tensorrt", "-q"]
    legal, ort = tmp_path / "trt.onnx", tmp_path / "ort.onnx"
    assert main([*args, "-o", str(legal)]) == 0
    assert main(["lint", "--target", "tensorrt", str(legal)]) == 0
    assert "clean" in capsys.readouterr().out

    assert main(["compile", str(source), "--calib", str(calib), "-o", str(ort), "-q"]) == 0
    assert main(["lint", "--target", "tensorrt", str(ort)]) == 1
    out = capsys.readouterr().out
    assert "qdq-dtype" in out and "fix:" in out and "errors" in out
    assert main(["lint", str(tmp_path / "missing.onnx")]) == 2


def test_a_third_party_plugin_is_a_warning_the_linter_cannot_check():
    """TensorRT loads any plugin registered under the node's namespace: not an error."""
    findings = lint_tensorrt(third_party_plugin())
    assert [(f.rule, f.severity) for f in findings] == [("plugin-unchecked", "warning")]
    assert "acme::FancyGemm" in findings[0].message
    assert "cannot check" in findings[0].message
    assert rules_of(third_party_plugin(quantize_input=True)) == {"plugin-unchecked", "plugin-qdq"}


def test_a_quantize_without_zero_point_is_int8_in_tensorrt_and_uint8_in_onnx_runtime():
    findings = lint_tensorrt(implicit_uint8())
    assert len(findings) == 1, [str(f) for f in findings]  # the Q, not its DQ again
    (finding,) = findings
    assert finding.rule == "implicit-type" and finding.severity == "error"
    assert finding.node.startswith("quantizelinear")
    assert "TensorRT's importer reads it as INT8" in finding.message
    assert "ONNX Runtime as UINT8" in finding.message


def test_nvfp4_activations_in_tensorrts_dynamic_form_are_legal():
    """FP4 activations quantized dynamically per block of 16 (TRT_FP4DynamicQuantize, FP8 block
    scales, one build-time double-quantization scale) are allowed; other block sizes are not,
    and a static FP4 QuantizeLinear on an activation is a warning, not the weight-only error."""
    assert lint_tensorrt(nvfp4_matmul()) == []
    wrong_block = lint_tensorrt(nvfp4_matmul(block_size=32))
    assert {f.rule for f in wrong_block} == {"fp4"}
    assert any("16" in f.message for f in wrong_block)
    static = lint_tensorrt(nvfp4_matmul(static_activation=True))
    assert [(f.rule, f.severity) for f in static] == [("fp4-activation", "warning")]
    assert "fp4" not in rules_of(nvfp4_matmul(static_activation=True))


def test_a_qdq_that_reaches_only_a_float_gemm_through_pooling_is_unused():
    """GlobalAveragePool -> Reshape -> Gemm with a float weight: the Gemm stays float."""
    findings = lint_tensorrt(pooled_gemm(quantize_weight=False))
    assert [f.rule for f in findings] == ["unused-qdq"]
    assert "float" in findings[0].message
    assert lint_tensorrt(pooled_gemm(quantize_weight=True)) == []


def test_a_graph_without_qdq_has_nothing_to_check(tmp_path, capsys):
    findings = lint_tensorrt(float_conv())
    assert [(f.rule, f.severity) for f in findings] == [("no-qdq", "info")]
    assert errors(findings) == []
    path = tmp_path / "float.onnx"
    onnx.save(float_conv(), path)
    assert main(["lint", "--target", "tensorrt", str(path)]) == 0
    out = capsys.readouterr().out
    assert "nothing to check" in out and "clean" not in out
    onnx.save(legal_conv(), path)
    assert main(["lint", "--target", "tensorrt", str(path)]) == 0
    assert "clean" in capsys.readouterr().out


def test_findings_start_with_a_summary_per_rule(tmp_path, capsys):
    """Rule, severity and count of each violated rule, before the per-node lines."""
    model = legal_conv(dtype=TensorProto.UINT8, zero=3)
    table = format_findings(lint_tensorrt(model)).splitlines()
    assert table[0].split() == ["rule", "severity", "count"]
    assert [line.split() for line in table[1:3]] == [
        ["qdq-dtype", "error", "2"],
        ["zero-point", "error", "2"],
    ]
    first_node_line = next(i for i, line in enumerate(table) if "quantizelinear" in line)
    assert first_node_line > 3
    path = tmp_path / "uint8.onnx"
    onnx.save(model, path)
    assert main(["lint", "--target", "tensorrt", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.index("zero-point             error") < out.index("fix:")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_build_engine_without_tensorrt_says_how_to_install(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(legal_conv(), model)
    with pytest.raises(trt_runtime.TensorRTUnavailableError, match="pip install tensorrt"):
        trt_runtime.build_engine(model, tmp_path / "m.engine")


def test_trtexec_command(tmp_path):
    model, plugin = tmp_path / "m.onnx", tmp_path / "libplugin.so"
    model.write_bytes(b"")
    plugin.write_bytes(b"")
    command = trt_runtime.trtexec_command(
        model,
        tmp_path / "m.engine",
        timing_cache=tmp_path / "cache.bin",
        plugins=[plugin],
        shapes={"input": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)), "mask": (1, 9)},
    )
    assert command == (
        f"trtexec --onnx={model} --saveEngine={tmp_path}/m.engine --stronglyTyped "
        f"--timingCacheFile={tmp_path}/cache.bin --dynamicPlugins={plugin} "
        "--minShapes=input:1x3x224x224,mask:1x9 --optShapes=input:8x3x224x224,mask:1x9 "
        "--maxShapes=input:32x3x224x224,mask:1x9"
    )
    fp16 = trt_runtime.trtexec_command(model, tmp_path / "m.engine", fp16=True)
    assert fp16 == (
        f"python -m modelopt.onnx.autocast --onnx_path {model} --output_path "
        f"{tmp_path}/m.fp16.onnx && trtexec --onnx={tmp_path}/m.fp16.onnx "
        f"--saveEngine={tmp_path}/m.engine --stronglyTyped"
    )


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"input": ((8, 3), (1, 3), (16, 3))}, "min <= opt <= max"),
        ({"input": (1, -1)}, "positive ints"),
        ({"input": ((1, 3), (2, 3))}, "positive ints"),
    ],
)
def test_trtexec_command_rejects_bad_shapes(tmp_path, shapes, message):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    with pytest.raises(qpass.QpassError, match=message):
        trt_runtime.trtexec_command(model, tmp_path / "m.engine", shapes=shapes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet20"])
def test_int8_for_tensorrt_is_clean_on_real_models(real_models, name):
    data = pytest.importorskip("benchmarks.data")
    loader = {"efficientnet_lite0": data.imagenet, "resnet20": data.cifar10}[name]
    calib, _ = loader("calibration", limit=8)
    compiled = qpass.compile(
        real_models[name], target="tensorrt", calibration={"input": calib}, progress=False
    )
    assert compiled.findings == []
    convs = [n for n in compiled.model.graph if n.op_type in ("Conv", "Gemm")]
    assert convs and all(is_quantized_weighted(n) for n in convs)
    images, _ = loader("evaluation", limit=16)
    reference = run_onnx(onnx.load(real_models[name]), {"input": images})[0]
    assert sqnr_db(reference, compiled.run({"input": images})[0]) >= 15


def test_python_plugin_modules_are_checked_before_a_build():
    """build_engine(python_plugins=...) imports each module in the builder process; a module
    that cannot be found is refused up front (TensorRT itself is absent here)."""
    assert trt_runtime._python_plugins(["qpass.plugins.tensorrt"]) == ["qpass.plugins.tensorrt"]
    with pytest.raises(qpass.QpassError, match="cannot be imported"):
        trt_runtime._python_plugins(["qpass.plugins.no_such_plugin"])
