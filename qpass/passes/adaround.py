"""AdaRound: learn whether each weight rounds up or down, layer by layer, on calibration data."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qpass.calibration import Context
from qpass.graph import attribute, constant, is_op, set_constant, sole_consumer
from qpass.passes.base import CalibratedPass, ReadsFloatModel
from qpass.passes.rounding import (
    INTEGER_RANGES,
    full_scale_zero,
    initial_logits,
    integer_grid,
    rectified_sigmoid,
    torch_threads,
)

logger = logging.getLogger(__name__)

ROUNDED_OPS = ("Conv", "Gemm", "MatMul")
_STEP_ELEMENTS = 4 << 20
_STEP_MACS = 128 << 20


class AdaRound(ReadsFloatModel, CalibratedPass):
    """Choose up or down for every weight so each layer reproduces its float output
    (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

    Runs after InsertQDQ; the float model comes from `self.snapshot()` placed before it. Rewrite
    rules, for each Conv (1-D/2-D, explicit pads), Gemm (transA=0) or MatMul (2-D weight) whose
    weight is a DequantizeLinear of a constant integer tensor, in graph order:

    1. The integers q = clip(round(W/s) + z) become q = clip(floor(W/s) + h + z), h in {0, 1}
       per weight, learned by minimizing, with Adam on the continuous h(V) = clip(sigmoid(V)
       (zeta - gamma) + gamma, 0, 1),
           E(W~) / E(round to nearest) + lambda * mean over weights (1 - |2 h(V) - 1|^beta),
           E(W~) = mean over rows || f(W~ x~ + b) - f(W x + b) ||^2
       with W~ = s (clip(floor(W/s) + h(V) + z) - z), x~ the layer's input in the quantized
       graph (activations quantized, layers above already rounded), x its input in the float
       model, f the Relu or Clip that follows the layer, if any (the paper's asymmetric
       reconstruction with the activation), and beta annealed from 20 to 2 after a warm-up
       without the regularizer. The result is h = [V >= 0]. The paper's objective is
       E + lambda * sum, lambda = 0.01, over 10k steps; in the few hundred steps run here that
       leaves most h undecided between 0 and 1 on large layers, so the error is taken relative
       to round to nearest and the regularizer averaged: one lambda (16) then fits layers of
       any size and scale, with Adam's step 0.05 (docs/methods/data-free.md).
    2. Scale, zero point, axis and the int32 bias are untouched: only the integer each weight
       rounds to changes, so the bias scale (activation scale x weight scale) stays right.
    3. A layer whose learned rounding reconstructs its calibration rows worse than round to
       nearest keeps round to nearest: on all its rows, or, with `held_out` > 0, on that
       fraction of them kept out of the learning (off by default; docs/methods/data-free.md).

    Memory is bounded by one layer's sampled rows: at most `rows` input patches (Conv) or rows
    (Gemm/MatMul), and at most `row_bytes` of them, spread evenly over the calibration samples
    at random positions (the float targets of the next layers, from one float run, take at
    most `row_bytes` more). Each layer runs `iterations` Adam steps on windows of
    `batch_rows` random rows (fewer for wide layers: a step reads at most 4M inputs and does
    at most 128M multiply-adds). Torch runs on `threads` threads: one by default, because on
    a shared 2-core machine a second spinning thread slows these small products several times.
    Per-layer results are kept in `self.results` (`LayerResult`, by layer output name). The
    learned integers stay within the weight's grid (`integer_grid`: 3 bits in an INT4 tensor
    stay in [-4, 3]).
    """

    def __init__(
        self,
        context: Context | None = None,
        *,
        iterations: int = 500,
        batch_rows: int = 1024,
        rows: int = 16384,
        row_bytes: int = 128 << 20,
        reg_weight: float = 16.0,
        beta: tuple[float, float] = (20.0, 2.0),
        warmup: float = 0.2,
        lr: float = 5e-2,
        held_out: float = 0.0,
        threads: int | None = 1,
        seed: int = 0,
    ):
        super().__init__(context)
        if min(iterations, batch_rows, rows, row_bytes) < 1:
            raise ValueError("AdaRound needs iterations, batch_rows, rows and row_bytes >= 1")
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup is a fraction of the iterations in [0, 1), not {warmup}")
        if not 0 <= held_out < 1:
            raise ValueError(f"held_out is a fraction of the rows in [0, 1), not {held_out}")
        self.held_out = held_out
        self.iterations, self.batch_rows = iterations, batch_rows
        self.rows, self.row_bytes = rows, row_bytes
        self.reg_weight, self.beta, self.warmup, self.lr = reg_weight, beta, warmup, lr
        self.threads, self.seed = threads, seed
        self.float_model: bytes | None = None
        self.float_layers: dict[str, _FloatLayer] = {}
        self.results: dict[str, LayerResult] = {}

    def annealed_beta(self, step: int) -> float | None:
        """The regularizer's beta at `step` (cosine from beta[0] to beta[1]), None in warm-up."""
        start, end = self.beta
        warm = int(self.warmup * self.iterations)
        if step < warm:
            return None
        done = (step - warm) / max(self.iterations - warm, 1)
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * done))

    def record(self, model: ir.Model) -> None:
        self.float_model = ir.to_proto(model).SerializeToString()
        self.float_layers = {
            node.outputs[0].name: layer
            for node in model.graph
            if (layer := float_layer(node)) is not None
        }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = [layer for n in model.graph if (layer := self._roundable(n)) is not None]
        targets: dict[int, np.ndarray] = {}
        with torch_threads(self.threads):
            for index, layer in enumerate(layers):
                if index not in targets:
                    targets.update(self._float_targets(layers, index))
                result = self._round_layer(model, layer, index, len(layers), targets.pop(index))
                self.results[layer.output] = result
        logger.info("adarounded %d layers", len(layers))
        return ir.passes.PassResult(model, modified=bool(layers))

    def _roundable(self, node: ir.Node) -> RoundableLayer | None:
        """The layer to round, or None when rule 1 does not cover the op."""
        if not is_op(node, *ROUNDED_OPS) or not node.outputs:
            return None
        reference = self.float_layers.get(node.outputs[0].name)
        dq = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] else None
        if reference is None or not _is_dequantized_integer_constant(dq):
            return None
        if constant(dq.inputs[0]).shape != reference.weight.shape:
            logger.info("%s: the quantized weight's shape differs from the float one", node.name)
            return None
        return RoundableLayer(node, dq, reference)

    def _float_targets(self, layers: list[RoundableLayer], first: int) -> dict[int, np.ndarray]:
        """Float outputs f(W x + b) [groups, R, outs] at the sampled rows of layers `first`,
        first + 1, ... (as many as `row_bytes` hold their rows and outputs; at least one), from
        one run of the float model."""
        chosen, total = [], 0
        for index in range(first, len(layers)):
            shape = layers[index].reference.shape
            rows = self._rows_per_sample(shape) * self.context.data.num_samples
            size = 4 * rows * shape.groups * (shape.depth + shape.outs)
            if chosen and total + size > self.row_bytes:
                break
            chosen.append(index)
            total += size
        requests = [
            (layers[i].reference.input, layers[i].reference.shape,
             self._rows_per_sample(layers[i].reference.shape), (self.seed, i))
            for i in chosen
        ]
        rows = _sample_rows(self.context, self.float_model, requests)
        rows.reverse()
        return {i: layers[i].reference.output_of(rows.pop()) for i in chosen}  # frees each

    def _round_layer(self, model: ir.Model, layer: RoundableLayer, index: int, total: int,
                     target: np.ndarray) -> LayerResult:
        reference, shape = layer.reference, layer.reference.shape
        seed = (self.seed, index)
        inputs = self.layer_rows(model, layer, index)
        integers = constant(layer.dq.inputs[0])
        scale, zero = full_scale_zero(layer.dq, integers.shape)
        rounding = _Rounding(
            shape.canonical(reference.weight), shape.canonical(scale), shape.canonical(zero),
            integer_grid(layer.dq, integers.dtype), reference, shape.canonical(integers),
        )
        with tqdm(total=self.iterations, desc=f"AdaRound {index + 1}/{total}", unit="it",
                  disable=not self.context.progress, leave=False) as bar:
            result = rounding.learn(self, inputs, target, seed, bar.update)
        learned = shape.original(rounding.integers, integers.shape).astype(integers.dtype)
        layer.dq.replace_input_with(0, set_constant(model.graph, layer.dq.inputs[0], learned))
        logger.info(
            "%s: reconstruction error %.4g (round to nearest %.4g), %.1f%% of weights changed%s",
            layer.output, result.error, result.nearest_error, 100 * result.changed,
            ", kept round to nearest" if result.kept_nearest else "",
        )
        return result

    def layer_rows(self, model: ir.Model, layer: RoundableLayer, index: int) -> np.ndarray:
        """The sampled input rows [groups, R, depth] of the `index`-th layer in `model` (rows
        and positions seeded by `index`), from one run of `model`."""
        shape = layer.reference.shape
        request = (layer.node.inputs[0].name, shape, self._rows_per_sample(shape),
                   (self.seed, index))
        (inputs,) = _sample_rows(self.context, model, [request])
        return inputs

    def _rows_per_sample(self, shape: _Shape) -> int:
        samples = max(self.context.data.num_samples, 1)
        budget = min(self.rows, self.row_bytes // (4 * shape.groups * shape.depth))
        return max(1, math.ceil(budget / samples))


@dataclasses.dataclass
class LayerResult:
    """Reconstruction error (squared, summed over outputs, mean over rows) on all the layer's
    calibration rows and on those held out of the learning, learned rounding vs round to
    nearest, and the share of weights whose integer the learning changed (0 when round to
    nearest was kept)."""

    error: float
    nearest_error: float
    held_out_error: float
    held_out_nearest_error: float
    changed: float
    kept_nearest: bool


# ---------------------------------------------------------------- layers as grouped matmuls


@dataclasses.dataclass(frozen=True)
class _Shape:
    """A layer as `groups` independent matmuls: rows [R, groups, depth] -> [R, groups, outs].

    Conv weight [O, C/g, k...] is [g, O/g, C/g * prod(k)]; Gemm/MatMul weights are one group."""

    op_type: str
    groups: int
    outs: int
    depth: int
    transposed: bool = False  # Gemm transB=0 and MatMul store the weight as [K, N]
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()

    def canonical(self, weight: np.ndarray) -> np.ndarray:
        """The weight (or a same-shaped array) as [groups, outs, depth]."""
        if self.transposed:
            weight = weight.T
        return np.ascontiguousarray(weight).reshape(self.groups, self.outs, self.depth)

    def original(self, canonical: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.transposed:
            return canonical.reshape(shape[::-1]).T
        return canonical.reshape(shape)

    def rows(self, x: np.ndarray, positions) -> np.ndarray:
        """Input rows [P, groups, depth] of one sample `x` at the output positions chosen by
        `positions(count)`."""
        if self.op_type != "Conv":
            x = x.reshape(-1, self.depth)
            return x[positions(len(x))][:, None, :]
        spatial = len(self.kernel)
        x = np.pad(x, [(0, 0)] + [(self.pads[i], self.pads[i + spatial]) for i in range(spatial)])
        sizes = [
            (x.shape[1 + i] - self.dilations[i] * (self.kernel[i] - 1) - 1) // self.strides[i] + 1
            for i in range(spatial)
        ]
        chosen = np.unravel_index(positions(math.prod(sizes)), sizes)
        index = []
        for i in range(spatial):  # [P, k_0, ..., k_n] index along spatial axis i
            start = chosen[i] * self.strides[i]
            offsets = np.arange(self.kernel[i]) * self.dilations[i]
            along = [1] * (1 + spatial)
            along[1 + i] = -1
            index.append(start.reshape([-1] + [1] * spatial) + offsets.reshape(along))
        patches = x[(slice(None), *index)]  # [C, P, k...]
        patches = np.moveaxis(patches, 0, 1)
        return patches.reshape(len(patches), self.groups, self.depth)


def _conv_shape(node: ir.Node, weight: np.ndarray) -> _Shape | None:
    if weight.ndim not in (3, 4) or attribute(node, "auto_pad", "NOTSET") not in (
        "NOTSET",
        "VALID",
    ):
        return None
    kernel = weight.shape[2:]
    spatial = len(kernel)
    groups = attribute(node, "group", 1)
    pads = attribute(node, "pads", None) or [0] * (2 * spatial)
    return _Shape(
        "Conv", groups, weight.shape[0] // groups, math.prod(weight.shape[1:]),
        kernel=tuple(kernel), strides=tuple(attribute(node, "strides", None) or [1] * spatial),
        dilations=tuple(attribute(node, "dilations", None) or [1] * spatial), pads=tuple(pads),
    )


def _matmul_shape(node: ir.Node, weight: np.ndarray) -> _Shape | None:
    if weight.ndim != 2:
        return None
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return None
        if attribute(node, "transB", 0):
            return _Shape("Gemm", 1, weight.shape[0], weight.shape[1])
    return _Shape(node.op_type, 1, weight.shape[1], weight.shape[0], transposed=True)


@dataclasses.dataclass
class _FloatLayer:
    """What the float model says about one layer: weight, bias, input and the activation after."""

    weight: np.ndarray
    bias: np.ndarray  # [groups, outs], already times Gemm's beta
    alpha: float
    clamp: tuple[float, float] | None
    input: str
    shape: _Shape

    def output_of(self, rows: np.ndarray) -> np.ndarray:
        """f(alpha W x + b) of input rows [groups, R, depth]: the float target [groups, R, outs]."""
        import torch

        w = torch.from_numpy(self.shape.canonical(self.weight).astype(np.float32))
        out = self.alpha * torch.bmm(torch.from_numpy(rows), w.transpose(1, 2))
        out += torch.from_numpy(self.bias)[:, None, :]
        if self.clamp is not None:
            out = out.clamp(*self.clamp)
        return out.numpy()


def float_layer(node: ir.Node) -> _FloatLayer | None:
    """The float description of a roundable layer, or None."""
    if not is_op(node, *ROUNDED_OPS) or len(node.inputs) < 2:
        return None
    weight = constant(node.inputs[1])
    if weight is None or node.inputs[0] is None:
        return None
    shape = (_conv_shape if node.op_type == "Conv" else _matmul_shape)(node, weight)
    if shape is None:
        return None
    bias = np.zeros(shape.groups * shape.outs, np.float32)
    if node.op_type != "MatMul" and len(node.inputs) > 2 and node.inputs[2] is not None:
        value = constant(node.inputs[2])
        if value is None or value.size not in (1, bias.size):
            return None
        beta = attribute(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
        bias = bias + beta * value.reshape(-1).astype(np.float32)
    alpha = attribute(node, "alpha", 1.0) if node.op_type == "Gemm" else 1.0
    return _FloatLayer(
        weight, bias.reshape(shape.groups, shape.outs), float(alpha),
        _activation_bounds(node.outputs[0]), node.inputs[0].name, shape,
    )


def _activation_bounds(value: ir.Value) -> tuple[float, float] | None:
    """(low, high) of a Relu or constant Clip that alone reads the layer's output."""
    consumer = sole_consumer(value)
    if is_op(consumer, "Relu"):
        return 0.0, math.inf
    if not is_op(consumer, "Clip"):
        return None
    bounds = [attribute(consumer, "min", -math.inf), attribute(consumer, "max", math.inf)]
    for i in (1, 2):
        if len(consumer.inputs) > i and consumer.inputs[i] is not None:
            array = constant(consumer.inputs[i])
            if array is None:
                return None
            bounds[i - 1] = float(array)
    return bounds[0], bounds[1]


def _sample_rows(context: Context, model, requests) -> list[np.ndarray]:
    """For each request (tensor name, layer shape, rows per sample, seed), the layer's input
    rows [groups, R, depth] over the calibration set, from one run of `model`: `per_sample`
    random positions of each sample, in a random row order (the same positions and order for
    the same seed and samples, in any model)."""
    names = list(dict.fromkeys(name for name, *_ in requests))
    chunks: list[list[np.ndarray]] = [[] for _ in requests]
    for outputs in context.run(model, names, "AdaRound rows", progress=False, only=True):
        for (name, shape, per_sample, seed), kept in zip(requests, chunks, strict=True):
            for x in outputs[name]:  # the sample's index is len(kept)
                rng = np.random.default_rng([*seed, len(kept)])
                rows = shape.rows(x, lambda n, rng=rng, k=per_sample: _choose(rng, n, k))
                kept.append(rows.astype(np.float32))
    return [_grouped(kept, np.random.default_rng([*seed, len(kept)]))
            for kept, (_, _, _, seed) in zip(chunks, requests, strict=True)]


def _grouped(chunks: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Row chunks [P, groups, depth] as one array [groups, R, depth] in random row order,
    emptying `chunks` as it goes."""
    total = sum(len(c) for c in chunks)
    order = rng.permutation(total)
    grouped = np.empty((chunks[0].shape[1], total, chunks[0].shape[2]), np.float32)
    start = 0
    while chunks:
        chunk = chunks.pop(0)
        grouped[:, order[start : start + len(chunk)]] = chunk.transpose(1, 0, 2)
        start += len(chunk)
    return grouped


def _choose(rng: np.random.Generator, count: int, wanted: int) -> np.ndarray:
    if wanted >= count:
        return np.arange(count)
    return np.sort(rng.choice(count, wanted, replace=False))


# ---------------------------------------------------------------- the optimization (rule 1)


class _Rounding:
    """The learned rounding of one layer's weight, in canonical [groups, outs, depth] layout."""

    def __init__(self, weight, scale, zero, limits: tuple[int, int], reference: _FloatLayer,
                 nearest: np.ndarray):
        self.scaled = weight.astype(np.float64) / scale
        self.scale, self.zero, self.limits = scale, zero.astype(np.float64), limits
        self.reference = reference
        self.integers = nearest.astype(np.float64)  # as InsertQDQ rounded them

    def _integers(self, up: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(self.scaled) + up + self.zero, *self.limits)

    def learn(self, options: AdaRound, inputs: np.ndarray, target: np.ndarray, seed, progress):
        """Rule 1 on input rows [groups, R, depth] and float outputs [groups, R, outs], both in
        random row order: each step reads a random window of `batch_rows` consecutive rows,
        leaving out the last `held_out` fraction; rule 3 compares the roundings on all rows
        and on those left out."""
        import torch

        generator = torch.Generator().manual_seed(int(np.random.default_rng(seed).integers(2**31)))
        x, y = torch.from_numpy(inputs), torch.from_numpy(target)
        floor = torch.from_numpy((np.floor(self.scaled) + self.zero).astype(np.float32))
        scale = torch.from_numpy(self.scale.astype(np.float32))
        zero = torch.from_numpy(self.zero.astype(np.float32))
        v = torch.tensor(initial_logits(self.scaled), dtype=torch.float32, requires_grad=True)
        optimizer = torch.optim.Adam([v], lr=options.lr)
        low, high = self.limits
        held_out = min(int(options.held_out * x.shape[1]), x.shape[1] - 1)
        rows = x.shape[1] - held_out
        # a step reads at most _STEP_ELEMENTS inputs (wide depthwise layers: fewer rows) and
        # does at most _STEP_MACS multiply-adds (wide 1x1 convolutions: fewer rows)
        groups, depth, outs = x.shape[0], x.shape[2], y.shape[2]
        cap = min(_STEP_ELEMENTS // (groups * depth), _STEP_MACS // (groups * depth * outs))
        batch = min(options.batch_rows, rows, max(64, cap))

        def weight(h):
            return scale * (torch.clamp(floor + h, low, high) - zero)

        with torch.no_grad():  # the loss is relative to round to nearest's error
            unit = max(self._error(self.integers, x[:, :rows], y[:, :rows]), 1e-12)

        for step in range(options.iterations):
            first = int(torch.randint(0, rows - batch + 1, (1,), generator=generator))
            window = slice(first, first + batch)
            h = rectified_sigmoid(v)
            loss = self._reconstruction(weight(h), x[:, window], y[:, window]) / unit
            if (beta := options.annealed_beta(step)) is not None:
                loss = loss + options.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            progress(1)
        with torch.no_grad():
            learned = self._integers((v >= 0).double().numpy())
            nearest = self._error(self.integers, x, y) if held_out else unit  # unit: all rows
            errors = [self._error(learned, x, y), nearest]
            if held_out:
                x_out, y_out = x[:, rows:], y[:, rows:]
                errors += [self._error(q, x_out, y_out) for q in (learned, self.integers)]
            else:
                errors += errors
        kept = errors[1] < errors[0] or errors[3] < errors[2]
        changed = float(np.mean(learned != self.integers))
        if not kept:
            self.integers = learned
        return LayerResult(*errors, 0.0 if kept else changed, kept)

    def _reconstruction(self, weight, x, y):
        """Squared error of f(alpha W x + b) against y, summed over outputs, mean over rows."""
        import torch

        out = self.reference.alpha * torch.bmm(x, weight.transpose(1, 2))
        out = out + torch.from_numpy(self.reference.bias)[:, None, :]
        if self.reference.clamp is not None:
            out = out.clamp(*self.reference.clamp)
        return (out - y).pow(2).sum() / x.shape[1]

    def _error(self, integers: np.ndarray, x, y, chunk: int = 4096) -> float:
        """Mean over rows of the squared reconstruction error with these integers."""
        import torch

        weight = torch.from_numpy((self.scale * (integers - self.zero)).astype(np.float32))
        rows = x.shape[1]
        total = 0.0
        for i in range(0, rows, chunk):
            part = slice(i, i + chunk)
            size = min(chunk, rows - i)
            total += float(self._reconstruction(weight, x[:, part], y[:, part])) * size
        return total / rows


# ---------------------------------------------------------------- graph helpers


@dataclasses.dataclass
class RoundableLayer:
    """A layer to round: its op, the DequantizeLinear of its integer weight, and what the float
    model says about it."""

    node: ir.Node
    dq: ir.Node
    reference: _FloatLayer

    @property
    def output(self) -> str:
        return self.node.outputs[0].name


def _is_dequantized_integer_constant(node: ir.Node | None) -> bool:
    """A DequantizeLinear of a constant integer tensor with a constant scale (a weight)."""
    if not is_op(node, "DequantizeLinear") or constant(node.inputs[0]) is None:
        return False
    if constant(node.inputs[1]) is None:
        return False
    return node.inputs[0].dtype in INTEGER_RANGES
