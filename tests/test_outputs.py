"""Output safety: an output that would replace an input, another output or a device is refused
before any work, in one line with exit code 2; an interrupted or failed write leaves no file
behind; written files follow the umask; a model with external data is written atomically."""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import assert_refused, files
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.cli import main

compile_module = sys.modules["qpass.compile"]  # the module, not the function qpass.compile


def cli(capsys, *args) -> tuple[int, list[str]]:
    code = main(["compile", *map(str, args), "-q"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()


def compile_args(w: Path, output, *extra):
    return [w / "in" / "model.onnx", "-o", output, "--calib", w / "in" / "calib.npz", *extra]


def _external_data(w: Path) -> Path:
    """Save in/model.onnx again with its weights in in/model.onnx.data."""
    model = w / "in" / "model.onnx"
    onnx.save(
        onnx.load(model),
        model,
        save_as_external_data=True,
        size_threshold=0,
        location="model.onnx.data",
    )
    return w / "in" / "model.onnx.data"


def _link(w: Path, kind: str) -> Path:
    link = w / "out" / f"{kind}.onnx"
    (os.symlink if kind == "symlink" else os.link)(w / "in" / "model.onnx", link)
    return link


REFUSED = {
    "output is the model": (
        lambda w: compile_args(w, w / "in" / "model.onnx"),
        "output .* is the input model",
    ),
    "output is the model by another path": (
        lambda w: compile_args(w, w / "out" / ".." / "in" / "model.onnx"),
        "output .* is the input model",
    ),
    "output is a symlink to the model": (
        lambda w: compile_args(w, _link(w, "symlink")),
        "output .* is the input model",
    ),
    "output is a hard link to the model": (
        lambda w: compile_args(w, _link(w, "hardlink")),
        "output .* is the input model",
    ),
    "output is the calibration file": (
        lambda w: compile_args(w, w / "in" / "calib.npz"),
        "output .* is the calibration file",
    ),
    "output is the model's external data": (
        lambda w: compile_args(w, _external_data(w)),
        "output .* is the input model's external data",
    ),
    "report is the output": (
        lambda w: compile_args(w, w / "out" / "o.onnx", "--report", w / "out" / "o.onnx"),
        "report .* is the output model",
    ),
    "report is the model": (
        lambda w: compile_args(w, w / "out" / "o.onnx", "--report", w / "in" / "model.onnx"),
        "report .* is the input model",
    ),
    "report is the calibration file": (
        lambda w: compile_args(w, w / "out" / "o.onnx", "--report", w / "in" / "calib.npz"),
        "report .* is the calibration file",
    ),
    "output is a folder": (lambda w: compile_args(w, w / "out"), "it is a folder"),
    "output is /dev/null": (lambda w: compile_args(w, "/dev/null"), "it is not a regular file"),
    "output folder is missing": (
        lambda w: compile_args(w, w / "missing" / "o.onnx"),
        "folder .*missing does not exist",
    ),
    "report folder is missing": (
        lambda w: compile_args(w, w / "out" / "o.onnx", "--report", w / "missing" / "r.md"),
        "cannot write report .* does not exist",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsafe_outputs_are_refused_before_any_work(workspace, case, monkeypatch, capsys):
    arguments, message = REFUSED[case]
    args = arguments(workspace)  # may create a link in out/
    monkeypatch.setattr(qpass, "compile", lambda *a, **k: pytest.fail("compiled before refusing"))
    assert_refused(capsys, workspace, ["compile", *args, "-q"], message)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_output_whose_data_file_would_replace_the_models_data_is_refused(
    tmp_path, tiny_model, monkeypatch, capsys
):
    """a.onnx keeps its weights in b.onnx.data; `-o b.onnx` of a model over 2 GB would write
    b.onnx.data."""
    model = tmp_path / "a.onnx"
    onnx.save(
        tiny_model, model, save_as_external_data=True, location="b.onnx.data", size_threshold=0
    )
    before = files(tmp_path)
    monkeypatch.setattr(qpass, "compile", lambda *a, **k: pytest.fail("compiled before refusing"))
    code, lines = cli(capsys, model, "-o", tmp_path / "b.onnx", "--preset", "w4a16-rtn")
    assert code == 2 and len(lines) == 1
    assert "output data file" in lines[0] and "external data" in lines[0]
    assert files(tmp_path) == before


def test_read_only_output_folder_is_refused(workspace, read_only_folder, monkeypatch, capsys):
    before = files(workspace)
    monkeypatch.setattr(qpass, "compile", lambda *a, **k: pytest.fail("compiled before refusing"))
    code, lines = cli(capsys, *compile_args(workspace, read_only_folder / "o.onnx"))
    assert code == 2 and len(lines) == 1 and "is not writable" in lines[0]
    assert files(workspace) == before


def _interrupt_compile(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compile_module, "_run", interrupted)


def _interrupt_write(monkeypatch):
    def interrupted(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)


def _terminate_compile(monkeypatch):
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the compile")

    monkeypatch.setattr(compile_module, "_run", terminated)


@pytest.mark.parametrize(
    ("stop", "code"),
    [(_interrupt_compile, 130), (_interrupt_write, 130), (_terminate_compile, 128 + 15)],
    ids=["ctrl-c-in-compile", "ctrl-c-in-write", "sigterm-in-compile"],
)
def test_interrupted_compile_leaves_nothing_behind(workspace, stop, code, monkeypatch, capsys):
    (workspace / "out" / "o.onnx").write_bytes(b"the previous output")
    before = files(workspace)
    stop(monkeypatch)
    args = compile_args(
        workspace, workspace / "out" / "o.onnx", "--report", workspace / "out" / "r.md"
    )
    assert cli(capsys, *args) == (code, ["qpass: interrupted"])
    assert files(workspace) == before
    assert sorted(os.listdir(workspace / "out")) == ["o.onnx"]  # no temporary file or folder


@pytest.mark.parametrize(
    ("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"]
)
def test_written_files_follow_the_umask(workspace, umask, mode, capsys):
    before = files(workspace / "in")
    previous = os.umask(umask)
    try:
        out, report = workspace / "out" / "o.onnx", workspace / "out" / "r.json"
        assert cli(capsys, *compile_args(workspace, out, "--report", report)) == (0, [])
    finally:
        os.umask(previous)
    assert sorted(os.listdir(workspace / "out")) == ["o.onnx", "r.json"]
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert stat.S_IMODE(report.stat().st_mode) == mode
    assert files(workspace / "in") == before


@pytest.fixture
def compiled(tiny_model, tiny_calibration):
    return qpass.compile(tiny_model, calibration=tiny_calibration, progress=False)


@pytest.fixture
def compiled_matmul():
    """x [b, 64] -> MatMul(64 x 64) -> y, W8A8 dynamic: a 4 KB int8 weight (external data
    holds tensors of 256 bytes and more)."""
    weight = np.random.default_rng(0).normal(0, 0.1, (64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return qpass.compile(model, preset="w8a8-dynamic", progress=False)


def test_model_with_external_data_is_saved_whole_and_loads_from_anywhere(
    compiled_matmul, tmp_path, monkeypatch
):
    compiled = compiled_matmul
    monkeypatch.setattr(compile_module, "EXTERNAL_DATA_BYTES", 0)
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    previous = os.umask(0o022)
    try:
        path = compiled.save(tmp_path / "out" / "big.onnx")
    finally:
        os.umask(previous)
    assert sorted(os.listdir(tmp_path / "out")) == ["big.onnx", "big.onnx.data"]
    for written in (path, tmp_path / "out" / "big.onnx.data"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert (tmp_path / "out" / "big.onnx.data").stat().st_size > 0
    monkeypatch.chdir(tmp_path / "elsewhere")
    x = np.random.default_rng(1).normal(0, 1, (4, 64)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], compiled.run({"x": x})[0])


class _FailingTensor(ir.Tensor):
    """A weight whose bytes cannot be written (a full disk, or Ctrl-C, mid-write)."""

    error: BaseException = OSError(errno.ENOSPC, "No space left on device")

    def tofile(self, file):
        file.write(b"\0" * 16)
        raise self.error

    def tobytes(self):
        raise self.error


def _fail_data_write(model: ir.Model, error: BaseException) -> None:
    value = max(model.graph.initializers.values(), key=lambda v: v.const_value.nbytes)
    tensor = _FailingTensor(value.const_value.numpy(), name=value.name)
    tensor.error = error
    value.const_value = tensor


@pytest.mark.parametrize("failure", ["disk full in data", "ctrl-c in data", "model rename"])
def test_failed_external_data_save_leaves_neither_file(
    compiled_matmul, failure, tmp_path, monkeypatch
):
    compiled = compiled_matmul
    monkeypatch.setattr(compile_module, "EXTERNAL_DATA_BYTES", 0)
    folder = tmp_path / "out"
    folder.mkdir()
    if failure == "model rename":
        replace = os.replace

        def fail_on_model(source, destination):
            if str(destination).endswith(".onnx"):
                raise OSError(errno.EIO, "Input/output error")
            replace(source, destination)

        monkeypatch.setattr(os, "replace", fail_on_model)
        expected = qpass.OutputError
    elif failure == "ctrl-c in data":
        _fail_data_write(compiled.model, KeyboardInterrupt())
        expected = KeyboardInterrupt
    else:
        _fail_data_write(compiled.model, OSError(errno.ENOSPC, "No space left on device"))
        expected = qpass.OutputError
    with pytest.raises(expected):
        compiled.save(folder / "big.onnx")
    assert os.listdir(folder) == []


def test_api_saves_refuse_folders_and_devices(compiled, tmp_path):
    for path in (tmp_path, Path("/dev/null")):
        with pytest.raises(qpass.OutputError, match="cannot write"):
            compiled.save(path)
        with pytest.raises(qpass.OutputError, match="cannot write"):
            compiled.report().save(path)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert os.listdir(tmp_path) == []
