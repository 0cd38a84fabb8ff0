"""Presets as registered data: each names its passes and declares its typed options once.

A preset is a function `build(target, exclude, **options) -> list of passes`, registered with
`@preset(name, help, options=..., targets=...)` in a module of this package (the `REGISTRY`
imports them all at the first lookup). Its `Option`s give each keyword's type, default (per
target where it differs), range or choices and one-line help; the CLI's flags, choices and help
are generated from them, and `Preset.passes` refuses an option the preset does not take, or out
of its range, before any work, naming the presets that take it. A preset names a format; the
target (`qpass.targets`) decides its legal form: e.g. `int8` builds U8 activations for ONNX
Runtime and symmetric S8 for TensorRT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from qpass import targets
from qpass.errors import QpassError
from qpass.passes import FoldConstants, FoldPadIntoConv
from qpass.registry import Registry
from qpass.schemes import RANGE_METHODS


@dataclasses.dataclass(frozen=True)
class Option:
    """A typed keyword option of one or more presets (`--name-with-dashes` on the CLI)."""

    name: str
    type: Callable[[Any], Any]
    help: str
    default: Any = None
    choices: tuple = ()
    minimum: float | None = None
    cli: bool = True  # False: Python API only (e.g. a tuple-valued grid)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_for(self, target: str) -> Any:
        return self.default.get(target) if isinstance(self.default, dict) else self.default

    def check(self, value: Any, preset: str) -> Any:
        """`value` converted to the option's type; a QpassError if it is out of range."""
        where = f"preset {preset!r}: {self.name} ({self.flag})"
        try:
            value = self.type(value)
        except (TypeError, ValueError) as e:
            raise QpassError(f"{where}: {e}") from e
        if self.choices and value not in self.choices:
            raise QpassError(f"{where} must be one of {', '.join(map(str, self.choices))}, "
                             f"not {value!r}")
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and self.minimum is not None and value < self.minimum:
            raise QpassError(f"{where} must be >= {self.minimum:g}, not {value}")
        return value


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named pipeline: `build(target, exclude, **options)` and the options it takes."""

    name: str
    help: str
    build: Callable[..., list[ir.passes.PassBase]]
    options: tuple[Option, ...] = ()
    targets: tuple[str, ...] = ("onnxruntime",)  # target families (`Target.family`)

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def passes(
        self,
        target: str | targets.Target = "onnxruntime",
        exclude: frozenset[str] | tuple[str, ...] = frozenset(),
        **options: Any,
    ) -> list[ir.passes.PassBase]:
        """The pipeline for `target`, every option checked and defaulted."""
        target = targets.get(target)
        if target.family not in self.targets:
            serving = [p.name for p in all_presets() if target.family in p.targets]
            raise QpassError(
                f"preset {self.name!r} is for {', '.join(self.targets)}, not {target.name}; "
                f"presets for {target.name}: {', '.join(serving)}"
            )
        for name in options:
            if self.option(name) is None:
                takers = [p.name for p in all_presets() if p.option(name) is not None]
                flag = "--" + name.replace("_", "-")
                raise QpassError(
                    f"preset {self.name!r} takes no option {name} ({flag}); "
                    + (f"presets that take it: {', '.join(takers)}" if takers else
                       "no preset takes it")
                )
        values = {
            o.name: o.check(options[o.name], self.name) if options.get(o.name) is not None
            else o.default_for(target.name)
            for o in self.options
        }
        try:
            return self.build(target, frozenset(exclude), **values)
        except ValueError as e:  # a combination of options a pass or scheme refuses
            raise QpassError(f"preset {self.name!r}: {e}") from e


REGISTRY = Registry(__name__, "preset")


def preset(
    name: str,
    help: str,
    options: tuple[Option, ...] = (),
    targets: tuple[str, ...] = ("onnxruntime",),
):
    """Register the decorated `build(target, exclude, **options)` as preset `name`."""

    def register(build: Callable[..., list[ir.passes.PassBase]]) -> Callable:
        REGISTRY.add(name, Preset(name, help, build, tuple(options), tuple(targets)))
        return build

    return register


def all_presets() -> list[Preset]:
    return REGISTRY.values()


def get(name: str) -> Preset:
    """The registered preset; a QpassError naming the choices if there is none."""
    return REGISTRY.get(name)


def passes(name: str, target: str = "onnxruntime", exclude=frozenset(), **options):
    """The passes of preset `name` for `target` (`Preset.passes`)."""
    return get(name).passes(target, exclude, **options)


def canonicalize() -> list[ir.passes.PassBase]:
    """Passes that expose patterns without changing the float function."""
    return [FoldConstants(), FoldPadIntoConv()]


CALIBRATOR = Option(
    "calibrator", str, "activation range method", default="minmax", choices=RANGE_METHODS
)
