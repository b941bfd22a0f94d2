"""`ModelConfig`: one frozen, hashable config for LLaMA-style models, HF-compatible.

Field names follow `transformers.LlamaConfig` so a HF `config.json` maps one to one, plus two
JAX-side fields: ``dtype`` (compute dtype of activations) and ``param_dtype`` (storage dtype of
the parameters). Logits, softmax and RMSNorm statistics are always computed in fp32.

Loading from HF (:meth:`ModelConfig.from_hf`) sorts every field of ``config.json`` into one of
three kinds:

* maths: fields that set the forward pass (shapes, RoPE, norm epsilon, tied embeddings) and are
  kept. A field or value that would change the maths in a way mojax does not implement (MLP
  biases, another activation, a RoPE variant other than default / llama3, interleaved RoPE, weights
  quantized by GPTQ, AWQ, bitsandbytes, ...) raises ``ValueError`` naming the field and what is
  supported, instead of silently producing a different model;
* token ids (``bos_token_id``, ``eos_token_id`` (an int or a list), ``pad_token_id``,
  ``unk_token_id``): kept, so that generation and export know the special tokens;
* metadata: bookkeeping (``architectures``, ``transformers_version``, ``use_cache``,
  ``initializer_range``, ...), tool blocks (``transformers.js_config``), markers that restate the
  default maths (``is_llama_config``, ``rope_interleaved=False``) and a ``quantization_config``
  whose ``quant_method`` is ``"gguf"`` (the note that the float weights beside it were
  dequantized from a GGUF file): accepted and ignored by name.

An unknown field is an error: it may change the maths.

transformers is imported lazily, only by :meth:`ModelConfig.to_hf` and when a `LlamaConfig`
object is passed to :meth:`ModelConfig.from_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

# Keys of a llama3 rope-scaling dict (HF `rope_parameters` minus rope_type / rope_theta).
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# HF fields that do not change the forward pass of a LLaMA model: accepted and ignored.
_IGNORED_HF_FIELDS = frozenset(
    {
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "initializer_range",
        "_name_or_path",
        "name_or_path",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "pretraining_tp",  # HF >= 4.4x computes the same maths for any value
        "attention_dropout",  # mojax applies no dropout (inference / RL fine-tuning)
        "tokenizer_class",
        "prefix",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "finetuning_task",
        "_attn_implementation_autoset",
        "tf_legacy_loss",
        "use_bfloat16",
        "torchscript",
        "tie_encoder_decoder",
        "add_cross_attention",
        "is_llama_config",  # a marker of the LLaMA maths mojax implements
        "transformers.js_config",  # a transformers.js block (ONNX export dtypes): no effect on the weights
    }
)

# Model families (HF ``model_type``): LLaMA and Qwen2 (LLaMA maths with q, k, v biases).
MODEL_TYPES = ("llama", "qwen2")

# Fields whose only supported value is fixed; anything else changes the architecture.
_FIXED_HF_FIELDS: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "mlp_bias": (False,),
    "model_type": MODEL_TYPES,
    "is_decoder": (False, True),
    "rope_interleaved": (False,),  # True rotates adjacent pairs (GPT-J style), not HF's halves
    "use_sliding_window": (False,),  # Qwen2: sliding-window attention is not implemented
    "use_mrope": (False,),  # Qwen2 configs may carry it; multimodal RoPE is not implemented
}

# `quantization_config.quant_method` of a folder whose float weights were dequantized from a GGUF
# file: a note, not quantized weights. Every other method (gptq, awq, bitsandbytes, fp8, ...)
# stores weights mojax cannot read as floats.
_DEQUANTIZED_QUANT_METHODS = ("gguf",)


# Qwen2 fields that only matter with use_sliding_window=True (rejected above): accepted and ignored.
_SLIDING_WINDOW_FIELDS = frozenset({"sliding_window", "max_window_layers"})

_DIRECT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "attention_bias",
)

_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def _as_dtype(x: Any) -> np.dtype:
    return jnp.dtype(x)


def _token_id(x: Any) -> int | tuple[int, ...] | None:
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return tuple(int(v) for v in x)
    return int(x)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaMA architecture hyper-parameters (HF names) plus JAX dtypes. Frozen and hashable.

    ``rope_scaling`` is ``None`` (plain RoPE) or a llama3 mapping with keys
    ``factor, low_freq_factor, high_freq_factor, original_max_position_embeddings`` (stored as a
    hashable ``FrozenDict``). ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and
    ``num_key_value_heads`` to ``num_attention_heads``.

    ``model_type`` is the HF family: ``"llama"`` (biases on q, k, v and o exactly when
    ``attention_bias``) or ``"qwen2"`` (LLaMA maths with biases on q, k and v, none on o, as
    transformers' ``Qwen2Attention``; ``attention_bias`` must then stay False).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_bias: bool = False
    model_type: str = "llama"

    def __post_init__(self):
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.num_key_value_heads is None:
            s("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                    f"({self.num_attention_heads}); pass head_dim explicitly"
                )
            s("head_dim", self.hidden_size // self.num_attention_heads)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"ModelConfig.{k} must be a positive int, got {v!r}")
            s(k, int(v))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) (MHA, GQA or MQA)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        s("rms_norm_eps", float(self.rms_norm_eps))
        s("rope_theta", float(self.rope_theta))
        s("tie_word_embeddings", bool(self.tie_word_embeddings))
        if not isinstance(self.attention_bias, bool | np.bool_):
            raise ValueError(f"ModelConfig.attention_bias must be a bool, got {self.attention_bias!r}")
        s("attention_bias", bool(self.attention_bias))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"ModelConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.model_type == "qwen2" and self.attention_bias:
            raise ValueError("ModelConfig.attention_bias must be False for qwen2 (q, k, v biases are implied)")
        for k in _TOKEN_ID_FIELDS:
            s(k, _token_id(getattr(self, k)))
        s("dtype", _as_dtype(self.dtype))
        s("param_dtype", _as_dtype(self.param_dtype))
        if self.rope_scaling is not None:
            s("rope_scaling", _check_llama3_scaling(dict(self.rope_scaling), "rope_scaling"))

    # ------------------------------------------------------------------ derived
    @property
    def num_query_groups(self) -> int:
        """Query heads per KV head (1 = MHA, num_attention_heads = MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_bias(self) -> bool:
        """Whether q_proj, k_proj and v_proj carry biases (``attention_bias`` or Qwen2)."""
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        """Whether o_proj carries a bias (``attention_bias``; never for Qwen2)."""
        return self.attention_bias

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count of `LlamaForCausalLM` (no buffers)."""
        d, f, h, kv, hd, L, v = (
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            self.num_hidden_layers,
            self.vocab_size,
        )
        per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d
        per_layer += (h * hd + 2 * kv * hd) * self.qkv_bias + d * self.o_bias
        return v * d * (1 if self.tie_word_embeddings else 2) + L * per_layer + d

    def forward_flops(self, tokens: int, context: int, *, lm_head: bool = True) -> int:
        """Matmul FLOPs of a forward pass of `LlamaForCausalLM` over ``tokens`` query tokens (all sequences
        together), each attending to ``context`` key positions, with the LM head on every token (without it when
        ``lm_head`` is False: the trunk alone).

        Per token: 2 FLOPs per weight of every matmul (the decoder layers' seven projections and the LM head; the
        input embedding is a lookup, and a tied head counts once, as the head), plus attention's two contractions,
        2 * 2 * heads * head_dim per key position per layer. Attention is counted dense, every query against
        ``context`` keys, masked or not, as in PaLM's model-FLOPs count (Chowdhery et al., arXiv 2204.02311,
        appendix B): 2 N + 4 L H T per token. Norms, activations, biases and the softmax are left out (they are
        elementwise, a few per cent here). A training step's backward pass costs twice its forward (the gradients
        with respect to each matmul's input and weight), so a step is ``3 * forward_flops(B * T, T)``; one decode
        step of B rows with S cached positions is ``forward_flops(B, S)``.
        """
        if tokens < 0 or context < 0:
            raise ValueError(f"forward_flops: tokens and context must be >= 0, got tokens={tokens}, context={context}")
        d, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer_weights = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size
        matmul_weights = self.num_hidden_layers * per_layer_weights + self.vocab_size * d * lm_head
        attention_per_token = self.num_hidden_layers * 2 * 2 * q * context
        return tokens * (2 * matmul_weights + attention_per_token)

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """~107k parameters (GQA 4/2 heads, 2 layers, vocab 256): tests and CPU demos."""
        kw = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def llama_7b(cls, **overrides: Any) -> ModelConfig:
        """Llama-2 7B shapes (MHA, 32 layers)."""
        kw = dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            bos_token_id=1,
            eos_token_id=2,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def llama_13b(cls, **overrides: Any) -> ModelConfig:
        """Llama-2 13B shapes (MHA, 40 layers)."""
        kw = dict(
            vocab_size=32000,
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            bos_token_id=1,
            eos_token_id=2,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def llama_70b(cls, **overrides: Any) -> ModelConfig:
        """Llama-3 70B shapes (GQA 64/8 heads, 80 layers, vocab 128256)."""
        kw = dict(
            vocab_size=128256,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            bos_token_id=128000,
            eos_token_id=128001,
        )
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> ModelConfig:
        """From a HF config dict (``config.json`` contents) or a `transformers.LlamaConfig`.

        ``overrides`` sets JAX-side fields (``dtype``, ``param_dtype``) or replaces any field.
        Raises ``ValueError`` naming every unsupported field or value.
        """
        if not isinstance(hf, Mapping):
            if hasattr(hf, "to_dict"):
                hf = hf.to_dict()
            else:
                raise TypeError(f"from_hf expects a dict or a transformers config, got {type(hf).__name__}")
        hf = dict(hf)
        errors: list[str] = []
        kw: dict[str, Any] = {}
        rope_theta = None
        rope_scaling = None
        for key, value in hf.items():
            if key in _DIRECT_FIELDS:
                kw[key] = value
            elif key in _IGNORED_HF_FIELDS or (key in _SLIDING_WINDOW_FIELDS and hf.get("model_type") == "qwen2"):
                continue
            elif key == "layer_types":
                if value is not None and any(kind != "full_attention" for kind in value):
                    errors.append(f"layer_types={value!r} is not supported (supported: only 'full_attention')")
            elif key in _FIXED_HF_FIELDS:
                if value not in _FIXED_HF_FIELDS[key]:
                    errors.append(
                        f"{key}={value!r} is not supported (supported: "
                        f"{', '.join(repr(v) for v in _FIXED_HF_FIELDS[key])})"
                    )
                elif key == "model_type":
                    kw[key] = value
            elif key == "rope_theta":
                rope_theta = value
            elif key in ("rope_parameters", "rope_scaling"):
                if value is None:
                    continue
                if not isinstance(value, Mapping):
                    errors.append(f"{key} must be a dict or null, got {value!r}")
                    continue
                params = dict(value)
                if "type" in params and "rope_type" not in params:  # very old HF spelling
                    params["rope_type"] = params.pop("type")
                if "rope_theta" in params:
                    rope_theta = params.pop("rope_theta")
                rope_type = params.pop("rope_type", "default")
                if rope_type == "default":
                    if params:
                        errors.append(f"{key}: unexpected keys {sorted(params)} for rope_type 'default'")
                elif rope_type == "llama3":
                    try:
                        rope_scaling = _check_llama3_scaling(params, key)
                    except ValueError as e:
                        errors.append(str(e))
                else:
                    errors.append(f"{key}: rope_type={rope_type!r} is not supported (supported: 'default', 'llama3')")
            elif key == "quantization_config":
                error = _quantization_error(value)
                if error:
                    errors.append(error)
            elif key == "auto_map":
                errors.append(
                    "auto_map (custom remote modeling code) is not supported: mojax never "
                    "runs remote code; supported architecture: standard LlamaForCausalLM"
                )
            else:
                errors.append(f"unknown field {key}={value!r}")
        if errors:
            raise ValueError(
                "unsupported HF LLaMA config: "
                + "; ".join(errors)
                + ". Supported fields: "
                + ", ".join(_DIRECT_FIELDS)
                + ", rope_theta, rope_parameters/rope_scaling (rope_type 'default' or "
                "'llama3'), attention_bias, model_type ('llama' or 'qwen2', full attention only), "
                "hidden_act='silu', mlp_bias=False"
            )
        if rope_theta is not None:
            kw["rope_theta"] = rope_theta
        kw["rope_scaling"] = rope_scaling
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json``-style dict (transformers v5 layout, ``rope_parameters``)."""
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dict(self.rope_scaling)}
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        family = {"llama": {"attention_bias": self.attention_bias}, "qwen2": {"use_sliding_window": False}}
        return {
            **family[self.model_type],
            "architectures": [f"{architecture_prefix(self.model_type)}ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            **({} if self.unk_token_id is None else {"unk_token_id": self.unk_token_id}),
            "dtype": str(self.param_dtype),
        }

    def to_hf(self, **extra: Any):
        """A `transformers.LlamaConfig` (or `Qwen2Config` for qwen2) (imports transformers)."""
        from transformers import AutoConfig

        d = self.to_hf_dict()
        model_type = d.pop("model_type")
        d.update(extra)
        return AutoConfig.for_model(model_type, **d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> ModelConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f), **overrides)

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike, **overrides: Any) -> ModelConfig:
        """From ``<path>/config.json`` of a local HF model folder."""
        cfg = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}")
        return cls.from_json_file(cfg, **overrides)


def _quantization_error(value: Any) -> str | None:
    """None for a dequantized-GGUF note; the error naming the method for quantized weights."""
    method = value.get("quant_method") if isinstance(value, Mapping) else None
    if method in _DEQUANTIZED_QUANT_METHODS:
        return None
    return (
        f"quantization_config (quant_method={method!r}) describes quantized weights, which mojax does not "
        f"read (supported: float weights, or the note quant_method={_DEQUANTIZED_QUANT_METHODS[0]!r} of "
        "weights dequantized from GGUF); dequantize the checkpoint to float safetensors first"
    )


def architecture_prefix(model_type: str) -> str:
    """The HF class-name prefix of a model family: ``"Llama"`` or ``"Qwen2"``."""
    return {"llama": "Llama", "qwen2": "Qwen2"}[model_type]


def _check_llama3_scaling(params: dict[str, Any], where: str) -> FrozenDict:
    params = dict(params)
    params.pop("rope_type", None)
    params.pop("type", None)
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in params]
    unknown = sorted(k for k in params if k not in LLAMA3_ROPE_KEYS)
    if missing or unknown:
        raise ValueError(
            f"{where}: llama3 rope scaling needs exactly the keys {list(LLAMA3_ROPE_KEYS)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unsupported {unknown}" if unknown else "")
        )
    out = {k: float(params[k]) for k in LLAMA3_ROPE_KEYS}
    out["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"{where}: llama3 needs high_freq_factor > low_freq_factor, got {out}")
    return FrozenDict(out)
