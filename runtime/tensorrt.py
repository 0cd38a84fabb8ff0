"""Build TensorRT engines from qpass's TensorRT-form QDQ models (`--target tensorrt`).

UNTESTED HERE: TensorRT cannot be installed on the machines qpass is developed and tested on (its
builder libraries are not on the reachable package registries, and the lent GPU machines have
none), so `build_engine` has never run. What runs in CI is the static linter (`qpass.lint`, which
checks the graph against TensorRT's documented rules), the numerics of the same graph in ONNX
Runtime, and the tests of this module's import guard and of `trtexec_command`.

The build follows TensorRT 11's documented flow (TensorRT Python API reference; "Migrating from
TensorRT 10.x to 11.x"): a strongly typed network (the only kind in 11.x; the flag is set so that
10.x builds the same way), the ONNX parser, one optimization profile for dynamic input shapes, an
optional timing cache read and written back, and plugin libraries loaded into the plugin
registry. TensorRT 11 has no FP16 builder flag: `fp16=True` first converts the float parts of the
model with TensorRT Model Optimizer's AutoCast (`modelopt.onnx.autocast`), as NVIDIA's migration
guide prescribes. The build runs in a child process, so a crash or a leak in the builder cannot
take the caller down.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from qpass.errors import QpassError

Shape = Sequence[int]
ShapeSpec = Mapping[str, "Shape | tuple[Shape, Shape, Shape]"]
"""Input name -> one shape (fixed), or (min, opt, max) shapes of an optimization profile."""


class TensorRTUnavailableError(QpassError):
    """The `tensorrt` (or, for fp16, `modelopt`) Python package is not installed."""


class EngineBuildError(QpassError):
    """TensorRT's parser or builder refused the model."""


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    fp16: bool = False,
    timing_cache: str | os.PathLike | None = None,
    plugins: Sequence[str | os.PathLike] = (),
    shapes: ShapeSpec | None = None,
    timeout: float | None = None,
    python_plugins: Sequence[str] = (),
) -> Path:
    """Build a serialized TensorRT engine (plan) from an ONNX model, in a child process.

    Args:
        onnx_path: the model, e.g. written by `qpass compile --target tensorrt`.
        engine_path: where the plan is written.
        fp16: run the float parts in FP16 (converted with ModelOpt AutoCast first; INT8 Q/DQ
            stays as it is).
        timing_cache: a timing-cache file, read if it exists and written back after the build.
        plugins: plugin libraries (.so) to load into TensorRT's plugin registry.
        shapes: per input, a fixed shape or (min, opt, max): one optimization profile. Needed
            for every input with a dynamic dimension.
        timeout: seconds before the child process is stopped (default: none).
        python_plugins: modules the child process imports before parsing, to register
            TensorRT Python plugins (`tensorrt.plugin`), e.g. "qpass.plugins.tensorrt" for the
            INT4 GEMM node `LowerToInt4Plugin` emits. Their ahead-of-time kernels are embedded
            in the engine: running it needs no Python. trtexec cannot import Python plugins,
            so `trtexec_command` has no equivalent.

    Raises TensorRTUnavailableError without TensorRT, EngineBuildError if the parser or the
    builder fails.
    """
    require_tensorrt(fp16=fp16)
    request = _request(onnx_path, engine_path, fp16, timing_cache, plugins, shapes)
    request["python_plugins"] = _python_plugins(python_plugins)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "qpass.runtime.tensorrt", json.dumps(request)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise EngineBuildError(f"the TensorRT build ran past {timeout} s and was stopped") from e
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-20:])
        raise EngineBuildError(
            f"TensorRT could not build {request['onnx']} (exit {done.returncode}):\n{tail}"
        )
    return Path(request["engine"])


def trtexec_command(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    fp16: bool = False,
    timing_cache: str | os.PathLike | None = None,
    plugins: Sequence[str | os.PathLike] = (),
    shapes: ShapeSpec | None = None,
) -> str:
    """The shell command that builds the same engine with `trtexec` (TensorRT's command-line
    tool): `--stronglyTyped` (required by 10.x, the default in 11.x), `--timingCacheFile`,
    `--dynamicPlugins` per library and `--minShapes/--optShapes/--maxShapes`. With fp16 it is
    preceded by the ModelOpt AutoCast step, since 11.x has no `--fp16`."""
    request = _request(onnx_path, engine_path, fp16, timing_cache, plugins, shapes)
    steps = []
    model = request["onnx"]
    if fp16:
        converted = str(Path(model).with_suffix(".fp16.onnx"))
        autocast = ["python", "-m", "modelopt.onnx.autocast"]
        steps.append([*autocast, "--onnx_path", model, "--output_path", converted])
        model = converted
    command = ["trtexec", f"--onnx={model}", f"--saveEngine={request['engine']}", "--stronglyTyped"]
    if request["timing_cache"]:
        command.append(f"--timingCacheFile={request['timing_cache']}")
    command += [f"--dynamicPlugins={p}" for p in request["plugins"]]
    if request["shapes"]:
        for flag, position in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            spec = ",".join(
                f"{name}:{'x'.join(map(str, profile[position]))}"
                for name, profile in request["shapes"].items()
            )
            command.append(f"{flag}={spec}")
    steps.append(command)
    return " && ".join(shlex.join(step) for step in steps)


def require_tensorrt(fp16: bool = False) -> None:
    """Raise TensorRTUnavailableError, saying how to install it, if TensorRT cannot be imported."""
    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTUnavailableError(
            "TensorRT is not installed in this Python environment: on a Linux or Windows machine "
            "with an NVIDIA GPU and driver run `pip install tensorrt` (or `pip install "
            "qpass[tensorrt]`). Without it, `qpass lint --target tensorrt MODEL.onnx` checks a "
            "model statically and `trtexec_command(...)` prints the equivalent trtexec command."
        )
    if fp16 and importlib.util.find_spec("modelopt") is None:
        raise TensorRTUnavailableError(
            "fp16=True converts the model with TensorRT Model Optimizer's AutoCast (TensorRT 11 "
            "has no FP16 builder flag): `pip install nvidia-modelopt[all]`, or build with "
            "fp16=False"
        )


def _request(onnx_path, engine_path, fp16, timing_cache, plugins, shapes) -> dict:
    """Check the arguments and turn them into the JSON the child process reads."""
    onnx_file = Path(onnx_path)
    if not onnx_file.is_file():
        raise QpassError(f"model file {onnx_file} does not exist")
    engine = Path(engine_path)
    if not engine.parent.is_dir():
        raise QpassError(f"cannot write {engine}: folder {engine.parent} does not exist")
    for plugin in plugins:
        if not Path(plugin).is_file():
            raise QpassError(f"plugin library {plugin} does not exist")
    return {
        "onnx": str(onnx_file),
        "engine": str(engine),
        "fp16": bool(fp16),
        "timing_cache": str(timing_cache) if timing_cache is not None else None,
        "plugins": [str(p) for p in plugins],
        "shapes": _profiles(shapes or {}),
    }


def _python_plugins(modules: Sequence[str]) -> list[str]:
    """Check that each plugin module can be found (it is imported in the child process)."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise QpassError(f"plugin module {module!r} cannot be imported")
    return list(modules)


def _profiles(shapes: ShapeSpec) -> dict[str, list[list[int]]]:
    """{name: [min, opt, max]} from fixed shapes or (min, opt, max) triples, checked."""
    profiles = {}
    for name, spec in shapes.items():
        spec = list(spec)
        nested = bool(spec) and all(isinstance(s, Sequence) for s in spec)
        triple = [list(s) for s in spec] if nested else [list(spec)] * 3
        if len(triple) != 3 or any(
            not all(isinstance(d, int) and d > 0 for d in s) for s in triple
        ):
            raise QpassError(
                f"shapes[{name!r}] must be one shape of positive ints or (min, opt, max) "
                f"shapes, not {spec!r}"
            )
        low, opt, high = triple
        if not len(low) == len(opt) == len(high) or not all(
            a <= b <= c for a, b, c in zip(low, opt, high, strict=True)
        ):
            raise QpassError(
                f"shapes[{name!r}]: min <= opt <= max must hold in every dimension: {triple}"
            )
        profiles[name] = triple
    return profiles


def _build(request: dict) -> None:  # pragma: no cover - needs TensorRT and a GPU
    """The child process: parse, configure and build (TensorRT Python API)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    for module in request.get("python_plugins", []):  # registers with tensorrt.plugin
        importlib.import_module(module)
    builder = trt.Builder(logger)
    for library in request["plugins"]:
        builder.get_plugin_registry().load_library(library)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    model = request["onnx"]
    if request["fp16"]:
        model = _autocast_fp16(model)
    if not parser.parse_from_file(model):
        raise SystemExit(
            "ONNX parser errors:\n"
            + "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        )
    config = builder.create_builder_config()
    dynamic = [
        network.get_input(i)
        for i in range(network.num_inputs)
        if any(d < 0 for d in network.get_input(i).shape)
    ]
    missing = [t.name for t in dynamic if t.name not in request["shapes"]]
    if missing:
        raise SystemExit(f"inputs {missing} have dynamic dimensions: give shapes=(min, opt, max)")
    if request["shapes"]:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in request["shapes"].items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache_path = request["timing_cache"]
    if cache_path:
        cached = Path(cache_path).read_bytes() if Path(cache_path).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SystemExit("the TensorRT builder returned no engine (see the log above)")
    Path(request["engine"]).write_bytes(bytes(plan))
    if cache_path:
        Path(cache_path).write_bytes(bytes(config.get_timing_cache().serialize()))


def _autocast_fp16(model: str) -> str:  # pragma: no cover - needs ModelOpt
    """Convert the float parts of the model to FP16 with ModelOpt AutoCast, inputs and outputs
    kept in float32; returns the converted file's path."""
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    converted = convert_to_mixed_precision(
        onnx_path=model, low_precision_type="fp16", keep_io_types=True
    )
    path = Path(tempfile.mkdtemp(prefix="qpass-trt-")) / f"{Path(model).stem}.fp16.onnx"
    onnx.save(converted, path)
    return str(path)


if __name__ == "__main__":  # pragma: no cover - the child process of build_engine
    _build(json.loads(sys.argv[1]))
