"""Capture: turn a PyTorch module or an ONNX model into the one IR, `onnx_ir.Model`."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qpass.errors import ModelError, first_line
from qpass.graph import infer_missing_types, quiet, raise_opset
from qpass.passes.compute_in_float32 import ComputeInFloat32

logger = logging.getLogger(__name__)

MIN_OPSET = 13
"""Per-axis QuantizeLinear/DequantizeLinear (per-channel weights) need opset 13."""


def capture(
    model: Any,
    example_inputs: Any = None,
    *,
    input_names: list[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: tuple[int, ...] | None = None,
) -> ir.Model:
    """Return `model` as an `onnx_ir.Model` at opset >= 13.

    Accepts an ONNX file path, an `onnx.ModelProto`, an `onnx_ir.Model` (used as is, not copied),
    or a `torch.nn.Module` with `example_inputs` (a tensor or a tuple of tensors): it is captured
    with torch.export and the dynamo ONNX exporter, with a dynamic batch dimension; if torch.export
    cannot capture it, the TorchScript exporter is used with a warning. `dynamic_axes` lists the
    axes that are dynamic in every input (default `(0,)`; `(0, 1)` for batch and sequence length
    of a text encoder taking input_ids, attention_mask, token_type_ids), named dim0, dim1, ...
    """
    if isinstance(model, ir.Model):
        result = model
    elif isinstance(model, onnx.ModelProto):
        with quiet("onnx_ir.serde"):  # a dangling value: check_graph says it in one line
            result = _own_tensor_data(ir.from_proto(model))
    elif isinstance(model, str | os.PathLike):
        with quiet("onnx_ir.serde"):  # a dangling value: check_graph says it in one line
            result = _own_tensor_data(load_onnx(Path(model)))
    elif _is_torch_module(model):
        axes = (dynamic_axes or (0,)) if dynamic_batch else ()
        result = _capture_torch(model, example_inputs, input_names, axes)
    else:
        raise ModelError(
            f"cannot capture a {type(model).__name__}: give an ONNX file path, an onnx.ModelProto, "
            "an onnx_ir.Model or a torch.nn.Module with example_inputs"
        )
    if len(result.graph) == 0:
        raise ModelError("the model's graph has no nodes")
    infer_missing_types(result)
    ComputeInFloat32()(result)
    raise_opset(result, MIN_OPSET)
    return result


def load_onnx(path: Path) -> ir.Model:
    """Read an ONNX file (external data beside it is read lazily) with a clear error."""
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        model = ir.load(os.fspath(path))
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:  # onnx-ir's SerdeError wraps the reason
            cause = cause.__cause__
        raise ModelError(
            f"{path} is not a readable ONNX model ({type(cause).__name__}: {first_line(cause)})"
        ) from e
    if len(model.graph) == 0:
        raise ModelError(f"{path} is not a usable ONNX model: its graph has no nodes")
    return model


def _own_tensor_data(model: ir.Model) -> ir.Model:
    """Give every initializer that reads from the loaded protobuf or from external data its own
    numpy array (external data memory-mapped): the protobuf is then freed, reading a weight no
    longer copies it out each time, and no later copy of the model refers to the input's data
    files (which ONNX Runtime could not find from another working directory). External data
    must lie inside the model's folder, as onnx.load requires."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                _check_external(tensor)
            if isinstance(tensor, ir.TensorProtoTensor | ir.ExternalTensor) and (
                tensor.dtype != ir.DataType.STRING
            ):
                value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name)
    return model


def _check_external(tensor: ir.ExternalTensor) -> None:
    folder = Path(tensor.base_dir or ".").resolve()
    path = (folder / tensor.location).resolve()
    if not path.is_relative_to(folder):
        raise ModelError(
            f"tensor {tensor.name!r} reads external data at {tensor.location!r}, outside the "
            f"model's folder {folder}: refused (move the data file beside the model)"
        )
    if not path.is_file():
        raise ModelError(
            f"tensor {tensor.name!r} reads external data file {path}, which does not exist: "
            "copy it beside the model"
        )


def _is_torch_module(model: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(model, torch.nn.Module)


def _capture_torch(module, example_inputs, input_names, axes: tuple[int, ...]) -> ir.Model:
    """Export `module` in eval mode; its training mode is restored afterwards."""
    if example_inputs is None:
        raise ModelError("capturing a torch.nn.Module needs example_inputs (a tensor or a tuple)")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    training = module.training
    try:
        return _export(module.eval(), args, input_names, axes)
    finally:
        module.train(training)


def _export(module, args: tuple, input_names, axes: tuple[int, ...]) -> ir.Model:
    import torch

    names = input_names or [f"input_{i}" if len(args) > 1 else "input" for i in range(len(args))]
    dynamic = None
    if axes:
        dims = {a: torch.export.Dim("batch" if a == 0 else f"dim{a}", min=1) for a in axes}
        dynamic = tuple({a: dims[a] for a in axes if a < arg.ndim} for arg in args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=dynamic, input_names=names, verbose=False
            )
        return program.model
    except Exception as e:  # torch.export refuses some models; the TorchScript exporter may not
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[0][:200]
        warnings.warn(
            f"torch.export could not capture {type(module).__name__} ({type(e).__name__}: "
            f"{reason}); falling back to the TorchScript ONNX exporter, which traces one path "
            "through data-dependent control flow",
            stacklevel=4,
        )
    import io

    buffer = io.BytesIO()
    named = {a: "batch" if a == 0 else f"dim{a}" for a in axes}
    dynamic_names = {
        n: {a: d for a, d in named.items() if a < x.ndim}
        for n, x in zip(names, args, strict=True)
    }
    torch.onnx.export(
        module, args, buffer, dynamo=False, input_names=names, dynamic_axes=dynamic_names or None
    )
    return ir.from_proto(onnx.load_from_string(buffer.getvalue()))
