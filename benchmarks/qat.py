"""Quantization-aware training benchmark: ResNet20 on CIFAR-10 (qpass.qat).

    python -m benchmarks.qat [--rows ROW ...] [--train-images N] [--epochs E] [--work DIR]
                             [--out FILE]

Each row runs in its own process (its peak RSS is its own). Training rows fit on the first
`--train-images` of the CIFAR-10 training set (JPEG copies, random horizontal flips) with
knowledge distillation from the FP32 model plus the labels, AdamW on a cosine schedule; every row
is evaluated on the 9800-image evaluation split of the test set. Quantized rows report the top-1
of the exported ONNX model run by ONNX Runtime; QAT rows also the torch module's and their
agreement. 4-, 3- and 2-bit activations run in ONNX Runtime through opset-21 Q/DQ in float: a
simulation of the accuracy, no speed claim; the int8 rows run the fused QLinearConv kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import paired_ratio, peak_rss_mb, run_worker

# row -> (kind, preset, method, options)
ROWS = {
    "FP32": ("float", None, None, {}),
    "FP32 fine-tuned": ("finetune", None, None, {}),
    "W4A4 PTQ RTN": ("ptq", "w4a4", None, {}),
    "W4A4 PTQ BlockAdaRound": ("ptq", "w4a4", None, {"adaround": True, "iterations": 200}),
    "W4A4 LSQ": ("qat", "w4a4", "lsq", {}),
    "W4A4 LSQ+": ("qat", "w4a4", "lsq+", {}),
    "W4A4 PACT": ("qat", "w4a4", "pact", {}),
    "W3A3 LSQ": ("qat", "w3a3", "lsq", {}),
    "W2A2 LSQ": ("qat", "w2a2", "lsq", {}),
    "INT8 PTQ": ("ptq", "int8", None, {}),
    "INT8 LSQ": ("qat", "int8", "lsq", {}),
}
BATCH = 64
LR = 1e-4  # AdamW, cosine schedule (qpass.qat.fit's defaults), for every training row


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loader(images: np.ndarray, labels: np.ndarray, seed: int = 0):
    """Shuffled batches of (images, labels), each image flipped left-right with probability 1/2."""
    import torch

    class Flipped(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            x = torch.from_numpy(images[i])
            return (x.flip(-1) if torch.rand(()) < 0.5 else x), int(labels[i])

    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(Flipped(), batch_size=BATCH, shuffle=True,
                                       generator=generator)


def worker(row: str, work: str, train_images: str, epochs: str, eval_images: str) -> int:
    """Run one row; write its evaluation logits to WORK/<row>.npy and print its JSON line."""
    import torch

    import qpass
    import qpass.qat
    from benchmarks import data, models

    torch.manual_seed(0)
    kind, preset, method, options = ROWS[row]
    folder = Path(work)
    calib, _ = data.cifar10("calibration")
    images, labels = data.cifar10("evaluation", int(eval_images) or None)
    teacher = models.resnet20()
    example = (torch.from_numpy(calib[:1]),)
    result: dict = {"row": row, "epochs": 0, "train_s": 0.0}

    def torch_logits(module) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([module(torch.from_numpy(images[i : i + 500])).numpy()
                                   for i in range(0, len(images), 500)])

    def train(module) -> None:
        x, y = data.cifar10_train(int(train_images))
        start = time.perf_counter()
        qpass.qat.fit(module, loader(x, y), teacher=teacher, epochs=int(epochs), lr=LR,
                      progress=False)
        result.update(train_s=time.perf_counter() - start, epochs=int(epochs),
                      train_images=int(train_images))

    path = folder / f"{row.replace(' ', '_')}.onnx"
    if kind == "float":
        logits = torch_logits(teacher)
    elif kind == "finetune":
        student = models.resnet20().train()
        train(student)
        logits = torch_logits(student.eval())
    else:
        start = time.perf_counter()
        if kind == "ptq":
            compiled = qpass.compile(teacher, preset=preset, calibration=calib,
                                     example_inputs=example, progress=False, **options)
        else:
            qat = qpass.qat.prepare(teacher, example, preset=preset, method=method,
                                    calibration=calib, progress=False, **options)
            train(qat)
            compiled = qpass.qat.convert(qat)
            torch_out = torch_logits(qat)
            result["torch_top1"] = float((torch_out.argmax(1) == labels).mean())
        result["compile_s"] = time.perf_counter() - start - result["train_s"]
        compiled.save(path)
        result["path"] = str(path)
        session = compiled.session()
        logits = np.concatenate([session.run(None, {"input": images[i : i + 500]})[0]
                                 for i in range(0, len(images), 500)])
        if kind == "qat":
            result["onnx_torch_agreement"] = float((logits.argmax(1) == torch_out.argmax(1)).mean())
            result["integer_weights_equal"] = all(
                np.array_equal(q.integers().detach().numpy().astype(np.int64),
                               compiled.model.graph.initializers[name].const_value.numpy()
                               .astype(np.int64))
                for name, key in qat.keys.items() if key in qat.weights
                for q in [qat.weights[key]]
            )
    np.save(folder / f"{row.replace(' ', '_')}.npy", logits)
    result["top1"] = float((logits.argmax(1) == labels).mean())
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))
    return 0


def latency(rows: list[dict], rounds: int = 7) -> None:
    """INT8 LSQ against INT8 PTQ at batch 1: interleaved rounds, the paired median ratio, and
    the QLinearConv count of each after ONNX Runtime's fusions."""
    from qpass.runtime.onnxruntime import latency as measure
    from qpass.runtime.onnxruntime import optimized_op_types, session

    from benchmarks.data import cifar10

    pair = {r["row"]: r for r in rows if r["row"] in ("INT8 PTQ", "INT8 LSQ") and "path" in r}
    if len(pair) < 2:
        return
    image = cifar10("evaluation", 1)[0]  # batch 1
    sessions = {row: session(r["path"]) for row, r in pair.items()}
    for r in pair.values():
        r["qlinearconv"] = optimized_op_types(r["path"]).get("QLinearConv", 0)
        r["latency_rounds_ms"] = []
    for _ in range(rounds):
        for row, sess in sessions.items():
            pair[row]["latency_rounds_ms"].append(measure(sess, {"input": image}, repeat=200))
    pair["INT8 LSQ"]["latency_ratio_vs_ptq"] = paired_ratio(
        pair["INT8 LSQ"]["latency_rounds_ms"], pair["INT8 PTQ"]["latency_rounds_ms"])


def table(rows: list[dict]) -> str:
    head = ("| row | top-1 | agreement with FP32 fine-tuned | epochs (images) | training s | "
            "peak RSS MB | ONNX vs torch agreement |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error'][-200:]} |||||")
            continue
        agree = r.get("agreement_fp32_finetuned")
        exported = r.get("onnx_torch_agreement")
        lines.append(
            f"| {r['row']} | {100 * r['top1']:.2f} | "
            f"{'' if agree is None else f'{100 * agree:.2f}'} | "
            f"{r['epochs']} ({r.get('train_images', 0)}) | {r['train_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{'' if exported is None else f'{100 * exported:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.qat", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--worker", nargs=5, metavar=("ROW", "WORK", "IMAGES", "EPOCHS", "EVAL"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--train-images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-images", type=int, default=0,
                        help="evaluate on the first N of the split (0: all 9800; for smoke runs)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qpass-qat"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in args.rows:
        log(f"{row} ...")
        out = args.work / f"{row.replace(' ', '_')}.npy"
        worker_args = [row, args.work, args.train_images, args.epochs, args.eval_images]
        result = run_worker("benchmarks.qat", worker_args, out, timeout_s=1800)
        result.setdefault("row", row)
        log(json.dumps(result))
        rows.append(result)
    reference = args.work / "FP32_fine-tuned.npy"
    if reference.exists():
        reference_top = np.load(reference).argmax(1)
        for r in rows:
            logits = args.work / f"{r['row'].replace(' ', '_')}.npy"
            if "error" not in r and logits.exists():
                r["agreement_fp32_finetuned"] = float((np.load(logits).argmax(1)
                                                       == reference_top).mean())
    latency(rows)
    print(table(rows))
    for r in rows:
        if "latency_ratio_vs_ptq" in r or "qlinearconv" in r:
            print(f"{r['row']}: QLinearConv {r['qlinearconv']}, batch-1 latency "
                  f"{np.median(r['latency_rounds_ms']):.3f} ms (median of rounds)"
                  + (f", paired ratio vs INT8 PTQ {r['latency_ratio_vs_ptq']:.3f}"
                     if "latency_ratio_vs_ptq" in r else ""))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
