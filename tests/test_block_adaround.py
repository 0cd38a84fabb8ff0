"""Block AdaRound (BRECQ): blocks are cut where the issue's rules say, the torch function of a
block computes what ONNX Runtime computes on the quantized graph, and every block's output is
reconstructed at least as well as with round to nearest, measured in ONNX Runtime."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import tiny_cnn
from test_adaround import adarounded, const, fetch, nearest_integers

from qpass.calibration import Context
from qpass.cli import main
from qpass.passes import FoldBatchNorm, InsertQDQ, block_adaround
from qpass.passes.adaround import AdaRound
from qpass.passes.block_adaround import BlockAdaRound, BlockProgram, find_blocks
from qpass.presets import canonicalize, passes
from qpass.schemes import WEIGHT_INT4_CHANNEL


def rounded(proto: onnx.ModelProto, calibration: dict, **options):
    """(float model after BN folding, W4A8 model with block AdaRound, the pass)."""
    return adarounded(proto, calibration, BlockAdaRound, **options)


def quantized_with_blocks(proto, calibration):
    """The W4A8 graph before rounding, its roundable layers and their blocks."""
    model = ir.from_proto(proto)
    context = Context(calibration, model.graph, progress=False)
    rounding = BlockAdaRound(context)
    for p in (*canonicalize(), FoldBatchNorm(), rounding.snapshot(),
              InsertQDQ(context, weights=WEIGHT_INT4_CHANNEL)):
        p(model)
    layers = [layer for n in model.graph if (layer := rounding._roundable(n)) is not None]
    return model, layers, list(find_blocks(layers, rounding.block_layers))


def test_blocks_end_at_linear_layers_and_take_in_residual_adds(tiny_model, tiny_calibration):
    _, layers, blocks = quantized_with_blocks(tiny_model, tiny_calibration)
    assert [len(b.layers) for b in blocks] == [2, 1]  # conv + depthwise, then the classifier
    first = blocks[0]
    ops = [n.op_type for n in first.nodes]
    assert ops.count("Conv") == 2 and ops.count("Add") == 1 and ops[-1] == "Clip"
    assert first.input == layers[0].node.inputs[0].name
    assert first.nodes[-1].outputs[0].name == first.output


@pytest.mark.parametrize("seed", range(3))
def test_a_block_as_torch_computes_what_onnx_runtime_computes(seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    proto = tiny_cnn(seed, channels=16)
    x = rng.uniform(-1, 2, (16, 3, 16, 16)).astype(np.float32)
    model, _, blocks = quantized_with_blocks(proto, {"input": x})
    block = blocks[0]
    program = BlockProgram.of(block)
    assert program is not None
    block_input, expected = fetch(model, [block.input, block.output], x)
    weights = []
    for layer in block.layers:
        (w,) = fetch(model, [layer.dq.outputs[0].name], x)
        weights.append(torch.from_numpy(w))
    with torch.no_grad():
        got = program(weights, torch.from_numpy(block_input)).numpy()
    # the same numbers, but for an output that lands on a rounding tie of an inner Q/DQ pair
    # (float sums in another order): then one quantization step apart
    off = np.abs(got - expected) > 1e-5 * (1 + np.abs(expected))
    assert off.mean() < 1e-3 and np.abs(got - expected).max() < 0.1, off.mean()


@pytest.mark.parametrize("seed", range(3))
def test_every_block_output_is_reconstructed_at_least_as_well_as_round_to_nearest(seed):
    rng = np.random.default_rng(seed)
    proto = tiny_cnn(seed, channels=16)
    x = rng.uniform(-1, 2, (32, 3, 16, 16)).astype(np.float32)
    reference, model, rounding = rounded(proto, {"input": x}, iterations=300)
    blocks = list(find_blocks(
        [layer for n in model.graph if (layer := rounding._roundable(n)) is not None], 4
    ))
    float_weights = {n.outputs[0].name: const(n.inputs[1])
                     for n in ir.from_proto(reference).graph if n.op_type in ("Conv", "Gemm")}
    improved = 0
    for block in blocks:
        (target,) = fetch(reference, [block.output], x)
        (learned,) = fetch(model, [block.output], x)
        kept = [const(layer.dq.inputs[0]) for layer in block.layers]
        for layer, integers in zip(block.layers, kept, strict=True):
            nearest = nearest_integers(float_weights[layer.output], layer.dq)
            layer.dq.inputs[0].const_value = ir.tensor(nearest.astype(integers.dtype))
        (plain,) = fetch(model, [block.output], x)
        for layer, integers in zip(block.layers, kept, strict=True):
            layer.dq.inputs[0].const_value = ir.tensor(integers)
        learned_error = np.mean((learned - target) ** 2)
        nearest_error = np.mean((plain - target) ** 2)
        assert learned_error <= nearest_error * (1 + 1e-5), (block.output, learned_error,
                                                            nearest_error)
        improved += len(block.layers) > 1 and learned_error < nearest_error
    assert improved == sum(len(b.layers) > 1 for b in blocks) >= 1
    assert set(rounding.results) == {layer.output for b in blocks for layer in b.layers}


def test_held_out_samples_are_left_out_of_the_learning_and_decide_the_rounding(
        tiny_model, tiny_calibration):
    """held_out=0.25: the last 8 of 32 samples; each block's held-out error is its error on
    those samples as ONNX Runtime computes it, and a learned rounding is kept only where it
    beats round to nearest there as well as on all samples."""
    x = tiny_calibration["input"]
    reference, model, rounding = rounded(tiny_model, tiny_calibration, iterations=100,
                                         held_out=0.25)
    layers = [layer for n in model.graph if (layer := rounding._roundable(n)) is not None]
    for block in find_blocks(layers, rounding.block_layers):
        result = rounding.results[block.layers[0].output]
        (target,) = fetch(reference, [block.output], x[-8:])
        (learned,) = fetch(model, [block.output], x[-8:])
        positions = learned.size // learned.shape[1]
        stored = result.held_out_nearest_error if result.kept_nearest else result.held_out_error
        assert stored == pytest.approx(np.sum((learned - target) ** 2) / positions, rel=1e-3)
        assert result.held_out_error != pytest.approx(result.error, rel=1e-3)
        if not result.kept_nearest:
            assert result.error <= result.nearest_error
            assert result.held_out_error <= result.held_out_nearest_error


def test_blocks_beat_layer_by_layer_rounding_on_the_block_output(tiny_model, tiny_calibration):
    """The point of BRECQ: the first layer rounds so the second can cancel its error."""
    x = tiny_calibration["input"]
    reference, blockwise, rounding = rounded(tiny_model, tiny_calibration, iterations=300)
    model = ir.from_proto(tiny_model)
    context = Context(tiny_calibration, model.graph, progress=False)
    layerwise = AdaRound(context, iterations=300)
    for p in (*canonicalize(), FoldBatchNorm(), layerwise.snapshot(),
              InsertQDQ(context, weights=WEIGHT_INT4_CHANNEL), layerwise):
        p(model)
    layers = [layer for n in blockwise.graph if (layer := rounding._roundable(n)) is not None]
    block = next(iter(find_blocks(layers, 4)))
    (target,) = fetch(reference, [block.output], x)
    errors = [np.mean((fetch(m, [block.output], x)[0] - target) ** 2)
              for m in (blockwise, model)]
    assert errors[0] < errors[1], errors


@pytest.mark.slow
def test_resnet20_blocks_are_rounded_jointly_where_their_ops_are_covered(real_models):
    data = pytest.importorskip("benchmarks.data")
    calibration, _ = data.cifar10("calibration", limit=32)
    proto = onnx.load(real_models["resnet20"])
    _, _, rounding = rounded(proto, {"input": calibration}, iterations=50)
    results = list(rounding.results.values())
    assert len(results) == 20
    jointly = [r for r in results if results.count(r) > 1]  # layers sharing their block's result
    assert len(jointly) >= 12, rounding.results
    assert all(r.error <= r.nearest_error for r in results)


def test_cli_block_layers_picks_blocks_or_layer_by_layer(tiny_model, tiny_calibration, tmp_path,
                                                          capsys):
    onnx.save(tiny_model, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **tiny_calibration)
    argv = ["compile", str(tmp_path / "model.onnx"), "--preset", "w4a8", "--calib",
            str(tmp_path / "calib.npz"), "-q", "--iterations", "50"]
    for layers in ("1", "4"):
        out = tmp_path / f"model.{layers}.onnx"
        assert main([*argv, "-o", str(out), "--block-layers", layers]) == 0
        assert sum(t.data_type == onnx.TensorProto.INT4 for t in onnx.load(out).graph.initializer)
    assert main([*argv, "-o", str(tmp_path / "bad.onnx"), "--block-layers", "0"]) == 2
    assert "block_layers (--block-layers) must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()


def test_presets_pick_the_rounding_pass():
    assert sum(isinstance(p, BlockAdaRound) for p in passes("w4a8")) == 1
    layerwise = [p for p in passes("w4a8", block_layers=1) if isinstance(p, AdaRound)]
    assert len(layerwise) == 1 and not isinstance(layerwise[0], BlockAdaRound)
    names = [type(p).__name__ for p in passes("int8-tensor", adaround=True)]
    assert names.index("InsertQDQ") < names.index("AdaRound") < names.index("CorrectBias")
    assert "AdaRound" not in [type(p).__name__ for p in passes("int8-tensor")]


def test_a_block_with_an_op_it_does_not_cover_is_rounded_layer_by_layer(
    tiny_model, tiny_calibration, monkeypatch
):
    monkeypatch.delitem(block_adaround._OPS, "Add")  # the residual Add of the first block
    _, _, rounding = rounded(tiny_model, tiny_calibration, iterations=50)
    results = list(rounding.results.values())
    assert len(results) == 3 and len({id(r) for r in results}) == 3  # no shared block result
