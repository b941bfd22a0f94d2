"""LLaMA in Flax NNX: RMSNorm, RoPE (default and llama3), GQA/MQA attention, SwiGLU, KV cache.

The decoder layers are stored stacked on a leading ``layers`` axis and run with ``jax.lax.scan``
over the stacked arrays, so an 80-layer config traces and compiles one layer. Parameter paths
mirror HF names (``model.layers.self_attn.q_proj.kernel`` <-> ``model.layers.{i}.self_attn.
q_proj.weight``) so the safetensors mapping in :mod:`mojax.models.hf` is mechanical.

Call convention (shared by the sampler and the trainer)::

    logits, cache = model(input_ids, positions=None, attention_mask=None, cache=None,
                          adapters=True, dropout_rng=None, layer_weights=None)

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
  the layer scan. ``remat`` says what each layer keeps for the backward pass (:func:`checkpointed`):
  ``"dots"`` (the default) its matmul outputs, ``"full"`` (or True) nothing, ``"none"`` (or False) everything.
* logits are fp32; attention softmax and RMSNorm statistics are fp32 whatever ``config.dtype``.
* ``model.set_attributes(attention_kernel=...)`` picks how a forward without a cache runs attention
  (:data:`ATTENTION_KERNELS`): mojax's query blocks (the default, any mask), or ``jax.nn.dot_product_attention``
  with XLA's or cuDNN's fused kernel (:func:`fused_causal_attention`: rows of contiguous real tokens only).
* ``adapters=False`` runs the base model without its LoRA adapters (:mod:`mojax.models.lora`), the
  reference policy; ``dropout_rng`` (a PRNG key) turns on the adapters' dropout, for training only.
* ``layer_weights=model.per_layer_weights()`` (with a cache, for decode loops): the layers run unrolled on
  weights split per layer once, outside the loop, instead of the scan (:func:`decode_layers`), on a cache split
  per layer too (``cache.per_layer()``). On a CPU backend the split kernels are also transposed once
  (:class:`OutputMajor`), so that each projection of a decode step's few token rows runs as weights times the rows'
  columns (:func:`mojax._numerics.columns_matmul`). Such a cache may hold keys and values that consecutive groups of
  rows share (``cache.prefix``, :class:`SharedPrefix`: a prompt prefilled once for its completions), read once per
  group rather than copied into every row.

Code layout: :class:`LlamaDecoderLayers` hands its stacked arrays to the pure layer maths as a
:class:`LayerWeights` (HF field names; each projection a :class:`Projection` of kernel, optional
bias and optional LoRA factors); :func:`key_slots` / :func:`causal_mask` / :func:`default_positions`
build the attention inputs (without a cache, :func:`causal_attention` runs attention in query blocks that skip the
masked future); :func:`run_layers` scans :func:`decoder_layer` with or without cache
slices through one body; :func:`decode_layers` loops over the same two halves of a layer
(:func:`attention_inputs`, :func:`attention_and_mlp`) writing straight into each layer's cache arrays.
Activations are constrained by logical name ("batch") through
:func:`mojax.models.sharding.constrain`; no mesh axis is named here.

Probe mode: :func:`split_last_layer` cuts the stacked state into ``model.layers`` [L-1] and
``model.last_layer`` [1], :func:`apply_split` runs such a state (same logits as the model; :func:`merge_split`
gives its model, for hidden states and for sampling with a KV cache, without a merged copy of the weights),
:func:`merge_last_layer` undoes the split (of parameters or gradients) and
:func:`default_probe_mask` selects the last block, final norm and untied LM head (or the last
block's LoRA adapters).

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
model.layers.self_attn.q_proj.bias  (qkv_bias)   [L, H, hd]             ("layers", "heads", "head_dim")
model.layers.self_attn.k_proj.bias  (qkv_bias)   [L, KV, hd]            ("layers", "kv_heads", "head_dim")
model.layers.self_attn.v_proj.bias  (qkv_bias)   [L, KV, hd]            ("layers", "kv_heads", "head_dim")
model.layers.self_attn.o_proj.bias  (o_bias)     [L, D]                 ("layers", "embed")
model.layers.<...>.<proj>.lora_a  (LoRA)         [L, *in, r]            (kernel's "layers" and input axes, None)
model.layers.<...>.<proj>.lora_b  (LoRA)         [L, r, *out]           ("layers", None, kernel's output axes)
value_head.kernel  (heads.LlamaValueModel)       [D, n]                 ("embed", None)
score.kernel  (heads.LlamaRewardModel)           [D, num_labels]        ("embed", None)
===============================================  =====================  ===========================================

KV cache arrays are activations, not Params; their suggested logical axes are in
``KV_CACHE_LOGICAL_AXES`` ("batch" and "cache_length" are activation-only names).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mojax._numerics import (
    COLUMNS_MAX_ROWS,
    columns_matmul,
    head_matmul,
    token_rows,
    transposed_copies_pay_off,
)
from mojax.models.config import ModelConfig
from mojax.models.sharding import PARAM_AXIS_NAMES, constrain  # noqa: F401 (the vocabulary, re-exported)

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

BIAS_LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "model.layers.self_attn.q_proj.bias": ("layers", "heads", "head_dim"),
    "model.layers.self_attn.k_proj.bias": ("layers", "kv_heads", "head_dim"),
    "model.layers.self_attn.v_proj.bias": ("layers", "kv_heads", "head_dim"),
    "model.layers.self_attn.o_proj.bias": ("layers", "embed"),
}
"""Bias path -> logical axis names (q/k/v when ``config.qkv_bias``, o when ``config.o_bias``)."""

KV_CACHE_LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "keys": ("layers", "batch", "kv_heads", "cache_length", "head_dim"),
    "values": ("layers", "batch", "kv_heads", "cache_length", "head_dim"),
    "valid": ("batch", "cache_length"),
    "index": (),
}

_INIT_STD = 0.02  # HF initializer_range default


def param_variable(
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


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, prefix: tuple[jax.Array, ...] | None = None
) -> jax.Array:
    """Grouped-query attention with an explicit mask; fp32 scores and softmax.

    q [B, T, H, hd], k/v [B, KV, S, hd] (H a multiple of KV: MHA, GQA, MQA; the cache's layout), mask bool[B, T, S]
    (True = may attend). Query head h reads KV head h // (H // KV), as HF's ``repeat_kv``.
    A query row with no allowed key yields a finite (meaningless) output, never NaN.

    Both contractions are batched over (B, KV) with the G query heads of a KV head and the T queries merged into one
    axis of G T rows, [B, KV, G T, hd] (one transpose of q, fused with its RoPE): each is then one plain matmul per
    (b, kv) in forward and backward. With q left [B, T, KV, G, hd], XLA:CPU copied q and the scores' cotangent into
    transposed layouts around the dots (a layer's attention fwd+bwd at 4 x 128 SmolLM2 shapes: 8.7-10.1 ms, now
    6.4-6.9). The output is the dot's natural [B, KV, G, T, hd], transposed after to [B, T, H, hd]: asking the einsum
    for that order directly made XLA:CPU pick a slower dot, at decode and at training shapes.

    ``prefix``: (keys, values [P, KV, W, hd] shared by groups of B / P consecutive rows, each row's valid prefix
    slots bool[B, W]) (:class:`SharedPrefix`): keys every query of row b may read besides its own. One softmax over
    the W prefix slots and the S own ones, the same maths as attending to the prefix copied into every row's cache.
    The prefix's two contractions run per prefix on the rows of its whole group, [P, KV, (B / P) G T, hd] against
    [P, KV, W, hd], so each prefix slot is read once per step rather than once per row.
    """
    B, T, H, hd = q.shape
    KV = k.shape[1]
    G = H // KV
    rows = jnp.swapaxes(q, 1, 2).reshape(B, KV, G * T, hd)
    scores = jnp.einsum("bkqd,bksd->bkqs", rows, k, preferred_element_type=jnp.float32)
    if prefix is not None:
        prefix_keys, _, prefix_valid = prefix
        scores = jnp.concatenate([_grouped(prefix_keys, rows, "pkqd,pksd->pkqs", jnp.float32), scores], axis=-1)
        mask = jnp.concatenate([jnp.broadcast_to(prefix_valid[:, None], (B, T, prefix_valid.shape[1])), mask], -1)
    scores = scores.reshape(B, KV, G, T, -1) * np.float32(hd**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, np.float32(-1e30))
    probs = jax.nn.softmax(scores, axis=-1).reshape(B, KV, G * T, -1).astype(v.dtype)
    if prefix is None:
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    else:
        width = prefix[0].shape[2]
        out = jnp.einsum("bkqs,bksd->bkqd", probs[..., width:], v)
        out = out + _grouped(prefix[1], probs[..., :width], "pkqs,pksd->pkqd", None)
    return out.reshape(B, KV, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def _grouped(shared: jax.Array, per_row: jax.Array, spec: str, preferred_element_type: Any) -> jax.Array:
    """``einsum(spec)`` of per-row operands [B, KV, Q, n] with the operand [P, KV, m, k] their group of B / P rows
    shares: the group's rows merged into one axis of (B / P) Q rows, one contraction per (prefix, KV head), the result
    back as [B, KV, Q, out]."""
    B, KV, Q, n = per_row.shape
    P = shared.shape[0]
    group = per_row.reshape(P, B // P, KV, Q, n).transpose(0, 2, 1, 3, 4).reshape(P, KV, B // P * Q, n)
    out = jnp.einsum(spec, group, shared, preferred_element_type=preferred_element_type)
    return out.reshape(P, KV, B // P, Q, -1).transpose(0, 2, 1, 3, 4).reshape(B, KV, Q, -1)


CAUSAL_BLOCKS = 4
"""Query blocks of :func:`causal_attention`: of 2, 4, 8 and 16 blocks, 4 gave the fastest forward+backward on
XLA:CPU at 4 x 128 and 1 x 512 SmolLM2 shapes (more blocks: more, smaller contractions)."""
MIN_BLOCK_ROWS = 16
"""Fewer queries per block than this and :func:`causal_attention` runs :func:`attention` whole."""


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """:func:`attention` when the keys are the queries' own T tokens in order and ``mask`` never lets query t see a
    key s > t (a forward without a cache: training and scoring): the same maths, on the queries in
    :data:`CAUSAL_BLOCKS` blocks, each against the keys up to its last query only.

    The blocks skip the masked upper triangle: the two contractions cost (n + 1) / 2n of the whole product for n
    blocks (5/8 for 4). A query row with no allowed key still gets a finite, meaningless output (a uniform average of
    the keys its block reads rather than of all T). Shapes as :func:`attention`, with S = T.
    """
    T = q.shape[1]
    size = -(-T // CAUSAL_BLOCKS)
    if size < MIN_BLOCK_ROWS:
        return attention(q, k, v, mask)
    spans = [(start, min(start + size, T)) for start in range(0, T, size)]
    blocks = [attention(q[:, a:b], k[:, :, :b], v[:, :, :b], mask[:, a:b, :b]) for a, b in spans]
    return jnp.concatenate(blocks, axis=1)


ATTENTION_KERNELS = ("mojax", "xla", "cudnn")
"""How a forward without a cache (training, scoring) runs attention. ``"mojax"``: :func:`causal_attention`, query
blocks that skip the masked future, for any mask. ``"xla"`` and ``"cudnn"``: :func:`fused_causal_attention` through
``jax.nn.dot_product_attention``, with XLA's implementation (the whole [T, T] score matrix) or cuDNN's fused
flash-attention kernel, which never writes the scores to memory (NVIDIA GPUs, bfloat16 or float16 compute, head
dimension a multiple of 8 up to 256). A forward with a cache (prefill, decode) always runs :func:`attention`."""


def fused_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, implementation: str
) -> jax.Array:
    """:func:`causal_attention` under ``causal_mask(valid, arange(T))`` through ``jax.nn.dot_product_attention``
    (``implementation``: ``"xla"`` or ``"cudnn"``), for rows whose real tokens are contiguous: left and right padding
    only, the layout of the trainers' prompts and completions.

    The fused kernels know the causal mask and right padding only (query and key lengths l_b). Each row b is
    therefore rotated left by its leading pads s_b, which puts its l_b real tokens first: rotated query i < l_b
    attends to rotated keys j <= i, the real tokens s_b .. s_b + i of the row, as the mask says. The output is
    rotated back. Shapes as :func:`attention` with S = T; ``valid`` bool[B, T]. A pad query's output is finite and
    meaningless, as in :func:`attention`. A row whose real tokens are not contiguous comes out NaN, never silently
    wrong (the rotation would let its queries attend across the gap).
    """
    T = valid.shape[1]
    starts = jnp.argmax(valid, axis=1).astype(jnp.int32)
    lengths = jnp.maximum(valid.sum(axis=1, dtype=jnp.int32), 1)
    rises = valid[:, 0].astype(jnp.int32) + jnp.sum(valid[:, 1:] & ~valid[:, :-1], axis=1, dtype=jnp.int32)
    slots = jnp.arange(T, dtype=jnp.int32)

    def rotated(a: jax.Array, shift: jax.Array) -> jax.Array:
        return jnp.take_along_axis(a, ((slots[None] + shift[:, None]) % T)[:, :, None, None], axis=1)

    heads_last = lambda a: rotated(jnp.swapaxes(a, 1, 2), starts)  # noqa: E731 ([B, KV, T, hd] -> [B, T, KV, hd])
    out = jax.nn.dot_product_attention(
        rotated(q, starts),
        heads_last(k),
        heads_last(v),
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return jnp.where((rises <= 1)[:, None, None, None], rotated(out, -starts), jnp.nan)


def check_attention_kernel(kernel: str, config: ModelConfig) -> None:
    """ValueError unless ``kernel`` is one of :data:`ATTENTION_KERNELS` and, for ``"cudnn"``, the model and this
    process can run cuDNN's fused attention (a GPU backend, bfloat16 or float16 compute, a head dimension that is a
    multiple of 8 up to 256)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel is {kernel!r}; expected one of {ATTENTION_KERNELS}")
    if kernel != "cudnn":
        return
    problems = []
    if jax.default_backend() != "gpu":
        problems.append(f"it runs on NVIDIA GPUs only, and this process's default backend is {jax.default_backend()}")
    if jnp.dtype(config.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        problems.append(f"it needs a bfloat16 or float16 compute dtype, and the model computes in {config.dtype}")
    if config.head_dim % 8 or config.head_dim > 256:
        problems.append(
            f"it needs a head dimension that is a multiple of 8 up to 256, and the model's is {config.head_dim}"
        )
    if problems:
        raise ValueError("attention_kernel='cudnn' cannot run here: " + "; ".join(problems) + ". Use 'mojax' or 'xla'")


def default_positions(attention_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """``offset + cumsum(mask) - 1`` clipped at 0: i32[B, T]."""
    m = attention_mask.astype(jnp.int32)
    pos = jnp.cumsum(m, axis=-1) - 1
    if not isinstance(offset, int) or offset:
        pos = pos + jnp.asarray(offset, jnp.int32).reshape(-1, 1)
    return jnp.maximum(pos, 0).astype(jnp.int32)


# --------------------------------------------------------------------------- KV cache
@struct.dataclass
class SharedPrefix:
    """Keys and values that consecutive groups of a cache's rows share: a prompt prefilled once for its G completions.

    keys, values: [L, P, KV, W, hd] (or tuples of L arrays [P, KV, W, hd], :meth:`KVCache.per_layer`) for P
    prefixes of W slots; valid: bool[P, W]. Cache row b reads prefix b // G, G = the cache's rows / P. Every valid
    prefix slot lies before the cache's own slots, so every query may attend to it.
    """

    keys: jax.Array | tuple[jax.Array, ...]
    values: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array

    def rows_valid(self, batch: int) -> jax.Array:
        """bool[batch, W]: each cache row's prefix slots (row b reads prefix b // G)."""
        return jnp.repeat(self.valid, batch // self.valid.shape[0], axis=0)


@struct.dataclass
class KVCache:
    """Preallocated per-layer keys/values plus slot validity.

    keys, values: [L, B, KV, S, hd] (compute dtype by default), or after :meth:`per_layer` tuples of L arrays
    [B, KV, S, hd]; valid: bool[B, S] (slot holds a real token); index: i32 scalar, the slot where the next call
    writes its first new token. The slots sit next to the head dimension, the layout the attention contractions
    read (a batch of [S, hd] matrices per row and KV head): with slots before heads XLA:CPU re-lays every layer's
    cache out for its attention at each decode step (``benchmarks/RESULTS.md``).

    ``prefix``: keys and values shared by groups of rows, read in place of a copy per row (:class:`SharedPrefix`;
    ``generate``'s completions of one prompt); the slots above then hold each row's own tokens only.
    """

    keys: jax.Array | tuple[jax.Array, ...]
    values: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array
    prefix: SharedPrefix | None = None

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def is_per_layer(self) -> bool:
        """True when keys and values are tuples of per-layer arrays (:meth:`per_layer`)."""
        return isinstance(self.keys, tuple)

    def per_layer(self) -> KVCache:
        """This cache with keys and values split into one array per layer, for decode loops.

        The layer scan reads a layer's slice of the stacked arrays, and inside a decode loop XLA:CPU copies
        every slice it reads at every step; separate arrays are read and updated in place
        (:func:`decode_layers`).
        """
        if self.is_per_layer:
            return self
        split = lambda a: tuple(a[i] for i in range(a.shape[0]))  # noqa: E731
        prefix = self.prefix and self.prefix.replace(keys=split(self.prefix.keys), values=split(self.prefix.values))
        return self.replace(keys=split(self.keys), values=split(self.values), prefix=prefix)

    def stacked(self) -> KVCache:
        """This cache with keys and values as [L, B, KV, S, hd] arrays (what the layer scan reads)."""
        if not self.is_per_layer:
            return self
        prefix = self.prefix and self.prefix.replace(
            keys=jnp.stack(self.prefix.keys), values=jnp.stack(self.prefix.values)
        )
        return self.replace(keys=jnp.stack(self.keys), values=jnp.stack(self.values), prefix=prefix)

    @property
    def lengths(self) -> jax.Array:
        """i32[B]: number of valid (real-token) slots per row, its prefix's included, i.e. the next position id."""
        own = jnp.sum(self.valid.astype(jnp.int32), axis=-1)
        if self.prefix is None:
            return own
        return own + jnp.sum(self.prefix.rows_valid(self.batch_size).astype(jnp.int32), axis=-1)


def init_kv_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    dtype = config.dtype if dtype is None else jnp.dtype(dtype)
    shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch_size, max_length), jnp.bool_),
        index=jnp.zeros((), jnp.int32),
    )


# --------------------------------------------------------------------------- layer maths
class Projection(NamedTuple):
    """One linear map of a decoder layer, as arrays (a pytree; absent parts are None).

    ``kernel`` [*in, *out] (e.g. q_proj [D, H, hd], o_proj [H, hd, D]), or the same kernel transposed as an
    :class:`OutputMajor`; ``bias`` [*out]; ``lora_a`` [*in, r] and ``lora_b`` [r, *out]: the low-rank adapter of
    :mod:`mojax.models.lora`. With a leading ``layers`` axis on every part when the weights are stacked.
    """

    kernel: jax.Array | OutputMajor
    bias: jax.Array | None = None
    lora_a: jax.Array | None = None
    lora_b: jax.Array | None = None


class OutputMajor(NamedTuple):
    """A projection kernel stored output-major, [*out, *in] (the transpose of the [*in, *out] kernel), which
    :func:`project` multiplies by the activations' columns (:func:`mojax._numerics.columns_matmul`): faster for the
    few rows of a decode step on XLA:CPU. Made once before a decode loop (:meth:`LlamaDecoderLayers.per_layer_weights`).
    """

    array: jax.Array


def output_major(kernel: jax.Array, input_dims: int) -> OutputMajor:
    """One layer's [*in, *out] kernel, with ``input_dims`` input axes, as an :class:`OutputMajor` [*out, *in]."""
    return OutputMajor(jnp.transpose(kernel, (*range(input_dims, kernel.ndim), *range(input_dims))))


class LayerWeights(NamedTuple):
    """The weights of one decoder layer (or of all of them, stacked), named as in HF ``LlamaDecoderLayer``."""

    input_layernorm: jax.Array
    q_proj: Projection
    k_proj: Projection
    v_proj: Projection
    o_proj: Projection
    post_attention_layernorm: jax.Array
    gate_proj: Projection
    up_proj: Projection
    down_proj: Projection


INPUT_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}
"""Projection name -> number of leading kernel dims it contracts (o_proj reads [H, hd])."""


def output_major_kernels(w: LayerWeights) -> LayerWeights:
    """One layer's weights with every projection kernel :func:`output_major` (biases and adapters unchanged)."""
    return w._replace(
        **{
            name: getattr(w, name)._replace(kernel=output_major(getattr(w, name).kernel, dims))
            for name, dims in INPUT_DIMS.items()
        }
    )


class LoraCall(NamedTuple):
    """How adapters run in one call: ``scaling`` = alpha / r, dropout ``rate``, and a PRNG ``key`` (None: no dropout)."""

    scaling: float = 1.0
    rate: float = 0.0
    key: jax.Array | None = None


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of ``x`` with drop probability ``rate``; the identity when ``key`` is None or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def project(x: jax.Array, weights: Projection, input_dims: int, lora: LoraCall, salt: int) -> jax.Array:
    """``x @ kernel + bias + scaling * dropout(x) @ lora_a @ lora_b``, contracting the last ``input_dims`` of x.

    ``salt`` makes the dropout mask of each projection of a layer its own (PEFT: one dropout per module).

    Every matmul runs on the tokens flattened to rows, [tokens, in] x [in, out] (:func:`token_rows`).
    """
    y = _matmul(x, weights.kernel, input_dims)
    if weights.bias is not None:
        y = y + weights.bias
    if weights.lora_a is not None:
        key = None if lora.key is None else jax.random.fold_in(lora.key, salt)
        low = _matmul(dropout(x, lora.rate, key), weights.lora_a, input_dims)
        y = y + jnp.asarray(lora.scaling, y.dtype) * _matmul(low, weights.lora_b, 1)
    return y


def _matmul(x: jax.Array, kernel: jax.Array | OutputMajor, input_dims: int) -> jax.Array:
    """``tensordot(x, kernel, input_dims)`` as one matmul of :func:`token_rows` by the kernel's input axes merged
    into rows (free reshapes), shaped back to [*lead, *out]; an :class:`OutputMajor` kernel by the rows' columns."""
    rows = token_rows(x, input_dims)
    if isinstance(kernel, OutputMajor):
        y, out_shape = columns_matmul(rows, token_rows(kernel.array, input_dims)), kernel.array.shape[:-input_dims]
    else:
        y, out_shape = rows @ token_rows(kernel, kernel.ndim - input_dims), kernel.shape[input_dims:]
    return y.reshape(*x.shape[: x.ndim - input_dims], *out_shape)


class AttentionInputs(NamedTuple):
    """What every layer needs besides its weights: mask bool[B, T, S], RoPE cos/sin [B, T, hd],
    with a cache the slot ``index`` i32[] where the T new keys are written (None without a cache), and the attention
    ``kernel`` of a forward without a cache (:data:`ATTENTION_KERNELS`)."""

    mask: jax.Array
    cos: jax.Array
    sin: jax.Array
    index: jax.Array | None
    kernel: str = "mojax"


def key_slots(attention_mask: jax.Array, cache: KVCache | None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(valid bool[B, S], query slots i32[T], write index or None) for T new tokens.

    Without a cache the keys are the new tokens themselves (S = T); with one, the new tokens are
    written at ``cache.index`` and the keys are all S cache slots.
    """
    T = attention_mask.shape[1]
    if cache is None:
        return attention_mask, jnp.arange(T, dtype=jnp.int32), None
    index = jnp.asarray(cache.index, jnp.int32)
    valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
    return valid, index + jnp.arange(T, dtype=jnp.int32), index


def causal_mask(valid: jax.Array, query_slots: jax.Array) -> jax.Array:
    """bool[B, T, S]: key slot s holds a real token and is not in the future of query t."""
    slots = jnp.arange(valid.shape[1], dtype=jnp.int32)
    return valid[:, None, :] & (slots[None, None, :] <= query_slots[None, :, None])


def check_cache_fits(cache: KVCache, batch: int, new_tokens: int) -> None:
    """ValueError when the cache's batch differs or ``new_tokens`` do not fit (checked when the index is concrete)."""
    if cache.batch_size != batch:
        raise ValueError(f"cache batch size {cache.batch_size} != input batch size {batch}")
    if cache.prefix is not None and batch % cache.prefix.valid.shape[0]:
        raise ValueError(
            f"a cache of {batch} rows cannot share {cache.prefix.valid.shape[0]} prefixes: expected the rows to be a "
            "multiple of the prefixes (consecutive groups of rows share one)"
        )
    if new_tokens > cache.max_length:
        raise ValueError(f"{new_tokens} new tokens do not fit in a cache of length {cache.max_length}")
    if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + new_tokens > cache.max_length:
        raise ValueError(
            f"cache overflow: writing {new_tokens} tokens at slot {int(cache.index)} of a cache "
            f"of length {cache.max_length}"
        )


def _projector(w: LayerWeights, lora: LoraCall) -> Callable[[str, jax.Array], jax.Array]:
    """``linear(name, x)``: projection ``name`` of layer ``w`` applied to x (with its adapter, if any)."""

    def linear(name: str, x: jax.Array) -> jax.Array:
        return project(x, getattr(w, name), INPUT_DIMS[name], lora, salt=list(INPUT_DIMS).index(name))

    return linear


def attention_inputs(
    w: LayerWeights,
    x: jax.Array,
    inputs: AttentionInputs,
    eps: float,
    lora: LoraCall,
    query_rows: slice = slice(None),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first half of a LLaMA block: (q [B, T, H, hd], k, v [B, KV, T, hd]) of x [B, T, D], RoPE applied.

    Keys and values come out in the KV cache's layout (:class:`KVCache`), heads before time. ``query_rows``: the
    positions that get a query (all by default), for a block whose output is read at those rows only.
    """
    linear = _projector(w, lora)
    h = rms_norm(x, w.input_layernorm, eps)
    q = apply_rope(linear("q_proj", h[:, query_rows]), inputs.cos[:, query_rows], inputs.sin[:, query_rows])
    k = apply_rope(linear("k_proj", h), inputs.cos, inputs.sin)
    heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
    return q, heads_first(k), heads_first(linear("v_proj", h))


def attention_and_mlp(
    w: LayerWeights,
    x: jax.Array,
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    inputs: AttentionInputs,
    eps: float,
    lora: LoraCall,
    prefix: tuple[jax.Array, ...] | None = None,
) -> jax.Array:
    """The second half of a LLaMA block: x + attention(q, keys, values), then x + MLP(norm(x)). Without a cache
    (``inputs.index`` None) the keys are the queries' own tokens, and attention skips the masked future
    (:func:`causal_attention`, or :func:`fused_causal_attention` as ``inputs.kernel`` says). ``prefix``: this
    layer's shared keys and values and each row's valid prefix slots (:func:`attention`), read in the compute dtype as
    the keys and values are."""
    if inputs.index is None and inputs.kernel != "mojax":
        # the last query may attend to every real key: its mask row is the rows' real tokens
        attended = fused_causal_attention(q, keys, values, inputs.mask[:, -1], inputs.kernel)
    elif inputs.index is None:
        attended = causal_attention(q, keys, values, inputs.mask)
    else:
        if prefix is not None:
            prefix = (prefix[0].astype(x.dtype), prefix[1].astype(x.dtype), prefix[2])
        attended = attention(q, keys, values, inputs.mask, prefix)
    return output_and_mlp(w, x, attended, eps, lora)


def output_and_mlp(w: LayerWeights, x: jax.Array, attended: jax.Array, eps: float, lora: LoraCall) -> jax.Array:
    """The rest of a LLaMA block after attention: x + o_proj(attended), then x + MLP(norm(x)); row by row."""
    linear = _projector(w, lora)
    x = x + linear("o_proj", attended)
    h = rms_norm(x, w.post_attention_layernorm, eps)
    return x + linear("down_proj", jax.nn.silu(linear("gate_proj", h)) * linear("up_proj", h))


def decoder_layer(
    w: LayerWeights,
    x: jax.Array,
    inputs: AttentionInputs,
    past: tuple[jax.Array, jax.Array] | None,
    eps: float,
    lora: LoraCall,
    prefix: tuple[jax.Array, ...] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One LLaMA block on x [B, T, D] (weights already in the compute dtype).

    ``past``: this layer's cached keys/values [B, KV, S, hd], or None without a cache; ``prefix``: the cache's shared
    prefix at this layer (:func:`attention`).
    Returns (x, (k_new, v_new)) with k/v [B, KV, T, hd] the new tokens' keys and values.
    """
    x = constrain(x, ("batch", None, None))
    q, k, v = attention_inputs(w, x, inputs, eps, lora)
    if past is None:
        k_all, v_all = k, v
    else:
        start = (0, 0, inputs.index, 0)
        k_all = jax.lax.dynamic_update_slice(past[0], k.astype(past[0].dtype), start).astype(x.dtype)
        v_all = jax.lax.dynamic_update_slice(past[1], v.astype(past[1].dtype), start).astype(x.dtype)
    x = attention_and_mlp(w, x, q, k_all, v_all, inputs, eps, lora, prefix)
    return constrain(x, ("batch", None, None)), (k, v)


def decoder_layer_at_rows(
    w: LayerWeights, x: jax.Array, inputs: AttentionInputs, eps: float, lora: LoraCall, rows: slice
) -> jax.Array:
    """``decoder_layer(w, x, inputs, None, eps, lora)[0][:, rows]`` (no cache) for a final block whose output is read
    at positions ``rows`` only, as the trainers read the responses' hidden states: every position's keys and values,
    but the queries, the output projection and the MLP at ``rows`` only. Its attention is :func:`attention` with the
    mask's rows (the query blocks and the fused kernels assume queries at every key's position)."""
    x = constrain(x, ("batch", None, None))
    q, k, v = attention_inputs(w, x, inputs, eps, lora, query_rows=rows)
    attended = attention(q, k, v, inputs.mask[:, rows])
    return constrain(output_and_mlp(w, x[:, rows], attended, eps, lora), ("batch", None, None))


REMAT_POLICIES = ("dots", "full", "none")
"""What a decoder layer keeps for the backward pass: its matmul outputs, nothing, or every intermediate."""


def remat_policy(remat: bool | str) -> str:
    """``remat`` as one of :data:`REMAT_POLICIES` (True is ``"full"``, False ``"none"``); ValueError otherwise."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat is {remat!r}; expected True, False or one of {REMAT_POLICIES}")
    return remat


def checkpointed(layer: Callable, remat: bool | str) -> Callable:
    """``layer`` with the rematerialisation policy ``remat`` applied to its backward pass.

    * ``"dots"``: keep the outputs of the weight matmuls (``dots_with_no_batch_dims_saveable``) and
      recompute the cheap rest (norms, RoPE, attention scores, SiLU) in the backward pass. On XLA:CPU this is
      also the fastest: the stacked residuals of every elementwise op cost more to write, zero and read back
      than recomputing them (``benchmarks/model_real.py --variants``).
    * ``"full"``: keep only the layer's input (``jax.checkpoint``): least memory, one more forward.
    * ``"none"``: keep every intermediate (plain autodiff).

    The forward values are the same under every policy; the gradients agree to float rounding.
    """
    policy = remat_policy(remat)
    if policy == "none":
        return layer
    if policy == "full":
        return jax.checkpoint(layer)
    return jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def run_layers(
    stacked: LayerWeights,
    x: jax.Array,
    inputs: AttentionInputs,
    past: tuple[jax.Array, jax.Array] | None,
    eps: float,
    lora: LoraCall,
    keys: jax.Array | None,
    remat: bool | str,
    last: LayerWeights | None = None,
    prefix: SharedPrefix | None = None,
    rows: slice | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """``jax.lax.scan`` of :func:`decoder_layer` over stacked weights [L, ...], cache slices [L, B, KV, S, hd]
    and dropout keys [L].

    Each layer's weights are cast to x's dtype (the compute dtype) inside the scan body, one layer at a time: a cast
    of the whole stack ahead of the scan would hold a compute-dtype copy of every layer's weights (and, in the
    backward pass, the stacked gradient in that dtype before its cast back), about 2 GiB more per device in the
    planned LLaMA-70B step on 64 devices (``benchmarks/plan_memory.py``).

    One scan body serves every case: without a cache ``past`` is None, without dropout ``keys`` is
    None, and the scan carries those empty pytrees through. ``remat`` picks the body's checkpoint policy
    (:func:`checkpointed`). ``last``: probe mode's final block [1, ...], apart from ``stacked`` [L-1, ...]
    (:func:`split_last_layer`); it runs on its own after the scan, with ``past`` and ``keys`` cut the same way: the
    same maths as one scan over all L blocks. ``prefix``: the cache's shared prefix (:class:`SharedPrefix`, stacked),
    its keys and values scanned with the layers.
    Returns (x, (k_new, v_new)) with k/v [L, B, KV, T, hd].

    ``rows`` (no cache): only x's positions ``rows`` are wanted. With ``last`` the final block then computes its
    queries, output projection and MLP at those rows only (:func:`decoder_layer_at_rows`), which its backward pass
    (probe mode's n pullbacks) pays for too; without it x is sliced after the scan. Returns (x [B, len(rows), D],
    None).
    """

    prefix_valid = None if prefix is None else prefix.rows_valid(x.shape[0])
    shared = None if prefix is None else (prefix.keys, prefix.values)

    def in_compute_dtype(w, x):
        return jax.tree.map(lambda a: a.astype(x.dtype), w)

    def layer(w, x, layer_past, key, layer_shared):
        layer_prefix = None if layer_shared is None else (*layer_shared, prefix_valid)
        return decoder_layer(in_compute_dtype(w, x), x, inputs, layer_past, eps, lora._replace(key=key), layer_prefix)

    def layer_at_rows(w, x, key):
        return decoder_layer_at_rows(in_compute_dtype(w, x), x, inputs, eps, lora._replace(key=key), rows)

    layer = checkpointed(layer, remat)
    body = lambda x, xs: layer(xs[0], x, *xs[1:])  # noqa: E731
    if last is None:
        x, new = jax.lax.scan(body, x, (stacked, past, keys, shared))
        return (x, new) if rows is None else (x[:, rows], None)
    first = lambda tree: jax.tree.map(lambda a: a[:-1], tree)  # noqa: E731 (None stays None)
    final = lambda tree: jax.tree.map(lambda a: a[-1], tree)  # noqa: E731
    x, new = jax.lax.scan(body, x, (stacked, first(past), first(keys), first(shared)))
    if rows is not None:
        return checkpointed(layer_at_rows, remat)(final(last), x, final(keys)), None
    x, last_new = layer(final(last), x, final(past), final(keys), final(shared))
    return x, jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), new, last_new)


def decode_layers(
    per_layer: Sequence[LayerWeights],
    x: jax.Array,
    inputs: AttentionInputs,
    cache: tuple[Sequence[jax.Array], Sequence[jax.Array]],
    eps: float,
    lora: LoraCall,
    prefix: SharedPrefix | None = None,
) -> tuple[jax.Array, tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]]:
    """The decoder layers as a Python loop over weights and cache arrays already split per layer.

    For inference with a KV cache (no dropout, no remat). Inside a decode loop, the layer scan of :func:`run_layers`
    slices every layer's weights out of the stacked arrays at each step, and XLA:CPU materialises each slice: a copy
    of all weights per generated token, which triples the memory traffic of a memory-bound step. Weights split once
    before the loop (:meth:`LlamaDecoderLayers.per_layer_weights`) and a cache split once (:meth:`KVCache.per_layer`:
    keys and values [B, KV, S, hd] per layer) are read in place, and each layer writes its new keys and values into
    its own cache arrays in place. ``prefix``: keys and values shared by groups of rows, split per layer too
    (:class:`SharedPrefix`), read in place.
    Returns (x, (keys, values)): the updated per-layer cache arrays.
    """
    keys, values = list(cache[0]), list(cache[1])
    prefix_valid = None if prefix is None else prefix.rows_valid(x.shape[0])
    for i, w in enumerate(per_layer):
        x = constrain(x, ("batch", None, None))
        q, k, v = attention_inputs(w, x, inputs, eps, lora)
        start = (0, 0, inputs.index, 0)
        keys[i] = jax.lax.dynamic_update_slice(keys[i], k.astype(keys[i].dtype), start)
        values[i] = jax.lax.dynamic_update_slice(values[i], v.astype(values[i].dtype), start)
        shared = None
        if prefix is not None:
            shared = (prefix.keys[i], prefix.values[i], prefix_valid)
        x = attention_and_mlp(w, x, q, keys[i].astype(x.dtype), values[i].astype(x.dtype), inputs, eps, lora, shared)
    return constrain(x, ("batch", None, None)), (tuple(keys), tuple(values))


# --------------------------------------------------------------------------- modules
class _Linear(nnx.Module):
    """A kernel and, when ``bias_names`` is given, a zero-initialised bias (HF ``nn.Linear`` init)."""

    def __init__(self, shape, names, *, dtype, rngs: nnx.Rngs, bias_shape=None, bias_names=None):
        self.kernel = param_variable(rngs, shape, names, dtype)
        if bias_names is not None:
            self.bias = param_variable(rngs, bias_shape, bias_names, dtype, init=nnx.initializers.zeros)

    def weights(self, adapters: bool) -> Projection:
        """The arrays of this projection; the LoRA factors only when present and ``adapters``."""
        read = lambda name: getattr(self, name)[...] if hasattr(self, name) else None  # noqa: E731
        with_lora = adapters and hasattr(self, "lora_a")
        return Projection(
            kernel=self.kernel[...],
            bias=read("bias"),
            lora_a=read("lora_a") if with_lora else None,
            lora_b=read("lora_b") if with_lora else None,
        )


class _Scale(nnx.Module):
    def __init__(self, shape, names, *, dtype, rngs: nnx.Rngs):
        self.scale = param_variable(rngs, shape, names, dtype, init=nnx.initializers.ones)


class _Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = param_variable(rngs, (vocab, dim), ("vocab", "embed"), dtype)


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

        def heads(n, name):
            bias = dict(bias_shape=(L, n, hd), bias_names=("layers", name, "head_dim")) if c.qkv_bias else {}
            return _Linear((L, D, n, hd), ("layers", "embed", name, "head_dim"), dtype=pd, rngs=rngs, **bias)

        self.q_proj = heads(H, "heads")
        self.k_proj = heads(KV, "kv_heads")
        self.v_proj = heads(KV, "kv_heads")
        o_bias = dict(bias_shape=(L, D), bias_names=("layers", "embed")) if c.o_bias else {}
        self.o_proj = _Linear((L, H, hd, D), ("layers", "heads", "head_dim", "embed"), dtype=pd, rngs=rngs, **o_bias)


class LlamaMLPWeights(nnx.Module):
    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        L, D, F, pd = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.param_dtype
        self.gate_proj = _Linear((L, D, F), ("layers", "embed", "mlp"), dtype=pd, rngs=rngs)
        self.up_proj = _Linear((L, D, F), ("layers", "embed", "mlp"), dtype=pd, rngs=rngs)
        self.down_proj = _Linear((L, F, D), ("layers", "mlp", "embed"), dtype=pd, rngs=rngs)


class LlamaDecoderLayers(nnx.Module):
    """All decoder layers, stacked on a leading "layers" axis and run with ``jax.lax.scan``.

    ``lora`` (static) holds the adapter hyper-parameters (a :class:`mojax.models.lora.LoraConfig`)
    once :func:`mojax.models.lora.add_lora` has added adapters, None before.
    """

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        L, D, pd = c.num_hidden_layers, c.hidden_size, c.param_dtype
        self.input_layernorm = _Scale((L, D), ("layers", "norm"), dtype=pd, rngs=rngs)
        self.self_attn = LlamaAttentionWeights(c, rngs=rngs)
        self.post_attention_layernorm = _Scale((L, D), ("layers", "norm"), dtype=pd, rngs=rngs)
        self.mlp = LlamaMLPWeights(c, rngs=rngs)
        self.lora = None

    def projections(self) -> dict[str, _Linear]:
        """Projection name (HF) -> its module."""
        a, m = self.self_attn, self.mlp
        return {
            "q_proj": a.q_proj,
            "k_proj": a.k_proj,
            "v_proj": a.v_proj,
            "o_proj": a.o_proj,
            "gate_proj": m.gate_proj,
            "up_proj": m.up_proj,
            "down_proj": m.down_proj,
        }

    def weights(self, adapters: bool = True) -> LayerWeights:
        """The stacked arrays [L, ...] as a :class:`LayerWeights` (adapters left out unless ``adapters``)."""
        return LayerWeights(
            input_layernorm=self.input_layernorm.scale[...],
            post_attention_layernorm=self.post_attention_layernorm.scale[...],
            **{name: module.weights(adapters) for name, module in self.projections().items()},
        )

    def per_layer_weights(self, dtype: Any, adapters: bool = True, columns: bool = False) -> tuple[LayerWeights, ...]:
        """The weights of each layer on its own, in the compute ``dtype``, for :func:`decode_layers`; with
        ``columns``, every projection kernel :func:`output_major` (for the few rows of decode steps on XLA:CPU)."""
        stacked = jax.tree.map(lambda a: a.astype(dtype), self.weights(adapters))
        layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.input_layernorm.scale.shape[0])]
        return tuple(map(output_major_kernels, layers)) if columns else tuple(layers)

    def lora_call(self, adapters: bool) -> LoraCall:
        """The adapters' scaling and dropout rate for one call (no adapter maths unless ``adapters``)."""
        if self.lora is None or not adapters:
            return LoraCall()
        return LoraCall(scaling=self.lora.scaling, rate=self.lora.dropout)


class LlamaModel(nnx.Module):
    """Embedding + stacked decoder layers + final norm (HF ``LlamaModel``).

    ``last_layer`` is None, except in the probe-mode representation built by :func:`apply_split`:
    then ``layers`` holds the first L - 1 blocks and ``last_layer`` the final one (stacked, [1, ...]),
    which runs after the scan, on its own.

    ``attention_kernel`` (static, one of :data:`ATTENTION_KERNELS`): how a forward without a cache runs attention;
    checked at every call (:func:`check_attention_kernel`), so it may be changed with
    ``model.set_attributes(attention_kernel=...)`` on any module that holds this one.
    """

    def __init__(
        self, config: ModelConfig, *, remat: bool | str = "dots", attention_kernel: str = "mojax", rngs: nnx.Rngs
    ):
        self.config = config
        self.remat = remat_policy(remat)
        self.attention_kernel = attention_kernel
        self.embed_tokens = _Embed(config.vocab_size, config.hidden_size, dtype=config.param_dtype, rngs=rngs)
        self.layers = LlamaDecoderLayers(config, rngs=rngs)
        self.norm = _Scale((config.hidden_size,), ("norm",), dtype=config.param_dtype, rngs=rngs)
        self.last_layer = None

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        adapters: bool = True,
        dropout_rng: jax.Array | None = None,
        layer_weights: Sequence[LayerWeights] | None = None,
        input_embeddings: jax.Array | None = None,
        output_rows: slice | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, D] and the updated cache.

        ``layer_weights``: the decoder layers' weights from :meth:`LlamaDecoderLayers.per_layer_weights` (made once,
        outside a decode loop), run unrolled (:func:`decode_layers`) instead of the layer scan; only with a cache
        (inference), which is then used and returned split per layer (:meth:`KVCache.per_layer`; pass it split to
        avoid slicing it at every call). Without ``layer_weights`` the cache is used and returned stacked.

        ``input_embeddings`` [B, T, D]: the layers' input in place of the embedding table's rows at ``input_ids``
        (which still give the shape), as Hugging Face's ``inputs_embeds``; differentiated as an input of its own, its
        cotangent is the input part of the embedding's gradient before the scatter onto the table's rows.

        ``output_rows`` (a static slice of positions; no cache): the hidden states at those positions only,
        [B, len(rows), D]. With the final block apart (``last_layer``, probe mode) it computes its queries, output
        projection and MLP at those rows only, in the forward pass and in every backward pass through it
        (:func:`run_layers`): the trainers read the responses' rows, a fraction of prompt + response.
        """
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
        if cache is not None:
            check_cache_fits(cache, B, T)
        if output_rows is not None and (cache is not None or not isinstance(output_rows, slice)):
            raise ValueError(
                f"output_rows must be a slice of positions and needs a forward without a cache; got {output_rows!r} "
                f"and {'a' if cache is not None else 'no'} cache"
            )
        if layer_weights is not None and (cache is None or len(layer_weights) != c.num_hidden_layers):
            raise ValueError(
                f"layer_weights (per-layer weights for decoding) need a KV cache and {c.num_hidden_layers} layers; got "
                f"{len(layer_weights)} layers and {'a' if cache is not None else 'no'} cache"
            )
        valid, query_slots, index = key_slots(attention_mask, cache)
        if positions is None:
            positions = default_positions(attention_mask, 0 if cache is None else cache.lengths)
        cos, sin = rope_cos_sin(jnp.asarray(positions, jnp.int32), rope_inv_freq(c), dtype)
        check_attention_kernel(self.attention_kernel, c)
        inputs = AttentionInputs(causal_mask(valid, query_slots), cos, sin, index, self.attention_kernel)

        lora = self.layers.lora_call(adapters)
        dropout_keys = None
        if dropout_rng is not None and lora.rate != 0.0:
            dropout_keys = jax.random.split(dropout_rng, c.num_hidden_layers)
        if cache is not None:
            cache = cache.per_layer() if layer_weights is not None else cache.stacked()
        past = None if cache is None else (cache.keys, cache.values)
        if input_embeddings is None:
            input_embeddings = jnp.take(self.embed_tokens.embedding[...], input_ids, axis=0)
        elif input_embeddings.shape != (B, T, c.hidden_size):
            raise ValueError(
                f"input_embeddings shape {input_embeddings.shape} != (batch, time, hidden_size) {(B, T, c.hidden_size)}"
            )
        x = input_embeddings.astype(dtype)
        if layer_weights is not None:
            x, past = decode_layers(layer_weights, x, inputs, past, c.rms_norm_eps, lora, cache.prefix)
        else:
            last = None if self.last_layer is None else self.last_layer.weights(adapters)
            stacked = self.layers.weights(adapters)
            prefix = None if cache is None else cache.prefix
            x, new = run_layers(
                stacked, x, inputs, past, c.rms_norm_eps, lora, dropout_keys, self.remat, last, prefix, output_rows
            )
            if past is not None:
                start = (0, 0, 0, index, 0)
                past = tuple(
                    jax.lax.dynamic_update_slice(p, n.astype(p.dtype), start) for p, n in zip(past, new, strict=True)
                )
        x = rms_norm(x, self.norm.scale[...].astype(dtype), c.rms_norm_eps)
        if cache is not None:
            cache = KVCache(keys=past[0], values=past[1], valid=valid, index=index + T, prefix=cache.prefix)
        return x, cache


class LlamaForCausalLM(nnx.Module):
    """HF-compatible LLaMA causal LM. ``model(input_ids, ...) -> (logits f32[B, T, V], cache)``."""

    def __init__(self, config: ModelConfig, *, remat: bool | str = "dots", rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, remat=remat, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _Linear(
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
        adapters: bool = True,
        dropout_rng: jax.Array | None = None,
        layer_weights: Sequence[LayerWeights] | None = None,
        input_embeddings: jax.Array | None = None,
        output_rows: slice | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, D] (compute dtype) and the updated cache (see :class:`LlamaModel`)."""
        return self.model(
            input_ids,
            positions=positions,
            attention_mask=attention_mask,
            cache=cache,
            adapters=adapters,
            dropout_rng=dropout_rng,
            layer_weights=layer_weights,
            input_embeddings=input_embeddings,
            output_rows=output_rows,
        )

    def per_layer_weights(self, adapters: bool = True, columns: bool | None = None) -> tuple[LayerWeights, ...]:
        """Each decoder layer's weights on its own, for the ``layer_weights`` of :meth:`hidden_states` (the final block
        from ``last_layer`` in probe mode's split representation). ``columns``: projection kernels output-major
        (:class:`OutputMajor`), the faster layout for decode steps on XLA:CPU; None: where
        :func:`~mojax._numerics.transposed_copies_pay_off`."""
        columns = transposed_copies_pay_off() if columns is None else columns
        layers = self.model.layers.per_layer_weights(self.config.dtype, adapters, columns)
        if self.model.last_layer is None:
            return layers
        return layers + self.model.last_layer.per_layer_weights(self.config.dtype, adapters, columns)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on hidden states: fp32 logits [..., V].

        A tied head ([V, D], output-major already) multiplies the columns of at most
        :data:`~mojax._numerics.COLUMNS_MAX_ROWS` token rows on a CPU backend (decode steps;
        :func:`~mojax._numerics.columns_matmul`), more rows as rows.
        """
        hidden = hidden.astype(self.config.dtype)
        if not self.config.tie_word_embeddings:
            return head_matmul(hidden, self.lm_head.kernel[...])
        w = self.model.embed_tokens.embedding[...].astype(hidden.dtype)  # [V, D]
        rows = token_rows(hidden)
        if transposed_copies_pay_off() and rows.shape[0] <= COLUMNS_MAX_ROWS:
            logits = columns_matmul(rows, w, preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("nd,vd->nv", rows, w, preferred_element_type=jnp.float32)
        return logits.reshape(*hidden.shape[:-1], w.shape[0])

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        adapters: bool = True,
        dropout_rng: jax.Array | None = None,
        layer_weights: Sequence[LayerWeights] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        h, cache = self.hidden_states(
            input_ids,
            positions=positions,
            attention_mask=attention_mask,
            cache=cache,
            adapters=adapters,
            dropout_rng=dropout_rng,
            layer_weights=layer_weights,
        )
        return self.logits(h).astype(jnp.float32), cache


# --------------------------------------------------------------------------- probe-mode split
_LAYERS, _LAST = "layers", "last_layer"


def _raw(tree: Any) -> dict:
    """The nested dict under an ``nnx.State`` (or the mapping itself), so rebuilt trees keep its structure."""
    return tree.raw_mapping if isinstance(tree, nnx.State) else tree


def _trunk(state: Any, where: str) -> dict:
    """The ``model`` sub-tree (the LlamaModel trunk) of a causal-LM or head-model state, as a dict."""
    raw = _raw(state)
    if "model" not in raw or _LAYERS not in raw["model"]:
        raise ValueError(f"{where}: `state` has no model.layers; expected the nnx state of a mojax Llama model.")
    return _raw(raw["model"])


def _with_trunk(state: Any, trunk: dict) -> Any:
    """``state`` (same type) with its ``model`` sub-tree replaced by ``trunk``."""
    raw = {**_raw(state), "model": trunk}
    return type(state)(raw) if isinstance(state, nnx.State) else raw


@jax.jit
def split_last_layer(state: nnx.State) -> nnx.State:
    """The state with the final decoder block apart: ``model.layers`` [L-1, ...] and ``model.last_layer`` [1, ...].

    Every stacked layer leaf (kernels, norms, biases, LoRA factors) is cut in two, so a probe mask
    can select the final block alone. This copies the layer weights once (the slices are new
    arrays): do it outside the differentiated function, ideally once, keeping the split state as the
    training representation (optimizer state included) and merging only to sample or export.
    Jitted: every slice of the state in one compiled program (op by op, each leaf shape's two slices
    compiled apart), which JAX's persistent compilation cache can keep.

    Args:
      state: ``nnx.state(model)`` or the ``nnx.Param`` part of ``nnx.split(model, nnx.Param, ...)``
        of a ``LlamaForCausalLM`` (or a head model on the same trunk) with at least one layer.

    Returns:
      A state of the same kind with ``model.layers`` holding the first L-1 blocks and
      ``model.last_layer`` the last one.

    References:
      Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
      arXiv:1810.04650 (MGDA-UB: per-task gradients of the last shared layer only); Li et al.,
      GAPO, arXiv:2507.01915 (its last-layer variant).
    """
    trunk = _trunk(state, "split_last_layer")
    if _LAST in trunk:
        raise ValueError("split_last_layer: `state` already has a model.last_layer; expected an unsplit state.")
    layers = trunk[_LAYERS]
    return _with_trunk(
        state, {**trunk, _LAYERS: jax.tree.map(lambda a: a[:-1], layers), _LAST: jax.tree.map(lambda a: a[-1:], layers)}
    )


@jax.jit
def merge_last_layer(split: nnx.State) -> nnx.State:
    """The inverse of :func:`split_last_layer`: ``model.layers`` and ``model.last_layer`` concatenated back.

    Also turns gradients or optimizer moments of the split parameters into those of the model. Jitted, as
    :func:`split_last_layer` is.

    Args:
      split: a state (or a gradient pytree of the same structure) from :func:`split_last_layer`.

    Returns:
      The state with one stacked ``model.layers`` [L, ...] and no ``model.last_layer``.

    References:
      See :func:`split_last_layer`.
    """
    trunk = _trunk(split, "merge_last_layer")
    if _LAST not in trunk:
        raise ValueError("merge_last_layer: `split` has no model.last_layer; expected a state from split_last_layer.")
    merged = {key: value for key, value in trunk.items() if key != _LAST}
    merged[_LAYERS] = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), trunk[_LAYERS], trunk[_LAST])
    return _with_trunk(split, merged)


def apply_split(
    graphdef: nnx.GraphDef,
    split: nnx.State,
    input_ids: jax.Array,
    *,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    adapters: bool = True,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Logits f32[B, T, V] of a ``LlamaForCausalLM`` from split parameters, equal to the unsplit model's.

    The first L-1 blocks run in the layer scan, then the last block on its own, so under
    ``jax.grad`` / ``jax.vjp`` the final block's parameters are separate leaves (no KV cache here).

    Args:
      graphdef: from ``nnx.split(model)`` or ``nnx.split(model, nnx.Param, ...)`` of the unsplit model
        (a split with more than one state needs every state but the first to be empty).
      split: :func:`split_last_layer` of the model's (Param) state.
      input_ids, positions, attention_mask, adapters, dropout_rng: as ``LlamaForCausalLM.__call__``.

    Returns:
      fp32 logits [B, T, V].

    References:
      See :func:`split_last_layer`.

    Example:
      >>> from flax import nnx
      >>> from mojax.models import LlamaForCausalLM, ModelConfig
      >>> config = ModelConfig.tiny(num_hidden_layers=2, vocab_size=16)
      >>> graphdef, params = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))), nnx.Param)
      >>> split = jax.eval_shape(split_last_layer, params)  # shapes only, for the example
      >>> split["model"]["last_layer"]["mlp"]["up_proj"]["kernel"].shape
      (1, 64, 128)
      >>> jax.eval_shape(lambda split: apply_split(graphdef, split, jnp.ones((1, 3), jnp.int32)), split).shape
      (1, 3, 16)
    """
    logits, _ = merge_split(graphdef, split)(
        input_ids, positions=positions, attention_mask=attention_mask, adapters=adapters, dropout_rng=dropout_rng
    )
    return logits


def merge_split(graphdef: nnx.GraphDef, split: nnx.State) -> Any:
    """The ``LlamaForCausalLM`` of split parameters: the first L-1 blocks stacked, the final one in ``last_layer``.

    Its ``__call__``, ``hidden_states`` and ``per_layer_weights`` equal the unsplit model's, with or without a KV
    cache, so :func:`mojax.models.generate` samples from it directly (no concatenated copy of the layer weights, as
    :func:`merge_last_layer` makes); :func:`apply_split` is its logits. Call it inside the differentiated function,
    so the final block's parameters are separate leaves.

    Args:
      graphdef, split: as :func:`apply_split`.

    Returns:
      The merged model (a new object; ``split`` is not copied).
    """
    trunk = _trunk(split, "merge_split")
    if _LAST not in trunk:
        raise ValueError("merge_split: `split` has no model.last_layer; expected a state from split_last_layer.")
    model = nnx.merge(graphdef, _with_trunk(split, {k: v for k, v in trunk.items() if k != _LAST}))
    model.model.last_layer = nnx.data(nnx.merge(nnx.graphdef(model.model.layers), nnx.State(trunk[_LAST])))
    return model


def default_probe_mask(split: nnx.State) -> Any:
    """Bool pytree over ``split``: the parameters whose per-objective gradients the probe mode takes.

    Without adapters: the last decoder block, the final norm and the LM head (when untied; a
    tied head is the embedding, left out). With LoRA adapters (``nnx.LoRAParam`` leaves, see
    :mod:`mojax.models.lora`): the last block's adapters, so that the probe's n pullbacks run through the last
    block only, as without adapters. In a state without a ``last_layer`` every adapter is selected (the trainer
    leaves one-layer models unsplit); patterns such as ``combiner.probe: [lora_]`` select every layer's adapters.

    Args:
      split: a state from :func:`split_last_layer` (Variables or plain arrays as leaves).

    Returns:
      A pytree with the structure of ``split`` and a bool per array (usable as an optax mask).

    References:
      See :func:`split_last_layer`.
    """
    has_last = _LAST in _trunk(split, "default_probe_mask")
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    has_adapters = any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(split, is_leaf=is_variable))

    def probe(path, leaf) -> Any:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if has_adapters:
            selected = isinstance(leaf, nnx.LoRAParam) and (not has_last or keys[:2] == ("model", _LAST))
        else:
            selected = keys[:2] in (("model", _LAST), ("model", "norm")) or keys[:1] == ("lm_head",)
        return leaf.replace(selected) if is_variable(leaf) else selected

    return jax.tree_util.tree_map_with_path(probe, split, is_leaf=is_variable)
