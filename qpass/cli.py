"""The `qpass` command: compile, inspect and lint models."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import typing
from collections import Counter
from pathlib import Path

import onnx_ir as ir

from qpass import presets, targets
from qpass.errors import QpassError, first_line
from qpass.passes.cast_float_parts import FLOAT_TYPES


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage dump), pointing at --help; exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="qpass", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print internal errors' tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_compile(commands)

    i = commands.add_parser("inspect", help="summarize the quantization of an ONNX model")
    i.add_argument("model", type=Path)

    lint = commands.add_parser(
        "lint",
        help="check a QDQ ONNX model against a target's rules (exit 1 on errors or warnings)",
    )
    lint.add_argument("model", type=Path)
    checked = [t for t in targets.names() if type(targets.get(t)).check is not targets.Target.check]
    lint.add_argument("--target", default=checked[0], choices=checked)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _signals_interrupt():
            return {"compile": _compile, "inspect": _inspect, "lint": _lint}[args.command](args)
    except QpassError as e:
        print(f"qpass: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGHUP: files being written are removed
        print("qpass: interrupted", file=sys.stderr)
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        return 128 + signum
    except Exception as e:  # a qpass bug, not the input's fault: one line and a traceback file
        if args.debug:
            traceback.print_exc()
        print(f"qpass: internal error: {type(e).__name__}: {first_line(e)}; the traceback is "
              f"in {_save_traceback()} (--debug prints it)", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGHUP raise KeyboardInterrupt(signal number) as Ctrl-C does, so that the
    temporary files of a write in progress are removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signum)

    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {s: signal.signal(s, interrupt) for s in (getattr(signal, n) for n in names)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _save_traceback() -> str:
    fd, path = tempfile.mkstemp(prefix="qpass-error-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        traceback.print_exc(file=f)
    return path


def _add_compile(commands) -> None:
    """The compile command: common flags, then one flag per preset option (from the registry)."""
    listing = "\n".join(
        f"  {p.name:<18} {p.help} [{', '.join(p.targets)}]" for p in presets.all_presets()
    )
    c = commands.add_parser(
        "compile",
        help="quantize an ONNX model",
        description="Quantize a float ONNX model with a preset's passes for a target.",
        epilog=f"presets [targets]:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("model", type=Path, help="float ONNX model (never modified)")
    c.add_argument("-o", "--output", type=Path, required=True, help="quantized ONNX model to write")
    c.add_argument(
        "--preset",
        choices=[p.name for p in presets.all_presets()],
        metavar="PRESET",
        help="pass list and schemes, listed below (default: the target's, int8)",
    )
    c.add_argument(
        "--target",
        default="onnxruntime",
        choices=targets.names(),
        help="; ".join(f"{t}: {targets.get(t).help}" for t in targets.names()),
    )
    c.add_argument(
        "--calib",
        type=Path,
        help=".npz calibration data: one array per model input, samples on axis 0 (every "
        "preset but w4a16-rtn and w8a8-dynamic needs it)",
    )
    c.add_argument("--exclude", nargs="*", default=[], help="node names to keep in float")
    c.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    c.add_argument(
        "--custom-op-library",
        action="append",
        default=[],
        metavar="PATH",
        help="ONNX Runtime custom-op library for the model's ops of other domains (repeatable)",
    )
    c.add_argument(
        "--float-type",
        choices=FLOAT_TYPES,
        help="type of the float parts (weights left float, scales, activations between "
        "quantized ops); float16 keeps reductions, Softmax, normalizations and exp in float32 "
        "(for TensorRT, which runs what the ONNX types say); default: float16 for a float16 "
        "model, else float32",
    )
    c.add_argument("--report", type=Path, help="write a report (.html, .md or .json)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    options = c.add_argument_group("preset options (default: the preset's)")
    for name, declared in _preset_options().items():
        option = declared[0][1]
        takers = ", ".join(
            f"{p}={o.default}" if len({str(o.default) for _, o in declared}) > 1 else p
            for p, o in declared
        )
        if isinstance(option.default, dict):
            takers += "; default " + ", ".join(f"{v} on {t}" for t, v in option.default.items())
        kwargs = {"dest": name, "default": None, "help": f"{option.help} [{takers}]"}
        if option.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = option.type
            if option.choices:
                kwargs["choices"] = option.choices
        options.add_argument(option.flag, **kwargs)


def _preset_options() -> dict[str, list]:
    """Each CLI option name -> [(preset name, Option)] of the presets that take it."""
    found: dict[str, list] = {}
    for p in presets.all_presets():
        for option in p.options:
            if option.cli:
                found.setdefault(option.name, []).append((p.name, option))
    return found


def _compile(args) -> int:
    import qpass
    from qpass.files import check_outputs

    check_outputs(args.output, args.report, model=args.model, calibration=args.calib)
    options = {name: getattr(args, name) for name in _preset_options()}
    start = time.perf_counter()
    try:
        compiled = qpass.compile(
            args.model,
            preset=args.preset,
            calibration=args.calib,
            exclude=args.exclude,
            batch_size=args.batch_size,
            target=args.target,
            progress=not args.quiet,
            keep_reference=args.report is not None,
            custom_op_libraries=args.custom_op_library,
            float_type=args.float_type,
            **{k: v for k, v in options.items() if v is not None},
        )
    except qpass.LintError as e:
        raise qpass.LintError(f"{e}\n{args.output} was not written", e.findings) from e
    report = compiled.report() if args.report else None  # before writing: an error leaves no file
    compiled.save(args.output)
    if not args.quiet:
        print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
        print(_summary(compiled.model))
    if report is not None:
        report.save(args.report)
        if not args.quiet:
            print(f"wrote {args.report}; worst layers:")
            for r in report.worst(5):
                print(f"  {r.op_type:<18} {r.node:<40} {r.sqnr_db:6.2f} dB")
    return 0


def _lint(args) -> int:
    from qpass.lint import errors, format_findings

    findings = targets.get(args.target).check(args.model)
    notes = [f for f in findings if f.severity == "info"]
    if len(notes) == len(findings):  # nothing wrong: clean, or nothing to check
        for note in notes:
            print(f"{args.model} for {args.target}: {note.message}")
        if not notes:
            print(f"{args.model}: clean for {args.target}")
        return 0
    print(format_findings(findings))
    n_errors = len(errors(findings))
    n_warnings = len(findings) - n_errors - len(notes)
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
    from qpass.graph import attribute, constant, is_op
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
