"""The contracts every qpass pass follows, written once (see docs/writing-a-pass.md).

- `Pass`: an `onnx_ir` in-place pass whose name in errors and logs is its class name.
- `CalibratedPass`: reads statistics of the calibration data through a `Context`. `qpass.compile`
  attaches its Context to every such pass of the pipeline; `requires` raises onnx-ir's
  `PreconditionError` when none is attached.
- `ReadsFloatModel`: needs something from the float model as it was before quantization. Its
  `snapshot()` is a pass placed before the quantizing pass; it hands the model it sees to the
  owner's `record`, and `requires` refuses to run the owner when no snapshot was recorded.
- Keeping a node float: a pass that decides to leave a node in float marks it (`keep_float`);
  every quantizing pass skips marked nodes (`is_kept_float`). No pass changes another's settings.
- A refused match says why: `refuse(pass, node, why)` logs at debug level and returns False.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qpass.calibration import Context
from qpass.metadata import KEEP_FLOAT

logger = logging.getLogger(__name__)

PreconditionError = ir.passes.PreconditionError


class Pass(ir.passes.InPlacePass):
    """An in-place pass named by its class in errors and logs."""

    def __repr__(self) -> str:
        return type(self).__name__


class CalibratedPass(Pass):
    """A pass that observes activations on the calibration data through `self.context`
    (`calibration_optional`: one that also runs without, e.g. a weighting it then leaves out)."""

    calibration_optional = False

    def __init__(self, context: Context | None = None):
        super().__init__()
        self.context = context

    def requires(self, model: ir.Model) -> None:
        if self.context is None and not self.calibration_optional:
            raise PreconditionError(
                f"{self!r} needs calibration data: pass calibration=... (an .npz file with one "
                "array per model input, or an iterable of input dicts)"
            )


class ReadsFloatModel(Pass):
    """A pass that needs the float model from before quantization, recorded by `snapshot()`."""

    recorded = False

    def snapshot(self) -> Snapshot:
        """The pass that records the float model for this one; place it before quantization."""
        return Snapshot(self)

    def record(self, model: ir.Model) -> None:
        """Keep what this pass needs from the float `model` (called by its snapshot)."""
        raise NotImplementedError

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if not self.recorded:
            raise PreconditionError(
                f"{self!r} needs the float model from before quantization: put its snapshot() "
                "pass before the quantizing pass"
            )


class Snapshot(Pass):
    """Hands the model it sees to its owner's `record`; changes nothing."""

    def __init__(self, owner: ReadsFloatModel):
        super().__init__()
        self.owner = owner

    def __repr__(self) -> str:
        return f"{self.owner!r}.snapshot"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.owner.record(model)
        self.owner.recorded = True
        return ir.passes.PassResult(model, modified=False)


def keep_float(node: ir.Node, reason: str) -> None:
    """Mark `node` to be left in float by every quantizing pass after this one."""
    node.meta[KEEP_FLOAT] = reason


def is_kept_float(node: ir.Node, exclude: frozenset[str] = frozenset()) -> bool:
    """Whether a quantizing pass must leave `node` in float: marked, or named in `exclude`."""
    return KEEP_FLOAT in node.meta or node.name in exclude


def refuse(owner: ir.passes.PassBase, node: ir.Node, why: str) -> bool:
    """Log at debug level why `owner` does not rewrite `node`; returns False for `return`."""
    logger.debug("%r: %s %s refused: %s", owner, node.op_type, node.name, why)
    return False
