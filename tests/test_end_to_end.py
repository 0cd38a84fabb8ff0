"""End to end on the real models: export, compile through the CLI, evaluate on real data."""

import numpy as np
import onnx
import pytest
from qpass.runtime import onnxruntime as rt

from qpass.cli import main

pytestmark = pytest.mark.slow
data = pytest.importorskip("benchmarks.data")

CASES = {
    # model: (loader, calibration samples, evaluation samples, allowed top-1 drop vs FP32)
    "efficientnet_lite0": (data.imagenet, 32, 200, 0.03),
    "resnet20": (data.cifar10, 64, 1000, 0.02),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_int8_matches_float_accuracy(real_models, name, tmp_path):
    loader, n_calib, n_eval, allowed_drop = CASES[name]
    calib, _ = loader("calibration", limit=n_calib)
    images, labels = loader("evaluation", limit=n_eval)
    np.savez(tmp_path / "calib.npz", input=calib)
    out = tmp_path / "int8.onnx"
    report = tmp_path / "report.html"
    code = main(
        [
            "compile",
            str(real_models[name]),
            "-o",
            str(out),
            "--preset",
            "int8",
            "--calib",
            str(tmp_path / "calib.npz"),
            "--report",
            str(report),
            "-q",
        ]
    )
    assert code == 0
    onnx.checker.check_model(onnx.load(out))

    float_sess, int8_sess = rt.session(real_models[name]), rt.session(out)
    fp32 = data.top1(lambda x: float_sess.run(None, {"input": x})[0], images, labels)
    int8 = data.top1(lambda x: int8_sess.run(None, {"input": x})[0], images, labels)
    assert int8 >= fp32 - allowed_drop, (fp32, int8)

    convs = sum(n.op_type == "Conv" for n in onnx.load(real_models[name]).graph.node)
    kernels = rt.optimized_op_types(out)
    assert kernels.get("QLinearConv") == convs, kernels
    assert "Conv" not in kernels and "FusedConv" not in kernels
    assert "SQNR" in report.read_text()
