"""AWQ: activation-aware input-channel scales folded into the producers, clipping, then RTN."""

from __future__ import annotations

import numpy as np
import pytest
from test_weight_only import captured_llama, run  # noqa: F401  (a fixture)

import qpass
from qpass.calibration.staged import StagedCalibration
from qpass.graph import constant
from qpass.passes import AWQ, RoundToNearest
from qpass.passes.awq import InputStatistics, output_error
from qpass.passes.groupwise import dequantize, quantize_rtn
from qpass.passes.matmul_weights import (
    block_index,
    ensure_weight_opset,
    quantization_stages,
    weight_matmuls,
)
from qpass.schemes import QuantScheme

SCHEME = QuantScheme("uint4", group_size=32)


def calibration(seed: int = 0) -> dict:
    return {"input_ids": np.random.default_rng(seed).integers(0, 256, (8, 16))}


def test_scaling_leaves_the_float_function_unchanged(captured_llama):  # noqa: F811
    """With alpha forced to 0.5, 1/s goes into the RMSNorm gains (q/k/v, gate/up) and into
    up_proj's output columns (down_proj); o_proj, behind attention, keeps s = 1; the logits of
    the scaled float model equal the original's."""
    model = captured_llama.clone()
    ensure_weight_opset(model)
    data = calibration()
    reference = run(captured_llama, data)
    context = qpass.Context(data, model.graph, batch_size=4, progress=False)
    awq = AWQ(context, weights=SCHEME, alphas=(0.5,))
    runner = StagedCalibration(context)
    for stage in quantization_stages(weight_matmuls(model.graph)):
        stats = runner.statistics(model, stage, InputStatistics, "stats")
        groups: dict[str, list] = {}
        for node in stage:
            groups.setdefault(node.inputs[0].name, []).append(node)
        for name, group in groups.items():
            awq._smooth(model.graph, group, stats[name])
    assert sorted(awq.chosen.values()) == [0.0] * 2 + [0.5] * 6  # 2 blocks: o_proj unscaled
    np.testing.assert_allclose(run(model, data), reference, rtol=1e-4, atol=1e-4)


def test_group_error_is_at_most_rtn_and_the_output_error_is_lower(captured_llama):  # noqa: F811
    """On block 0 (whose inputs are the float model's, as the pass saw them), the summed output
    error of each group of MatMuls reading one activation is at most RTN's (alpha = 0 and no
    clipping are in the search), lower for most; the logits' error is lower than RTN's."""
    data = calibration(1)
    context = qpass.Context(data, captured_llama.graph, batch_size=4, progress=False)
    awq = AWQ(context, weights=SCHEME)
    quantized = awq(captured_llama.clone()).model
    rtn = RoundToNearest(SCHEME)(captured_llama.clone()).model
    block0 = [n for n in weight_matmuls(captured_llama.graph) if block_index(n) == 0]
    names = sorted({n.inputs[0].name for n in block0})
    stats = {name: InputStatistics(0) for name in names}
    for outputs in context.run(captured_llama, names):
        for name, x in outputs.items():
            if not stats[name].rows:
                stats[name] = InputStatistics(x.shape[-1])
            stats[name].update(x)
    ratios = []
    for name in names:
        h = stats[name].hessian
        rtn_error = awq_error = 0.0
        for node in (n for n in block0 if n.inputs[0].name == name):
            w = constant(node.inputs[1])
            rtn_error += output_error(h, w, dequantize(*quantize_rtn(w, SCHEME), 32))
            awq_error += output_error(h, w, _effective_weight(quantized, awq, node.name))
        ratios.append(awq_error / rtn_error)
    assert len(ratios) == 4 and max(ratios) <= 1 + 1e-4 and min(ratios) < 0.95, ratios
    reference = run(captured_llama, data)
    assert np.mean((run(quantized, data) - reference) ** 2) < np.mean(
        (run(rtn, data) - reference) ** 2
    )


def _effective_weight(model, awq: AWQ, name: str) -> np.ndarray:
    """The weight the quantized MatMul applies to its original input: diag(1/s) Q(diag(s) W),
    times the column factors a later group folded into it."""
    node = next(n for n in model.graph if n.name == name)
    dq = node.inputs[1].producer()
    w_hat = dequantize(*(constant(v) for v in dq.inputs[:3]), dq.attributes["block_size"].value)
    s = awq.factors.get(node.inputs[0].name, np.ones(len(w_hat)))
    w_hat = w_hat / s[:, None]
    for use in node.outputs[0].uses():  # up_proj: its columns took down_proj's 1/s
        later = awq.factors.get(use.node.outputs[0].name)
        if use.node.op_type == "Mul" and later is not None:
            w_hat = w_hat * later[None, :]
    return w_hat


@pytest.mark.parametrize("fmt", ["dq", "matmulnbits"])
def test_awq_preset_runs_in_both_formats(captured_llama, fmt):  # noqa: F811
    data = calibration(2)
    compiled = qpass.compile(captured_llama, preset="w4a16-awq", calibration=data,
                             group_size=32, format=fmt, progress=False)
    ops = [n.op_type for n in compiled.model.graph]
    assert ops.count("MatMulNBits" if fmt == "matmulnbits" else "DequantizeLinear") == 14
    reference = run(captured_llama, data)
    assert np.abs(compiled.run(data)[0] - reference).max() < 0.2 * np.abs(reference).max()
