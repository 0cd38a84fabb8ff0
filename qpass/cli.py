"""The `qpass` command: compile, inspect and lint models."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import onnx_ir as ir

from qpass.errors import QpassError
from qpass.schemes import RANGE_METHODS


def main(argv: list[str] | None = None) -> int:
    from qpass.compile import TARGETS

    parser = argparse.ArgumentParser(prog="qpass", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    c = commands.add_parser("compile", help="quantize an ONNX model")
    c.add_argument("model", type=Path, help="float ONNX model (never modified)")
    c.add_argument("-o", "--output", type=Path, required=True, help="quantized ONNX model to write")
    c.add_argument(
        "--preset",
        help="pass list and schemes (default: the target's: int8, or int8-tensorrt)",
    )
    c.add_argument(
        "--calib",
        type=Path,
        help=".npz calibration data: one array per model input, samples on axis 0 (every "
        "preset but w4a16-rtn needs it)",
    )
    c.add_argument(
        "--calibrator",
        choices=RANGE_METHODS,
        help="activation range method (default: the preset's)",
    )
    c.add_argument("--exclude", nargs="*", default=[], help="node names to keep in float")
    c.add_argument(
        "--group-size", type=int, help="w4a16-*: input channels per weight scale (default 128)"
    )
    c.add_argument(
        "--format",
        choices=("dq", "matmulnbits", "plugin"),
        help="w4a16-*: blockwise DequantizeLinear -> MatMul (dq, default), MatMulNBits, or "
        "qpass's INT4 GEMM TensorRT plugin node (plugin)",
    )
    c.add_argument(
        "--correct-bias",
        action="store_true",
        help="fp8: empirical bias correction after quantization (CorrectBias)",
    )
    c.add_argument(
        "--float-layers",
        type=int,
        help="fp8, w4a8-fp: leave the first N Conv/Gemm/MatMul layers in float",
    )
    c.add_argument(
        "--storage",
        choices=("float8", "float4"),
        help="w4a8-fp: FP4 weights stored as their exact FP8 values (float8, default: ONNX "
        "Runtime runs it) or as FLOAT4E2M1 (float4, opset 23; for TensorRT)",
    )
    c.add_argument("--symmetric", action="store_true", help="w4a16-*: int4 weights, no zero point")
    c.add_argument(
        "--lm-head",
        choices=("float", "int8", "int4"),
        help="w4a16-*: the final projection in float (default), 8-bit groups (int8: most of the "
        "1-token speed-up of int4 without its accuracy loss) or 4-bit like the rest",
    )
    c.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        help="w4a16-gptq: quantize columns in order of decreasing diag(H) (default: on)",
    )
    c.add_argument(
        "--normalize-tokens",
        action=argparse.BooleanOptionalAction,
        help="w4a16-gptq, w4a16-awq: each calibration token's input row scaled to unit norm in "
        "the statistics, so tokens with massive activations do not outweigh the rest (default: on)",
    )
    c.add_argument(
        "--lorc-rank",
        type=int,
        help="w4a16-*: add a rank-r float branch for each weight's quantization error (LoRC)",
    )
    c.add_argument(
        "--keep-float", type=int, help="w8a8-*: leave the N most sensitive layers in float"
    )
    c.add_argument(
        "--iterations",
        type=int,
        help="w4a8, int8-tensor --adaround: AdaRound steps per block or layer (default 500)",
    )
    c.add_argument(
        "--adaround",
        action="store_true",
        help="int8-tensor: learn each weight's rounding (AdaRound) before bias correction",
    )
    c.add_argument(
        "--block-layers",
        type=int,
        help="w4a8: layers whose rounding is learned together on their block's output "
        "(default 4; 1: layer by layer)",
    )
    c.add_argument(
        "--alpha",
        type=_alpha,
        help="w8a8-smoothquant: SmoothQuant migration strength in [0, 1], or 'auto' to search "
        "it per layer (default 0.8)",
    )
    c.add_argument(
        "--scale-constraint",
        choices=("float", "pow2", "pow2-group"),
        help="fp8, w4a8-fp: scales any float (default), powers of two, or powers of two apart "
        "per tensor (per output channel for blocks)",
    )
    c.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    c.add_argument("--report", type=Path, help="write a report (.html, .md or .json)")
    c.add_argument(
        "--target",
        default="onnxruntime",
        choices=TARGETS,
        help="deployment target (default: onnxruntime); tensorrt also lints the result and "
        "refuses a graph TensorRT would reject",
    )
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")

    i = commands.add_parser("inspect", help="summarize the quantization of an ONNX model")
    i.add_argument("model", type=Path)

    lint = commands.add_parser(
        "lint", help="check a QDQ ONNX model against a target's rules (exit 1 on findings)"
    )
    lint.add_argument("model", type=Path)
    lint.add_argument("--target", default="tensorrt", choices=("tensorrt",))

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"compile": _compile, "inspect": _inspect, "lint": _lint}[args.command](args)
    except QpassError as e:
        print(f"qpass: error: {e}", file=sys.stderr)
        return 2


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1] or 'auto'")
    return value


def _compile(args) -> int:
    import qpass

    options = {"group_size": args.group_size, "format": args.format}
    options.update(symmetric=args.symmetric or None, act_order=args.act_order)
    options.update(keep_float=args.keep_float or None, scale_constraint=args.scale_constraint)
    options.update(storage=args.storage, float_layers=args.float_layers)
    options.update(iterations=args.iterations, block_layers=args.block_layers)
    options["adaround"] = args.adaround or None
    options["correct_bias"] = args.correct_bias or None
    options["alpha"] = args.alpha
    options["lorc_rank"] = args.lorc_rank
    options["normalize_tokens"] = args.normalize_tokens
    options["lm_head"] = args.lm_head
    start = time.perf_counter()
    try:
        compiled = qpass.compile(
            args.model,
            preset=args.preset,
            calibration=args.calib,
            calibrator=args.calibrator,
            exclude=args.exclude,
            batch_size=args.batch_size,
            target=args.target,
            progress=not args.quiet,
            keep_reference=args.report is not None,
            **{k: v for k, v in options.items() if v is not None},
        )
    except qpass.LintError as e:
        raise qpass.LintError(f"{e}\n{args.output} was not written", e.findings) from e
    compiled.save(args.output)
    if not args.quiet:
        print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
        print(_summary(compiled.model))
    if args.report:
        report = compiled.report()
        report.save(args.report)
        if not args.quiet:
            print(f"wrote {args.report}; worst layers:")
            for r in report.worst(5):
                print(f"  {r.op_type:<18} {r.node:<40} {r.sqnr_db:6.2f} dB")
    return 0


def _lint(args) -> int:
    from qpass.lint import RULES, errors, format_findings, lint_tensorrt

    findings = lint_tensorrt(args.model)
    if not findings:
        print(f"{args.model}: clean for {args.target} ({len(RULES)} rules checked)")
        return 0
    print(format_findings(findings))
    n_errors = len(errors(findings))
    n_warnings = len(findings) - n_errors
    print(
        f"{args.model}: {n_errors} error{'s' * (n_errors != 1)}, {n_warnings} "
        f"warning{'s' * (n_warnings != 1)} for {args.target}"
    )
    return 1


def _inspect(args) -> int:
    from qpass.capture import load_onnx
    from qpass.runtime import onnxruntime as ort_runtime

    model = load_onnx(args.model)
    print(_summary(model))
    print("\nper layer:")
    print(_layer_table(model))
    print("\nONNX Runtime kernels after its fusions:")
    for op, n in ort_runtime.optimized_op_types(str(args.model)).items():
        print(f"  {op:<32} {n}")
    return 0


def _layers(model: ir.Model):
    """(node, weight dtype, weight granularity, activation dtypes) of each compute op."""
    from qpass.passes._graph import attribute, constant, is_op
    from qpass.passes.insert_qdq import QUANTIZABLE_OPS

    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            bits, block = attribute(node, "bits", 4), attribute(node, "block_size", 0)
            level = attribute(node, "accuracy_level", 0)  # 4: int8 activations at run time
            activations = ["int8" if level == 4 else "float"]
            yield node, f"{bits}-bit", f"block({block}, axis=0)", activations
            continue
        if not is_op(node, *QUANTIZABLE_OPS):
            continue
        weight, granularity, activations = "-", "-", []
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if not is_op(producer, "DequantizeLinear"):
                if value is not None and constant(value) is None:
                    activations.append("float")
                continue
            dtype = producer.inputs[0].dtype.name.lower()
            if constant(producer.inputs[0]) is None:
                activations.append(dtype)
            elif producer.inputs[0].dtype != ir.DataType.INT32:
                scale = constant(producer.inputs[1])
                weight = dtype
                granularity = (
                    f"channel(axis={attribute(producer, 'axis', 1)})"
                    if scale is not None and scale.size > 1
                    else "tensor"
                )
                if attribute(producer, "block_size", 0):
                    granularity = f"block({attribute(producer, 'block_size', 0)}, axis=0)"
        yield node, weight, granularity, activations


def _summary(model: ir.Model) -> str:
    quantized, floating = Counter(), Counter()
    for node, weight, _, activations in _layers(model):
        if weight != "-" and activations == ["float"]:  # weight-only (w4a16)
            quantized[f"{node.op_type} (float act, {weight} w)"] += 1
        elif "float" in activations or not activations:
            floating[node.op_type] += 1
        else:
            quantized[f"{node.op_type} ({'/'.join(sorted(set(activations)))} act, {weight} w)"] += 1
    lines = ["quantized ops:"] + [f"  {k:<44} {v}" for k, v in sorted(quantized.items())]
    lines += ["float ops left:"] + (
        [f"  {k:<44} {v}" for k, v in sorted(floating.items())] or ["  none"]
    )
    return "\n".join(lines)


def _layer_table(model: ir.Model) -> str:
    rows = [(n.op_type, n.name or "?", w, g, "/".join(a) or "-") for n, w, g, a in _layers(model)]
    width = max([len(r[1]) for r in rows] + [4])
    header = f"  {'op':<18} {'node':<{width}} {'weight':<7} {'granularity':<18} activations"
    return "\n".join(
        [header] + [f"  {o:<18} {n:<{width}} {w:<7} {g:<18} {a}" for o, n, w, g, a in rows]
    )


if __name__ == "__main__":
    sys.exit(main())
