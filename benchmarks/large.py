"""A model over 2 GB: wall time and peak memory of capture and of compiles, against the file size.

    python -m benchmarks.large [--rows ...] [--calib-samples 4] [--calib-length 128]
                               [--work DIR] [--out FILE]

The model is a randomly initialized Llama (transformers `LlamaConfig`, seed 0, nothing
downloaded): hidden 2048, MLP 5632, 12 layers, 32 heads with 4 key/value heads, vocabulary 32000,
untied embeddings (TinyLlama-1.1B's shapes with 12 of its 22 layers): 0.66 G parameters,
2.6 GB of float32 weights. It is captured by `qpass.capture` and written with its weights in
external data (`model.onnx.data`) by one worker process; each compile runs in another, reading
that file as `qpass compile` does (weights memory-mapped) and writing its output with
`CompiledModel.save`. Calibration: `--calib-samples` random token sequences of `--calib-length`
(the weights are random: text would tell nothing more), batch size 4.

Every worker reports its wall time and its peak RSS (VmHWM), and the peak of each phase: the
peak is reset (`/proc/self/clear_refs`) at each phase boundary, and the compile's phases are
marked by passes placed between the preset's passes (load: reading the model and the checks
before the first pass; one phase per pass; checks: the final checks; save). The parent process
then loads every output in ONNX Runtime and compares its logits with the float model's on one
held-out sequence (SQNR, dB).

Internal workers (print JSON):

    python -m benchmarks.large --worker capture MODEL_OUT
    python -m benchmarks.large --worker PRESET MODEL CALIB OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, header, peak_rss_mb, run_worker, work_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONFIG = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 12,
    "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
    "max_position_embeddings": 2048, "tie_word_embeddings": False,
}
# row label -> (preset, extra `qpass compile` options)
ROWS = {
    "w4a16-rtn": ("w4a16-rtn", {"format": "matmulnbits"}),
    "w4a16-gptq": ("w4a16-gptq", {"format": "matmulnbits"}),
    "w8a8-dynamic": ("w8a8-dynamic", {}),
}
BATCH_SIZE = 4
WORKER_TIMEOUT_S = 3 * 3600


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- per-phase peak memory


class PhasePeaks:
    """Peak RSS per phase: `mark(name)` ends the phase `name` (its peak is VmHWM since the last
    mark) and resets VmHWM to the current RSS (Linux `clear_refs` 5)."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.peaks[name] = max(self.peaks.get(name, 0.0), peak_rss_mb() or 0.0)
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._start
        Path("/proc/self/clear_refs").write_text("5")
        self._start = now


def phase_marker(peaks: PhasePeaks, name: str):
    """A pass that changes nothing and ends the phase `name` when the pipeline reaches it."""
    import onnx_ir as ir

    from qpass.passes.base import Pass

    class PhaseEnd(Pass):
        def __repr__(self) -> str:
            return f"PhaseEnd({name})"

        def call(self, model):
            peaks.mark(name)
            return ir.passes.PassResult(model, modified=False)

    return PhaseEnd()


# ---------------------------------------------------------------- workers (subprocesses)


def build_model():
    """The random Llama of `CONFIG` (seed 0), float32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def capture_worker(out: str) -> int:
    """Build, capture and save the model; print JSON with the phases' peaks."""
    from benchmarks.llm import capture_llm, save_model

    peaks = PhasePeaks()
    model = build_model()
    peaks.mark("build")
    captured = capture_llm(model)
    peaks.mark("capture")
    save_model(captured, Path(out))
    peaks.mark("save")
    print(json.dumps({"seconds": peaks.seconds, "phase_peak_rss_mb": peaks.peaks,
                      "peak_rss_mb": max(peaks.peaks.values())}))
    return 0


def compile_worker(preset: str, model: str, calib: str, out: str) -> int:
    """Compile as `qpass compile MODEL --preset PRESET --calib CALIB -o OUT` does (the output
    checks, `qpass.compile` from the path, `CompiledModel.save`), the preset's passes with phase
    marks between them; print JSON with the wall time and the phases' peaks."""
    import qpass
    from qpass import presets
    from qpass.files import check_outputs
    from qpass.passes.base import CalibratedPass

    name, options = ROWS[preset]
    peaks = PhasePeaks()
    check_outputs(Path(out), model=Path(model), calibration=Path(calib))
    passes = [phase_marker(peaks, "load")]
    for p in presets.passes(name, **options):
        passes += [p, phase_marker(peaks, repr(p))]
    calibration = calib if any(isinstance(p, CalibratedPass) for p in passes) else None
    compiled = qpass.compile(model, passes, calibration=calibration, batch_size=BATCH_SIZE,
                             keep_reference=False, progress=False)
    peaks.mark("checks")
    compiled.save(out)
    peaks.mark("save")
    print(json.dumps({"compile_s": sum(peaks.seconds.values()), "seconds": peaks.seconds,
                      "phase_peak_rss_mb": peaks.peaks,
                      "peak_rss_mb": max(peaks.peaks.values())}))
    return 0


# ---------------------------------------------------------------- parent


def file_mb(path: Path) -> float:
    """The model file and its external data file, in MB."""
    data = path.parent / f"{path.name}.data"
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def logits_sqnr(reference: np.ndarray, paths: dict[str, Path], ids: np.ndarray) -> dict:
    """SQNR (dB) of each model's logits against `reference` on `ids`, one session at a time."""
    from qpass.runtime.onnxruntime import session

    result = {}
    for label, path in paths.items():
        logits = session(str(path)).run(None, {"input_ids": ids})[0]
        noise = np.mean((logits - reference) ** 2)
        result[label] = float(10 * np.log10(np.mean(reference**2) / max(noise, 1e-30)))
    return result


def run(args, work: Path) -> dict:
    fp32, calib = work / "fp32.onnx", work / "calib.npz"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG["vocab_size"], (args.calib_samples + 1, args.calib_length))
    np.savez(calib, input_ids=ids[:-1])
    captured = work / "capture.json"  # the capture's figures, kept with the model it wrote
    if not fp32.exists():
        log("building and capturing the model")
        capture = run_worker("benchmarks.large", ["capture", fp32], fp32, WORKER_TIMEOUT_S)
        if "error" in capture:
            raise SystemExit(f"capture failed: {capture['error']}")
        captured.write_text(json.dumps(capture))
    capture = json.loads(captured.read_text()) if captured.exists() else {}
    size = file_mb(fp32)
    log(f"model: {size:.0f} MB")
    rows, outputs = [], {}
    for label in args.rows:
        out = work / f"{label}.onnx"
        log(f"compiling {label}")
        row = {"row": label, **run_worker("benchmarks.large", [label, fp32, calib, out], out,
                                          WORKER_TIMEOUT_S)}
        if "error" not in row:
            row["size_mb"] = file_mb(out)
            row["rss_over_file"] = row["peak_rss_mb"] / size
            outputs[label] = out
        else:
            log(f"{label} FAILED: {row['error'].splitlines()[-1]}")
        rows.append(row)
    log("logits of the float model and the outputs in ONNX Runtime")
    from qpass.runtime.onnxruntime import session

    held_out = ids[-1:]
    reference = session(str(fp32)).run(None, {"input_ids": held_out})[0]
    for label, sqnr in logits_sqnr(reference, outputs, held_out).items():
        next(r for r in rows if r["row"] == label)["logits_sqnr_db"] = sqnr
    return {"model_mb": size, "capture": capture, "rows": rows}


def table(result: dict) -> str:
    size = result["model_mb"]
    lines = [f"model file (with external data): {size:.0f} MB"]
    capture = result["capture"]
    if capture:
        phases = ", ".join(f"{k} {v:.0f}" for k, v in capture["phase_peak_rss_mb"].items())
        lines.append(f"capture: {sum(capture['seconds'].values()):.0f} s, peak RSS "
                     f"{capture['peak_rss_mb']:.0f} MB ({capture['peak_rss_mb'] / size:.2f}x "
                     f"the file); per phase MB: {phases}")
    lines.append(f"{'preset':<14}{'wall s':>8}{'peak RSS MB':>13}{'x file':>8}{'out MB':>8}"
                 f"{'logits SQNR dB':>16}")
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['row']:<14}ERROR: {r['error'].splitlines()[-1][:150]}")
            continue
        lines.append(f"{r['row']:<14}{r['compile_s']:>8.0f}{r['peak_rss_mb']:>13.0f}"
                     f"{r['rss_over_file']:>8.2f}{r['size_mb']:>8.0f}"
                     f"{r.get('logits_sqnr_db', float('nan')):>16.1f}")
        phases = ", ".join(f"{k} {v:.0f} MB / {r['seconds'][k]:.0f} s"
                           for k, v in r["phase_peak_rss_mb"].items())
        lines.append(f"  phases (peak RSS / wall): {phases}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--calib-samples", type=int, default=4, help="calibration sequences")
    parser.add_argument("--calib-length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/large.json")
    parser.add_argument("--work", type=Path, help="keep the captured and compiled models here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.worker[0] == "capture":
            return capture_worker(*args.worker[1:])
        return compile_worker(*args.worker)

    command, info = header("benchmarks.large", argv)
    with work_folder(args.work, "large-") as work:
        result = run(args, work)
    print(f"\n== random Llama ({CONFIG['num_hidden_layers']} layers, hidden "
          f"{CONFIG['hidden_size']}, MLP {CONFIG['intermediate_size']}, vocabulary "
          f"{CONFIG['vocab_size']}), float32, external data; calibration {args.calib_samples} x "
          f"{args.calib_length} random tokens, batch {BATCH_SIZE} ==")
    print(table(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "versions": info, "config": CONFIG,
                                    "calib_samples": args.calib_samples,
                                    "calib_length": args.calib_length, **result}, indent=2)
                        + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
