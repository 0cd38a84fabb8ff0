"""Quantize EfficientNet-Lite0 to INT8 and compare it with FP32 on the ImageNet sample.

Run from the repository root: `.venv/bin/python examples/quantize_efficientnet.py`.
Data: ../shared/data (or $QPASS_DATA); 100 calibration images, 900 evaluation images. Without
it the example exits with status 2 and one line saying where the data comes from.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data


def main() -> int:
    try:
        calibration, _ = data.imagenet("calibration")
        images, labels = data.imagenet("evaluation")
    except data.DataNotFoundError as e:
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        return 2

    import torch
    from qpass.runtime import onnxruntime as rt

    import qpass
    from benchmarks import models

    # torch's ONNX exporter logs a warning for each torchvision op it cannot register
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    module = models.efficientnet_lite0()
    example = torch.from_numpy(calibration[:1])

    float_model = qpass.compile(module, passes=[], example_inputs=example)
    int8_model = qpass.compile(
        module, preset="int8", calibration=calibration, example_inputs=example
    )

    print(f"{'model':<6} {'top-1 %':>8} {'batch-1 ms':>11} {'batch-8 ms':>11}")
    for name, compiled in (("FP32", float_model), ("INT8", int8_model)):
        session = compiled.session()
        top1 = data.top1(lambda x, s=session: s.run(None, {"input": x})[0], images, labels)
        ms1 = rt.latency(session, {"input": images[:1]})
        ms8 = rt.latency(session, {"input": images[:8]})
        print(f"{name:<6} {100 * top1:8.2f} {ms1:11.2f} {ms8:11.2f}")
    report = int8_model.report()
    print("\nlayers with the most quantization error (SQNR of their output, dB):")
    for layer in report.worst(5):
        print(f"  {layer.op_type:<18} {layer.source:<32} {layer.sqnr_db:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
