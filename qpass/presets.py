"""Presets: named lists of passes and schemes."""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from qpass.passes import FoldBatchNorm, FoldConstants, FuseRequant, InsertQDQ, LowerForOnnxRuntime
from qpass.schemes import WEIGHT_INT8, QuantScheme

DEFAULT_CALIBRATOR = "minmax"


def canonicalize() -> list[ir.passes.PassBase]:
    """Passes that expose patterns without changing the float function."""
    return [FoldConstants()]


def int8(
    calibrator: str | None = None, exclude: frozenset[str] = frozenset()
) -> list[ir.passes.PassBase]:
    """INT8 for ONNX Runtime: S8 symmetric per-channel weights, U8 per-tensor activations."""
    activations = QuantScheme(dtype="uint8", method=calibrator or DEFAULT_CALIBRATOR)
    return [
        *canonicalize(),
        FoldBatchNorm(),
        InsertQDQ(weights=WEIGHT_INT8, activations=activations, exclude=exclude),
        FuseRequant(),
        LowerForOnnxRuntime(),
    ]


PRESETS: dict[str, Callable[..., list[ir.passes.PassBase]]] = {"int8": int8}
