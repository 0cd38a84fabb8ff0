"""INT4 W4A16 GEMM plugin: the Triton kernel compiles to PTX without a GPU, the ONNX node form is
valid ONNX and lints clean for TensorRT, the numpy reference equals ONNX Runtime's
DequantizeLinear -> MatMul, and the lowering keeps the model's outputs.

TensorRT and a GPU are absent here: the kernel is never launched and the plugin never registered
in CI (scripts/gpu-check runs the kernel on a GPU).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_onnx, sqnr_db
from onnx import TensorProto, helper, numpy_helper
from qpass.plugins import int4_gemm, onnx_node

import qpass
from qpass import plugin_spec
from qpass.lint import errors, lint_tensorrt
from qpass.metadata import PLUGIN_K
from qpass.packing import pack_4bit, unpack_4bit
from qpass.passes.groupwise import dequantize, quantize_rtn
from qpass.passes.lower_int4_plugin import LowerToInt4Plugin
from qpass.schemes import QuantScheme

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def matmul_model(k: int, n: int, seed: int = 0, outputs: int = 1) -> onnx.ModelProto:
    """x [batch, 5, K] -> MatMul(W1 [K, N]) -> Relu -> MatMul(W2 [N, N]) (the last one a graph
    output; weight-only presets leave it float unless lm_head=True)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1 / np.sqrt(k), (k, n)).astype(np.float32)
    w2 = rng.normal(0, 1 / np.sqrt(n), (n, n)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, n])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_model(seed: int = 0) -> onnx.ModelProto:
    """3x3 Conv -> Relu -> 1x1 Conv (+bias, 64 -> 32) -> 1x1 Conv (no bias, 32 -> 48, stride 2)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (64, 3, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(0, 0.15, (32, 64, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (48, 32, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="pointwise1"),
        helper.make_node("Conv", ["c1", "w2"], ["y"], name="strided2", strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 48, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ----------------------------------------------------------------------------- Triton -> PTX


@needs_triton
@pytest.mark.parametrize(
    "arch, config",
    [
        (80, int4_gemm.Config(group_size=128)),
        (90, int4_gemm.Config(group_size=32, dtype="float32", scale_dtype="float32")),
        (90, int4_gemm.Config(group_size=16, dtype="bfloat16", scale_dtype="bfloat16")),
    ],
)
def test_triton_source_compiles_to_ptx_without_a_gpu(arch, config):
    compiled = int4_gemm.compile_ptx(config, arch=arch)
    ptx = compiled.ptx
    assert f".target sm_{arch}" in ptx
    entry = re.search(r"\.visible \.entry (\w+)\(([^)]*)\)", ptx)
    assert entry and entry.group(1) == compiled.name == "int4_group_gemm"
    # 8 kernel arguments (x, b, scales, zero_points, M, N, K, y) and Triton's two scratch pointers
    assert entry.group(2).count(".param") == len(config.signature) + 2
    assert re.search(r"\bmma\.sync\.aligned\.m16n8k(8|16)\b", ptx), "tl.dot should use tensor cores"
    assert compiled.num_warps == config.num_warps and compiled.shared_mem > 0


_INTERPRETED = """
import json, sys
import numpy as np, torch
import triton.runtime.interpreter as interpreter

# Triton 3.6's interpreter converts a loop bound with int() of a 1-element array, which
# numpy >= 2.4 refuses; read the element instead.
_patch = interpreter._patch_lang_tensor
def _patch_index(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda t: int(np.asarray(t.handle.data).reshape(-1)[0]))
interpreter._patch_lang_tensor = _patch_index

from qpass.packing import pack_4bit
from qpass.plugins import int4_gemm
errors = []
rng = np.random.default_rng(0)
for m, k, n, g, dtype in json.loads(sys.argv[1]):
    blocks = -(-k // g)
    q = rng.integers(0, 16, (k, n)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.02, (blocks, n)).astype(np.float32)
    zero = rng.integers(1, 15, (blocks, n)).astype(np.uint8)
    b, scales, zero_points = pack_4bit(q, scale, zero, g)
    x = torch.from_numpy(rng.normal(0, 1, (m, k)).astype(np.float32)).to(getattr(torch, dtype))
    s = torch.from_numpy(scales).to(x.dtype)
    y = int4_gemm.launch(x, torch.from_numpy(b), s, torch.from_numpy(zero_points))
    ref = int4_gemm.reference(x.float().numpy(), b, s.float().numpy(), zero_points)
    errors.append(float(np.abs(y.float().numpy() - ref).max() / np.abs(ref).max()))
print(json.dumps(errors))
"""


@needs_triton
def test_triton_kernel_computes_the_reference_in_the_interpreter():
    """The kernel itself, run by Triton's CPU interpreter (TRITON_INTERPRET=1): equal to the
    numpy reference (fp32 to float rounding; fp16 to the dequantized weight's fp16 rounding),
    including M below the tile, N and K not multiples of the tiles, an odd number of groups."""
    import json
    import os
    import subprocess

    pytest.importorskip("torch")
    cases = [[3, 200, 40, 32, "float32"], [17, 256, 96, 64, "float16"], [2, 96, 64, 32, "float32"]]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETED, json.dumps(cases)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert errors[0] < 1e-5 and errors[2] < 1e-5 and errors[1] < 2e-3, errors


def test_kernel_config_refuses_groups_the_k_tile_cannot_divide():
    with pytest.raises(ValueError, match="BLOCK_K"):
        int4_gemm.Config(group_size=24)
    assert int4_gemm.Config(group_size=32).block_k == 32


# ----------------------------------------------------------------------------- numpy reference


@pytest.mark.parametrize(
    "dtype, symmetric, group, k",
    [("int4", True, 32, 256), ("uint4", False, 16, 128), ("uint4", False, 128, 200)],
)
def test_numpy_reference_matches_onnxruntime_dequantize_matmul(dtype, symmetric, group, k):
    """The plugin's numpy reference on the packed weights == ORT's blockwise DQ -> MatMul graph,
    to 1e-5 (K not a multiple of the group included: the last block is padded)."""
    rng = np.random.default_rng(group)
    n = 48
    w = rng.normal(0, 0.1, (k, n)).astype(np.float32)
    scheme = QuantScheme(dtype=dtype, symmetric=symmetric, group_size=group)
    q, scale, zero = quantize_rtn(w, scheme)
    zero = None if symmetric else zero
    x = rng.normal(0, 1, (3, 7, k)).astype(np.float32)
    dq_inputs = [
        numpy_helper.from_array(q, "q"),
        numpy_helper.from_array(scale.astype(np.float32), "s"),
    ] + ([] if zero is None else [numpy_helper.from_array(zero, "z")])
    graph = helper.make_graph(
        [
            helper.make_node(
                "DequantizeLinear", [i.name for i in dq_inputs], ["w"], axis=0, block_size=group
            ),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "dq_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 7, 48])],
        dq_inputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (ort,) = run_onnx(model, {"x": x})
    packed = pack_4bit(q, scale, zero, group)
    assert onnx_node.inputs_are_consistent(*packed)
    np.testing.assert_allclose(int4_gemm.reference(x, *packed), ort, rtol=1e-5, atol=1e-5)
    # and the packing is lossless: the weights are the DequantizeLinear's exactly
    np.testing.assert_array_equal(unpack_4bit(*packed, k), dequantize(q, scale, zero, group))


@pytest.mark.parametrize("dtype, symmetric, k", [("int4", True, 96), ("uint4", False, 80)])
def test_plugin_layout_is_the_matmulnbits_layout(dtype, symmetric, k):
    """The plugin's packing (zero points always present) writes the bytes qpass's MatMulNBits
    lowering writes: the same weight files serve both."""
    from qpass.packing import pack_matmulnbits, unpack_nibbles

    w = np.random.default_rng(3).normal(0, 1, (k, 24)).astype(np.float32)
    q, scale, zero = quantize_rtn(w, QuantScheme(dtype=dtype, symmetric=symmetric, group_size=32))
    zero = None if symmetric else zero
    b, scales, zero_points = pack_4bit(q, scale, zero, 32)
    b_ref, scales_ref, zero_ref = pack_matmulnbits(q, scale, zero, 32)
    np.testing.assert_array_equal(b, b_ref)
    np.testing.assert_array_equal(scales, scales_ref)
    if zero_ref is None:
        assert np.all(unpack_nibbles(zero_points)[:, : scales.shape[1]] == 8)
    else:
        np.testing.assert_array_equal(zero_points, zero_ref)


# ----------------------------------------------------------------------------- ONNX node form


def test_onnx_node_form_passes_the_checker():
    k, n, g = 64, 32, 32
    rng = np.random.default_rng(0)
    q, scale, zero = quantize_rtn(rng.normal(0, 1, (k, n)).astype(np.float32),
                                  QuantScheme(dtype="uint4", group_size=g))
    b, scales, zero_points = pack_4bit(q, scale, zero, g)
    node = plugin_spec.make_node(["x", "b", "scales", "zero_points"], "y", g, name="gemm")
    graph = helper.make_graph(
        [node],
        "plugin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        [
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(scales, "scales"),
            numpy_helper.from_array(zero_points, "zero_points"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 21),
            helper.make_opsetid(plugin_spec.DOMAIN, plugin_spec.DOMAIN_VERSION),
        ],
    )
    onnx.checker.check_model(model)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "Int4GroupGemm"
    assert attrs == {"plugin_namespace": b"qpass", "plugin_version": b"1", "block_size": g}
    assert errors(lint_tensorrt(model)) == []
    # the ONNX Runtime stand-in computes the reference
    x = rng.normal(0, 1, (2, k)).astype(np.float32)
    node.metadata_props.add(key=PLUGIN_K, value=str(k))
    (y,) = run_onnx(onnx_node.to_matmulnbits(model), {"x": x})
    np.testing.assert_allclose(y, int4_gemm.reference(x, b, scales, zero_points), rtol=1e-5,
                               atol=1e-5)


# ----------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_lowering_keeps_the_dequantize_matmul_outputs(symmetric):
    """w4a16-rtn with format="plugin" computes what format="dq" computes (ORT, 1e-5)."""
    proto = matmul_model(k=256, n=64)
    options = {"group_size": 64, "symmetric": symmetric, "lm_head": "int4"}
    dq = qpass.compile(proto, preset="w4a16-rtn", progress=False, **options)
    plugin = qpass.compile(proto, preset="w4a16-rtn", progress=False, format="plugin", **options)
    model = onnx.load_from_string(plugin.to_bytes())
    onnx.checker.check_model(model)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("qpass", "Int4GroupGemm")) == 2 and ("", "DequantizeLinear") not in ops
    assert errors(lint_tensorrt(model)) == []
    x = np.random.default_rng(1).normal(0, 1, (2, 5, 256)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(onnx_node.to_matmulnbits(model), {"x": x})[0],
        dq.run({"x": x})[0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_plugin_format_compiles_for_tensorrt():
    compiled = qpass.compile(
        matmul_model(k=128, n=32), preset="w4a16-rtn", progress=False, format="plugin",
        group_size=32, target="tensorrt",
    )
    assert errors(compiled.findings) == []


def test_pointwise_convolutions_lower_and_keep_their_output():
    """1x1 stride-1 convolutions become Transpose -> plugin (-> bias Add) -> Transpose; the 3x3
    and the strided 1x1 stay; the result equals the int4 group-quantized convolution."""
    proto = conv_model()
    model = ir.from_proto(proto)
    scheme = QuantScheme(dtype="int4", symmetric=True, group_size=32)
    assert LowerToInt4Plugin(scheme)(model).modified
    lowered = ir.to_proto(model)
    onnx.checker.check_model(lowered)
    convs = [n.name for n in lowered.graph.node if n.op_type == "Conv"]
    plugins = [n for n in lowered.graph.node if plugin_spec.is_plugin_node(n)]
    assert convs == ["conv0", "strided2"] and [n.name for n in plugins] == ["pointwise1"]
    assert errors(lint_tensorrt(lowered)) == []

    # expected: the same graph with the 1x1 weight replaced by its dequantized int4 values
    w1 = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w1"))
    q, scale, _ = quantize_rtn(np.ascontiguousarray(w1[:, :, 0, 0].T), scheme)
    fake = dequantize(q, scale, None, 32).T[:, :, None, None]
    expected = onnx.ModelProto()
    expected.CopyFrom(proto)
    for init in expected.graph.initializer:
        if init.name == "w1":
            init.CopyFrom(numpy_helper.from_array(fake.astype(np.float32), "w1"))
    x = np.random.default_rng(2).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    got = run_onnx(onnx_node.to_matmulnbits(lowered), {"x": x})[0]
    np.testing.assert_allclose(got, run_onnx(expected, {"x": x})[0], rtol=1e-4, atol=1e-5)
    assert sqnr_db(run_onnx(proto, {"x": x})[0], got) >= 15  # and int4 stays close to float


# ----------------------------------------------------------------------------- TensorRT plugin


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_plugin_registration_without_tensorrt_says_how_to_install_it():
    sys.modules.pop("qpass.plugins.tensorrt", None)
    with pytest.raises(qpass.QpassError, match=r"pip install 'qpass\[tensorrt\]'"):
        importlib.import_module("qpass.plugins.tensorrt")


class _Expr:
    """A stand-in for tensorrt.plugin's symbolic integers: plain ints with the same operators."""

    def __init__(self, value):
        self.value = int(value)

    def __floordiv__(self, other):
        return _Expr(self.value // _value(other))


def _value(x):
    return x.value if isinstance(x, _Expr) else int(x)


class _Shape(list):
    def numel(self):
        return _Expr(np.prod([_value(d) for d in self]))


@needs_triton
def test_aot_impl_returns_the_kernel_ptx_and_its_launch(monkeypatch):
    """With a stand-in for `tensorrt.plugin` (TensorRT itself cannot be installed here), the
    registered shape function and ahead-of-time implementation produce the contract TensorRT
    documents: output [..., N]; (kernel name, PTX, launch grid/block/shared memory, M, N, K)."""
    registry = {}
    trt = types.ModuleType("tensorrt")
    trt.float16, trt.bfloat16, trt.float32 = "f16", "bf16", "f32"
    trtp = types.ModuleType("tensorrt.plugin")

    def decorator(kind):
        return lambda plugin_id: lambda fn: registry.setdefault((kind, plugin_id), fn)

    trtp.register, trtp.aot_impl = decorator("register"), decorator("aot")
    trtp.TensorDesc = object
    trtp.KernelLaunchParams = types.SimpleNamespace
    trtp.cdiv = lambda a, b: -(-_value(a) // b)
    trtp.SymInt32 = _value
    trtp.SymIntExprs = lambda n: [None] * n
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.delitem(sys.modules, "qpass.plugins.tensorrt", raising=False)
    import qpass.plugins.tensorrt as plugin

    monkeypatch.setattr(plugin, "_compute_capability", lambda: 90)

    def desc(shape, dtype):
        d = types.SimpleNamespace(shape_expr=_Shape(shape), dtype=dtype, ndim=len(shape))
        d.like = lambda: desc(list(shape), dtype)
        return d

    x = desc([4, 3, 256], "f16")
    b, scales, zeros = desc([96, 2, 64], "u8"), desc([96, 2], "f16"), desc([96, 1], "u8")
    out = registry[("register", "qpass::Int4GroupGemm")](x, b, scales, zeros, 128)
    assert list(out.shape_expr) == [4, 3, 96] and out.dtype == "f16"
    name, ptx, launch, scalars = registry[("aot", "qpass::Int4GroupGemm")](
        x, b, scales, zeros, 128, (out,), 0
    )
    assert name == "int4_group_gemm" and ".target sm_90" in ptx
    assert (launch.grid_x, launch.grid_y, launch.block_x) == (1, 2, 128)
    assert launch.shared_mem > 0 and scalars == [12, 96, 256]


@pytest.mark.slow
def test_efficientnet_pointwise_convolutions_lower_to_the_plugin(real_models):
    """EfficientNet-Lite0: each of its 32 pointwise convolutions becomes a plugin node; the graph
    passes onnx.checker and the TensorRT linter, and (through the ORT stand-in) computes what the
    same model with int4 group-quantized pointwise weights computes."""
    proto = onnx.load(real_models["efficientnet_lite0"])
    scheme = QuantScheme(dtype="int4", symmetric=True, group_size=32)
    model = ir.from_proto(proto)
    LowerToInt4Plugin(scheme)(model)
    lowered = ir.to_proto(model)
    onnx.checker.check_model(lowered)
    assert sum(map(plugin_spec.is_plugin_node, lowered.graph.node)) == 32
    assert errors(lint_tensorrt(lowered)) == []

    expected = onnx.ModelProto()
    expected.CopyFrom(proto)
    inits = {i.name: i for i in expected.graph.initializer}
    for node in expected.graph.node:
        w = numpy_helper.to_array(inits[node.input[1]]) if node.op_type == "Conv" else None
        if w is None or w.shape[2:] != (1, 1) or w.shape[1] == 1:
            continue
        q, scale, _ = quantize_rtn(np.ascontiguousarray(w[:, :, 0, 0].T), scheme)
        fake = dequantize(q, scale, None, 32).T[:, :, None, None].astype(np.float32)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(fake, node.input[1]))
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(onnx_node.to_matmulnbits(lowered), {"input": x})[0],
        run_onnx(expected, {"input": x})[0],
        rtol=1e-3,
        atol=1e-3,
    )


def test_gpu_check_loads_its_kernel_module_without_qpass(tmp_path):
    """scripts/gpu-check runs on a machine without a qpass install: its kernel module and
    packing helpers load by path, import nothing of qpass's dependencies, and round-trip."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"
    code = (
        "import importlib.machinery, importlib.util, sys, numpy as np\n"
        f"loader = importlib.machinery.SourceFileLoader('gpucheck', {str(script)!r})\n"
        "spec = importlib.util.spec_from_loader('gpucheck', loader)\n"
        "m = importlib.util.module_from_spec(spec); loader.exec_module(m)\n"
        "gemm = m.load_kernel_module()\n"
        "q, s, z = m.random_weights(np.random.default_rng(0), 256, 64, 32)\n"
        "b, sc, zp = gemm.pack(q, s, z, 32)\n"
        "w = gemm.unpack(b, sc, zp, 256)\n"
        "x = np.random.default_rng(1).normal(0, 1, (3, 256)).astype(np.float32)\n"
        "assert np.allclose(gemm.reference(x, b, sc, zp), x @ w, rtol=1e-4, atol=1e-4)\n"
        "print('onnx_ir' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert out.stdout.strip() == "False"
