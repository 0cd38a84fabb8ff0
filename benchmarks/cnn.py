"""CNN benchmark: FP32 vs ONNX Runtime quantize_static vs qpass, side by side.

    python -m benchmarks.cnn [--models efficientnet_lite0 resnet20] [--out FILE] [--quick]

For each model: top-1 on the evaluation split, latency at batch 1 and 8 (ONNX Runtime, CPU),
compile wall time and peak RSS (each compile in its own subprocess), and the quantized kernels
ONNX Runtime runs after its fusions.  Internal worker (one compile, prints JSON):

    python -m benchmarks.cnn --worker {ort,qpass} METHOD BATCH MODEL.onnx CALIB.npz OUT.onnx

ORT's histogram calibrators (Entropy, Percentile) fail when the last calibration batch is smaller
than the others (microsoft/onnxruntime#18792); such a row is kept as an error and retried once as
an extra row "[bN]" with the largest batch size N <= 8 that divides the calibration set.

Each row is also compared image by image with the best-accuracy ORT row (ORT*): "+a/-b" counts
the evaluation images only this row classifies right and those only ORT* does, "p" is the exact
McNemar p-value of that split. "ORT MinMax, float logits" is ORT's MinMax model with the Q/DQ
pair it puts on the logits removed (qpass leaves a model output float): uint8 logits tie at the
top for some images, and argmax then picks the lower class index.

Per-tensor INT8 weights: ORT MinMax with per_channel=False, and qpass's `int8-tensor` preset
without and with cross-layer equalization, high-bias absorption and bias correction (both from a
second export that keeps BatchNormalization, whose statistics high-bias absorption reads).

W4A8 (per-channel INT4 weights, U8 activations): qpass's `w4a8-rtn` (round to nearest), `w4a8`
(AdaRound on blocks of layers, and with `--block-layers 1` layer by layer) and `w4a8-obq` (OBQ;
with `--max-row 1` every layer takes GPTQ's update instead: GPTQ on the same grid) presets;
W3A8 the same with `--bits 3`. The OBQ rows also print each layer's output error with OBQ's,
GPTQ's and round to nearest's weights (the `OBQ` pass's `errors`). ONNX
Runtime has no INT4 convolution: the int4 weights go through opset-21 DequantizeLinear and the
convolutions run in float. `--rows TEXT...` runs FP32 and only the rows
whose label contains one of the texts (e.g. `--rows W4A8`).

Latency: this machine's CPU time is noisy, so all rows of a model are timed in interleaved rounds;
the table shows each row's best round median (all round medians are in the JSON) and ratios as
the median over rounds of the two rows' medians in the same round.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    REPO,
    header,
    paired_ratio,
    peak_rss_mb,
    run_worker,
    source_digest,
    work_folder,
)

BATCH = 8  # calibration batch size, for ORT and qpass alike
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
QPASS_METHODS = ("default", "minmax", "percentile", "entropy", "mse")
# ORT quantizes the logits too (qpass leaves a model output float): ties at the top of the
# uint8 logits then go to the lower class index; this row measures ORT without that pair
FLOAT_LOGITS_ROW = ("ORT MinMax, float logits", "ort", "MinMax-float-logits")
# per-tensor INT8 weights: ORT MinMax as the anchor; qpass without and with data-free
# quantization (CLE + high-bias absorption + bias correction), both from an export that keeps
# BatchNormalization (fp32_bn.onnx), whose statistics high-bias absorption reads
PER_TENSOR_ROWS = (("ORT MinMax per-tensor", "ort", "MinMax-tensor"),
                   ("qpass per-tensor", "qpass", "int8-tensor-plain"),
                   ("qpass per-tensor CLE+BA+BC", "qpass", "int8-tensor"),
                   ("qpass per-tensor CLE+BA+AdaRound+BC", "qpass", "int8-tensor:adaround=true"))
# W4A8: per-channel INT4 weights (int4 DequantizeLinear -> float Conv), U8 activations,
# round to nearest vs AdaRound
W4A8_ROWS = (("qpass W4A8 RTN", "qpass", "w4a8-rtn"),
             ("qpass W4A8 AdaRound layer by layer", "qpass", "w4a8:block_layers=1"),
             ("qpass W4A8 AdaRound blocks", "qpass", "w4a8"),
             ("qpass W4A8 GPTQ (OBQ pass, max_row 1)", "qpass", "w4a8-obq:max_row=1"),
             ("qpass W4A8 OBQ", "qpass", "w4a8-obq"))
# W3A8: the same with 3-bit weights (8 levels of INT4)
W3A8_ROWS = tuple((label.replace("W4A8", "W3A8"), tool, f"{method}:bits=3")
                  for label, tool, method in W4A8_ROWS)
# FP8 E4M3 and FP4-weight W4A8, ONNX Runtime simulation: "PRESET[:SCALE_CONSTRAINT]"
# "fl9+bc": the first 9 weighted layers in float and bias correction (the fp8 preset's options)
_FL9_BC = "float_layers=9:correct_bias=true"
FLOAT_FORMAT_ROWS = (("qpass fp8", "qpass", "fp8"),
                     ("qpass fp8 no bc", "qpass", "fp8:float:correct_bias=false"),
                     ("qpass fp8 all convs no bc", "qpass",
                      "fp8:float:small_convs=true:correct_bias=false"),
                     ("qpass fp8 fl9+bc", "qpass", f"fp8:float:{_FL9_BC}"),
                     ("qpass fp8 fl9+bc pow2", "qpass", f"fp8:pow2:{_FL9_BC}"),
                     ("qpass fp8 fl9+bc pow2-group", "qpass", f"fp8:pow2-group:{_FL9_BC}"),
                     ("qpass w4a8-fp g32", "qpass", "w4a8-fp:float:group_size=32"),
                     ("qpass w4a8-fp g32 fl9", "qpass",
                      "w4a8-fp:float:group_size=32:float_layers=9"),
                     ("qpass w4a8-fp g32 fl9 pow2-group", "qpass",
                      "w4a8-fp:pow2-group:group_size=32:float_layers=9"))
# NVIDIA ModelOpt's ONNX FP8 mode, its defaults (float parts in FP16), as the FP8 anchor. It runs
# in a Python of its own (nvidia-modelopt[onnx] brings onnxruntime-gpu, which must not share a
# folder with onnxruntime): the row is measured when QPASS_MODELOPT_PYTHON names that Python.
MODELOPT_ROWS = (("ModelOpt fp8", "modelopt", "fp8"),)
MODELOPT_PYTHON = os.environ.get("QPASS_MODELOPT_PYTHON")
MODELOPT_SCRIPT = """
import sys
import numpy as np
from modelopt.onnx.quantization import quantize
model, mode, calib, out = sys.argv[1:]
quantize(model, quantize_mode=mode, calibration_data={"input": np.load(calib)["input"]},
         calibration_eps=["cpu"], output_path=out)
"""
KERNELS = ("QLinearConv", "QGemm", "QLinearAdd")
# model -> (data loader name, calibration images, eval limit with --quick)
MODELS = {"efficientnet_lite0": ("imagenet", 100, 200), "resnet20": ("cifar10", 200, 1000)}
WORKER_TIMEOUT_S = 3600


def log(msg: str) -> None:
    """Progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- compile workers (subprocess)


def _ort_reader(calib: np.ndarray, name: str, batch: int):
    """A CalibrationDataReader yielding ``calib`` in batches of ``batch`` under input ``name``."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calib[i : i + batch]} for i in range(0, len(calib), batch)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def worker(tool: str, method: str, batch: str, model: str, calib: str, out: str) -> int:
    """Compile one model, then print JSON with compile wall time (s) and peak RSS (MB) (and the
    per-layer errors of an OBQ compile)."""
    extra = {}
    if tool == "ort":
        import onnxruntime as ort
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        name = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0].name
        with np.load(calib) as npz:
            reader = _ort_reader(npz["input"], name, int(batch))
        # "MinMax-tensor": per-tensor weights; "MinMax-float-logits": the output Q/DQ removed
        method, _, variant = method.partition("-")
        start = time.perf_counter()
        quantize_static(
            model, out, reader, quant_format=QuantFormat.QDQ, per_channel=variant != "tensor",
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[method],
        )
        if variant == "float-logits":
            _remove_output_qdq(out)
        rc = 0
    elif tool == "modelopt":
        start = time.perf_counter()
        rc = subprocess.run([MODELOPT_PYTHON, "-c", MODELOPT_SCRIPT, model, method, calib, out],
                            stdout=subprocess.DEVNULL).returncode
        wall = time.perf_counter() - start
        child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps({"compile_s": wall, "peak_rss_mb": child_mb, "rc": rc}))
        return rc
    elif method.startswith("w4a8-obq"):  # through the API, to keep the per-layer errors
        import qpass
        from qpass import presets
        from qpass.passes import OBQ

        options = dict(option.split("=") for option in method.split(":")[1:])
        passes = presets.passes("w4a8-obq", **{k: int(v) for k, v in options.items()})
        obq = next(p for p in passes if isinstance(p, OBQ))
        start = time.perf_counter()
        qpass.compile(model, passes, calibration=calib, batch_size=int(batch),
                      progress=False).save(out)
        extra["layer_errors"] = {name: dataclasses.asdict(e) for name, e in obq.errors.items()}
        rc = 0
    elif method == "int8-tensor-plain":  # per-tensor baseline: the preset without its DFQ passes
        import qpass
        from qpass import presets

        start = time.perf_counter()
        qpass.compile(model, presets.passes("int8-tensor", data_free=False), calibration=calib,
                      batch_size=int(batch), progress=False).save(out)
        rc = 0
    else:
        from qpass import cli

        # METHOD is a calibrator, a preset, or "PRESET[:SCALE_CONSTRAINT][:option=value...]"
        preset, *settings = method.split(":")
        if not preset.startswith(("int8-", "w4a8", "fp8")):
            preset = "int8"
        argv = ["compile", model, "-o", out, "--preset", preset, "--calib", calib, "-q",
                "--batch-size", batch]
        argv += [] if method.split(":")[0] in ("default", preset) else ["--calibrator", method]
        if preset in ("fp8", "w4a8-fp"):
            argv += ["--scale-constraint", settings.pop(0) if settings else "float"]
        for option in settings:  # "float_layers=9" -> --float-layers 9; "correct_bias=false"
            key, value = option.split("=")
            flag = key.replace("_", "-")
            switch = {"true": [f"--{flag}"], "false": [f"--no-{flag}"]}
            argv += switch.get(value, [f"--{flag}", value])
        start = time.perf_counter()
        rc = cli.main(argv)
    wall = time.perf_counter() - start
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(json.dumps({"compile_s": wall, "peak_rss_mb": peak_rss_mb() or maxrss_mb,
                      "ru_maxrss_mb": maxrss_mb, "rc": rc, **extra}))
    return rc


def _remove_output_qdq(path: str) -> None:
    """Drop the QuantizeLinear -> DequantizeLinear pair quantize_static puts on a graph output
    (the logits): the model then writes the float logits of its last Gemm."""
    import onnx

    model = onnx.load(path)
    made_by = {out: node for node in model.graph.node for out in node.output}
    for output in model.graph.output:
        dq = made_by.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = made_by.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        last = made_by[q.input[0]]
        last.output[list(last.output).index(q.input[0])] = output.name
        model.graph.node.remove(q)
        model.graph.node.remove(dq)
    onnx.save(model, path)


# ---------------------------------------------------------------- evaluation (parent process)


def load_data(model: str, quick: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibration images, evaluation images and evaluation labels for ``model``."""
    from benchmarks import data

    loader, n_calib, quick_limit = MODELS[model]
    load = getattr(data, loader)
    calib, _ = load("calibration", n_calib)
    images, labels = load("evaluation", quick_limit if quick else None)
    return calib, images, labels


def export(model: str, example: np.ndarray, path: Path, optimize: bool = True) -> Path:
    """Export the reference torch model to ONNX (optimized: BatchNorm folded by the exporter),
    silencing the exporter's prints."""
    import torch

    from benchmarks import models

    module = getattr(models, model)()
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        return models.export_onnx(module, torch.from_numpy(example), path, optimize=optimize)


def accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 (batch 50), the logits, and the op types ORT runs after its fusions."""
    from qpass.runtime.onnxruntime import optimized_op_types, session

    from benchmarks.data import top1

    sess = session(str(path))
    name = sess.get_inputs()[0].name
    outputs = []

    def logits(x: np.ndarray) -> np.ndarray:
        outputs.append(sess.run(None, {name: x})[0])
        return outputs[-1]

    acc = top1(logits, images, labels, batch=50)
    return {"top1": acc, "logits": np.concatenate(outputs),
            "op_types": optimized_op_types(str(path))}


def measure_latency(rows: list[dict], images: np.ndarray, rounds: int, repeat: int) -> None:
    """Median latency at batch 1 and 8 for every row, in interleaved rounds.

    This machine's CPU time is noisy (bursts of 2-4x slowdowns lasting seconds), so each round
    takes ``latency(repeat=...)`` of every row in turn and a row's figure is its best round
    median; every round median is kept in the row (``latency_b{1,8}_rounds_ms``).
    """
    from qpass.runtime.onnxruntime import latency, session

    sessions = {r["row"]: session(str(r["path"])) for r in rows}
    for b in (1, 8):
        batch = np.ascontiguousarray(images[:b])
        for r in rows:
            r[f"latency_b{b}_rounds_ms"] = []
        for _ in range(rounds):
            for r in rows:
                sess = sessions[r["row"]]
                ms = latency(sess, {sess.get_inputs()[0].name: batch}, warmup=5, repeat=repeat)
                r[f"latency_b{b}_rounds_ms"].append(ms)
        for r in rows:
            r[f"latency_b{b}_ms"] = min(r[f"latency_b{b}_rounds_ms"])


def float_layers(path: Path) -> int:
    """How many Conv/Gemm/MatMul layers of a saved model read a weight that no
    DequantizeLinear produces (a Cast or Transpose between them allowed): the layers left float."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}

    def dequantized(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in ("Cast", "Transpose"):
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    return sum(1 for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")
               and len(node.input) > 1 and not dequantized(node.input[1]))


def bench_row(model: str, label: str, tool: str, method: str | None, batch: int, folder: Path,
              images: np.ndarray, labels: np.ndarray) -> dict:
    """Compile (in a worker) unless FP32, then measure top-1 and the fused kernels of one row."""
    fp32 = folder / "fp32.onnx"
    path = fp32 if tool == "fp32" else folder / f"{tool}_{method}_b{batch}.onnx"
    source = folder / "fp32_bn.onnx" if method and method.startswith("int8-tensor") else fp32
    row = {"model": model, "row": label, "tool": tool, "method": method, "calib_batch": batch,
           "n_eval": len(images), "path": str(path)}
    if tool == "qpass":  # qpass is edited while benchmarks run: name the tree each row used
        row["qpass_source_sha256"] = source_digest()
    if tool != "fp32":
        log(f"{model}: compiling {label}")
        args = [tool, method, batch, source, folder / "calib.npz", path]
        row.update(run_worker("benchmarks.cnn", args, path, WORKER_TIMEOUT_S))
    if "error" in row:
        log(f"{model}: {label} FAILED: {row['error'].splitlines()[-1]}")
        return row
    log(f"{model}: top-1 of {label}")
    row.update(accuracy(path, images, labels))
    if tool != "fp32":
        row["kernels"] = {k: row["op_types"].get(k, 0) for k in KERNELS}
    row["float_layers"] = float_layers(path)
    return row


def bench_model(model: str, work: Path, quick: bool, only: list[str] | None = None) -> list[dict]:
    """All rows (FP32, ORT x3 (+ retries), qpass x5, ...) for one model; with `only`, FP32 and
    the rows whose label contains one of those strings."""
    log(f"{model}: loading data")
    calib, images, labels = load_data(model, quick)
    folder = work / model
    folder.mkdir(parents=True, exist_ok=True)
    fp32, calib_path = folder / "fp32.onnx", folder / "calib.npz"
    np.savez(calib_path, input=calib)
    log(f"{model}: exporting ONNX ({len(calib)} calibration, {len(images)} evaluation images)")
    export(model, calib[:2], fp32)
    export(model, calib[:2], folder / "fp32_bn.onnx", optimize=False)

    specs = [("FP32", "fp32", None)]
    specs += [(f"ORT {m}", "ort", m) for m in ORT_METHODS]
    specs += [("qpass" if m == "default" else f"qpass {m}", "qpass", m) for m in QPASS_METHODS]
    specs += [FLOAT_LOGITS_ROW]
    specs += list(PER_TENSOR_ROWS)
    specs += list(W4A8_ROWS) + list(W3A8_ROWS)
    if model == "efficientnet_lite0":
        specs += list(FLOAT_FORMAT_ROWS) + (list(MODELOPT_ROWS) if MODELOPT_PYTHON else [])
    if only:
        specs = [s for s in specs if s[1] == "fp32" or any(o in s[0] for o in only)]
    fallback = max(b for b in range(1, BATCH + 1) if len(calib) % b == 0)
    rows = []
    for label, tool, method in specs:
        rows.append(row := bench_row(model, label, tool, method, BATCH, folder, images, labels))
        if tool == "ort" and "error" in row and "inhomogeneous" in row["error"]:
            rows.append(bench_row(model, f"{label} [b{fallback}]", tool, method, fallback,
                                  folder, images, labels))
    ok = [r for r in rows if "error" not in r]
    rounds, repeat = (2, 10) if quick else (7, 30)
    log(f"{model}: latency of {len(ok)} models, {rounds} interleaved rounds x {repeat} runs")
    measure_latency(ok, images, rounds, repeat)
    add_ratios(rows, labels)
    return rows


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: how likely a split at least this uneven of the images
    that exactly one of two classifiers gets right is, if both are equally accurate."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def add_ratios(rows: list[dict], labels: np.ndarray) -> None:
    """Add delta vs FP32 (points), agreement with FP32's predicted classes and the SQNR of the
    logits against FP32's (steadier measures of fidelity than top-1 on a few hundred images,
    where a few flipped images decide a comparison), the paired comparison with the
    best-accuracy ORT row (images only this row gets right, images only ORT's gets right,
    McNemar's p), and latency ratios to FP32 and to that ORT row."""
    from qpass.report import sqnr_db

    ok = [r for r in rows if "error" not in r]
    base = next(r for r in ok if r["tool"] == "fp32")
    # the per-tensor anchor and the float-logits variant answer other questions: they are not
    # candidates for "best ORT"
    ort_rows = [r for r in ok if r["tool"] == "ort" and "-" not in r["method"]]
    best = max(ort_rows, key=lambda r: r["top1"]) if ort_rows else None
    reference = base["logits"]
    correct = {id(r): r["logits"].argmax(1) == labels for r in ok}
    for r in ok:
        r["delta_pts"] = 100 * (r["top1"] - base["top1"])
        if best is not None:
            mine, theirs = correct[id(r)], correct[id(best)]
            r["only_this_right"] = int(np.sum(mine & ~theirs))
            r["only_best_ort_right"] = int(np.sum(theirs & ~mine))
            r["mcnemar_p"] = mcnemar_p(r["only_this_right"], r["only_best_ort_right"])
        logits = r.pop("logits")
        r["agree_fp32"] = float(np.mean(logits.argmax(1) == reference.argmax(1)))
        r["logits_sqnr_db"] = sqnr_db(reference, logits)
        r["best_ort_row"] = best["row"] if best else None
        for b in (1, 8):
            key = f"latency_b{b}_rounds_ms"
            r[f"ratio_fp32_b{b}"] = paired_ratio(r[key], base[key])
            r[f"ratio_best_ort_b{b}"] = paired_ratio(r[key], best[key]) if best else None


# ---------------------------------------------------------------- output


def table(rows: list[dict]) -> str:
    """Aligned text table of one model's rows."""
    header = ["row", "top1%", "Δpts", "agree%", "SQNR dB", "+/-ORT*", "p", "b1 ms", "b8 ms",
              "b1/fp32", "b8/fp32", "b1/ORT*", "b8/ORT*", "compile s", "RSS MB",
              "float layers", *KERNELS]

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["row"], "ERROR: " + r["error"].splitlines()[-1][:150]])
            continue
        k = r.get("kernels", {})
        lines.append([
            r["row"], fmt(100 * r["top1"], ".2f"), fmt(r["delta_pts"], "+.2f"),
            fmt(100 * r["agree_fp32"], ".2f"), fmt(r["logits_sqnr_db"], ".1f"),
            f"+{r['only_this_right']}/-{r['only_best_ort_right']}" if "mcnemar_p" in r else "-",
            fmt(r.get("mcnemar_p"), ".2f"),
            fmt(r["latency_b1_ms"], ".2f"), fmt(r["latency_b8_ms"], ".2f"),
            fmt(r["ratio_fp32_b1"], ".2f"), fmt(r["ratio_fp32_b8"], ".2f"),
            fmt(r["ratio_best_ort_b1"], ".2f"), fmt(r["ratio_best_ort_b8"], ".2f"),
            fmt(r.get("compile_s"), ".1f"), fmt(r.get("peak_rss_mb"), ".0f"),
            fmt(r.get("float_layers"), "d"), *(fmt(k.get(name), "d") for name in KERNELS),
        ])
    full = [header] + [ln for ln in lines if len(ln) == len(header)]
    widths = [max(len(ln[i]) for ln in full) for i in range(len(header))]

    def join(cells: list[str]) -> str:
        if len(cells) == 2:  # error row: name + message
            return f"{cells[0].ljust(widths[0])}  {cells[1]}"
        return "  ".join([cells[0].ljust(widths[0])]
                         + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)])

    return "\n".join(join(ln) for ln in [header, *lines])


def layer_error_table(rows: list[dict]) -> str:
    """Per-layer output errors of the OBQ rows: OBQ, GPTQ (decreasing diag H, and input order),
    round to nearest, and what the pass kept (OBQ's or GPTQ's integers per row)."""
    lines = []
    for r in rows:
        errors = r.get("layer_errors")
        if not errors or r["method"].endswith("max_row=1"):
            continue
        lines += [f"\n{r['row']}: layer output errors (mean squared, summed over outputs)",
                  f"{'layer':<14} {'OBQ':>10} {'GPTQ':>10} {'GPTQ in':>10} {'RTN':>10} "
                  f"{'kept':>10} {'GPTQ rows':>9}  OBQ<GPTQ"]
        for name, e in errors.items():
            obq = f"{e['obq']:10.4g}" if e["exact"] else f"{'-':>10}"
            lines.append(f"{name:<14} {obq} {e['gptq']:10.4g} {e['gptq_input_order']:10.4g} "
                         f"{e['nearest']:10.4g} {e['kept']:10.4g} {100 * e['gptq_rows']:8.0f}%  "
                         f"{e['obq'] < e['gptq'] if e['exact'] else 'row > max_row: GPTQ'}")
        exact = [e for e in errors.values() if e["exact"]]
        lines.append(f"OBQ below GPTQ on {sum(e['obq'] < e['gptq'] for e in exact)} of the "
                     f"{len(exact)} layers it ran on ({len(errors)} in all); kept below GPTQ on "
                     f"{sum(e['kept'] < e['gptq'] for e in errors.values())}")
    return "\n".join(lines)


def obq_layer_errors(bits: int, images: int, max_row: int) -> str:
    """The `OBQ` pass alone on ResNet20 (after InsertQDQ as in `w4a8-obq`): its per-layer errors
    and wall time, without compiling or evaluating a model."""
    import onnx_ir as ir

    from benchmarks import data
    from qpass.calibration import Context
    from qpass.passes import OBQ, FoldBatchNorm, InsertQDQ
    from qpass.presets import canonicalize
    from qpass.presets.cnn import weight_scheme

    calib, _ = data.cifar10("calibration", images)
    with tempfile.TemporaryDirectory() as folder:
        model = ir.load(export("resnet20", calib[:2], Path(folder) / "fp32.onnx"))
    context = Context({"input": calib}, model.graph, batch_size=BATCH, progress=False)
    scheme = weight_scheme(bits)
    obq = OBQ(context, max_row=max_row)
    start = time.perf_counter()
    for p in (*canonicalize(), FoldBatchNorm(), obq.snapshot(),
              InsertQDQ(context, weights=scheme), obq):
        model = p(model).model
    rows = [{"method": f"w4a8-obq:bits={bits}",
             "layer_errors": {n: dataclasses.asdict(e) for n, e in obq.errors.items()},
             "row": f"OBQ W{bits}A8, {images} images, max_row {max_row}"}]
    return f"{layer_error_table(rows)}\nOBQ pass: {time.perf_counter() - start:.1f} s"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --worker, one compile); print tables and write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cnn.json")
    parser.add_argument("--quick", action="store_true", help="fewer eval images and repeats")
    parser.add_argument("--work", type=Path, help="keep exported/quantized models here")
    parser.add_argument("--rows", nargs="+", metavar="TEXT",
                        help="only FP32 and the rows whose label contains one of these")
    parser.add_argument("--obq-layers", nargs=3, type=int, metavar=("BITS", "IMAGES", "MAX_ROW"),
                        help="only OBQ's per-layer errors on ResNet20 (no top-1): BITS-bit "
                             "weights, IMAGES calibration images, rows up to MAX_ROW by OBQ")
    parser.add_argument("--worker", nargs=6,
                        metavar=("TOOL", "METHOD", "BATCH", "MODEL", "CALIB", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    if args.obq_layers:
        print(obq_layer_errors(*args.obq_layers))
        return 0

    command, info = header("benchmarks.cnn", argv)
    rows = []
    with work_folder(args.work, "cnn-") as work:
        for model in args.models:
            model_rows = bench_model(model, work, args.quick, args.rows)
            rows += model_rows
            n_eval = model_rows[0]["n_eval"]
            print(f"\n== {model}: top-1 on {n_eval} images; ORT* = best-accuracy ORT row ==")
            print(table(model_rows), flush=True)
            print(layer_error_table(model_rows), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "versions": info, "quick": args.quick,
              "calibration_batch": BATCH, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
