"""Tied embeddings with a large vocabulary: the table quantized once for the lookup and the head.

    python -m benchmarks.tied [--vocab 151936] [--hidden 256] [--layers 4] [--work DIR] [--out FILE]

The model is a LlamaForCausalLM built from a transformers config with random weights (seed 0,
tie_word_embeddings=True; Qwen2.5's vocabulary size by default, a small hidden size so that it
runs fast), captured like SmolLM2 (`benchmarks.llm.capture_llm`). Rows, all `w4a16-rtn` at group
128 in the MatMulNBits form: `--lm-head float` (the float-table model), `int8` (an 8-bit copy of
the table for the head beside the float one), `shared-int8` and `shared-int4` (the table quantized
once, read by GatherBlockQuantized and MatMulNBits). Per row: file size and its ratio to the FP32
file, compile wall time and peak RSS (each compile in its own subprocess), SQNR of the logits and
top-1 agreement against the float-table model and FP32 on random token sequences, and latency
(ONNX Runtime CPU) of a 1-token and a 1x128 forward as paired ratios to `--lm-head int8`'s.
Perplexity on random weights means nothing and is not measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, header, paired_ratio, run_worker, work_folder
from benchmarks.llm import WORKER_TIMEOUT_S, capture_llm, log, measure_latency, save_model

ROWS = {  # row label -> benchmarks.llm worker tool (w4a16-rtn with this --lm-head)
    "lm_head float": "qpass-rtn",
    "lm_head int8": "qpass-rtn-lm-head-int8",
    "lm_head shared-int8": "qpass-rtn-lm-head-shared-int8",
    "lm_head shared-int4": "qpass-rtn-lm-head-shared-int4",
}
FLOAT_TABLE = "lm_head float"
LATENCY_BASE = "lm_head int8"


def random_llama(vocab: int, hidden: int, layers: int):
    """A random tied-embedding LlamaForCausalLM (4 heads, 2 KV heads, MLP 3x hidden)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def fidelity(logits: np.ndarray, reference: np.ndarray) -> dict:
    """SQNR (dB) of `logits` against `reference` and their top-1 agreement."""
    noise = np.sum((logits.astype(np.float64) - reference) ** 2)
    sqnr = 10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30))
    agree = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
    return {"sqnr_db": float(sqnr), "top1_agreement": agree}


def run(args, work: Path) -> list[dict]:
    from qpass.runtime.onnxruntime import session

    fp32, calib = work / "fp32.onnx", work / "calib.npz"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.sequences, 64))
    np.savez(calib, input_ids=ids)  # RTN reads no calibration data; the worker takes a file
    if not fp32.exists():
        log(f"building and capturing a random Llama (vocab {args.vocab}, hidden {args.hidden})")
        save_model(capture_llm(random_llama(args.vocab, args.hidden, args.layers)), fp32)
    paths = {"FP32": fp32}
    rows = [{"row": "FP32", "size_mb": fp32.stat().st_size / 1e6}]
    for label, tool in ROWS.items():
        path = work / f"{tool}.onnx"
        log(f"compiling {label}")
        row = {"row": label, "tool": tool}
        row.update(run_worker("benchmarks.llm", [tool, 128, "matmulnbits", fp32, calib, path],
                              path, WORKER_TIMEOUT_S))
        if "error" in row:
            log(f"{label} FAILED: {row['error'].splitlines()[-1]}")
        else:
            row["size_mb"] = path.stat().st_size / 1e6
            paths[label] = path
        rows.append(row)
    logits = {label: session(str(p)).run(None, {"input_ids": ids})[0] for label, p in paths.items()}
    for row in rows:
        row["size_vs_fp32"] = row.get("size_mb", 0) / rows[0]["size_mb"]
        if row["row"] in logits:
            for name, reference in (("fp32", "FP32"), ("float_table", FLOAT_TABLE)):
                if reference in logits and reference != row["row"]:
                    result = fidelity(logits[row["row"]], logits[reference])
                    row.update({f"{k}_vs_{name}": v for k, v in result.items()})
    del logits
    if not args.no_latency:
        log(f"latency of {len(paths)} models")
        by_label = {r["row"]: r for r in rows}
        for label, result in measure_latency(paths).items():
            by_label[label].update(result)
        if LATENCY_BASE in paths:
            base = by_label[LATENCY_BASE]
            for row in rows:
                for shape in ("1x1", "1x128"):
                    if f"{shape}_rounds_ms" in row:
                        row[f"{shape}_vs_int8_head"] = paired_ratio(
                            row[f"{shape}_rounds_ms"], base[f"{shape}_rounds_ms"])
    return rows


def table(rows: list[dict]) -> str:
    columns = [("size MB", "size_mb", ".1f"), ("x FP32", "size_vs_fp32", ".3f"),
               ("compile s", "compile_s", ".1f"), ("RSS MB", "peak_rss_mb", ".0f"),
               ("SQNR/float-table dB", "sqnr_db_vs_float_table", ".1f"),
               ("top-1/float-table", "top1_agreement_vs_float_table", ".4f"),
               ("SQNR/FP32 dB", "sqnr_db_vs_fp32", ".1f"),
               ("top-1/FP32", "top1_agreement_vs_fp32", ".4f"),
               ("1x1 ms", "1x1_ms", ".2f"), ("1x1/int8-head", "1x1_vs_int8_head", ".2f"),
               ("1x128 ms", "1x128_ms", ".1f"), ("1x128/int8-head", "1x128_vs_int8_head", ".2f")]
    lines = ["| row | " + " | ".join(c[0] for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        cells = [format(r[key], spec) if key in r else "-" for _, key, spec in columns]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tied", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=4, help="random 64-token sequences")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/tied.json")
    parser.add_argument("--work", type=Path, help="keep exported/quantized models here")
    args = parser.parse_args(argv)
    command, _ = header("benchmarks.tied", argv)
    with work_folder(args.work, "tied-") as work:
        rows = run(args, work)
    print(f"\n== random tied Llama, vocabulary {args.vocab}, hidden {args.hidden}, {args.layers} "
          "layers; w4a16-rtn g128, MatMulNBits form; ORT CPU ==")
    print(table(rows), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
