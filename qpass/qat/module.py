"""`QATModule`: a compiled Q/DQ graph run by torch, its integers and steps made trainable.

The module runs the very graph `qpass.compile` produced for the target, node by node: each
weight's DequantizeLinear becomes a `WeightQuantizer`, each int32 bias a `BiasQuantizer`, each
activation's QuantizeLinear/DequantizeLinear (sharing one scale) an `ActivationQuantizer`; every
other node is its torch function. What it trains is therefore what `qpass.qat.convert` writes
back into the same graph: the trained integers, steps and zero points, and nothing else.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from qpass.errors import ModelError
from qpass.graph import attribute, constant, is_op
from qpass.metadata import CLAMPS_TO_GRID
from qpass.passes.rounding import integer_grid
from qpass.qat.kernels import qlinear_add, qlinear_conv
from qpass.qat.quantizers import ActivationQuantizer, BiasQuantizer, WeightQuantizer


class QATModule(nn.Module):
    """The trainable form of a compiled Q/DQ model (made by `qpass.qat.prepare`).

    Attributes:
        compiled: the `CompiledModel` of the preset (post-training quantization) it starts from.
        method: "lsq", "lsq+" or "pact".
        weights, biases, activations: the quantizers, keyed by the name of the initializer
            they stand for (the weight's integers, the bias's integers, the activation's scale).
    """

    def __init__(self, compiled, method: str):
        super().__init__()
        self.compiled, self.method = compiled, method
        graph = compiled.model.graph
        self.nodes = list(graph)
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self.freed = _freed_after(self.nodes, self.output_names)
        self.activations = nn.ModuleDict()
        self.weights = nn.ModuleDict()
        self.biases = nn.ModuleDict()
        self.floats = nn.ParameterDict()  # float biases (TensorRT keeps them float)
        self.keys: dict[str, str] = {}  # initializer name -> module key (ModuleDict keys: no dots)
        # ONNX Runtime runs 8-bit DQ -> Conv/Add -> Q as integer kernels (`qpass.qat.kernels`)
        self.integer_kernels = compiled.target.family == "onnxruntime"
        self.grid_bounds: dict[str, dict[str, ir.Value]] = {}  # scale -> {"Min": high, "Max": low}
        for node in self.nodes:
            if is_op(node, "QuantizeLinear", "DequantizeLinear"):
                self._add_quantizer(node)
        for node in self.nodes:
            if is_op(node, "Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
                self._add_bias(node)
        self.constants = {
            name: torch.from_numpy(_as_torch_type(v.const_value.numpy()))
            for name, v in graph.initializers.items()
            if v.const_value is not None and name not in self.keys
        }

    def key(self, name: str) -> str:
        return self.keys.setdefault(name, f"q{len(self.keys)}")

    def _add_quantizer(self, node: ir.Node) -> None:
        source, scale, zero = node.inputs[0], node.inputs[1], node.inputs[2]
        if node.op_type == "DequantizeLinear" and constant(source) is not None:
            q = constant(source)
            if q.dtype == np.int32:
                return  # a bias: `_add_bias` needs the activation and weight quantizers first
            low, high = integer_grid(node, q.dtype)
            axis = attribute(node, "axis", 1) if constant(scale).size > 1 else None
            self.weights[self.key(source.name)] = WeightQuantizer(
                q, constant(scale), constant(zero), axis, low, high
            )
            return
        if scale.name in self.keys:
            return
        zero_point = constant(zero)
        low, high = integer_grid(node, zero_point.dtype)
        bounds = _grid_bounds(node) if node.op_type == "QuantizeLinear" else {}
        if bounds:  # a 3- or 2-bit activation: its Min and Max hold the narrow range
            s, z = float(constant(scale)), float(zero_point)
            high = round(float(constant(bounds["Min"])) / s + z)
            low = round(float(constant(bounds["Max"])) / s + z)
            self.grid_bounds[scale.name] = bounds
        learn_zero = self.method == "lsq+" and int(zero_point) != low
        self.activations[self.key(scale.name)] = ActivationQuantizer(
            constant(scale), zero_point, low, high, self.method, learn_zero
        )

    def _add_bias(self, node: ir.Node) -> None:
        bias = node.inputs[2]
        dq = bias.producer() if bias is not None else None
        if constant(bias) is not None and bias.dtype == ir.DataType.FLOAT:
            self.floats[self.key(bias.name)] = nn.Parameter(torch.from_numpy(constant(bias).copy()))
            return
        if not is_op(dq, "DequantizeLinear") or constant(dq.inputs[0]) is None:
            return
        x_dq, w_dq = node.inputs[0].producer(), node.inputs[1].producer()
        if not (is_op(x_dq, "DequantizeLinear") and is_op(w_dq, "DequantizeLinear")):
            raise ModelError(f"{node.op_type} {node.name}: an int32 bias without dequantized "
                             "input and weight; qpass.qat trains the graphs qpass.compile makes")
        self.biases[self.key(dq.inputs[0].name)] = BiasQuantizer(
            constant(dq.inputs[0]),
            constant(dq.inputs[1]),
            self.activations[self.keys[x_dq.inputs[1].name]],
            self.weights[self.keys[w_dq.inputs[0].name]],
        )

    def forward(self, *inputs: torch.Tensor):
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs, strict=True))
        for node, freed in zip(self.nodes, self.freed, strict=True):
            outputs = self._run(node, env)
            for value, out in zip(node.outputs, outputs, strict=False):
                env[value.name] = out
            for name in freed:
                env.pop(name, None)
        results = [env[name] for name in self.output_names]
        return results[0] if len(results) == 1 else tuple(results)

    def _integer_kernel(self, q: ir.Node, env: dict, out: ActivationQuantizer):
        """The forward value ONNX Runtime's QLinearConv / QLinearAdd give this QuantizeLinear,
        or None where no 8-bit integer kernel computes it."""
        op = q.inputs[0].producer()
        if out.qmax - out.qmin != 255 or len(q.inputs[0].consumers()) != 1:
            return None
        sources = [v.producer() if v is not None else None for v in op.inputs] if op else []
        if not sources or not all(is_op(p, "DequantizeLinear") for p in sources):
            return None
        with torch.no_grad():
            y_scale, y_zero = out.scale(), out.zero()
            if is_op(op, "Conv") and len(sources) >= 2:
                x = self.activations[self.keys[sources[0].inputs[1].name]]
                weight = self.weights[self.keys[sources[1].inputs[0].name]]
                bias = (self.biases[self.keys[sources[2].inputs[0].name]]
                        if len(sources) > 2 else None)
                return qlinear_conv(
                    lambda a, w, b: _conv(op, a, w, b), env[sources[0].inputs[0].name],
                    x.zero(), x.scale(), weight.integers(), bias.integers() if bias else None,
                    weight.scale(), y_scale, y_zero, out.qmin, out.qmax,
                )
            if is_op(op, "Add"):
                a, b = (self.activations[self.keys[p.inputs[1].name]] for p in sources)
                return qlinear_add(
                    env[sources[0].inputs[0].name], a.zero(), a.scale(),
                    env[sources[1].inputs[0].name], b.zero(), b.scale(),
                    y_scale, y_zero, out.qmin, out.qmax,
                )
        return None

    def _value(self, value: ir.Value | None, env: dict):
        if value is None or not value.name:
            return None
        if value.name in env:
            return env[value.name]
        if value.name in self.keys and self.keys[value.name] in self.floats:
            return self.floats[self.keys[value.name]]
        return self.constants[value.name]

    def _run(self, node: ir.Node, env: dict) -> list[torch.Tensor]:
        op = node.op_type
        if op == "DequantizeLinear" and node.inputs[0].name in self.keys:
            key = self.keys[node.inputs[0].name]
            quantizer = self.weights[key] if key in self.weights else self.biases[key]
            return [quantizer()]
        if op in ("QuantizeLinear", "DequantizeLinear"):
            quantizer = self.activations[self.keys[node.inputs[1].name]]
            x = self._value(node.inputs[0], env)
            if op == "DequantizeLinear":
                return [quantizer.dequantize(x)]
            q = quantizer.quantize(x)
            exact = self._integer_kernel(node, env, quantizer) if self.integer_kernels else None
            return [q if exact is None else q + (exact - q).detach()]
        if CLAMPS_TO_GRID in node.metadata_props:  # the activation quantizer clamps
            return [self._value(node.inputs[0], env)]
        function = _OPS.get(op)
        if function is None or node.domain not in ("", "ai.onnx"):
            raise ModelError(
                f"{op} {node.name}: qpass.qat runs {', '.join(sorted(_OPS))} and Q/DQ; this op "
                "is not among them (train the model with another tool, or leave it out)"
            )
        args = [self._value(v, env) for v in node.inputs]
        result = function(node, *args)
        return result if isinstance(result, list) else [result]


def _freed_after(nodes: list[ir.Node], outputs: list[str]) -> list[list[str]]:
    """For each node, the values no later node reads (`forward` drops them after it); a
    QuantizeLinear also reads the integers under the DequantizeLinears feeding its producer
    (`_integer_kernel`)."""
    last = {v.name: i for i, n in enumerate(nodes) for v in n.inputs if v is not None}
    for i, node in enumerate(nodes):
        op = node.inputs[0].producer() if is_op(node, "QuantizeLinear") else None
        for v in op.inputs if op is not None else ():
            if v is not None and is_op(v.producer(), "DequantizeLinear"):
                name = v.producer().inputs[0].name
                last[name] = max(last.get(name, i), i)
    freed: list[list[str]] = [[] for _ in nodes]
    for name, i in last.items():
        if name not in outputs:
            freed[i].append(name)
    return freed


def _as_torch_type(array: np.ndarray) -> np.ndarray:
    """A copy torch can hold: 4-bit integers (ml_dtypes) widened to int32."""
    return array.astype(np.int32) if array.dtype.kind == "V" else np.array(array)


def _grid_bounds(q: ir.Node) -> dict[str, ir.Value]:
    """The bounds of the Min and Max (CLAMPS_TO_GRID) right before a QuantizeLinear, by op."""
    bounds, value = {}, q.inputs[0]
    while (node := value.producer()) is not None and CLAMPS_TO_GRID in node.metadata_props:
        bounds[node.op_type] = node.inputs[1]
        value = node.inputs[0]
    return bounds


# the torch function of each ONNX op (as in the ONNX operator reference)


def _ints(x) -> list[int]:
    return [int(v) for v in np.asarray(x.numpy() if torch.is_tensor(x) else x).reshape(-1)]


def _pads(node: ir.Node, rank: int) -> list[int]:
    if attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise ModelError(f"{node.op_type} {node.name}: auto_pad is not supported by qpass.qat")
    pads = list(attribute(node, "pads", [0] * (2 * rank)))
    return [p for i in reversed(range(rank)) for p in (pads[i], pads[i + rank])]  # F.pad order


def _conv(node, x, w, b=None):
    rank = w.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    x = F.pad(x, _pads(node, rank))
    return conv(x, w, b, stride=list(attribute(node, "strides", [1] * rank)),
                dilation=list(attribute(node, "dilations", [1] * rank)),
                groups=attribute(node, "group", 1))


def _gemm(node, a, b, c=None):
    a = a.transpose(-1, -2) if attribute(node, "transA", 0) else a
    b = b.transpose(-1, -2) if attribute(node, "transB", 0) else b
    y = attribute(node, "alpha", 1.0) * (a @ b)
    return y if c is None else y + attribute(node, "beta", 1.0) * c


def _pool(node, x, maximum: bool):
    rank = x.dim() - 2
    pads = list(attribute(node, "pads", [0] * (2 * rank)))
    if pads[:rank] != pads[rank:] or rank != 2:
        raise ModelError(f"{node.op_type} {node.name}: qpass.qat pools 2-D with symmetric pads")
    options = {"kernel_size": list(attribute(node, "kernel_shape", [])), "padding": pads[:rank],
               "stride": list(attribute(node, "strides", [1] * rank)),
               "ceil_mode": bool(attribute(node, "ceil_mode", 0))}
    if maximum:
        return F.max_pool2d(x, **options)
    return F.avg_pool2d(x, count_include_pad=bool(attribute(node, "count_include_pad", 0)),
                        **options)


def _reduce_mean(node, x, axes=None):
    axes = _ints(axes) if axes is not None else list(attribute(node, "axes", range(x.dim())))
    return x.mean(dim=axes, keepdim=bool(attribute(node, "keepdims", 1)))


def _reshape(node, x, shape):
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(_ints(shape))]
    return x.reshape(shape)


def _slice(node, x, starts, ends, axes=None, steps=None):
    index = [slice(None)] * x.dim()
    axes = _ints(axes) if axes is not None else list(range(len(_ints(starts))))
    steps = _ints(steps) if steps is not None else [1] * len(axes)
    for axis, start, end, step in zip(axes, _ints(starts), _ints(ends), steps, strict=True):
        if step < 0:
            raise ModelError(f"Slice {node.name}: negative steps are not supported by qpass.qat")
        index[axis] = slice(start, min(end, x.shape[axis]), step)
    return x[tuple(index)]


def _pad(node, x, pads, value=None, axes=None):
    if attribute(node, "mode", "constant") not in ("constant", b"constant") or axes is not None:
        raise ModelError(f"Pad {node.name}: only constant padding of all axes runs in qpass.qat")
    pads, rank = _ints(pads), x.dim()
    order = [p for i in reversed(range(rank)) for p in (pads[i], pads[i + rank])]
    return F.pad(x, order, value=float(value) if value is not None else 0.0)


def _clip(node, x, low=None, high=None):
    low = low if low is not None else attribute(node, "min", None)
    high = high if high is not None else attribute(node, "max", None)
    return torch.clamp(x, min=low, max=high)


_OPS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda node, a, b: a @ b,
    "Add": lambda node, a, b: a + b,
    "Sub": lambda node, a, b: a - b,
    "Mul": lambda node, a, b: a * b,
    "Div": lambda node, a, b: a / b,
    "Relu": lambda node, x: F.relu(x),
    "Sigmoid": lambda node, x: torch.sigmoid(x),
    "Clip": _clip,
    "Min": lambda node, a, b: torch.minimum(a, b),
    "Max": lambda node, a, b: torch.maximum(a, b),
    "MaxPool": lambda node, x: _pool(node, x, maximum=True),
    "AveragePool": lambda node, x: _pool(node, x, maximum=False),
    "GlobalAveragePool": lambda node, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reduce_mean,
    "Reshape": _reshape,
    "Flatten": lambda node, x: x.reshape(math.prod(x.shape[: attribute(node, "axis", 1)]), -1),
    "Concat": lambda node, *xs: torch.cat(xs, dim=attribute(node, "axis", 0)),
    "Slice": _slice,
    "Pad": _pad,
    "Identity": lambda node, x: x,
    "Transpose": lambda node, x: x.permute(*attribute(node, "perm", range(x.dim())[::-1])),
}
