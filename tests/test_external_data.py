"""Models with external data: compiled from any working directory, their outputs self-contained
(data that is missing or outside the model's folder: the bad-input suite, test_bad_input.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run_onnx, sqnr_db, tiny_cnn
from onnx import external_data_helper

from qpass.cli import main


@pytest.fixture
def external_model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(tiny_cnn(), folder / "m.onnx", save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)  # (turns its tensors into references)
    return folder / "m.onnx", tiny_cnn()


def _compile(tmp_path, source, capsys):
    rng = np.random.default_rng(0)
    calib, out = tmp_path / "c.npz", tmp_path / "out" / "q.onnx"
    out.parent.mkdir(exist_ok=True)
    np.savez(calib, input=rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32))
    code = main(["compile", str(source), "--calib", str(calib), "-q", "-o", str(out)])
    return code, out, capsys.readouterr().err


def test_external_data_compiles_from_another_folder(tmp_path, external_model, monkeypatch,
                                                    capsys):
    source, proto = external_model
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = (source.parent / "m.onnx.data").read_bytes()
    code, out, err = _compile(tmp_path, source, capsys)
    assert code == 0, err
    written = onnx.load(out, load_external_data=False)
    assert not any(external_data_helper.uses_external_data(t) for t in written.graph.initializer)
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    assert sqnr_db(run_onnx(proto, {"input": x})[0], run_onnx(written, {"input": x})[0]) >= 20
    assert (source.parent / "m.onnx.data").read_bytes() == before
