"""float16 models: computed in float32 while quantizing (ComputeInFloat32), written back with
float16 float parts (CastFloatParts: weights left float, Q/DQ scales, activations), their
interface kept; every preset's output loads in ONNX Runtime and stays near the float16 model.
float32 models with float_type="float16": the same float16 form, with reductions, Softmax,
normalizations and exp kept in float32."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import relative_error, run_onnx, sqnr_db, tiny_cnn
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.passes import CastFloatParts, ComputeInFloat32
from qpass.passes.cast_float_parts import KEPT_IN_FLOAT32


def as_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with float16 weights, constants, inputs and outputs."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for tensor in proto.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return proto


def matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.1, (64, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.1, (64, 32)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="down"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])], [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def scale_types(proto: onnx.ModelProto) -> set[int]:
    """The data types of the constant scales of every Q/DQ and MatMul kernel."""
    initializers = {t.name: t.data_type for t in proto.graph.initializer}
    scales = {
        "QuantizeLinear": (1,), "DequantizeLinear": (1,), "MatMulNBits": (2,),
        "MatMulIntegerToFloat": (2, 3),
    }
    return {
        initializers[node.input[i]]
        for node in proto.graph.node
        for i in scales.get(node.op_type, ())
        if i < len(node.input) and node.input[i] in initializers
    }


def float_initializer_types(proto: onnx.ModelProto) -> set[int]:
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    return {t.data_type for t in proto.graph.initializer} & floats


def test_compute_in_float32_keeps_the_interface_and_the_function():
    """Against the float16 model the outputs differ by float16 rounding only (the float32
    computation is the more exact one)."""
    proto = as_float16(tiny_cnn())
    model = ir.from_proto(proto)
    assert ComputeInFloat32()(model).modified
    upcast = ir.to_proto(model)
    assert upcast.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert upcast.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert {t.data_type for t in upcast.graph.initializer} == {TensorProto.FLOAT}
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 16, 16)).astype(np.float16)
    reference = run_onnx(proto, {"input": x})[0].astype(np.float32)
    assert relative_error(run_onnx(upcast, {"input": x})[0].astype(np.float32), reference) < 5e-3
    assert not ComputeInFloat32()(ir.from_proto(tiny_cnn())).modified  # float32: unchanged


@pytest.mark.parametrize(
    ("preset", "target", "least_db"),
    [("int8", "onnxruntime", 30), ("int8", "tensorrt", 25), ("fp8", "onnxruntime", 15),
     ("fp8", "tensorrt", 15), ("int8-tensor", "onnxruntime", 30), ("w4a8-rtn", "onnxruntime", 12),
     ("w4a8-fp", "onnxruntime", 12)],
)
def test_float16_cnn_under_every_cnn_preset(preset, target, least_db):
    proto = as_float16(tiny_cnn())
    rng = np.random.default_rng(0)
    calibration = {"input": rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float16)}
    compiled = qpass.compile(
        proto, preset=preset, target=target, calibration=calibration, progress=False
    )
    x = rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float16)
    written = onnx.load_from_string(compiled.to_bytes())
    assert scale_types(written) == {TensorProto.FLOAT16}  # opset >= 19: float16 scales
    assert float_initializer_types(written) == {TensorProto.FLOAT16}
    output = run_onnx(written, {"input": x})[0]
    assert output.dtype == np.float16
    reference = run_onnx(proto, {"input": x})[0]
    assert sqnr_db(reference.astype(np.float32), output.astype(np.float32)) >= least_db


@pytest.mark.parametrize(
    ("preset", "options", "least_db"),
    [("w4a16-rtn", {"lm_head": "int4", "group_size": 32}, 15),
     ("w4a16-rtn", {"lm_head": "int4", "group_size": 32, "format": "matmulnbits"}, 15),
     ("w8a8-dynamic", {}, 30), ("w8a8-smoothquant", {}, 20), ("int8", {}, 30), ("fp8", {}, 20)],
)
def test_float16_matmuls_under_the_transformer_presets(preset, options, least_db):
    proto = as_float16(matmul_model())
    rng = np.random.default_rng(1)
    calibration = {"x": rng.normal(0, 1, (32, 64)).astype(np.float16)}
    compiled = qpass.compile(
        proto, preset=preset, calibration=calibration, progress=False, **options
    )
    x = rng.normal(0, 1, (8, 64)).astype(np.float16)
    written = onnx.load_from_string(compiled.to_bytes())
    assert scale_types(written) == {TensorProto.FLOAT16}
    assert float_initializer_types(written) <= {TensorProto.FLOAT16}
    output = run_onnx(written, {"x": x})[0]
    assert output.dtype == np.float16
    reference = run_onnx(proto, {"x": x})[0]
    assert sqnr_db(reference.astype(np.float32), output.astype(np.float32)) >= least_db


def test_float16_scales_match_the_float32_compile():
    """The float16 form of a float16 model's int8 compile holds the float32 compile's scales,
    rounded to float16, and its weights' integers unchanged."""
    proto = as_float16(matmul_model())
    calibration = {"x": np.random.default_rng(1).normal(0, 1, (32, 64)).astype(np.float16)}
    forms = {
        t: onnx.load_from_string(qpass.compile(
            proto, preset="int8", calibration=calibration, progress=False, float_type=t
        ).to_bytes())
        for t in ("float32", "float16")
    }
    tensors = {t: {i.name: numpy_helper.to_array(i) for i in p.graph.initializer}
               for t, p in forms.items()}
    assert tensors["float32"].keys() == tensors["float16"].keys()
    for name, array in tensors["float32"].items():
        low = tensors["float16"][name]
        if array.dtype == np.float32:
            assert low.dtype == np.float16
            np.testing.assert_allclose(low.astype(np.float32), array, rtol=2**-11, atol=0)
        else:
            np.testing.assert_array_equal(low, array)


@pytest.mark.parametrize(("preset", "calibrated"), [("w8a8-dynamic", False),
                                                  ("w8a8-smoothquant", True)])
def test_bfloat16_model_is_computed_in_float32_inside(preset, calibrated):
    """ONNX Runtime's CPU provider has no bfloat16 kernels for Conv, MatMul, Add, ...: a bfloat16
    model is quantized and computed in float32 inside, a Cast at its boundary, and loads; its
    calibration data, float32 or bfloat16, is fed through OrtValues (ONNX Runtime's Python
    binding converts no bfloat16 array)."""
    proto = matmul_model()
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for tensor in proto.graph.initializer:
        array = numpy_helper.to_array(tensor)
        tensor.CopyFrom(helper.make_tensor(tensor.name, TensorProto.BFLOAT16, array.shape,
                                           array.ravel().tolist()))
    name = proto.graph.input[0].name
    x = np.random.default_rng(0).normal(0, 1, (16, 64)).astype(np.float32)
    calibration = {name: x.astype(ml_dtypes.bfloat16)} if calibrated else None
    compiled = qpass.compile(proto, preset=preset, calibration=calibration, progress=False)
    written = onnx.load_from_string(compiled.to_bytes())
    assert scale_types(written) == {TensorProto.FLOAT}
    assert float_initializer_types(written) <= {TensorProto.FLOAT}
    assert written.graph.input[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    assert written.graph.output[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    assert [n.op_type for n in written.graph.node].count("Cast") == 2  # input and output
    assert compiled.session().get_outputs()[0].type == "tensor(bfloat16)"


# ------------------------------------------------------------- float32 models, float16 form


def transformer_block(seed: int = 0, width: int = 32) -> onnx.ModelProto:
    """LayerNorm -> attention-like MatMul / Softmax -> residual Add -> RMS-style ReduceMean, Exp,
    with a float32 interface (opset 19)."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape, scale=0.2):
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    inits = [weight("gamma", width, scale=1.0), weight("beta", width), weight("wq", width, width),
             weight("wv", width, width), weight("wo", width, width),
             numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.float32(2.0), "two"),
             numpy_helper.from_array(np.float32(1e-5), "eps")]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "wq"], ["q"]),
        helper.make_node("MatMul", ["n", "wv"], ["v"]),
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "qt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["a"]),
        helper.make_node("MatMul", ["a", "wo"], ["o"]),
        helper.make_node("Add", ["x", "o"], ["h"]),
        helper.make_node("Pow", ["h", "two"], ["h2"]),
        helper.make_node("ReduceMean", ["h2", "last"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["h", "rms"], ["hn"]),
        helper.make_node("Sigmoid", ["hn"], ["g"]),
        helper.make_node("Exp", ["g"], ["e"]),
        helper.make_node("Mul", ["hn", "e"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8, width])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def value_types(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    return {v.name: v.type.tensor_type.elem_type
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}


def test_float16_form_keeps_reductions_softmax_and_normalization_in_float32():
    proto = transformer_block()
    compiled = qpass.compile(proto, passes=[], float_type="float16", progress=False)
    written = onnx.load_from_string(compiled.to_bytes())
    onnx.checker.check_model(written, full_check=True)
    types = value_types(written)
    by_op = {}
    for node in written.graph.node:
        by_op.setdefault(node.op_type, set()).update(types[o] for o in node.output)
    for op in ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Exp"):
        assert by_op[op] == {TensorProto.FLOAT}, op
    for op in ("MatMul", "Transpose", "Sigmoid", "Div"):
        assert by_op[op] == {TensorProto.FLOAT16}, op
    assert by_op["Sqrt"] == {TensorProto.FLOAT}  # follows the variance (FOLLOWS_FLOAT32)
    assert written.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert written.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(1).normal(0, 1, (4, 8, 32)).astype(np.float32)
    reference = run_onnx(proto, {"x": x})[0]
    output = compiled.run({"x": x})[0]
    assert output.dtype == np.float32
    assert relative_error(output, reference) < 5e-3


def test_float16_form_of_a_quantized_float32_model():
    """w8a8-dynamic on the block: float16 scales, LayerNorm and Softmax still float32."""
    proto = transformer_block()
    x = np.random.default_rng(1).normal(0, 1, (4, 8, 32)).astype(np.float32)
    outputs = {}
    for float_type in ("float32", "float16"):
        compiled = qpass.compile(proto, preset="w8a8-dynamic", float_type=float_type,
                                 progress=False)
        written = onnx.load_from_string(compiled.to_bytes())
        assert scale_types(written) == {
            TensorProto.FLOAT if float_type == "float32" else TensorProto.FLOAT16
        }
        outputs[float_type] = compiled.run({"x": x})[0]
    reference = run_onnx(proto, {"x": x})[0]
    assert sqnr_db(reference, outputs["float32"]) >= 25
    assert sqnr_db(reference, outputs["float16"]) >= sqnr_db(reference, outputs["float32"]) - 1


def test_cli_float_type_flag(tmp_path):
    from qpass import cli

    source, out = tmp_path / "block.onnx", tmp_path / "block_w8.onnx"
    onnx.save(transformer_block(), source)
    assert cli.main(["compile", str(source), "-o", str(out), "--preset", "w8a8-dynamic",
                     "--float-type", "float16", "-q"]) == 0
    written = onnx.load(out)
    assert scale_types(written) == {TensorProto.FLOAT16}
    with pytest.raises(SystemExit) as refused:  # argparse: one line naming the choices
        cli.main(["compile", str(source), "-o", str(tmp_path / "x.onnx"), "--preset",
                  "w8a8-dynamic", "--float-type", "float8"])
    assert refused.value.code == 2


OPS = ("MatMul", "Add", "Relu", "Softmax", "LayerNormalization", "ReduceMean", "Sigmoid", "Exp",
       "Mul", "Transpose")


def random_graph(ops: list[str], seed: int, width: int = 16) -> onnx.ModelProto:
    """A chain of `ops` on [batch, width] (2-D), constants drawn from `seed`."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, op in enumerate(ops):
        out = f"v{i}"
        if op == "MatMul":
            inits.append(numpy_helper.from_array(
                rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node(op, [current, f"w{i}"], [out]))
        elif op in ("Add", "Mul"):
            inits.append(numpy_helper.from_array(
                rng.normal(1 if op == "Mul" else 0, 0.3, (width,)).astype(np.float32), f"c{i}"))
            nodes.append(helper.make_node(op, [current, f"c{i}"], [out]))
        elif op == "LayerNormalization":
            inits.append(numpy_helper.from_array(np.ones(width, np.float32), f"g{i}"))
            nodes.append(helper.make_node(op, [current, f"g{i}"], [out], axis=-1))
        elif op == "ReduceMean":  # x - mean(x): keeps the shape
            inits.append(numpy_helper.from_array(np.array([-1], np.int64), f"a{i}"))
            nodes.append(helper.make_node(op, [current, f"a{i}"], [f"m{i}"], keepdims=1))
            nodes.append(helper.make_node("Sub", [current, f"m{i}"], [out]))
        elif op == "Transpose":
            nodes.append(helper.make_node(op, [current], [f"t{i}"], perm=[1, 0]))
            nodes.append(helper.make_node(op, [f"t{i}"], [out], perm=[1, 0]))
        elif op == "Exp":
            nodes.append(helper.make_node("Tanh", [current], [f"t{i}"]))
            nodes.append(helper.make_node(op, [f"t{i}"], [out]))
        else:
            nodes.append(helper.make_node(op, [current], [out], **(
                {"axis": -1} if op == "Softmax" else {})))
        current = out
    graph = helper.make_graph(
        nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["b", width])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=8), seed=st.integers(0, 999))
def test_cast_float_parts_on_random_graphs(ops, seed):
    """Any chain: a valid model (full onnx check) that ONNX Runtime runs, its interface float32,
    the KEPT_IN_FLOAT32 ops computing in float32 and the others in float16, within float16's
    rounding of the float32 model."""
    proto = random_graph(ops, seed)
    model = ir.from_proto(proto)
    CastFloatParts("float16")(model)
    written = ir.to_proto(model)
    onnx.checker.check_model(written, full_check=True)
    types = value_types(written)
    for node in written.graph.node:
        if node.op_type == "Cast":
            continue
        expected = TensorProto.FLOAT if node.op_type in KEPT_IN_FLOAT32 else None
        if expected is not None:
            assert types[node.output[0]] == expected, node.op_type
        elif node.op_type in ("MatMul", "Relu", "Sigmoid", "Transpose", "Tanh"):
            assert types[node.output[0]] == TensorProto.FLOAT16, node.op_type
    assert written.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(seed).normal(0, 1, (4, 16)).astype(np.float32)
    reference = run_onnx(proto, {"x": x})[0]
    output = run_onnx(written, {"x": x})[0]
    assert relative_error(output, reference) < 1e-2


def casts_after_dequantize(proto: onnx.ModelProto) -> int:
    """Casts reading a DequantizeLinear: they keep TensorRT from fusing the Q/DQ into the op."""
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    return sum(n.op_type == "Cast" and producers.get(n.input[0]) == "DequantizeLinear"
               for n in proto.graph.node)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_scales_below_float16_are_fitted_not_cast(target):
    """A channel with near-zero weights (per-channel scale ~1e-8) and the int32 biases (scale =
    input scale x weight scale) are below float16's range: the scale is raised and the channel
    re-rounded, the bias becomes a float16 constant; no Cast sits between a DQ and its op, the
    TensorRT linter accepts the graph (qpass.compile runs it) and the outputs stay at the float32
    compile's SQNR."""
    proto = tiny_cnn()
    weights = {t.name: t for t in proto.graph.initializer}
    w1 = numpy_helper.to_array(weights["w1"]).copy()
    w1[0] *= 1e-6
    weights["w1"].CopyFrom(numpy_helper.from_array(w1, "w1"))
    rng = np.random.default_rng(0)
    calibration = {"input": rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32)}
    x = rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    reference = run_onnx(proto, {"input": x})[0]
    quality = {}
    for float_type in ("float32", "float16"):
        compiled = qpass.compile(proto, preset="int8", target=target, calibration=calibration,
                                 float_type=float_type, progress=False)
        written = onnx.load_from_string(compiled.to_bytes())
        assert casts_after_dequantize(written) == 0
        quality[float_type] = sqnr_db(reference, compiled.run({"input": x})[0])
    assert scale_types(written) == {TensorProto.FLOAT16}
    assert quality["float16"] >= quality["float32"] - 1.0


def test_float16_form_of_a_captured_llama():
    """The tiny Llama (decomposed RMSNorm: Pow, ReduceMean, Sqrt, Reciprocal; Softmax):
    w8a8-dynamic with float16 float parts keeps its normalizations and Softmax in float32 and
    stays at the float32 compile's SQNR."""
    from test_weight_only import tiny_llama

    from benchmarks.llm import capture_llm

    model = capture_llm(tiny_llama(), example_length=8)
    ids = np.random.default_rng(1).integers(0, 256, (2, 16))
    reference = run_onnx(ir.to_proto(model), {"input_ids": ids})[0]
    quality = {}
    for float_type in ("float32", "float16"):
        compiled = qpass.compile(model, preset="w8a8-dynamic", float_type=float_type,
                                 progress=False)
        output = compiled.run({"input_ids": ids})[0]
        assert output.dtype == np.float32
        quality[float_type] = sqnr_db(reference, output)
    written = onnx.load_from_string(compiled.to_bytes())
    types = value_types(written)
    for node in written.graph.node:
        if node.op_type in ("Softmax", "ReduceMean", "Pow"):
            assert types[node.output[0]] == TensorProto.FLOAT, node.op_type
        if node.op_type == "MatMulIntegerToFloat":
            assert types[node.output[0]] == TensorProto.FLOAT16
    assert quality["float32"] >= 25
    assert quality["float16"] >= quality["float32"] - 1.0


@pytest.mark.slow
def test_efficientnet_int8_float16_form(real_models):
    """EfficientNet-Lite0 (real weights, BatchNorm folded): int8 with float16 float parts, no
    Cast between a DQ and its op, the same top-1 class as the float32 compile on >= 95% of
    real images."""
    from benchmarks import data

    calibration, _ = data.imagenet("calibration", 16)
    images, _ = data.imagenet("evaluation", 50)
    classes = {}
    for float_type in ("float32", "float16"):
        compiled = qpass.compile(real_models["efficientnet_lite0"], preset="int8",
                                 calibration={"input": calibration}, float_type=float_type,
                                 progress=False)
        written = onnx.load_from_string(compiled.to_bytes())
        classes[float_type] = compiled.run({"input": images})[0].argmax(axis=1)
    assert casts_after_dequantize(written) == 0
    assert scale_types(written) == {TensorProto.FLOAT16}
    assert (classes["float16"] == classes["float32"]).mean() >= 0.95


def test_fp4_weights_for_tensorrt_read_in_float16():
    """w4a8-fp for TensorRT (FP4 weights, opset-23 DequantizeLinear whose output type is its
    scale's): float16 scales, no Cast between a DQ and its MatMul, accepted by the linter."""
    rng = np.random.default_rng(1)
    calibration = {"x": rng.normal(0, 1, (32, 64)).astype(np.float32)}
    compiled = qpass.compile(matmul_model(), preset="w4a8-fp", target="tensorrt",
                             calibration=calibration, float_type="float16", group_size=32,
                             progress=False)
    written = onnx.load_from_string(compiled.to_bytes())
    assert casts_after_dequantize(written) == 0
    assert scale_types(written) == {TensorProto.FLOAT16}


def test_constants_outside_float16_keep_their_readers_in_float32():
    """An attention-mask style constant (-3.4e38, a Constant node) would become -inf in
    float16: the Constant and the Add reading it stay float32; the output stays finite."""
    mask = numpy_helper.from_array(np.full((16,), -3.0e38, np.float32), "mask")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Constant", [], ["m"], value=mask),
        helper.make_node("Mul", ["m", "zero_one"], ["bias"]),
        helper.make_node("Add", ["h", "bias"], ["s"]),
        helper.make_node("Softmax", ["s"], ["y"], axis=-1),
    ]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), "w"),
             numpy_helper.from_array((np.arange(16) % 2).astype(np.float32), "zero_one")]
    graph = helper.make_graph(
        nodes, "mask", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])], inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model = ir.from_proto(proto)
    CastFloatParts("float16")(model)
    written = ir.to_proto(model)
    types = value_types(written)
    assert types["m"] == types["bias"] == TensorProto.FLOAT
    assert types["h"] == TensorProto.FLOAT16
    x = rng.normal(0, 1, (4, 16)).astype(np.float32)
    output = run_onnx(written, {"x": x})[0]
    assert np.isfinite(output).all()
    assert relative_error(output, run_onnx(proto, {"x": x})[0]) < 5e-3
