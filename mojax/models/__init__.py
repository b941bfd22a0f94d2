"""LLaMA-style Flax NNX models, value/reward heads, HF safetensors and GGUF interop, tokenizers.

Importing this package never imports transformers, torch or gguf (safetensors is imported only
when weights are read or written, gguf when a GGUF file is opened, transformers when a tokenizer
is loaded).
"""

from mojax.models.config import ModelConfig
from mojax.models.generate import GenerationResult, SamplingConfig, bucket_length, generate, sample_next_token
from mojax.models.gguf import SUPPORTED_TENSOR_TYPES, GGUFFile, read_gguf_config
from mojax.models.heads import LlamaRewardModel, LlamaValueModel, ValueHead
from mojax.models.hf import (
    load_causal_lm,
    load_reward_model,
    load_value_model,
    parameter_digest,
    read_causal_lm_config,
    save_pretrained,
    weight_file_digests,
)
from mojax.models.llama import (
    KV_CACHE_LOGICAL_AXES,
    LOGICAL_AXES,
    KVCache,
    LlamaForCausalLM,
    LlamaModel,
    SharedPrefix,
    apply_split,
    default_probe_mask,
    init_kv_cache,
    merge_last_layer,
    merge_split,
    split_last_layer,
)
from mojax.models.lora import (
    LoraConfig,
    adapter_state,
    adapters_only,
    add_lora,
    load_adapter_state,
    load_adapters,
    lora_mask,
    merge_lora,
    save_adapters,
)
from mojax.models.tokenizer import (
    chat_stop_token_ids,
    converted_tokenizer_folder,
    end_of_turn_token_id,
    load_tokenizer,
)

__all__ = [
    "GGUFFile",
    "LoraConfig",
    "adapter_state",
    "adapters_only",
    "add_lora",
    "apply_split",
    "default_probe_mask",
    "load_adapter_state",
    "load_adapters",
    "lora_mask",
    "merge_last_layer",
    "merge_split",
    "merge_lora",
    "save_adapters",
    "split_last_layer",
    "GenerationResult",
    "KV_CACHE_LOGICAL_AXES",
    "LOGICAL_AXES",
    "KVCache",
    "SharedPrefix",
    "LlamaForCausalLM",
    "LlamaModel",
    "LlamaRewardModel",
    "LlamaValueModel",
    "ModelConfig",
    "SUPPORTED_TENSOR_TYPES",
    "SamplingConfig",
    "ValueHead",
    "bucket_length",
    "chat_stop_token_ids",
    "converted_tokenizer_folder",
    "end_of_turn_token_id",
    "generate",
    "init_kv_cache",
    "load_causal_lm",
    "read_causal_lm_config",
    "load_reward_model",
    "load_tokenizer",
    "load_value_model",
    "parameter_digest",
    "read_gguf_config",
    "sample_next_token",
    "save_pretrained",
    "weight_file_digests",
]
