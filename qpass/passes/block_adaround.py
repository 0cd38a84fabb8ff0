"""Block reconstruction: AdaRound with the rounding of a whole block learned on its output."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qpass.graph import attribute, constant, is_op, set_constant, sole_consumer
from qpass.passes.adaround import AdaRound, LayerResult, RoundableLayer
from qpass.passes.rounding import (
    INTEGER_RANGES,
    full_scale_zero,
    initial_logits,
    integer_grid,
    rectified_sigmoid,
    torch_threads,
)

logger = logging.getLogger(__name__)

_STEP_MACS = 128 << 20  # multiply-adds of one optimization step's forward


class BlockAdaRound(AdaRound):
    """AdaRound whose reconstruction target is the output of a block of layers
    (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block
    Reconstruction"): the layers of a block learn their rounding together, so a layer may
    round so that the next one cancels its error.

    Runs after InsertQDQ, with its `snapshot()` before it, as AdaRound. Rewrite rules:

    1. Blocks, in graph order: consecutive roundable layers, each reading the previous one's
       (quantized) output, up to a layer without a Relu/Clip after it (a linear bottleneck or
       the last convolution of a residual branch) or `block_layers` layers. The block's output
       is that layer's output, or, when it meets the block's input or another block tensor
       again in an Add (a residual connection), that Add's output (after its Relu/Clip).
    2. Each block runs as a torch function of its input, with the activation Q/DQ pairs inside
       it as fake quantization (straight-through rounding) and each weight as
       s (clip(floor(W/s) + h(V) + z) - z); the V of all its layers minimize AdaRound's
       relative objective with the block's output in place of the layer's:
           E / E(round to nearest) + lambda * mean over its weights (1 - |2 h(V) - 1|^beta),
           E = mean over output positions || block(x~) - block_float(x) ||^2
       with x~ the block input in the quantized graph (blocks above already rounded) and
       block_float(x) the float model's value of the block output.
    3. A block whose learned rounding reconstructs its calibration samples worse than round to
       nearest keeps round to nearest; with `held_out` > 0, also one that does worse on that
       fraction of the samples (the last ones), kept out of the learning. A block with an op
       the torch function does not cover, or that reads a computed tensor other than its
       input, is rounded layer by layer (AdaRound's rule 1).

    Memory: a block's input and float output are kept for as many calibration samples as
    `row_bytes` holds (spread evenly over the set); a step takes as many samples as 128M
    multiply-adds of the block allow. Torch uses all cores by default (`threads`): a step is
    large enough to gain from them. `self.results` has each layer's block result.
    """

    def __init__(self, context=None, *, block_layers: int = 4, threads: int | None = None,
                 **options):
        super().__init__(context, threads=threads, **options)
        if block_layers < 1:
            raise ValueError("block_layers must be >= 1")
        self.block_layers = block_layers

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = [layer for n in model.graph if (layer := self._roundable(n)) is not None]
        with torch_threads(self.threads):
            for number, block in enumerate(find_blocks(layers, self.block_layers)):
                if (program := BlockProgram.of(block)) is not None:
                    self._round_block(model, block, program, number)
                    continue
                for layer in block.layers:  # one float target each (rows seeded by index)
                    index = layers.index(layer)
                    target = self._float_targets(layers[: index + 1], index)[index]
                    self.results[layer.output] = self._round_layer(
                        model, layer, index, len(layers), target
                    )
        logger.info("rounded %d layers", len(layers))
        return ir.passes.PassResult(model, modified=bool(layers))

    def _round_block(self, model: ir.Model, block: _Block, program: BlockProgram, number: int):
        inputs, targets = self._block_samples(model, block)
        roundings = [_SoftWeight(layer) for layer in block.layers]
        with tqdm(total=self.iterations, desc=f"Block AdaRound {number + 1}", unit="it",
                  disable=not self.context.progress, leave=False) as bar:
            result = _learn(self, program, roundings, inputs, targets, bar.update)
        for layer, rounding in zip(block.layers, roundings, strict=True):
            integers = rounding.integers.astype(constant(layer.dq.inputs[0]).dtype)
            layer.dq.replace_input_with(
                0, set_constant(model.graph, layer.dq.inputs[0], integers)
            )
            self.results[layer.output] = result
        held_out = (f", held out {result.held_out_error:.4g} ({result.held_out_nearest_error:.4g})"
                    if self.held_out else "")
        kept = ", kept round to nearest" if result.kept_nearest else ""
        logger.info(
            "block %d (%s): reconstruction error %.4g (round to nearest %.4g)%s%s", number + 1,
            ", ".join(layer.node.name for layer in block.layers), result.error,
            result.nearest_error, held_out, kept,
        )

    def _block_samples(self, model: ir.Model, block: _Block) -> tuple[np.ndarray, np.ndarray]:
        """The block input in the quantized graph and its output in the float model, for the
        same calibration samples: every k-th, k as small as `row_bytes` allows for both."""
        every = None
        kept: dict[str, list[np.ndarray]] = {block.input: [], block.output: []}
        for source, name in ((model, block.input), (self.float_model, block.output)):
            seen = 0
            for outputs in self.context.run(source, [name], "block samples", progress=False,
                                            only=True):
                batch = outputs[name]
                if every is None:  # the output is taken to be about as large as the input
                    size = 2 * batch[0].nbytes * self.context.data.num_samples
                    every = max(1, math.ceil(size / self.row_bytes))
                kept[name].append(batch[(-seen) % every :: every].astype(np.float32))
                seen += len(batch)
        return np.concatenate(kept[block.input]), np.concatenate(kept[block.output])


# ---------------------------------------------------------------- blocks (rule 1)


@dataclasses.dataclass
class _Block:
    layers: list[RoundableLayer]
    input: str  # the (dequantized) tensor the first layer reads
    output: str  # a float tensor present in both graphs
    nodes: list[ir.Node]  # what computes `output` from `input`, in graph order


def find_blocks(layers: list[RoundableLayer], most: int):
    """Rule 1: the layers cut into blocks, each with its input, output and nodes."""
    current: list[RoundableLayer] = []
    for layer in layers:
        if current and not _feeds(current[-1], layer):
            yield _closed(current)
            current = []
        current.append(layer)
        if layer.reference.clamp is None or len(current) == most:
            yield _closed(current)
            current = []
    if current:
        yield _closed(current)


def _feeds(layer: RoundableLayer, following: RoundableLayer) -> bool:
    """`following` reads `layer`'s output (through its Relu/Clip and a Q/DQ pair)."""
    return _after_activation(layer.node.outputs[0]).name == _before_qdq(following.node.inputs[0])


def _closed(layers: list[RoundableLayer]) -> _Block:
    source = layers[0].node.inputs[0]
    end = _after_activation(layers[-1].node.outputs[0])
    inside = _descendants(source)
    residual = _residual_add(end, source, inside)
    if residual is not None:
        end = _after_activation(residual.outputs[0])
    nodes = _between(source, end, inside)
    return _Block(layers, source.name, end.name, nodes)


def _after_activation(value: ir.Value) -> ir.Value:
    consumer = sole_consumer(value)
    return consumer.outputs[0] if is_op(consumer, "Relu", "Clip") else value


def _before_qdq(value: ir.Value) -> str:
    """The name of the float tensor a dequantized activation stands for."""
    dq = value.producer()
    if is_op(dq, "DequantizeLinear") and is_op(q := dq.inputs[0].producer(), "QuantizeLinear"):
        return q.inputs[0].name
    return value.name


def _residual_add(value: ir.Value, source: ir.Value, inside: set[int]) -> ir.Node | None:
    """The Add that `value` (through a Q/DQ pair) meets the block's input or another tensor
    computed inside the block in, if any."""
    reader = sole_consumer(value)
    if is_op(reader, "QuantizeLinear"):
        dq = sole_consumer(reader.outputs[0])
        reader = sole_consumer(dq.outputs[0]) if is_op(dq, "DequantizeLinear") else None
    if not is_op(reader, "Add"):
        return None
    others = [v for v in reader.inputs if v is not None and v.producer() is not None]
    if all(v is source or id(v.producer()) in inside for v in others):
        return reader
    return None


def _descendants(value: ir.Value) -> set[int]:
    seen: set[int] = set()
    stack = list(value.consumers())
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(c for out in node.outputs for c in out.consumers())
    return seen


def _between(source: ir.Value, end: ir.Value, inside: set[int]) -> list[ir.Node]:
    """The nodes below `source` (`inside`) that compute `end`, and the weight
    DequantizeLinears they read, in graph order."""
    needed: dict[int, ir.Node] = {}
    stack = [end.producer()]
    while stack:
        node = stack.pop()
        if node is None or id(node) in needed or not (id(node) in inside or _is_weight_dq(node)):
            continue
        needed[id(node)] = node
        stack.extend(v.producer() for v in node.inputs if v is not None and v is not source)
    graph = end.producer().graph
    return [node for node in graph if id(node) in needed]


# ---------------------------------------------------------------- the block as torch (rule 2)


class BlockProgram:
    """A block's nodes as a torch function of its input, weights replaceable by layer."""

    def __init__(self, block: _Block):
        self.block = block
        self.layer_weights = {layer.dq.outputs[0].name: i for i, layer in enumerate(block.layers)}
        self.constants: dict[str, object] = {}  # torch tensors of constants, made once

    @classmethod
    def of(cls, block: _Block) -> BlockProgram | None:
        """The program, or None when an op is not covered or a computed tensor other than the
        block input is read (rule 3)."""
        produced = {v.name for node in block.nodes for v in node.outputs}
        for node in block.nodes:
            if not _covered(node):
                logger.info("%s: %s is not covered; layer by layer", node.name, node.op_type)
                return None
            for v in node.inputs:
                if v is not None and v.name not in produced and v.name != block.input \
                        and constant(v) is None:
                    logger.info("%s reads %s from outside its block; layer by layer",
                                node.name, v.name)
                    return None
        return cls(block)

    def __call__(self, weights: list, x):
        import torch

        values = {self.block.input: x}

        def read(v):
            if v is None:
                return None
            if v.name in values:
                return values[v.name]
            if v.name not in self.constants:
                self.constants[v.name] = torch.tensor(np.asarray(constant(v), np.float32))
            return self.constants[v.name]

        self.macs = 0
        for node in self.block.nodes:
            out = node.outputs[0].name
            if out in self.layer_weights:
                values[out] = weights[self.layer_weights[out]]
            elif _is_weight_dq(node):  # a bias, or the weight of a layer not in the block
                if out not in self.constants:
                    integers = constant(node.inputs[0])
                    scale, zero = full_scale_zero(node, integers.shape)
                    self.constants[out] = torch.from_numpy(
                        (scale * (integers - zero)).astype(np.float32)
                    )
                values[out] = self.constants[out]
            else:
                inputs = [read(v) for v in node.inputs]
                values[out] = _OPS[node.op_type](node, inputs)
                if node.op_type in ("Conv", "Gemm", "MatMul"):  # multiply-adds of this call
                    self.macs += values[out].numel() * inputs[1].numel() // values[out].shape[1]
        return values[self.block.output]


def _covered(node: ir.Node) -> bool:
    if _is_weight_dq(node):
        return True
    if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
        return False
    if node.op_type == "Conv":
        spatial = len(node.inputs[1].shape or ()) - 2
        return spatial in (1, 2) and attribute(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):  # activations: integer, per tensor
        scale = constant(node.inputs[1])
        zero = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        integer = zero is None or ir.DataType.from_numpy(zero.dtype) in INTEGER_RANGES
        return scale is not None and scale.size == 1 and integer
    if node.op_type == "Slice":  # constant bounds, forward steps
        bounds = [constant(v) for v in node.inputs[1:]]
        steps = bounds[3] if len(bounds) > 3 else None
        return all(b is not None for b in bounds) and (steps is None or bool(np.all(steps > 0)))
    if node.op_type == "Pad":  # constant mode and pads, every axis
        fixed = all(constant(v) is not None for v in node.inputs[1:3] if v is not None)
        return attribute(node, "mode", "constant") == "constant" and len(node.inputs) < 4 \
            and fixed
    return True


def _is_weight_dq(node: ir.Node) -> bool:
    return is_op(node, "DequantizeLinear") and constant(node.inputs[0]) is not None


def _conv(node, inputs):
    from torch.nn import functional

    x, w, *rest = inputs
    spatial = w.ndim - 2
    pads = attribute(node, "pads", None) or [0] * (2 * spatial)
    torch_pads = [p for i in reversed(range(spatial)) for p in (pads[i], pads[i + spatial])]
    conv = functional.conv2d if spatial == 2 else functional.conv1d
    return conv(functional.pad(x, torch_pads), w, rest[0] if rest else None,
                stride=attribute(node, "strides", None) or 1,
                dilation=attribute(node, "dilations", None) or 1,
                groups=attribute(node, "group", 1))


def _gemm(node, inputs):
    a, b, *rest = inputs
    if attribute(node, "transA", 0):
        a = a.T
    if attribute(node, "transB", 0):
        b = b.T
    out = attribute(node, "alpha", 1.0) * (a @ b)
    return out + attribute(node, "beta", 1.0) * rest[0] if rest and rest[0] is not None else out


def _clip(node, inputs):
    x, *bounds = [*inputs, None, None]
    low = bounds[0] if bounds[0] is not None else attribute(node, "min", -math.inf)
    high = bounds[1] if bounds[1] is not None else attribute(node, "max", math.inf)
    return x.clamp(float(low), float(high))


def _slice(node, inputs):
    x, starts, ends, *rest = [*inputs, None, None]
    axes = rest[0] if rest[0] is not None else range(len(starts))
    steps = rest[1] if rest[1] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        index[int(axis)] = slice(int(start), int(end), int(step))
    return x[tuple(index)]


def _pad(node, inputs):
    from torch.nn import functional

    x, pads, *rest = inputs
    value = float(rest[0]) if rest and rest[0] is not None and rest[0].numel() else 0.0
    n = x.ndim
    pads = [int(p) for p in pads]
    torch_pads = [p for i in reversed(range(n)) for p in (pads[i], pads[i + n])]
    return functional.pad(x, torch_pads, value=value)


def _quantize(node, inputs):
    """x / s + z rounded with a straight-through gradient, saturated to the zero point's type."""
    x, scale, *rest = inputs
    zero_value = node.inputs[2] if len(node.inputs) > 2 else None
    zero = rest[0] if rest and rest[0] is not None else 0.0
    low, high = integer_grid(node, constant(zero_value).dtype) if zero_value else (0, 255)
    scaled = x / scale + zero
    return (scaled + (scaled.round() - scaled).detach()).clamp(low, high)


def _dequantize(node, inputs):
    q, scale, *rest = inputs
    zero = rest[0] if rest and rest[0] is not None else 0.0
    return (q - zero) * scale


_OPS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda node, i: i[0] @ i[1],
    "Relu": lambda node, i: i[0].clamp_min(0),
    "Clip": _clip,
    "Add": lambda node, i: i[0] + i[1],
    "Mul": lambda node, i: i[0] * i[1],
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "GlobalAveragePool": lambda node, i: i[0].mean(dim=tuple(range(2, i[0].ndim)), keepdim=True),
    "Flatten": lambda node, i: i[0].flatten(attribute(node, "axis", 1)),
    "Slice": _slice,
    "Pad": _pad,
}


# ---------------------------------------------------------------- the optimization (rule 2-3)


class _SoftWeight:
    """One layer's weight s (clip(floor(W/s) + h(V) + z) - z), in the weight's own layout."""

    def __init__(self, layer: RoundableLayer):
        import torch

        integers = constant(layer.dq.inputs[0])
        scale, zero = full_scale_zero(layer.dq, integers.shape)
        scaled = layer.reference.weight.astype(np.float64) / scale
        self.nearest = integers.astype(np.float64)
        self.integers = self.nearest
        self.floor = np.floor(scaled) + zero
        self.limits = integer_grid(layer.dq, integers.dtype)
        self.scale, self.zero = scale, zero
        self.v = torch.tensor(initial_logits(scaled), dtype=torch.float32, requires_grad=True)
        self._floor = torch.from_numpy(self.floor.astype(np.float32))
        self._scale = torch.from_numpy(scale.astype(np.float32))
        self._zero = torch.from_numpy(zero.astype(np.float32))

    def h(self):
        return rectified_sigmoid(self.v)

    def soft(self):
        import torch

        return self._scale * (torch.clamp(self._floor + self.h(), *self.limits) - self._zero)

    def fixed(self, integers: np.ndarray):
        import torch

        return torch.from_numpy((self.scale * (integers - self.zero)).astype(np.float32))

    def learned(self) -> np.ndarray:
        return np.clip(self.floor + (self.v.detach().numpy() >= 0), *self.limits)


def _learn(options: AdaRound, program: BlockProgram, roundings: list[_SoftWeight],
           inputs: np.ndarray, targets: np.ndarray, progress) -> LayerResult:
    import torch

    generator = torch.Generator().manual_seed(options.seed)
    x, y = torch.from_numpy(inputs), torch.from_numpy(targets)
    held_out = min(int(options.held_out * len(x)), len(x) - 1)  # the last samples
    learning = len(x) - held_out
    nearest = [r.fixed(r.nearest) for r in roundings]
    with torch.no_grad():
        nearest_error = _error(program, nearest, x, y)
        nearest_out = _error(program, nearest, x[learning:], y[learning:]) if held_out \
            else nearest_error
        program(nearest, x[:1])  # counts its multiply-adds per sample
    unit = max(nearest_error, 1e-12)
    size = sum(r.v.numel() for r in roundings)
    optimizer = torch.optim.Adam([r.v for r in roundings], lr=options.lr)
    batch = max(1, min(learning, _STEP_MACS // max(program.macs, 1)))
    for step in range(options.iterations):
        chosen = torch.randperm(learning, generator=generator)[:batch]
        out = program([r.soft() for r in roundings], x[chosen])
        loss = _reconstruction(out, y[chosen]) / unit
        if (beta := options.annealed_beta(step)) is not None:
            penalty = sum((1 - (2 * r.h() - 1).abs().pow(beta)).sum() for r in roundings)
            loss = loss + options.reg_weight * penalty / size
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress(1)
    learned = [r.learned() for r in roundings]
    with torch.no_grad():
        fixed = [r.fixed(q) for r, q in zip(roundings, learned, strict=True)]
        error = _error(program, fixed, x, y)
        error_out = _error(program, fixed, x[learning:], y[learning:]) if held_out else error
    kept = nearest_error < error or nearest_out < error_out
    changed = float(np.mean(np.concatenate([
        (q != r.nearest).ravel() for r, q in zip(roundings, learned, strict=True)])))
    for r, q in zip(roundings, learned, strict=True):
        r.integers = r.nearest if kept else q
    return LayerResult(error, nearest_error, error_out, nearest_out, 0.0 if kept else changed,
                       kept)


def _reconstruction(out, y):
    """Squared error summed over channels (axis 1), mean over samples and positions."""
    positions = out.numel() // out.shape[1] if out.ndim > 1 else out.numel()
    return (out - y).pow(2).sum() / positions


def _error(program: BlockProgram, weights: list, x, y, chunk: int = 16) -> float:
    total = sum(
        float(_reconstruction(program(weights, x[i : i + chunk]), y[i : i + chunk]))
        * len(x[i : i + chunk])
        for i in range(0, len(x), chunk)
    )
    return total / len(x)
