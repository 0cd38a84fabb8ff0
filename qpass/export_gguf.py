"""GGUF export of a Llama-family decoder captured from transformers and compiled by qpass.

The tensors are found by the torch module paths the capture records on each node
(`qpass.graph.module_path`): `model.embed_tokens` (Gather),
`model.layers.N.self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` (MatMul), the
RMSNorm weights of `input_layernorm`, `post_attention_layernorm` and `model.norm` (the Mul by a
constant [hidden] vector), `lm_head`.
A MatMul that `QuantizeGGML` quantized is written as its ggml bytes (exactly the weights the
ONNX model computes with); every other tensor in float (F32 unless told). A final projection
that reads the embedding table (tied) is left out, as llama.cpp and transformers expect.

GGUF's conventions (llama.cpp's convert_hf_to_gguf.py): tensor names `token_embd`,
`blk.N.attn_q`, ..., `output`; the rows of attn_q and attn_k permuted from Hugging Face's
rotate-half rotary layout to ggml's interleaved pairs (per head, rows (i, i + d/2) become
(2i, 2i + 1)); transformers undoes this when it loads the file. Hyperparameters come from the
source's transformers config, the tokenizer (every `tokenizer.*` field) from a GGUF file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from qpass.errors import QpassError
from qpass.graph import constant, is_op, module_path
from qpass.passes.ggml_weights import GGML_WEIGHT

_LAYER = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")
_NORM = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)$")
PROJECTIONS = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(node: ir.Node) -> str | None:
    """The GGUF tensor name of a captured Llama node's weight, or None."""
    path = module_path(node)
    if match := _LAYER.search(path):
        projection = PROJECTIONS.get(match.group(2))
        return f"blk.{match.group(1)}.{projection}.weight" if projection else None
    if match := _NORM.search(path):
        return f"blk.{match.group(1)}.{NORMS[match.group(2)]}.weight"
    if re.search(r"(?:^|\.)model\.norm$", path):
        return "output_norm.weight"
    if re.search(r"(?:^|\.)model\.embed_tokens$", path):
        return "token_embd.weight"
    if re.search(r"(?:^|\.)lm_head$", path):
        return "output.weight"
    return None


def rope_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotary row order -> ggml's, per head (convert_hf_to_gguf's `permute`)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(
        1, 2
    ).reshape(rows.shape)


def save_gguf(
    model: ir.Model,
    path: str | os.PathLike,
    config,
    tokenizer: str | os.PathLike | None = None,
    float_type: str = "f32",
    name: str | None = None,
) -> Path:
    """Write `model` (a Llama captured from transformers, compiled by qpass) as a GGUF file.

    `config`: the source's transformers config (LlamaConfig: sizes, heads, rope, epsilon);
    `tokenizer`: a GGUF file whose `tokenizer.*` fields are copied (without one, the file holds
    no tokenizer); `float_type`: f32 or f16 for the tensors left in float.
    """
    if getattr(config, "model_type", None) not in ("llama", "mistral"):
        raise QpassError(f"GGUF export writes Llama-family decoders, not model_type "
                         f"{getattr(config, 'model_type', None)!r}")
    if float_type not in ("f32", "f16"):
        raise QpassError(f"float_type must be f32 or f16, not {float_type!r}")
    tensors = _tensors(model, config, float_type)
    missing = [t for t in ("token_embd.weight", "output_norm.weight") if t not in tensors]
    layers = config.num_hidden_layers
    missing += [f"blk.{i}.{p}.weight" for i in range(layers)
                for p in (*PROJECTIONS.values(), *NORMS.values())
                if f"blk.{i}.{p}.weight" not in tensors]
    if missing:
        raise QpassError(f"GGUF export: the model has no {', '.join(missing[:4])} (a Llama "
                         "captured from transformers by qpass.capture keeps their module paths)")
    path = Path(path)
    writer = GGUFWriter(path, "llama")
    _hyperparameters(writer, config, name)
    if tokenizer is not None:
        _copy_tokenizer(writer, Path(tokenizer))
    for tensor_name, (array, raw_type) in tensors.items():
        writer.add_tensor(tensor_name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensors(model: ir.Model, config, float_type: str) -> dict:
    """{GGUF name: (array, raw ggml type or None)} in file order."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    found: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]] = {}
    dtype = np.float32 if float_type == "f32" else np.float16
    for node in model.graph:
        tensor = gguf_name(node)
        if tensor is None or tensor in found:
            continue
        if is_op(node, "MatMul") or node.op_type == "MatMulNBits":
            quantized = node.meta.get(GGML_WEIGHT)
            if quantized is not None:
                rows, raw = quantized.data, quantized.ggml_type
            elif node.op_type == "MatMulNBits":
                raise QpassError(f"GGUF export: {tensor} was lowered to MatMulNBits after "
                                 "quantization; export from the dq form (--format dq)")
            else:
                weight = constant(node.inputs[1])
                if weight is None:  # tied to the embeddings, or not a weight
                    continue
                rows, raw = np.ascontiguousarray(weight.T).astype(dtype), None
            if ".attn_q." in tensor or ".attn_k." in tensor:
                rows = rope_permute(rows, heads if ".attn_q." in tensor else kv_heads)
            found[tensor] = (np.ascontiguousarray(rows), raw)
        elif is_op(node, "Gather") and tensor == "token_embd.weight":
            table = constant(node.inputs[0])
            if table is not None:
                found[tensor] = (table.astype(dtype), None)
        elif is_op(node, "Mul") and tensor.endswith("norm.weight"):
            vectors = [constant(v) for v in node.inputs if constant(v) is not None]
            vector = next((v for v in vectors if v.shape == (config.hidden_size,)), None)
            if vector is not None:
                found[tensor] = (vector.astype(np.float32), None)
    return found


def _hyperparameters(writer: GGUFWriter, config, name: str | None) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if rope.get("rope_type", "default") != "default":
        raise QpassError(f"GGUF export: rope type {rope.get('rope_type')!r} is not written; "
                         "only Llama's default rotary embedding is")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name or Path(getattr(config, "name_or_path", "") or "model").name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _copy_tokenizer(writer: GGUFWriter, source: Path) -> None:
    """Every `tokenizer.*` field of the GGUF file `source`."""
    if not source.is_file():
        raise QpassError(f"tokenizer source {source} is not a file: give a GGUF file")
    reader = GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub)
