"""The INT4 W4A16 GEMM as a TensorRT plugin (TensorRT's Python "quickly deployable plugins").

NEVER RUN HERE: TensorRT cannot be installed on the machines qpass is developed and tested on,
nor carried to the lent GPU machines. What CI checks is everything around it: the Triton kernel
compiles to PTX without a GPU (`qpass.plugins.int4_gemm.compile_ptx`), the ONNX node form passes
`onnx.checker` and the TensorRT linter, and the numpy reference of the plugin agrees with the
DequantizeLinear -> MatMul graph in ONNX Runtime.

Importing this module registers the plugin `qpass::Int4GroupGemm` version 1 with
`tensorrt.plugin` (TensorRT >= 10.8 for `aot_impl`):

- `@trtp.register`: the shape and type contract: inputs x [..., K] (float16/bfloat16/float32),
  b uint8 [N, K/g, g/2], scales [N, K/g] (x's type), zero_points uint8 [N, ceil(K/g/2)];
  output [..., N] of x's type. Attribute `block_size` (g).
- `@trtp.aot_impl`: compiles the Triton kernel to PTX for the GPU the engine is built on and
  returns it with its launch grid and the scalar arguments (M, N, K), so the engine holds the
  kernel itself and runs without Python.

TensorRT's ONNX parser maps a node to this plugin when the node's op type is the plugin name and
its attributes carry `plugin_namespace` (and `plugin_version`): see `qpass.plugins.onnx_node`.
Build the engine in a process that imported this module, e.g.
`qpass.runtime.tensorrt.build_engine(..., python_plugins=["qpass.plugins.tensorrt"])`.
TensorRT does not fuse Q/DQ into a plugin: the plugin reads float activations and its own
packed weights.

Open points a GPU build must confirm: Triton >= 3.3 appends two scratch-buffer pointers to every
kernel's parameters (global and profile scratch); this kernel asks for no scratch
(`global_scratch_size == 0`), so the pointers are never read, but the launcher must still pass
two (null) arguments after the output pointer.
"""

from __future__ import annotations

from qpass.plugins.int4_gemm import Config, compile_ptx

from qpass.errors import QpassError
from qpass.plugin_spec import PLUGIN_ID


class TensorRTPluginUnavailableError(QpassError):
    """`tensorrt.plugin` (TensorRT >= 10.8 Python package) is not installed."""


try:
    import tensorrt as trt
    import tensorrt.plugin as trtp
except ImportError as e:
    raise TensorRTPluginUnavailableError(
        "registering the INT4 GEMM plugin needs TensorRT's Python package with tensorrt.plugin "
        "(TensorRT >= 10.8): pip install 'qpass[tensorrt]' on a machine with an NVIDIA GPU and "
        "driver. It is not installable on the machines qpass is developed on; the kernel itself "
        "compiles without it (qpass.plugins.int4_gemm.compile_ptx)."
    ) from e

from typing import Any  # noqa: E402

_DTYPES = {trt.float16: "float16", trt.bfloat16: "bfloat16", trt.float32: "float32"}


@trtp.register(PLUGIN_ID)
def int4_group_gemm_desc(
    x: trtp.TensorDesc,
    b: trtp.TensorDesc,
    scales: trtp.TensorDesc,
    zero_points: trtp.TensorDesc,
    block_size: int,
) -> trtp.TensorDesc:
    """y [..., N] of x's type, N = b's first dimension."""
    y = x.like()
    y.shape_expr[x.ndim - 1] = b.shape_expr[0]
    return y


@trtp.aot_impl(PLUGIN_ID)
def int4_group_gemm_aot(
    x: trtp.TensorDesc,
    b: trtp.TensorDesc,
    scales: trtp.TensorDesc,
    zero_points: trtp.TensorDesc,
    block_size: int,
    outputs: tuple[trtp.TensorDesc],
    tactic: int,
) -> tuple[str | bytes, str | bytes, Any, Any]:
    """(kernel name, PTX, launch parameters, scalar arguments M, N, K) for this GPU."""
    config = Config(group_size=block_size, dtype=_DTYPES[x.dtype],
                    scale_dtype=_DTYPES[scales.dtype])
    compiled = compile_ptx(config, arch=_compute_capability())
    k = x.shape_expr[x.ndim - 1]
    n = b.shape_expr[0]
    m = x.shape_expr.numel() // k
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(m, config.block_m)
    launch.grid_y = trtp.cdiv(n, config.block_n)
    launch.block_x = compiled.num_warps * 32
    launch.shared_mem = compiled.shared_mem
    scalars = trtp.SymIntExprs(3)
    scalars[0], scalars[1], scalars[2] = trtp.SymInt32(m), trtp.SymInt32(n), trtp.SymInt32(k)
    return compiled.name, compiled.ptx, launch, scalars


def _compute_capability() -> int:
    """The compute capability of the build GPU as Triton spells it (e.g. 90), from the CUDA
    driver through Triton."""
    import triton

    target = triton.runtime.driver.active.get_current_target()
    return int(target.arch)
