"""INT4 W4A16 GEMM: a numpy reference and the Triton kernel.

Y[M, N] = X[M, K] @ W[K, N], with W stored 4-bit, one scale and zero point per group of
`block_size` consecutive input channels of each output channel, in the packed layout of
`qpass.packing` (`pack_4bit`: ONNX Runtime's `com.microsoft.MatMulNBits` layout, zero points
always present): b uint8 [N, K/block_size, block_size/2] low nibble first, scales float
[N, K/block_size], zero_points uint8 [N, ceil((K/block_size)/2)]; w = (u - z) * s.

The Triton kernel dequantizes a [BLOCK_K, BLOCK_N] tile of W in registers (a tile never spans two
groups: BLOCK_K divides block_size) and accumulates X @ W in float32 (W4A16: activations stay 16
bit; weights move through memory at 4 bits, the point of weight-only quantization in the
memory-bound decode regime; Frantar et al. 2022, "GPTQ", §5; Lin et al. 2024, "AWQ", §4).

Kernel parameters are ordered inputs, scalars, output (x, b, scales, zero_points, M, N, K, y): the
order TensorRT's ahead-of-time plugin interface launches a kernel with (inputs, extra scalar
arguments, outputs); see `qpass.plugins.tensorrt`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from qpass.packing import unpack_4bit

TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
"""Activation (and output) types the kernel is compiled for, numpy/torch name -> Triton name."""


def reference(
    x: np.ndarray, b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray
) -> np.ndarray:
    """Numpy reference of the plugin: x [..., K] @ W [K, N] in float32 (K = x.shape[-1])."""
    w = unpack_4bit(b, scales, zero_points, x.shape[-1])
    return np.matmul(np.asarray(x, np.float32), w)


# ----------------------------------------------------------------------------- Triton kernel


@functools.cache
def _kernel():
    """The @triton.jit kernel (built on first use, so that importing qpass needs no Triton)."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise ImportError(
            "the INT4 GEMM kernel needs Triton: pip install 'triton==3.6.0' "
            "(or pip install -e '.[dev]')"
        ) from e

    @triton.jit
    def int4_group_gemm(
        x_ptr, b_ptr, scales_ptr, zeros_ptr, M, N, K, y_ptr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        groups = tl.cdiv(K, GROUP_SIZE)
        row_bytes = groups * (GROUP_SIZE // 2)  # bytes of one output channel in b
        zero_bytes = (groups + 1) // 2
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            x = tl.load(
                x_ptr + rm[:, None] * K + k[None, :],
                mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0,
            )
            byte = tl.load(
                b_ptr + rn[None, :] * row_bytes + (k // 2)[:, None],
                mask=(rn[None, :] < N) & (k[:, None] < K), other=0,
            )
            u = (byte >> ((k % 2) * 4)[:, None].to(tl.uint8)) & 0xF  # low nibble first
            g = k0 // GROUP_SIZE  # BLOCK_K divides GROUP_SIZE: one group per tile
            scale = tl.load(scales_ptr + rn * groups + g, mask=rn < N, other=0.0)
            zbyte = tl.load(zeros_ptr + rn * zero_bytes + g // 2, mask=rn < N, other=0)
            z = (zbyte >> ((g % 2) * 4)) & 0xF
            w = (u.to(tl.int32) - z[None, :].to(tl.int32)).to(tl.float32)
            w = (w * scale[None, :].to(tl.float32)).to(x.dtype)
            acc += tl.dot(x, w)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    return int4_group_gemm


def kernel():
    """The Triton kernel, `int4_group_gemm[grid](x, b, scales, zero_points, M, N, K, y,
    BLOCK_M=, BLOCK_N=, BLOCK_K=, GROUP_SIZE=)` (imports Triton)."""
    return _kernel()


@dataclasses.dataclass(frozen=True)
class Config:
    """Compile-time parameters of one kernel variant."""

    group_size: int
    dtype: str = "float16"  # of x and y
    scale_dtype: str = "float16"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_TYPES or self.scale_dtype not in TRITON_TYPES:
            raise ValueError(f"types must be among {sorted(TRITON_TYPES)}")
        block_k = min(self.block_k, self.group_size)
        if self.group_size % block_k or block_k < 16 or block_k & (block_k - 1):
            raise ValueError(
                f"group_size {self.group_size}: BLOCK_K {block_k} must be a power of two >= 16 "
                "that divides it"
            )
        object.__setattr__(self, "block_k", block_k)

    @property
    def signature(self) -> dict[str, str]:
        t, s = TRITON_TYPES[self.dtype], TRITON_TYPES[self.scale_dtype]
        return {
            "x_ptr": f"*{t}", "b_ptr": "*u8", "scales_ptr": f"*{s}", "zeros_ptr": "*u8",
            "M": "i32", "N": "i32", "K": "i32", "y_ptr": f"*{t}",
        }

    @property
    def constexprs(self) -> dict[str, int]:
        return {
            "BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
            "GROUP_SIZE": self.group_size,
        }

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        return (-(-m // self.block_m), -(-n // self.block_n), 1)


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """A kernel compiled ahead of time: what a launcher (TensorRT's AOT plugin) needs."""

    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    arch: int


def compile_ptx(config: Config, arch: int = 90) -> CompiledKernel:
    """Compile the kernel for CUDA compute capability `arch` (80: Ampere, 90: Hopper) to PTX.

    Needs Triton only (it bundles ptxas): no GPU and no CUDA driver."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel(), signature=config.signature, constexprs=config.constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps}
    )
    return CompiledKernel(
        name=compiled.metadata.name,
        ptx=compiled.asm["ptx"],
        num_warps=compiled.metadata.num_warps,
        shared_mem=compiled.metadata.shared,
        arch=arch,
    )


def launch(x, b, scales, zero_points, config: Config | None = None):
    """Run the kernel on torch CUDA tensors: x [..., K] (fp16/bf16/fp32) -> y [..., N]."""
    import torch

    k = x.shape[-1]
    n, _, half = b.shape
    if config is None:
        config = Config(group_size=2 * half, dtype=str(x.dtype).removeprefix("torch."),
                        scale_dtype=str(scales.dtype).removeprefix("torch."))
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    kernel()[config.grid(m, n)](
        x2, b.contiguous(), scales.contiguous(), zero_points.contiguous(), m, n, k, y,
        **config.constexprs, num_warps=config.num_warps,
    )
    return y.reshape(*x.shape[:-1], n)
