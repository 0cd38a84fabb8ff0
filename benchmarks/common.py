"""Pieces every benchmark shares: compile workers in their own process, peak memory, latency
ratios."""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float | None:
    """This process's peak RSS (VmHWM) in MB, or None where /proc is missing.

    ru_maxrss is not used: Linux carries it over fork+exec, so a worker started from the (larger)
    parent would report at least the parent's RSS.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def run_worker(module: str, args: list[str], out: Path, timeout_s: float) -> dict:
    """Run `python -m MODULE --worker ARGS...` in a fresh interpreter and return the JSON line it
    prints last; on failure (exit code, timeout, no output file) return ``{"error": ...}``."""
    cmd = [sys.executable, "-m", module, "--worker", *map(str, args)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines or not out.exists():
        tail = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def paired_ratio(rounds_ms: list[float], reference_rounds_ms: list[float]) -> float:
    """Median over interleaved rounds of one model's latency over another's in the same round:
    the machine's slow and fast spells hit both alike, where a ratio of best rounds compares
    one model's luckiest moment with another's."""
    return float(np.median(np.divide(rounds_ms, reference_rounds_ms)))


def versions() -> dict:
    """Versions of the packages that decide the numbers."""
    import onnx
    import onnxruntime
    import torch

    import qpass

    return {"python": sys.version.split()[0], "onnxruntime": onnxruntime.__version__,
            "qpass": qpass.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "qpass_source_sha256": source_digest()}


def source_digest() -> str:
    """Short hash of qpass's source files (qpass is edited often; this names the exact tree)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("qpass/**/*.py"), *REPO.glob("runtime/*.py")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def header(module: str, argv: list[str] | None) -> tuple[str, dict]:
    """Print the command line that reproduces this run and the versions that decide its
    numbers; return both for the report."""
    command = shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
    info = versions()
    print(f"$ {command}")
    print("  ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    return command, info


@contextlib.contextmanager
def work_folder(work: Path | None, prefix: str) -> Iterator[Path]:
    """The folder a run keeps its models in: `work` (created if missing), or a temporary one
    removed afterwards."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield Path(folder)
