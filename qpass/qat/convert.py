"""`convert`: a trained `QATModule` written back into its compiled Q/DQ graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from qpass import targets
from qpass.compile import CompiledModel, check_target
from qpass.errors import QpassError
from qpass.passes.insert_qdq import grid_ends
from qpass.qat.module import QATModule


@torch.no_grad()
def convert(qat_module: QATModule, target: str | None = None) -> CompiledModel:
    """The compiled model of `qat_module` with its trained values: each weight's integers and
    steps, each int32 bias at its new step s_x * s_w, each activation's step and zero point (and
    the grid ends of 3- and 2-bit activations), written into a copy of the graph the preset
    compiled for the target. The graph is otherwise unchanged, so ONNX Runtime runs the same
    fused kernels as for the post-training model, and a TensorRT graph passes the same linter.

    target: the target the module was prepared for (default); another one is refused: the Q/DQ
    form is the target's, chosen at `prepare`.
    """
    compiled = qat_module.compiled
    if target is not None and targets.get(target) is not compiled.target:
        raise QpassError(
            f"this module was prepared for {compiled.target.name}, not {target}: prepare it "
            f"again with target={target!r}"
        )
    model = compiled.model.clone()
    values = model.graph.initializers
    for name, key in qat_module.keys.items():
        if key in qat_module.weights:
            weight = qat_module.weights[key]
            dq = values[name].consumers()[0]
            _write(values[name], weight.integers())
            _write(values[dq.inputs[1].name], weight.scale())
        elif key in qat_module.biases:
            bias = qat_module.biases[key]
            dq = values[name].consumers()[0]
            _write(values[name], bias.integers())
            _write(values[dq.inputs[1].name], bias.s())
        elif key in qat_module.activations:
            _write_activation(model.graph, name, qat_module.activations[key],
                              qat_module.grid_bounds.get(name, {}))
        elif key in qat_module.floats:
            _write(values[name], qat_module.floats[key])
    result = CompiledModel(model, compiled.float_model, compiled.context, compiled.target)
    result.findings = check_target(compiled.target, model)
    return result


def _write_activation(graph: ir.Graph, scale_name: str, quantizer, bounds: dict) -> None:
    scale = graph.initializers[scale_name]
    _write(scale, quantizer.scale())
    q = next(n for n in scale.consumers() if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    _write(q.inputs[2], quantizer.zero())
    if bounds:  # a 3- or 2-bit activation: its Min and Max follow the step and zero point
        low, high = grid_ends(quantizer.qmin, quantizer.qmax, quantizer.scale().numpy(),
                              quantizer.zero().numpy())
        _write(bounds["Max"], low)
        _write(bounds["Min"], high)


def _write(value: ir.Value, tensor: torch.Tensor) -> None:
    """Replace the initializer's contents, keeping its name, dtype and shape."""
    old = value.const_value.numpy()
    array = tensor.detach().cpu().numpy().astype(np.float64) if torch.is_tensor(tensor) else tensor
    if np.issubdtype(np.dtype(old.dtype), np.floating):
        new = np.asarray(array, np.float32).reshape(old.shape)
    else:
        new = np.rint(array).reshape(old.shape).astype(old.dtype)
    value.const_value = ir.tensor(new, name=value.name)
