"""LLaMA in Flax NNX: RMSNorm, RoPE (default and llama3), GQA/MQA attention, SwiGLU, KV cache.

The decoder layers are stored stacked on a leading ``layers`` axis and run with ``jax.lax.scan``
over the stacked arrays, so an 80-layer config traces and compiles one layer. Parameter paths
mirror HF names (``model.layers.self_attn.q_proj.kernel`` <-> ``model.layers.{i}.self_attn.
q_proj.weight``) so the safetensors mapping in :mod:`mojax.models.hf` is mechanical.

Call convention (shared by the sampler and the trainer)::

    logits, cache = model(input_ids, positions=None, attention_mask=None, cache=None)

* ``input_ids`` i32[B, T]; ``attention_mask`` i32/bool[B, T] marks real tokens (0 = padding,
  typically on the left); padded tokens never change real tokens' outputs.
* ``positions`` default to ``cumsum(attention_mask) - 1`` clipped at 0, offset by the number of
  valid tokens already in the cache when a cache is given.
* ``cache=None``: plain causal forward, returns ``(logits, None)``.
* ``cache=model.init_cache(B, S)``: the T new tokens are written at ``cache.index`` and attend to
  every valid earlier slot plus causally among themselves; T may be a whole prompt (prefill) or 1
  (decode). Returns the updated cache (``index + T``). Writing past ``S`` raises when the index
  is concrete; inside jit it cannot be checked (``dynamic_update_slice`` clamps the start, which
  would overwrite the last slots): size the cache for prompt + generation.
* Call it under ``nnx.jit`` (or ``jax.jit`` over ``nnx.split`` state): eagerly, every call re-traces
  the layer scan. ``remat=True`` wraps each layer in ``jax.checkpoint`` for training.
* logits are fp32; attention softmax and RMSNorm statistics are fp32 whatever ``config.dtype``.

Logical axis names of every ``nnx.Param`` (read them with ``nnx.get_partition_spec``; the
sharding module maps them to mesh axes). Variables are created with ``eager_sharding=False``, so
construction never needs a mesh and works under ``nnx.eval_shape``.

===============================================  =====================  ===========================================
parameter path                                   shape                  logical axes
===============================================  =====================  ===========================================
model.embed_tokens.embedding                     [V, D]                 ("vocab", "embed")
model.layers.input_layernorm.scale               [L, D]                 ("layers", "norm")
model.layers.self_attn.q_proj.kernel             [L, D, H, hd]          ("layers", "embed", "heads", "head_dim")
model.layers.self_attn.k_proj.kernel             [L, D, KV, hd]         ("layers", "embed", "kv_heads", "head_dim")
model.layers.self_attn.v_proj.kernel             [L, D, KV, hd]         ("layers", "embed", "kv_heads", "head_dim")
model.layers.self_attn.o_proj.kernel             [L, H, hd, D]          ("layers", "heads", "head_dim", "embed")
model.layers.post_attention_layernorm.scale      [L, D]                 ("layers", "norm")
model.layers.mlp.gate_proj.kernel                [L, D, F]              ("layers", "embed", "mlp")
model.layers.mlp.up_proj.kernel                  [L, D, F]              ("layers", "embed", "mlp")
model.layers.mlp.down_proj.kernel                [L, F, D]              ("layers", "mlp", "embed")
model.norm.scale                                 [D]                    ("norm",)
lm_head.kernel  (absent when tied)               [D, V]                 ("embed", "vocab")
value_head.kernel  (heads.LlamaValueModel)       [D, n]                 ("embed", None)
score.kernel  (heads.LlamaRewardModel)           [D, num_labels]        ("embed", None)
===============================================  =====================  ===========================================

KV cache arrays are activations, not Params; their suggested logical axes are in
``KV_CACHE_LOGICAL_AXES`` ("batch" and "cache_length" are activation-only names).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mojax.models.config import ModelConfig

LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "model.embed_tokens.embedding": ("vocab", "embed"),
    "model.layers.input_layernorm.scale": ("layers", "norm"),
    "model.layers.self_attn.q_proj.kernel": ("layers", "embed", "heads", "head_dim"),
    "model.layers.self_attn.k_proj.kernel": ("layers", "embed", "kv_heads", "head_dim"),
    "model.layers.self_attn.v_proj.kernel": ("layers", "embed", "kv_heads", "head_dim"),
    "model.layers.self_attn.o_proj.kernel": ("layers", "heads", "head_dim", "embed"),
    "model.layers.post_attention_layernorm.scale": ("layers", "norm"),
    "model.layers.mlp.gate_proj.kernel": ("layers", "embed", "mlp"),
    "model.layers.mlp.up_proj.kernel": ("layers", "embed", "mlp"),
    "model.layers.mlp.down_proj.kernel": ("layers", "mlp", "embed"),
    "model.norm.scale": ("norm",),
    "lm_head.kernel": ("embed", "vocab"),
}
"""Parameter path -> logical axis names (the table in the module docstring)."""

PARAM_AXIS_NAMES = ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm")
# Mesh axes that split the batch of activations (data parallel and FSDP).
BATCH_AXES = ("data", "fsdp")
"""The whole vocabulary of logical axis names used on Params."""

KV_CACHE_LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "keys": ("layers", "batch", "cache_length", "kv_heads", "head_dim"),
    "values": ("layers", "batch", "cache_length", "kv_heads", "head_dim"),
    "valid": ("batch", "cache_length"),
    "index": (),
}

_INIT_STD = 0.02  # HF initializer_range default


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], dtype: Any, init: Any = None
) -> nnx.Param:
    init = nnx.initializers.normal(_INIT_STD) if init is None else init
    value = nnx.with_partitioning(init, names)(rngs.params(), shape, dtype)
    return nnx.Param(value, eager_sharding=False)


# --------------------------------------------------------------------------- functional pieces
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: statistics in fp32, normalised x cast back to x.dtype, times scale."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """f32[head_dim // 2] inverse frequencies, computed in float32 exactly as HF does
    (``_compute_default_rope_parameters`` / ``_compute_llama3_parameters``)."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    # float32 maths as torch does; the pow is evaluated in float64 and rounded, which reproduces
    # torch's (nearly always correctly rounded) float32 pow bit for bit where numpy's powf does not.
    power = (np.float64(config.rope_theta) ** exponent.astype(np.float64)).astype(np.float32)
    inv_freq = (np.float32(1.0) / power).astype(np.float32)
    if config.rope_scaling is None:
        return inv_freq
    rs = config.rope_scaling
    f32 = np.float32
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_freq_wavelen = f32(old_ctx / low)
    high_freq_wavelen = f32(old_ctx / high)
    # torch evaluates `scalar / tensor` as `tensor.reciprocal() * scalar`, all in float32.
    wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
    inv_llama = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq).astype(f32)
    smooth = ((f32(1) / wavelen) * f32(old_ctx) - f32(low)) / f32(high - low)
    smoothed = (f32(1) - smooth) * inv_llama / f32(factor) + smooth * inv_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_llama).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim] (HF layout: the half-frequencies repeated), in ``dtype``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF rotate_half RoPE on x [B, T, N, hd] with cos/sin [B, T, hd] (split halves, not pairs)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention with an explicit mask; fp32 scores and softmax.

    q [B, T, H, hd], k/v [B, S, KV, hd] (H a multiple of KV: MHA, GQA, MQA), mask bool[B, T, S]
    (True = may attend). Query head h reads KV head h // (H // KV), as HF's ``repeat_kv``.
    A query row with no allowed key yields a finite (meaningless) output, never NaN.
    """
    B, T, H, hd = q.shape
    KV = k.shape[2]
    G = H // KV
    qg = q.reshape(B, T, KV, G, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * np.float32(hd**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, np.float32(-1e30))
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(B, T, H, hd)


def default_positions(attention_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """``offset + cumsum(mask) - 1`` clipped at 0: i32[B, T]."""
    m = attention_mask.astype(jnp.int32)
    pos = jnp.cumsum(m, axis=-1) - 1
    if not isinstance(offset, int) or offset:
        pos = pos + jnp.asarray(offset, jnp.int32).reshape(-1, 1)
    return jnp.maximum(pos, 0).astype(jnp.int32)


# --------------------------------------------------------------------------- KV cache
@struct.dataclass
class KVCache:
    """Preallocated per-layer keys/values plus slot validity.

    keys, values: [L, B, S, KV, hd] (compute dtype by default); valid: bool[B, S] (slot holds a
    real token); index: i32 scalar, the slot where the next call writes its first new token.
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def lengths(self) -> jax.Array:
        """i32[B]: number of valid (real-token) slots per row, i.e. the next position id."""
        return jnp.sum(self.valid.astype(jnp.int32), axis=-1)


def init_kv_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    dtype = config.dtype if dtype is None else jnp.dtype(dtype)
    shape = (config.num_hidden_layers, batch_size, max_length, config.num_key_value_heads, config.head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch_size, max_length), jnp.bool_),
        index=jnp.zeros((), jnp.int32),
    )


# --------------------------------------------------------------------------- modules
class _Kernel(nnx.Module):
    def __init__(self, shape, names, *, dtype, rngs: nnx.Rngs):
        self.kernel = _param(rngs, shape, names, dtype)


class _Scale(nnx.Module):
    def __init__(self, shape, names, *, dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, shape, names, dtype, init=nnx.initializers.ones)


class _Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = _param(rngs, (vocab, dim), ("vocab", "embed"), dtype)


class LlamaAttentionWeights(nnx.Module):
    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        L, D, H, KV, hd, pd = (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.param_dtype,
        )
        self.q_proj = _Kernel((L, D, H, hd), ("layers", "embed", "heads", "head_dim"), dtype=pd, rngs=rngs)
        self.k_proj = _Kernel((L, D, KV, hd), ("layers", "embed", "kv_heads", "head_dim"), dtype=pd, rngs=rngs)
        self.v_proj = _Kernel((L, D, KV, hd), ("layers", "embed", "kv_heads", "head_dim"), dtype=pd, rngs=rngs)
        self.o_proj = _Kernel((L, H, hd, D), ("layers", "heads", "head_dim", "embed"), dtype=pd, rngs=rngs)


class LlamaMLPWeights(nnx.Module):
    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        L, D, F, pd = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.param_dtype
        self.gate_proj = _Kernel((L, D, F), ("layers", "embed", "mlp"), dtype=pd, rngs=rngs)
        self.up_proj = _Kernel((L, D, F), ("layers", "embed", "mlp"), dtype=pd, rngs=rngs)
        self.down_proj = _Kernel((L, F, D), ("layers", "mlp", "embed"), dtype=pd, rngs=rngs)


class LlamaDecoderLayers(nnx.Module):
    """All decoder layers, stacked on a leading "layers" axis and run with ``jax.lax.scan``."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        L, D, pd = c.num_hidden_layers, c.hidden_size, c.param_dtype
        self.input_layernorm = _Scale((L, D), ("layers", "norm"), dtype=pd, rngs=rngs)
        self.self_attn = LlamaAttentionWeights(c, rngs=rngs)
        self.post_attention_layernorm = _Scale((L, D), ("layers", "norm"), dtype=pd, rngs=rngs)
        self.mlp = LlamaMLPWeights(c, rngs=rngs)

    def stacked_arrays(self) -> dict[str, jax.Array]:
        a, m = self.self_attn, self.mlp
        return {
            "ln1": self.input_layernorm.scale[...],
            "wq": a.q_proj.kernel[...],
            "wk": a.k_proj.kernel[...],
            "wv": a.v_proj.kernel[...],
            "wo": a.o_proj.kernel[...],
            "ln2": self.post_attention_layernorm.scale[...],
            "wg": m.gate_proj.kernel[...],
            "wu": m.up_proj.kernel[...],
            "wd": m.down_proj.kernel[...],
        }


def constrain_batch(x: jax.Array) -> jax.Array:
    """x with its leading (batch) dim split over the Auto mesh axes of BATCH_AXES set by ``jax.set_mesh``.

    Without this, XLA propagates the FSDP weight layout (split along embed) into the activations
    and every device computes the whole global batch. No-op without a mesh, with Explicit axes
    (their shardings are types, not hints), or when the axes do not divide the batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    auto = {
        name for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=False) if kind == jax.sharding.AxisType.Auto
    }
    axes = tuple(name for name in BATCH_AXES if name in auto)
    size = math.prod(mesh.shape[name] for name in axes)
    if size == 1 or x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def _decoder_layer(
    p: dict[str, jax.Array],
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: jax.Array,
    eps: float,
    dtype: Any,
    past: tuple[jax.Array, jax.Array] | None,
    index: jax.Array | None,
):
    """One LLaMA block on x [B, T, D]. Returns (x, (k_new, v_new)) with k/v [B, T, KV, hd]."""
    w = {k: v.astype(dtype) for k, v in p.items()}
    x = constrain_batch(x)
    h = rms_norm(x, w["ln1"], eps)
    q = jnp.einsum("btd,dnh->btnh", h, w["wq"])
    k = jnp.einsum("btd,dnh->btnh", h, w["wk"])
    v = jnp.einsum("btd,dnh->btnh", h, w["wv"])
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    if past is None:
        k_all, v_all = k, v
    else:
        pk, pv = past
        k_all = jax.lax.dynamic_update_slice(pk, k.astype(pk.dtype), (0, index, 0, 0)).astype(dtype)
        v_all = jax.lax.dynamic_update_slice(pv, v.astype(pv.dtype), (0, index, 0, 0)).astype(dtype)
    o = attention(q, k_all, v_all, mask)
    x = x + jnp.einsum("btnh,nhd->btd", o, w["wo"])
    h = rms_norm(x, w["ln2"], eps)
    gate = jnp.einsum("btd,df->btf", h, w["wg"])
    up = jnp.einsum("btd,df->btf", h, w["wu"])
    x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w["wd"])
    return constrain_batch(x), (k, v)


class LlamaModel(nnx.Module):
    """Embedding + stacked decoder layers + final norm (HF ``LlamaModel``)."""

    def __init__(self, config: ModelConfig, *, remat: bool = False, rngs: nnx.Rngs):
        self.config = config
        self.remat = remat
        self.embed_tokens = _Embed(config.vocab_size, config.hidden_size, dtype=config.param_dtype, rngs=rngs)
        self.layers = LlamaDecoderLayers(config, rngs=rngs)
        self.norm = _Scale((config.hidden_size,), ("norm",), dtype=config.param_dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        c = self.config
        dtype = c.dtype
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.bool_)
        attention_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(B, T)}")

        if cache is None:
            if positions is None:
                positions = default_positions(attention_mask)
            slots = jnp.arange(T, dtype=jnp.int32)
            qslots = slots
            valid = attention_mask
            index = None
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache batch size {cache.batch_size} != input batch size {B}")
            if T > cache.max_length:
                raise ValueError(f"{T} new tokens do not fit in a cache of length {cache.max_length}")
            if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + T > cache.max_length:
                raise ValueError(
                    f"cache overflow: writing {T} tokens at slot {int(cache.index)} of a cache "
                    f"of length {cache.max_length}"
                )
            index = jnp.asarray(cache.index, jnp.int32)
            if positions is None:
                positions = default_positions(attention_mask, cache.lengths)
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
            slots = jnp.arange(cache.max_length, dtype=jnp.int32)
            qslots = index + jnp.arange(T, dtype=jnp.int32)
        positions = jnp.asarray(positions, jnp.int32)
        # mask[b, t, s]: key slot s holds a real token and is not in the future of query t.
        mask = valid[:, None, :] & (slots[None, None, :] <= qslots[None, :, None])

        cos, sin = rope_cos_sin(positions, rope_inv_freq(c), dtype)
        x = jnp.take(self.embed_tokens.embedding[...], input_ids, axis=0).astype(dtype)
        params = self.layers.stacked_arrays()
        eps = c.rms_norm_eps

        if cache is None:

            def body(x, p):
                return _decoder_layer(p, x, cos, sin, mask, eps, dtype, None, None)

            xs = params
        else:

            def body(x, inp):
                p, pk, pv = inp
                return _decoder_layer(p, x, cos, sin, mask, eps, dtype, (pk, pv), index)

            xs = (params, cache.keys, cache.values)
        if self.remat:
            body = jax.checkpoint(body)
        x, (k_new, v_new) = jax.lax.scan(body, x, xs)
        x = rms_norm(x, self.norm.scale[...].astype(dtype), eps)

        if cache is not None:
            cache = KVCache(
                keys=jax.lax.dynamic_update_slice(cache.keys, k_new.astype(cache.keys.dtype), (0, 0, index, 0, 0)),
                values=jax.lax.dynamic_update_slice(
                    cache.values, v_new.astype(cache.values.dtype), (0, 0, index, 0, 0)
                ),
                valid=valid,
                index=index + T,
            )
        return x, cache


class LlamaForCausalLM(nnx.Module):
    """HF-compatible LLaMA causal LM. ``model(input_ids, ...) -> (logits f32[B, T, V], cache)``."""

    def __init__(self, config: ModelConfig, *, remat: bool = False, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, remat=remat, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _Kernel(
                (config.hidden_size, config.vocab_size), ("embed", "vocab"), dtype=config.param_dtype, rngs=rngs
            )

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """Empty cache for ``batch_size`` rows and ``max_length`` slots (prompt + generation)."""
        return init_kv_cache(self.config, batch_size, max_length, dtype)

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, D] (compute dtype) and the updated cache."""
        return self.model(input_ids, positions=positions, attention_mask=attention_mask, cache=cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on hidden states: fp32 logits [..., V]."""
        dtype = self.config.dtype
        if self.config.tie_word_embeddings:
            w = self.model.embed_tokens.embedding[...].astype(dtype)
            return jnp.einsum("...d,vd->...v", hidden.astype(dtype), w, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...].astype(dtype)
        return jnp.einsum("...d,dv->...v", hidden.astype(dtype), w, preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        h, cache = self.hidden_states(input_ids, positions=positions, attention_mask=attention_mask, cache=cache)
        return self.logits(h).astype(jnp.float32), cache
