"""Output files: checked before any work, written atomically with the umask's permissions."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qpass.errors import OutputError


def check_outputs(
    output: Path, report: Path | None = None, *, model: Path, calibration: Path | None = None
) -> None:
    """Refuse, before any work, outputs that would replace an input or each other, or that
    cannot be written: a folder, a device, a missing or read-only folder. Paths are compared
    resolved (symlinks followed) and by `os.path.samefile` (hard links)."""
    output = Path(output)
    outputs = {"output": output} if report is None else {"output": output, "report": Path(report)}
    for what, path in outputs.items():
        check_writable(path, what)
    if report is not None and _same(outputs["report"], output):
        raise OutputError(f"report {report} is the output model {output}: give another path")
    written = {**outputs, "output data file": output.parent / f"{output.name}.data"}
    inputs = [("the input model", Path(model))]
    if calibration is not None:
        inputs.append(("the calibration file", Path(calibration)))
    existing = [path for path in written.values() if path.exists()]  # a new name is no input
    if any(_mentions(Path(model), path.name) for path in existing):
        inputs += [("the input model's external data", p) for p in _external_data(model)]
    for what, path in written.items():
        for name, source in inputs:
            if _same(path, source):
                raise OutputError(f"{what} {path} is {name} {source}: give another path")


def check_writable(path: Path, what: str = "") -> None:
    """Refuse a path that exists and is not a regular file, or whose folder is missing or
    read-only; `what` names the file in the message."""
    path = Path(path)
    what = f"{what} {path}" if what else str(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise OutputError(f"cannot write {what}: it is {kind}; give a file path")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {what}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what}: folder {folder} is not writable")


def write_atomically(path: Path, data: bytes) -> Path:
    """Write bytes to `path` through a temporary file beside it, then rename (`replacing`)."""
    path = Path(path)
    with replacing(path) as (temporary,):
        temporary.write_bytes(data)
    return path


PIECE_BYTES = 1 << 20


def write_model(path: Path, model) -> Path:
    """Write an `onnx_ir.Model` as one ONNX file through `replacing`, holding one large tensor's
    bytes at a time: `ir.to_proto` and its serialization would hold every weight twice at once.

    The file is the serialized model without its initializers of `PIECE_BYTES` or more, then, for
    each of them, a serialized ModelProto holding just that initializer. Protobuf parses
    concatenated messages as one message merged from them (the graph merged, repeated fields
    appended: protobuf's encoding guide, "Last One Wins"), so the file reads as the whole model."""
    import onnx
    import onnx_ir as ir

    from qpass.graph import tensors_left_out

    path = Path(path)
    large = [
        value
        for value in model.graph.initializers.values()
        if value.const_value is not None and value.const_value.nbytes >= PIECE_BYTES
    ]
    with replacing(path) as (temporary,), temporary.open("wb") as f:
        with tensors_left_out(large):
            f.write(ir.to_proto(model).SerializeToString())
        for value in large:
            piece = onnx.ModelProto()
            tensor = piece.graph.initializer.add()
            ir.serde.serialize_tensor_into(tensor, value.const_value)
            tensor.name = value.name
            f.write(piece.SerializeToString())
    return path


@contextlib.contextmanager
def replacing(*paths: Path) -> Iterator[list[Path]]:
    """Temporary paths, in a new folder beside `paths` (which share one folder), with the same
    file names. The block writes them; when it ends without an exception they are renamed onto
    `paths` in order (a file another refers to goes first). On any exception, Ctrl-C included,
    no new file is left: the temporary folder is removed and so is any file already renamed.

    Files are created by `open`, so they follow the umask (mkstemp would make them 0600)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        check_writable(path)
    folder = paths[0].parent
    try:
        temporary = Path(tempfile.mkdtemp(dir=folder, prefix=f".{paths[0].name}.", suffix=".tmp"))
    except OSError as e:
        raise OutputError(f"cannot write {paths[0]}: {e.strerror}") from e
    renamed: list[Path] = []
    try:
        yield [temporary / p.name for p in paths]
        for path in paths:
            os.replace(temporary / path.name, path)
            renamed.append(path)
    except BaseException as e:
        for path in renamed:
            path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {paths[-1]}: {e.strerror or e}") from e
        raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _mentions(path: Path, name: str, chunk: int = 1 << 20) -> bool:
    """Whether the file's bytes contain `name` (read in chunks: an external data location is
    stored in the model as text; a file that never names it cannot refer to it)."""
    needle, tail = name.encode(), b""
    try:
        with path.open("rb") as f:
            while block := f.read(chunk):
                if needle in tail + block:
                    return True
                tail = block[-len(needle) :]
    except OSError:
        return False
    return False


def _external_data(model: Path) -> list[Path]:
    """The external data files an ONNX file refers to (none if it cannot be read: loading it
    later says why)."""
    import onnx_ir as ir

    try:
        loaded = ir.load(model)
    except Exception:
        return []
    return sorted(
        {
            Path(value.const_value.path)
            for graph in loaded.graphs()
            for value in graph.initializers.values()
            if isinstance(value.const_value, ir.ExternalTensor)
        }
    )
