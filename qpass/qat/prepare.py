"""`prepare`: the post-training quantized model of a preset, made trainable."""

from __future__ import annotations

from typing import Any

from qpass.compile import compile as compile_model
from qpass.errors import QpassError
from qpass.qat.module import QATModule
from qpass.qat.quantizers import METHODS


def prepare(
    module: Any,
    example_inputs: Any,
    preset: str = "w4a4",
    target: str = "onnxruntime",
    method: str = "lsq",
    calibration: Any = None,
    progress: bool = True,
    **options: Any,
) -> QATModule:
    """A trainable torch module whose forward pass is the preset's quantized model for `target`.

    The float model is compiled by the preset exactly as `qpass.compile` does (capture, BatchNorm
    folded into the convolutions, calibration with the same Context and observers), and the
    compiled Q/DQ graph becomes a `QATModule`: every weight and activation the preset quantizes
    gets a fake quantizer initialized with the compiled integers, steps and zero points. Before
    training, its outputs are those of the post-training quantized model (the Qualcomm white
    paper's QAT pipeline, Nagel et al. 2021 §5: PTQ ranges as the start, BatchNorm folded).

    method: "lsq" (learned steps), "lsq+" (learned steps and asymmetric offsets; activations
    calibrated by the MSE range unless `calibrator` is given, and weight steps from LSQ+'s
    3-sigma rule, so it starts near, not at, the PTQ model), or "pact" (learned clipping of
    one-sided activations, weights by LSQ). `options` are the preset's (e.g. calibrator).
    """
    if method not in METHODS:
        raise QpassError(f"QAT method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if calibration is None:
        raise QpassError("prepare needs calibration data for the starting ranges: pass "
                         "calibration=... (as for qpass.compile)")
    if method == "lsq+":
        options.setdefault("calibrator", "mse")
    compiled = compile_model(
        module,
        preset=preset,
        target=target,
        calibration=calibration,
        example_inputs=example_inputs,
        progress=progress,
        **options,
    )
    qat = QATModule(compiled, method)
    if method == "lsq+":
        for quantizer in qat.weights.values():
            quantizer.init_lsq_plus()
    return qat
