"""Graph passes, one per file: each an `onnx_ir.passes.InPlacePass`."""

from qpass.passes.absorb_high_bias import AbsorbHighBias
from qpass.passes.adaround import AdaRound
from qpass.passes.awq import AWQ
from qpass.passes.block_adaround import BlockAdaRound
from qpass.passes.cast_float_parts import CastFloatParts
from qpass.passes.compute_in_float32 import ComputeInFloat32
from qpass.passes.correct_bias import CorrectBias
from qpass.passes.edge_layers import KeepEdgeLayersWide
from qpass.passes.equalize import EqualizeCrossLayer
from qpass.passes.fold_bn import FoldBatchNorm
from qpass.passes.fold_constants import FoldConstants
from qpass.passes.fold_pad import FoldPadIntoConv
from qpass.passes.fuse_requant import FuseRequant
from qpass.passes.ggml_weights import QuantizeGGML
from qpass.passes.gptq import GPTQ
from qpass.passes.hero_level import HeroLevel
from qpass.passes.insert_qdq import InsertQDQ
from qpass.passes.keep_leading_float import KeepLeadingLayersFloat
from qpass.passes.keep_small_convs_float import KeepSmallConvsFloat
from qpass.passes.lorc import LowRankCompensation
from qpass.passes.lower_int4_plugin import LowerToInt4Plugin
from qpass.passes.lower_integer_matmul import LowerIntegerMatMul
from qpass.passes.lower_matmulnbits import LowerToMatMulNBits
from qpass.passes.lower_onnxruntime import LowerForOnnxRuntime
from qpass.passes.lower_tensorrt import LowerForTensorRT
from qpass.passes.obq import OBQ
from qpass.passes.place_float8 import PlaceFloat8ForOnnxRuntime
from qpass.passes.quantize_dynamic import QuantizeDynamicPerToken
from qpass.passes.quantize_lm_head import QuantizeLMHead
from qpass.passes.quantize_tied_embeddings import QuantizeTiedEmbeddings
from qpass.passes.rtn import RoundToNearest
from qpass.passes.sensitivity import KeepSensitiveFloat
from qpass.passes.smoothquant import SmoothQuant
from qpass.passes.squeezellm import SqueezeLLM

__all__ = [
    "AWQ",
    "GPTQ",
    "OBQ",
    "AbsorbHighBias",
    "AdaRound",
    "BlockAdaRound",
    "CastFloatParts",
    "ComputeInFloat32",
    "CorrectBias",
    "EqualizeCrossLayer",
    "FoldBatchNorm",
    "FoldConstants",
    "FoldPadIntoConv",
    "FuseRequant",
    "HeroLevel",
    "InsertQDQ",
    "KeepEdgeLayersWide",
    "KeepLeadingLayersFloat",
    "KeepSensitiveFloat",
    "KeepSmallConvsFloat",
    "LowRankCompensation",
    "LowerForOnnxRuntime",
    "LowerForTensorRT",
    "LowerIntegerMatMul",
    "LowerToInt4Plugin",
    "LowerToMatMulNBits",
    "PlaceFloat8ForOnnxRuntime",
    "QuantizeDynamicPerToken",
    "QuantizeGGML",
    "QuantizeLMHead",
    "QuantizeTiedEmbeddings",
    "RoundToNearest",
    "SmoothQuant",
    "SqueezeLLM",
]
