"""The float16 form against float32, in ONNX Runtime (CPU), on the three benchmark models.

    python -m benchmarks.float16 [--models cnn text llm] [--tokens 8192] [--quick] [--out FILE]

For each model: the float32 model and its float16 form (`qpass.compile(model, passes=[],
float_type="float16")`: the float parts in float16, reductions, Softmax, normalizations and exp
kept in float32, see `CastFloatParts`), then one quantized preset compiled with float32 and with
float16 float parts, each scored with its harness's metric:

- EfficientNet-Lite0, ImageNet top-1 (`benchmarks.cnn`: same export, data and scoring), `int8`;
- all-MiniLM-L6-v2, STS-B Spearman x 100 (`benchmarks.text`), `w8a8-dynamic`;
- SmolLM2-135M-Instruct, WikiText-2 test perplexity (`benchmarks.llm`), `w4a16-rtn` (g128, DQ).

"agree" is the share of evaluation items whose top-1 class (CNN) matches the float32 row's.
ONNX Runtime's CPU provider has no float16 kernels for most compute ops (Conv, MatMul, Gemm,
Add, ...): it computes them in float32 between Casts of its own, so these figures measure float16
storage of the weights, scales and the values between ops, not float16 arithmetic as TensorRT
runs it (TensorRT cannot be installed on the machines these figures come from).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, header

PRESETS = {"cnn": ("int8", {}), "text": ("w8a8-dynamic", {}), "llm": ("w4a16-rtn", {})}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def forms(fp32: Path, work: Path, preset: str, calibration, options: dict) -> dict[str, Path]:
    """The four models of one row set: FP32, its float16 form, the preset in float32 and in
    float16 float parts."""
    import qpass

    paths = {"FP32": fp32}
    for label, passes, float_type in (
        ("FP32, float16 form", [], "float16"),
        (preset, None, "float32"),
        (f"{preset}, float16 form", None, "float16"),
    ):
        path = work / f"{label.replace(', ', '_').replace(' ', '_')}.onnx"
        log(f"compiling {label}")
        kwargs = {"passes": passes} if passes is not None else {"preset": preset, **options}
        compiled = qpass.compile(fp32, calibration=calibration, float_type=float_type,
                                 progress=False, keep_reference=False, **kwargs)
        compiled.save(path)
        paths[label] = path
    return paths


def cnn(work: Path, quick: bool) -> list[dict]:
    from benchmarks.cnn import accuracy, export, load_data

    calib, images, labels = load_data("efficientnet_lite0", quick)
    fp32 = export("efficientnet_lite0", calib[:2], work / "efficientnet_lite0.onnx")
    preset, options = PRESETS["cnn"]
    rows, reference = [], None
    for label, path in forms(fp32, work, preset, {"input": calib}, options).items():
        log(f"top-1 of {label}")
        result = accuracy(path, images, labels)
        predicted = result["logits"].argmax(axis=1)
        reference = predicted if reference is None else reference
        agree = 100 * (predicted == reference).mean()
        rows.append({"model": "EfficientNet-Lite0", "row": label, "metric": "top-1 %",
                     "value": 100 * result["top1"], "agree_%": agree, "n": len(images)})
    return rows


def text(work: Path, quick: bool) -> list[dict]:
    from qpass.runtime.onnxruntime import session

    from benchmarks.text import EVAL_PAIRS, export_onnx, sts_score, tokenizer

    tok = tokenizer()
    fp32 = export_onnx(work / "minilm.onnx")
    rows_eval = range(100, 300) if quick else EVAL_PAIRS
    preset, options = PRESETS["text"]
    rows = []
    for label, path in forms(fp32, work, preset, None, options).items():
        log(f"Spearman of {label}")
        sess = session(str(path))
        score = sts_score(lambda f, s=sess: s.run(None, f)[0].astype(np.float32), tok, rows_eval)
        rows.append({"model": "all-MiniLM-L6-v2", "row": label, "metric": "Spearman x100",
                     "value": score, "n": len(rows_eval)})
    return rows


def llm(work: Path, tokens: int) -> list[dict]:
    from benchmarks.llm import (
        WINDOW,
        capture_llm,
        perplexity,
        save_model,
        smollm2,
        smollm2_tokenizer,
        wikitext_tokens,
        windows,
    )

    test = windows(wikitext_tokens("test", smollm2_tokenizer()), tokens // WINDOW)
    log("capturing SmolLM2")
    fp32 = save_model(capture_llm(smollm2()), work / "smollm2.onnx")
    preset, options = PRESETS["llm"]
    rows = []
    for label, path in forms(fp32, work, preset, None, options).items():
        log(f"perplexity of {label}")
        result = perplexity(path, test)
        rows.append({"model": "SmolLM2-135M", "row": label, "metric": "perplexity",
                     "value": result["ppl"], "n": result["scored_tokens"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.float16", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("cnn", "text", "llm"),
                        default=["cnn", "text", "llm"])
    parser.add_argument("--tokens", type=int, default=8192, help="SmolLM2 test tokens")
    parser.add_argument("--quick", action="store_true", help="200 images / 200 pairs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/float16.json")
    parser.add_argument("--work", type=Path, help="keep the models here")
    args = parser.parse_args(argv)
    command, _ = header("benchmarks.float16", argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="qpass-float16-"))
    rows = []
    for name in args.models:
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        rows += (llm(folder, args.tokens) if name == "llm"
                 else {"cnn": cnn, "text": text}[name](folder, args.quick))
    print(f"\n{'model':<20} {'row':<30} {'metric':<14} {'value':>8} {'agree %':>8} {'n':>6}")
    for r in rows:
        agree = f"{r['agree_%']:8.1f}" if "agree_%" in r else f"{'':>8}"
        print(f"{r['model']:<20} {r['row']:<30} {r['metric']:<14} {r['value']:8.3f} {agree} "
              f"{r['n']:>6}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
