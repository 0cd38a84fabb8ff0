"""LoRC: a rank-r float branch for the weight quantization error, in standard ONNX."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from test_weight_only import correlated, mlp, run

import qpass
from qpass.passes import GPTQ, LowerToMatMulNBits, LowRankCompensation, RoundToNearest
from qpass.passes.lorc import low_rank
from qpass.schemes import QuantScheme

SCHEME = QuantScheme("uint4", group_size=32)


def output_error(model: ir.Model, reference: np.ndarray, x: np.ndarray) -> float:
    return float(np.mean((run(model, {"x": x}) - reference) ** 2))


def test_low_rank_factors_are_the_truncated_svd():
    e = np.random.default_rng(0).normal(size=(40, 24))
    previous = np.inf
    for rank in (1, 4, 12, 24):
        a, b = low_rank(e, rank)
        assert a.shape == (40, rank) and b.shape == (rank, 24)
        residual = np.linalg.norm(e - a.astype(np.float64) @ b)
        assert residual < previous
        previous = residual
    assert previous < 1e-5 * np.linalg.norm(e)  # full rank: exact up to float32


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_lorc_lowers_every_layer_error_and_the_output_error(quantizer):
    """After RTN or GPTQ, adding the rank-r branch lowers ||W - Ŵ - AB|| for each MatMul and the
    model's output error, more with a higher rank; the branch is plain MatMul/Add ONNX."""
    model = mlp(seed=3)
    x = correlated(256, 96, seed=4).reshape(32, 8, 96)
    reference = run(model, {"x": x})
    context = qpass.Context({"x": x}, model.graph, batch_size=8, progress=False)

    def quantized(rank: int | None) -> ir.Model:
        m = model.clone()
        quantize = RoundToNearest(SCHEME) if quantizer == "rtn" else GPTQ(context, weights=SCHEME)
        if rank is None:
            quantize(m)
            return m
        lorc = LowRankCompensation(rank)
        for p in (lorc.snapshot(), quantize, lorc):
            p(m)
        return m

    errors = [output_error(quantized(r), reference, x) for r in (None, 2, 8)]
    assert errors[0] > errors[1] > errors[2], errors
    m = quantized(4)
    ops = [n.op_type for n in m.graph]
    assert ops.count("Add") == 1 + 2 and ops.count("MatMul") == 3 + 2 * 2
    branch = [n for n in m.graph if n.name.endswith(".lorc_a")]
    assert {n.inputs[1].shape[1] for n in branch} == {4}


def test_lorc_composes_with_the_matmulnbits_lowering_in_onnxruntime():
    model = mlp(seed=5)
    x = correlated(64, 96, seed=6).reshape(8, 8, 96)
    results = {}
    for fmt in ("dq", "matmulnbits"):
        compiled = qpass.compile(model, preset="w4a16-gptq", calibration={"x": x}, group_size=32,
                                 format=fmt, lorc_rank=8, progress=False)
        results[fmt] = compiled.run({"x": x})[0]
    np.testing.assert_allclose(results["dq"], results["matmulnbits"], rtol=1e-4, atol=1e-4)
    lowered = qpass.compile(model, preset="w4a16-rtn", group_size=32, lorc_rank=8,
                            progress=False).model
    LowerToMatMulNBits()(lowered)
    assert sum(n.op_type == "MatMulNBits" for n in lowered.graph) == 2


def test_lorc_needs_a_snapshot_and_a_positive_rank():
    with pytest.raises(ValueError, match="rank"):
        LowRankCompensation(0)
    model = mlp()
    RoundToNearest(SCHEME)(model)
    with pytest.raises(ir.passes.PreconditionError, match="snapshot"):
        LowRankCompensation(4)(model)
