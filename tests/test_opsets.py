"""Models as exporters write them: every preset on ResNet20 exported at opsets 11, 13 and 17
(TorchScript exporter, BatchNorm kept) loads in ONNX Runtime and stays near its float model."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from conftest import run_onnx, sqnr_db

import qpass

torch = pytest.importorskip("torch")

PRESETS = [  # (preset, target, options, least output SQNR in dB against the float model)
    ("int8", "onnxruntime", {}, 35),
    ("int8", "tensorrt", {}, 30),
    ("int8-tensor", "onnxruntime", {}, 35),
    ("fp8", "onnxruntime", {}, 20),
    ("w4a8-rtn", "onnxruntime", {}, 15),
]


@pytest.fixture(scope="module")
def exports():
    from benchmarks.models import ResNet20

    torch.manual_seed(0)
    module = ResNet20().eval()
    x = torch.randn(1, 3, 32, 32)
    models = {}
    for opset in (11, 13, 17):
        buffer = io.BytesIO()
        torch.onnx.export(
            module, (x,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )
        models[opset] = onnx.load_from_string(buffer.getvalue())
    return models


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize(("preset", "target", "options", "least_db"), PRESETS)
def test_every_preset_on_every_opset(exports, opset, preset, target, options, least_db):
    proto = exports[opset]
    assert proto.opset_import[0].version == opset
    rng = np.random.default_rng(0)
    calibration = {"input": rng.normal(0, 1, (16, 3, 32, 32)).astype(np.float32)}
    compiled = qpass.compile(
        proto, preset=preset, target=target, calibration=calibration, progress=False, **options
    )
    x = rng.normal(0, 1, (4, 3, 32, 32)).astype(np.float32)
    quantized = run_onnx(onnx.load_from_string(compiled.to_bytes()), {"input": x})[0]
    assert sqnr_db(run_onnx(proto, {"input": x})[0], quantized) >= least_db
