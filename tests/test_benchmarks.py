"""Benchmark statistics: latency ratios compare rows measured in the same round."""

import pytest

from benchmarks.common import paired_ratio


def test_paired_ratio_ignores_one_rows_lucky_round():
    """Two equally fast models on a machine whose speed drifts between rounds: the reference
    has one fast spell (0.24 ms) the other model missed. The best-round ratio reads 1.12x;
    the paired ratio reads 1.0x."""
    drift = [0.28, 0.31, 0.30, 0.27, 0.28, 0.27, 0.28]
    reference = [*drift[:-1], 0.24]
    assert min(drift) / min(reference) == pytest.approx(0.27 / 0.24)
    assert paired_ratio(drift, reference) == pytest.approx(1.0)


def test_paired_ratio_sees_a_steady_slowdown():
    reference = [0.28, 0.31, 0.30, 0.27, 0.24]
    assert paired_ratio([1.2 * t for t in reference], reference) == pytest.approx(1.2)


def test_mcnemar_p_matches_the_binomial_tail():
    """Exact McNemar: the two-sided binomial tail of the discordant images at 1/2."""
    from math import comb

    from benchmarks.cnn import mcnemar_p

    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_p(3, 9) == pytest.approx(2 * sum(comb(12, i) for i in range(4)) / 2**12)
    assert mcnemar_p(9, 3) == mcnemar_p(3, 9) and mcnemar_p(60, 74) > 0.2


@pytest.mark.parametrize("method", ["w4a8-rtn", "fp8:float:correct_bias=false", "minmax"])
def test_the_cnn_compile_worker_compiles_and_reports(tmp_path, tiny_model, tiny_calibration,
                                                     capsys, method):
    """One compile of a benchmarks.cnn row in its worker: the model is written and the JSON line
    (wall time, peak RSS, exit code) printed."""
    import json

    import numpy as np
    import onnx

    from benchmarks.cnn import worker

    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    onnx.save(tiny_model, model)
    np.savez(calib, input=tiny_calibration["input"])
    assert worker("qpass", method, "8", str(model), str(calib), str(out)) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rc"] == 0 and report["compile_s"] > 0 and out.is_file()
