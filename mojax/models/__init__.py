"""LLaMA-style Flax NNX models, value/reward heads and HF safetensors interop.

Importing this package never imports transformers or torch (safetensors is imported only when
weights are read or written).
"""

from mojax.models.config import ModelConfig
from mojax.models.generate import GenerationResult, SamplingConfig, bucket_length, generate, sample_next_token
from mojax.models.heads import LlamaRewardModel, LlamaValueModel, ValueHead
from mojax.models.hf import load_causal_lm, load_reward_model, load_value_model, save_pretrained
from mojax.models.llama import (
    KV_CACHE_LOGICAL_AXES,
    LOGICAL_AXES,
    KVCache,
    LlamaForCausalLM,
    LlamaModel,
    init_kv_cache,
)

__all__ = [
    "GenerationResult",
    "KV_CACHE_LOGICAL_AXES",
    "LOGICAL_AXES",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "LlamaRewardModel",
    "LlamaValueModel",
    "ModelConfig",
    "SamplingConfig",
    "ValueHead",
    "bucket_length",
    "generate",
    "init_kv_cache",
    "load_causal_lm",
    "load_reward_model",
    "load_value_model",
    "sample_next_token",
    "save_pretrained",
]
