"""Quantization-aware training of ResNet20 to W4A4 (LSQ), exported as the preset's Q/DQ graph.

Run from the repository root: `.venv/bin/python examples/qat_resnet20.py` (a few minutes on two
cores: 2048 training images, one epoch). Data: ../shared/data (or $QPASS_DATA); without it the
example exits with status 2 and one line saying where the data comes from.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data


def main() -> int:
    try:
        calibration, _ = data.cifar10("calibration")
        images, labels = data.cifar10("evaluation", 2000)
        train_x, train_y = data.cifar10_train(2048)
    except data.DataNotFoundError as e:
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        return 2

    import torch

    import qpass.qat
    from benchmarks import models

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    model = models.resnet20()
    example = (torch.from_numpy(calibration[:1]),)
    qat = qpass.qat.prepare(model, example, preset="w4a4", method="lsq", calibration=calibration)
    before = qat.compiled  # the post-training (PTQ) model the training starts from

    batches = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_y)),
        batch_size=64, shuffle=True,
    )
    qpass.qat.fit(qat, batches, teacher=model, epochs=1, lr=1e-4)
    after = qpass.qat.convert(qat)  # the same Q/DQ graph, trained integers and steps
    after.save("resnet20.w4a4.qat.onnx")

    def top1(compiled):
        return data.top1(lambda x: compiled.run({"input": x})[0], images, labels)

    print(f"W4A4 PTQ {100 * top1(before):.2f}  ->  W4A4 LSQ {100 * top1(after):.2f} "
          f"(top-1 on {len(images)} evaluation images; ONNX Runtime simulates 4-bit activations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
