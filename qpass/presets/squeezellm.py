"""SqueezeLLM's weight-only preset for decoder LLMs: w4a16-squeezellm (`--bits 3` as well)."""

from __future__ import annotations

import onnx_ir as ir

from qpass.passes import SqueezeLLM
from qpass.presets import Option, preset
from qpass.presets.weight_only import BITS, STAGED
from qpass.targets import Target


@preset(
    "w4a16-squeezellm",
    "non-uniform weights: a 2^bits-entry table per output channel by sensitivity-weighted "
    "k-means, outliers kept in float (SqueezeLLM)",
    options=(
        BITS,
        Option("outliers", float, "fraction of each weight's largest values kept in float "
               "(sparse part)", 0.004, minimum=0.0),
        Option("sensitive", float, "fraction of each weight's values of largest weighted error "
               "kept in float as well", 0.0005, minimum=0.0),
        Option("compensate", bool, "round onto the tables with GPTQ's error feedback "
               "(not in the paper)", False),
        *STAGED,
    ),
)
def w4a16_squeezellm(
    target: Target,
    exclude: frozenset[str],
    bits: int,
    outliers: float,
    sensitive: float,
    compensate: bool,
    sequential: str,
    normalize_tokens: bool,
) -> list[ir.passes.PassBase]:
    """SqueezeLLM (Kim et al. 2023): per output channel a lookup table of 2^bits float values
    fitted by k-means weighted by the inputs' second moment, indices in UINT4; the outliers and
    the most sensitive values (0.40% + 0.05% of each weight by default, the paper's best) in a
    sparse float part. Embeddings and the final projection stay in float. ONNX Runtime only:
    the lookup is a GatherElements that ONNX Runtime folds into a float weight at load."""
    return [
        SqueezeLLM(bits=bits, outliers=outliers, sensitive=sensitive, exclude=exclude,
                   sequential=sequential, normalize_tokens=normalize_tokens,
                   compensate=compensate)
    ]
