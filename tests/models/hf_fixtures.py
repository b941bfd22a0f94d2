"""Tiny model builders for tests (shared: other test modules may import these).

* :func:`random_llama` builds a mojax model with numpy-random weights without compiling any
  initializer (``nnx.eval_shape`` + fill), which is much faster on a loaded CPU than
  ``LlamaForCausalLM(config, rngs=...)``.
* :func:`hf_llama_config` returns a tiny `transformers.LlamaConfig` (torch-free).
* :func:`save_hf_causal_lm` / :func:`save_hf_reward_model` build tiny random torch models with
  transformers and ``save_pretrained`` them into a folder (need torch: call
  ``pytest.importorskip("torch")`` first).
* :func:`save_tiny_tokenizer` trains a byte-level BPE tokenizer offline and saves it.

Everything is local and offline: no hub access.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

TINY_HF_KWARGS: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=256,
)


def hf_llama_config(**overrides: Any):
    """A tiny `transformers.LlamaConfig` (GQA 4/2 heads by default)."""
    from transformers import LlamaConfig

    kw = dict(TINY_HF_KWARGS)
    kw.update(overrides)
    return LlamaConfig(**kw)


def random_state_like(abstract_state, seed: int = 0, std: float = 0.1):
    """Fill an abstract (ShapeDtypeStruct) state with numpy normals; 1-D/norm leaves near 1."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            x = 1.0 + 0.1 * rng.standard_normal(s.shape)
        else:
            x = std * rng.standard_normal(s.shape)
        return jnp.asarray(x.astype(np.float32), dtype=s.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_state)


def random_module(make, seed: int = 0, std: float = 0.1):
    """``make()`` builds any mojax NNX module; returns it with random weights, no init compile."""
    from flax import nnx

    abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, random_state_like(state, seed, std))


def random_llama(config=None, seed: int = 0, std: float = 0.1):
    """A mojax `LlamaForCausalLM` with numpy-random weights (default `ModelConfig.tiny()`)."""
    from flax import nnx

    from mojax.models import LlamaForCausalLM, ModelConfig

    config = ModelConfig.tiny() if config is None else config
    return random_module(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)), seed, std)


def _randomize_torch(model, seed: int, std: float = 0.1):
    """HF inits norms to exactly 1; perturb every tensor so parity tests see all weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def save_hf_causal_lm(
    path: str | os.PathLike, seed: int = 0, max_shard_size: str | int | None = None, **config_overrides: Any
):
    """Build a tiny random torch `LlamaForCausalLM`, save it to ``path``; return the torch model."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_llama_config(**config_overrides)).eval()
    _randomize_torch(model, seed)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(path), **kw)
    return model


def save_hf_reward_model(path: str | os.PathLike, seed: int = 0, num_labels: int = 1, **config_overrides: Any):
    """Build a tiny random torch `LlamaForSequenceClassification`, save it; return the torch model."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(hf_llama_config(num_labels=num_labels, **config_overrides)).eval()
    _randomize_torch(model, seed)
    model.save_pretrained(os.fspath(path))
    return model


def save_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 300, corpus: list[str] | None = None):
    """Train a byte-level BPE tokenizer offline (<pad>=0, <s>=1, </s>=2) and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (
        corpus
        or [
            "the quick brown fox jumps over the lazy dog",
            "a helpful and harmless assistant answers concisely",
            "multi objective alignment balances several rewards",
        ]
        * 20
    )
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.save_pretrained(os.fspath(path))
    return hf
