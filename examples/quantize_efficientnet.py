"""Quantize EfficientNet-Lite0 to INT8 and compare it with FP32 on the ImageNet sample.

Run from the repository root: `.venv/bin/python examples/quantize_efficientnet.py`.
Data: ../shared/data (or $QPASS_DATA); 100 calibration images, 900 evaluation images.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qpass.runtime import onnxruntime as rt

import qpass
from benchmarks import data, models


def main() -> None:
    calibration, _ = data.imagenet("calibration")
    images, labels = data.imagenet("evaluation")
    module = models.efficientnet_lite0()
    example = torch.from_numpy(calibration[:1])

    float_model = qpass.compile(module, passes=[], example_inputs=example)
    int8_model = qpass.compile(
        module, preset="int8", calibration=calibration, example_inputs=example
    )

    print(f"{'model':<6} {'top-1':>7} {'batch-1 ms':>11} {'batch-8 ms':>11}")
    for name, compiled in (("FP32", float_model), ("INT8", int8_model)):
        session = compiled.session()
        top1 = data.top1(lambda x, s=session: s.run(None, {"input": x})[0], images, labels)
        ms1 = rt.latency(session, {"input": images[:1]})
        ms8 = rt.latency(session, {"input": images[:8]})
        print(f"{name:<6} {top1:7.4f} {ms1:11.2f} {ms8:11.2f}")
    report = int8_model.report()
    print("\nworst layers by SQNR (dB):")
    for layer in report.worst(5):
        print(f"  {layer.op_type:<18} {layer.node:<32} {layer.sqnr_db:6.2f}")


if __name__ == "__main__":
    main()
