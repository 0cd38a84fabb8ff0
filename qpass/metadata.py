"""The keys under which qpass leaves facts on a model, for the passes after it and the report.

Three stores, as onnx_ir names them:

- `model.meta`, `node.meta`, `value.meta`: in memory only, never written to the file.
- `model.metadata_props`, `node.metadata_props`, `value.metadata_props`: saved in the ONNX file.

Each key below says which store it goes to and what its value is.
"""

from __future__ import annotations

OBSERVED_RANGE = "qpass.observed_range"
"""`value.meta`: (min, max) of the value over the calibration data, left by a pass that already
measured it (SmoothQuant); a min-max calibration then needs no run of its own."""

BN_STATISTICS = "qpass.batchnorm"
"""`node.meta` of a layer that absorbed a BatchNormalization: {"gamma", "beta"} per channel,
the pre-activation distribution that high-bias absorption (Nagel et al. 2019, §4.1) relies on."""

RELU6_REPLACED = "qpass.relu6_replaced"
"""`model.meta` list (and comma-separated `model.metadata_props` entry) of the Clip(0, max)
nodes that EqualizeCrossLayer(allow_relu6=True) replaced by Relu."""

SMOOTHQUANT_MULS = "qpass.smoothquant_muls"
"""`model.meta` list of the activations that got an explicit Mul(1/s) because no producer could
absorb SmoothQuant's smoothing factors (one line per activation)."""

LEADING_FLOAT = "qpass.leading_float"
"""`model.meta`: the names of the layers KeepLeadingLayersFloat left in float, in graph order."""

SENSITIVITY = "qpass.sensitivity"
"""`model.meta` list of (node name, output SQNR dB with only that layer quantized, kept float),
most sensitive first (KeepSensitiveFloat)."""

UNFUSED = "qpass.unfused"
"""`model.meta` list of the quantized ops ONNX Runtime will not fuse into integer kernels, one
line each ("OpType name: why"; LowerForOnnxRuntime)."""

QUANTIZES = "qpass.quantizes"
"""`node.metadata_props` of each activation DequantizeLinear: the float tensor it stands for."""

PLUGIN_K = "qpass.K"
"""`node.metadata_props` of an INT4 GEMM plugin node: the weight's input channels K (the packed
weight holds K rounded up to whole blocks)."""

TORCH_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
"""`node.metadata_props` written by torch's dynamo exporter (read, never written, by qpass): the
node's module path as a Python list literal, e.g. "['', 'model.layers.0.mlp', ...]"."""

KEEP_FLOAT = "qpass.keep_float"
"""`node.meta` of a node a pass decided to leave in float: why (`qpass.passes.base.keep_float`);
every quantizing pass after it skips the node."""

EDGE_LAYER = "qpass.edge_layer"
"""`node.meta` of the first and last weighted layers, marked by KeepEdgeLayersWide: InsertQDQ
gives them, and the activations they read, its `edge_weights` / `edge_activations` schemes."""

CLAMPS_TO_GRID = "qpass.clamps_to_grid"
"""`node.metadata_props` of the Min and Max InsertQDQ puts before the QuantizeLinear of a 3- or
2-bit activation: the name of the activation; their bounds are the grid's ends s(qmax - z) and
s(qmin - z)."""

GRID = "qpass.grid"
"""`node.metadata_props` of a weight's DequantizeLinear: "qmin qmax", the integer range its
scheme rounds into (e.g. "-127 127" for symmetric int8, "-4 3" for int3 stored as int4)."""

SOURCE_FLOAT_TYPE = "qpass.source_float_type"
"""`model.meta`: "float16" or "bfloat16" when the captured model computed in that type
(ComputeInFloat32 turned it into float32 inside); absent for float32 models."""

SQUEEZELLM_SENSITIVITY = "qpass.squeezellm.sensitivity"
"""`model.metadata_props` of a model SqueezeLLM quantized: the sensitivity that weighted its
k-means (the inputs' second moment diag(E[x xᵀ]), or the Fisher information)."""
