"""LLaMA-style Flax NNX models, value/reward heads and HF safetensors interop."""

from mojax.models.config import ModelConfig
from mojax.models.llama import (
    KV_CACHE_LOGICAL_AXES,
    LOGICAL_AXES,
    KVCache,
    LlamaForCausalLM,
    LlamaModel,
    init_kv_cache,
)

__all__ = [
    "KV_CACHE_LOGICAL_AXES",
    "LOGICAL_AXES",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "ModelConfig",
    "init_kv_cache",
]
