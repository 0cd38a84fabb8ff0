"""ONNX Runtime sessions with settings that give correct numbers, and a latency helper."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from qpass.errors import ModelError, first_line

CUSTOM_OP_LIBRARIES: list[str] = []
"""Custom-op libraries (.so/.dll) every session of this process loads (`use_custom_ops`)."""

DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
"""Op domains ONNX Runtime's CPU provider runs without a custom-op library."""


UNSAFE_OPTIMIZERS = ["WeightBiasQuantization"]
"""ORT graph transformers every session here disables (see `session`)."""


def use_custom_ops(path: str | os.PathLike) -> None:
    """Load the custom-op library at `path` into every session this process creates (ONNX
    Runtime's `register_custom_ops_library`), so models with its ops can be calibrated."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"custom-op library {path} does not exist")
    try:
        ort.SessionOptions().register_custom_ops_library(path)
    except Exception as e:  # ORT raises its own Fail for a file it cannot load
        raise ModelError(f"custom-op library {path} cannot be loaded: {e}") from e
    if path not in CUSTOM_OP_LIBRARIES:
        CUSTOM_OP_LIBRARIES.append(path)


class Session(ort.InferenceSession):
    """ONNX Runtime's InferenceSession that also takes bfloat16 arrays (ml_dtypes), which its
    Python binding cannot convert: they are passed as OrtValues of ONNX type BFLOAT16."""

    def run(self, output_names, input_feed, run_options=None):
        feed = {
            name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(array).view(np.uint16), onnx.TensorProto.BFLOAT16)
            if getattr(array, "dtype", None) == ml_dtypes.bfloat16 else array
            for name, array in input_feed.items()
        }
        return super().run(output_names, feed, run_options)


def session(
    model: bytes | str | os.PathLike,
    *,
    threads: int | None = None,
    optimize: bool = True,
    arena: bool = True,
    providers: list[str] | None = None,
) -> Session:
    """An InferenceSession for a serialized model or a model file.

    - `session.qdq_matmulnbits_accuracy_level` is 0: ORT would otherwise turn DQ(int4)->MatMul into
      MatMulNBits at accuracy level 4 (0.5% error in fp32, zeros in fp16).
    - `threads` sets intra-op threads (default: ORT's choice, one per core); inter-op is 1.
    - ORT's `WeightBiasQuantization` is disabled: it turns a float bias beside Q/DQ inputs into
      an int32 bias and rounds it in the scales' type, which overflows in float16 (an fp8 float16
      CNN: 26 dB against the float16 model with it disabled, 13 dB with it).
    - `optimize=False` keeps the graph as written.
    - `arena=False` frees buffers after each run instead of keeping ORT's CPU memory arena (for
      calibration runs that fetch many intermediate tensors).
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    if threads:
        options.intra_op_num_threads = threads
    for library in CUSTOM_OP_LIBRARIES:
        options.register_custom_ops_library(library)
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    try:
        return Session(
            model, options, providers=providers or ["CPUExecutionProvider"],
            disabled_optimizers=UNSAFE_OPTIMIZERS,
        )
    except (ort.capi.onnxruntime_pybind11_state.Fail,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.NotImplemented) as e:
        raise ModelError(f"ONNX Runtime cannot load the model: {first_line(e)}") from e


def optimized_op_types(model: bytes | str | os.PathLike) -> dict[str, int]:
    """Op types of the graph ORT actually runs after its fusions (e.g. QLinearConv), with counts."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        options.optimized_model_filepath = path
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = os.fspath(model) if isinstance(model, os.PathLike) else model
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=UNSAFE_OPTIMIZERS)
        counts: dict[str, int] = {}
        for node in onnx.load(path, load_external_data=False).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def latency(
    sess: ort.InferenceSession, feed: Mapping[str, np.ndarray], *, warmup: int = 5, repeat: int = 30
) -> float:
    """Median wall time of one `sess.run` in milliseconds."""
    for _ in range(warmup):
        sess.run(None, dict(feed))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sess.run(None, dict(feed))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
