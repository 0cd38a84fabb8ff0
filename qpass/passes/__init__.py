"""Graph passes, one per file: each an `onnx_ir.passes.InPlacePass`."""

from qpass.passes.fold_bn import FoldBatchNorm
from qpass.passes.fold_constants import FoldConstants
from qpass.passes.fuse_requant import FuseRequant
from qpass.passes.insert_qdq import InsertQDQ
from qpass.passes.lower_onnxruntime import LowerForOnnxRuntime

__all__ = ["FoldBatchNorm", "FoldConstants", "FuseRequant", "InsertQDQ", "LowerForOnnxRuntime"]
