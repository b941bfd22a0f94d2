"""Tiny llama GGUF files for tests, written with ``gguf.GGUFWriter`` the way llama.cpp's converter writes them.

* :func:`hf_weights` gives the HF-layout float32 tensors (and the model) of a random tiny mojax
  LLaMA, through :func:`mojax.models.save_pretrained`.
* :func:`write_llama_gguf` writes them as a llama GGUF: GGUF tensor names, q/k rows permuted per
  head into llama.cpp's interleaved-pair order, 2-D weights stored as the requested GGML type
  (quantized with ``gguf.quants.quantize``), norms as F32, ``output.weight`` left out when the
  embeddings are tied, and the tokenizer of an HF tokenizer in ``tokenizer.ggml.*``.
* :func:`expected_weight` is what a reader must return for one tensor of such a file.

Everything is local and offline.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# HF name -> GGUF name, per the converter's llama tensor table.
_GLOBAL = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name] + ".weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest.rsplit('.', 1)[0]]}.weight"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The converter's q/k row order: within each head, rows (first half, second half) -> interleaved pairs."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def hf_weights(config, folder: str | os.PathLike, seed: int = 0) -> tuple[Any, dict[str, np.ndarray]]:
    """(random mojax LlamaForCausalLM, its HF-layout float32 tensors), via a safetensors folder."""
    from hf_fixtures import random_llama
    from safetensors.numpy import load_file

    from mojax.models import save_pretrained

    model = random_llama(config, seed=seed)
    save_pretrained(model, folder)
    return model, load_file(os.path.join(folder, "model.safetensors"))


def _stored(weight: np.ndarray, tensor_type: str) -> tuple[np.ndarray, Any]:
    """(array to write, raw_dtype) of a float32 weight stored as `tensor_type`."""
    import gguf

    kind = gguf.GGMLQuantizationType[tensor_type]
    if tensor_type == "F32":
        return weight.astype(np.float32), None
    if tensor_type == "F16":
        return weight.astype(np.float16), None
    return gguf.quants.quantize(weight.astype(np.float32), kind), kind


def expected_weight(weight: np.ndarray, tensor_type: str) -> np.ndarray:
    """The float32 values of `weight` after a round trip through `tensor_type` (HF layout)."""
    import gguf

    if weight.ndim == 1:
        return weight.astype(np.float32)
    stored, kind = _stored(weight, tensor_type)
    if kind is None:
        return stored.astype(np.float32)
    return gguf.quants.dequantize(stored, kind).reshape(weight.shape)


def write_llama_gguf(
    path: str | os.PathLike,
    config,
    weights: dict[str, np.ndarray],
    *,
    tensor_type: str = "F32",
    raw_tensors: dict[str, tuple[np.ndarray, str]] | None = None,
    tokenizer: Any = None,
    add_bos_token: bool = False,
    architecture: str = "llama",
    extra_metadata: dict[str, Any] | None = None,
    eot_token_id: int | None = None,
    skip_metadata: tuple[str, ...] = (),
) -> str:
    """Write `weights` (HF names and layout) and `config` as a llama GGUF file; returns its path.

    ``raw_tensors`` replaces the data of some HF names by already-encoded bytes (array, GGML type
    name), e.g. K-quant blocks that ``gguf.quants`` cannot produce. ``add_bos_token`` is the
    tokenizer's ``tokenizer.ggml.add_bos_token``.
    """
    import gguf

    writer = gguf.GGUFWriter(os.fspath(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    writer.add_pad_token_id(config.pad_token_id)
    if eot_token_id is not None:
        writer.add_eot_token_id(eot_token_id)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, add_bos_token)
    for name, weight in sorted(weights.items()):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "q_proj" in name:
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        elif "k_proj" in name:
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        if raw_tensors and name in raw_tensors:
            data, kind = raw_tensors[name]
            writer.add_tensor(gguf_name(name), data, raw_dtype=gguf.GGMLQuantizationType[kind])
            continue
        data, kind = _stored(weight, "F32" if weight.ndim == 1 else tensor_type)
        writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
    for key in skip_metadata:
        del writer.kv_data[0][key]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


def _add_tokenizer(writer, tokenizer, add_bos_token: bool) -> None:
    """A byte-level BPE HF tokenizer as ``tokenizer.ggml.*`` metadata (model gpt2)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()  # the BPE vocabulary and the added tokens
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_add_bos_token(add_bos_token)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
