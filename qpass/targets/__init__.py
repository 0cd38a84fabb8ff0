"""Deployment targets, one module each in this package (the `REGISTRY` imports them all).

A target module defines a `Target` subclass and registers an instance with `register`. The
target declares its name, its default preset, the legal form of the formats a preset names
(e.g. which 8-bit activations), the lowering passes after quantization, a legality check of the
compiled graph, and how a compiled model is deployed. `qpass.compile` and the CLI look targets up
here and never compare target names.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from qpass.registry import Registry
from qpass.schemes import QuantScheme


class Target:
    """Base class of a deployment target; a module in qpass/targets/ registers one instance."""

    name: str = ""
    title: str = ""  # as written in messages, e.g. "TensorRT"
    family: str = ""  # the name presets serve it by (default: its name); a subclass of another
    # target reuses that target's lowering and family
    help: str = ""
    default_preset: str = "int8"

    def __init__(self) -> None:
        self.family = self.family or self.name

    def int8_activations(self, method: str) -> QuantScheme:
        """The 8-bit integer activation scheme this target runs."""
        raise NotImplementedError

    def integer_lowering(self) -> list[ir.passes.PassBase]:
        """Passes after an integer Q/DQ pipeline (CNN and transformer static INT8)."""
        return []

    def float8_lowering(self) -> list[ir.passes.PassBase]:
        """Passes after an FP8 / FP4 Q/DQ pipeline."""
        return []

    def check(self, model: ir.Model) -> list:
        """Findings of this target's legality check on a compiled graph (`qpass.lint.Finding`);
        those of severity "error" make `qpass.compile` refuse the graph."""
        return []

    def deploy(self, onnx_path: Any, out: Any, **options: Any) -> Any:
        """Turn a saved compiled model into what this target runs (a session, an engine)."""
        raise NotImplementedError(f"target {self.name} has no deployment step")

    def __repr__(self) -> str:
        return f"Target({self.name})"


REGISTRY = Registry(__name__, "target")


def register(target: Target) -> Target:
    """Add `target` to the registry (called by each target module at import)."""
    return REGISTRY.add(target.name, target)


def names() -> tuple[str, ...]:
    return REGISTRY.names()


def get(target: str | Target) -> Target:
    """The registered target of that name; a `QpassError` naming the choices if there is none."""
    return target if isinstance(target, Target) else REGISTRY.get(target)
