"""Registries filled by the modules of a package: presets and targets are found, not listed."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from qpass.errors import QpassError


class Registry:
    """Name -> entry. Each module of `package` registers its entries when imported; the first
    lookup imports them all, so adding a preset or a target is adding a module."""

    def __init__(self, package: str, kind: str):
        self.package, self.kind = package, kind
        self.entries: dict[str, Any] = {}
        self.discovered = False

    def add(self, name: str, entry: Any) -> Any:
        self.entries[name] = entry
        return entry

    def discover(self, again: bool = False) -> None:
        """Import every module of the package (`again`: those added to its path since)."""
        if self.discovered and not again:
            return
        for module in pkgutil.iter_modules(importlib.import_module(self.package).__path__):
            importlib.import_module(f"{self.package}.{module.name}")
        self.discovered = True

    def names(self) -> tuple[str, ...]:
        self.discover()
        return tuple(self.entries)

    def values(self) -> list[Any]:
        self.discover()
        return list(self.entries.values())

    def get(self, name: str) -> Any:
        """The entry called `name`; a QpassError naming the choices if there is none."""
        self.discover()
        if name not in self.entries:
            raise QpassError(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(self.entries)}"
            )
        return self.entries[name]
