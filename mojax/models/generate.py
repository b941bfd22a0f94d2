"""Batched autoregressive sampling with a preallocated KV cache: one compile per shape bucket.

``generate`` takes prompts as a ragged Python list of token-id lists or as a left- or
right-padded array, left-aligns them (the layout the cache positions assume), left-pads them to a
bucketed width, prefills the cache once, then runs a ``lax.while_loop`` of single-token decode
steps that stops as soon as every sequence has emitted a stop token: by default the model's eos
ids, plus the chat template's end-of-turn token when a tokenizer is given. Each chosen token
comes with two log-probabilities: under the distribution it was sampled from (temperature, top-k
and top-p applied) and under the unmodified model distribution (softmax of the raw logits), which
is the one PPO ratios and KL penalties need.

Decoding speed. With ``num_generations`` = G each prompt is prefilled once and its KV cache shared by its G rows
(a GRPO rollout's G completions per prompt cost one prefill, not G); the decode steps read each prompt's keys and
values once for its G rows, not once per row (:class:`mojax.models.llama.SharedPrefix`). The single-token steps are
memory-bound: they run the decoder layers unrolled on weights split per layer once before the loop
(:func:`mojax.models.llama.decode_layers`), because inside a layer scan XLA:CPU copies every layer's weights out of
the stacked arrays at every step; with FSDP-sharded weights they keep the scan, which gathers one layer at a time
(``SamplingConfig.layer_loop``).

Sampling speed. Temperature and top-p enter the compiled program as traced scalars, so changing them does not
recompile; only whether decoding is greedy (temperature 0) and whether top-p is on (top_p < 1) are compiled in.
Top-p alone (no top-k) does not sort the vocabulary at every step: it takes the ``top_p_candidates`` largest logits
with ``jax.lax.top_k``, finds the nucleus among them using the whole row's normaliser, and draws the token among
them. Whenever those candidates hold at least ``top_p`` of the probability mass, the nucleus lies inside them and
the result equals that of the full sort; when a row's candidates hold less, that step finds the nucleus over the
whole vocabulary by bisection on the logits' values (a ``lax.cond``; the full sort's nucleus up to ties). Tokens
are drawn by a two-level inverse CDF (one uniform per row) rather than by Gumbel noise over every candidate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mojax.models.llama import SharedPrefix
from mojax.models.tokenizer import chat_stop_token_ids

LAYER_LOOPS = ("auto", "unrolled", "scan")
"""How decode steps run the decoder layers (:class:`SamplingConfig` ``layer_loop``)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each new token is chosen: argmax at temperature 0, else temperature, then top-k, then top-p sampling.

    ``top_k=0`` and ``top_p=1.0`` switch those filters off. ``temperature`` and ``top_p`` are traced values of the
    compiled decode loop (any two positive temperatures, or any two top_p < 1, share one compilation); ``top_k`` and
    ``top_p_candidates`` (how many of the largest logits top-p alone searches before falling back to a full sort)
    are compiled in. A sequence that emits any of
    ``stop_token_ids`` is finished: the stop token is kept, and every later position holds
    ``pad_token_id`` with response mask 0. ``stop_token_ids=None`` stands for the model config's
    eos ids (``()`` never stops early) and ``pad_token_id=None`` for the model config's pad id
    (else its first eos id, else 0); :func:`generate` fills them in. Prompts are left-padded to
    ``bucket_length(P, prompt_bucket_multiple)`` columns so that prompts of nearby lengths share
    one compilation.

    ``layer_loop`` (compiled in) is how the decode steps run the decoder layers: ``"unrolled"`` on weights split per
    layer once before the loop (:func:`mojax.models.llama.decode_layers`; the fastest when every device holds whole
    layers: one device, or replicated weights), ``"scan"`` the layer scan of the stacked weights at every step, which
    with FSDP-sharded weights gathers one layer at a time (split per layer, XLA gathers every layer's weights once
    before the loop: the whole model on every device), and ``"auto"`` (default) the scan when :func:`generate` is
    handed parameters sharded over several devices, else unrolled. Inside an outer ``jit`` the parameters are tracers
    whose sharding ``"auto"`` cannot see, so it unrolls: say ``"scan"`` there for sharded weights.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    prompt_bucket_multiple: int | None = None
    top_p_candidates: int = 64
    layer_loop: str = "auto"

    def __post_init__(self):
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(f"SamplingConfig: layer_loop must be one of {LAYER_LOOPS}, got {self.layer_loop!r}.")
        stop = _as_tuple(self.stop_token_ids)
        if stop is not None and not all(_is_int(t) and t >= 0 for t in stop):
            raise ValueError(
                f"SamplingConfig: stop_token_ids must be integer token ids >= 0 or None, got {self.stop_token_ids!r}."
            )
        _require_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _require_int("top_k", self.top_k, minimum=0, meaning="0 disables top-k")
        _require_int("top_p_candidates", self.top_p_candidates, minimum=1)
        if self.pad_token_id is not None:
            _require_int("pad_token_id", self.pad_token_id, minimum=0, meaning="or None")
        if self.prompt_bucket_multiple is not None:
            _require_int(
                "prompt_bucket_multiple", self.prompt_bucket_multiple, minimum=1, meaning="None pads to a power of two"
            )
        if not (_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(
                f"SamplingConfig: temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}."
            )
        if not (_is_real(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingConfig: top_p must lie in (0, 1] (1 disables top-p), got {self.top_p!r}.")
        numeric = ("max_new_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float)
        for name, kind in (*numeric, ("top_p_candidates", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.pad_token_id is not None:
            object.__setattr__(self, "pad_token_id", int(self.pad_token_id))
        object.__setattr__(self, "stop_token_ids", None if stop is None else tuple(int(t) for t in stop))


class GenerationResult(NamedTuple):
    """Sampled responses (N = max_new_tokens columns) and the full sequences for the training forward.

    ``sampler_logprobs`` are log-probabilities of the chosen tokens under the distribution they were
    drawn from (temperature, top-k, top-p applied; 0 under greedy decoding, a point mass).
    ``model_logprobs`` are log-probabilities under the unmodified model distribution
    ``log_softmax(logits)``. Both are 0 where ``response_mask`` is 0. ``sequences`` is the prompt,
    left-aligned (left-padded) in its given width, followed by the response; ``sequence_mask`` marks
    its real tokens (usable as the attention mask of a forward pass without a cache, whose default
    positions are then correct).
    """

    tokens: jax.Array
    response_mask: jax.Array
    sampler_logprobs: jax.Array
    model_logprobs: jax.Array
    sequences: jax.Array
    sequence_mask: jax.Array


class _DecodeState(NamedTuple):
    """Carry of the decode loop: the next response column to fill, the cache and the response buffers."""

    step: jax.Array
    cache: Any
    finished: jax.Array
    tokens: jax.Array
    response_mask: jax.Array
    sampler_logprobs: jax.Array
    model_logprobs: jax.Array


def _as_tuple(ids: Any) -> tuple | None:
    """None, or the ids of a sequence or array (one id alone becomes a 1-tuple)."""
    if ids is None:
        return None
    return tuple(ids) if isinstance(ids, (tuple, list, np.ndarray)) else (ids,)


def _is_real(value: Any) -> bool:
    """True for Python/NumPy real numbers other than bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    """True for Python/NumPy integers other than bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _require_int(name: str, value: Any, *, minimum: int, meaning: str = "") -> None:
    """ValueError unless `value` is a Python/NumPy integer >= minimum."""
    if not _is_int(value) or value < minimum:
        note = f" ({meaning})" if meaning else ""
        raise ValueError(f"SamplingConfig: {name} must be an integer >= {minimum}{note}, got {value!r}.")


def bucket_length(n: int, multiple: int | None = None) -> int:
    """Smallest bucket >= n: the next power of two, or the next multiple of `multiple` when given."""
    if not _is_int(n) or n < 1:
        raise ValueError(f"bucket_length: n must be an integer >= 1, got {n!r}.")
    if multiple is None:
        return 1 << (int(n) - 1).bit_length()
    if not _is_int(multiple) or multiple < 1:
        raise ValueError(f"bucket_length: multiple must be an integer >= 1 or None, got {multiple!r}.")
    return -(-int(n) // int(multiple)) * int(multiple)


def _compiled_part(config: SamplingConfig) -> SamplingConfig:
    """`config` with temperature and top_p reduced to what the program depends on: greedy or not, top-p on or off.

    It is the static argument of the jitted decode loop; the actual values travel as traced scalars.
    """
    return dataclasses.replace(
        config, temperature=float(config.temperature > 0), top_p=1.0 if config.top_p == 1.0 else 0.5
    )


DRAW_BLOCK = 256
"""Candidates per block of the two-level inverse-CDF draw (:func:`_draw`)."""


def _first_or_last(condition: jax.Array, positive: jax.Array) -> jax.Array:
    """i32[B]: per row, the first index where ``condition`` holds, else the last index where ``positive`` does."""
    last = condition.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.where(condition.any(axis=-1), jnp.argmax(condition, axis=-1), last).astype(jnp.int32)


def _draw(values: jax.Array, ids: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(token i32[B], its log-prob f32[B]) drawn from candidate logits `values` [B, C] (-inf: removed) with ids [B, C].

    Inverse-CDF sampling in two levels with one uniform u per row: with p = softmax(values) cut into blocks of
    :data:`DRAW_BLOCK`, the chosen block is the first whose cumulative mass exceeds u (P = its mass), then the
    candidate the first inside it whose cumulative mass exceeds u (P = p_i / the block's mass): P(i) = p_i, in O(C)
    work. ``jax.random.categorical`` draws C Gumbel variates per row instead, which at a 49k vocabulary costs more
    on a CPU than the rest of a decode step. A candidate of zero probability is never drawn (a rounding of u past
    the total mass lands on the last candidate with mass).
    """
    batch, count = values.shape
    log_probs = jax.nn.log_softmax(values, axis=-1)
    block = min(DRAW_BLOCK, count)
    blocks = -(-count // block)
    probs = jnp.pad(jnp.exp(log_probs), ((0, 0), (0, blocks * block - count))).reshape(batch, blocks, block)
    block_mass = probs.sum(axis=-1)
    block_end = jnp.cumsum(block_mass, axis=-1)
    target = jax.random.uniform(key, (batch,)) * block_end[:, -1]
    chosen = _first_or_last((block_end > target[:, None]) & (block_mass > 0), block_mass > 0)
    inside = jnp.take_along_axis(probs, chosen[:, None, None], axis=1)[:, 0]
    start = _pick(block_end, chosen) - _pick(block_mass, chosen)
    within = _first_or_last((start[:, None] + jnp.cumsum(inside, axis=-1) > target[:, None]) & (inside > 0), inside > 0)
    choice = chosen * block + within
    return _pick(ids, choice), _pick(log_probs, choice)


def _nucleus(descending: jax.Array, log_normaliser: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits f32[B, C] with -inf outside the nucleus, the candidates' mass f32[B]) of top-p over a row's largest logits.

    Args:
      descending: f32[B, C], the C largest logits of each row, in decreasing order.
      log_normaliser: f32[B], logsumexp of the distribution they come from (the whole row for top-p alone, the
        top-k logits after top-k).
      top_p: the nucleus mass, f32[].

    Returns:
      A candidate is kept while the mass before it is below top_p (a prefix of `descending`); the candidates'
      total mass tells whether the nucleus fits in them (mass >= top_p).
    """
    probs = jnp.exp(descending - log_normaliser[:, None])
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return jnp.where(mass_before < top_p, descending, -jnp.inf), jnp.sum(probs, axis=-1)


def _order_key(x: jax.Array) -> jax.Array:
    """i32 keys that order like the float32 values ``x`` (the IEEE bits, negative values' magnitude bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))


def _nucleus_by_bisection(scaled_logits: jax.Array, log_normaliser: jax.Array, top_p: jax.Array) -> jax.Array:
    """f32[B, V]: the logits with -inf outside each row's nucleus, found without sorting.

    The nucleus is {i : logit_i >= t} for the largest t whose tokens hold at least top_p of the mass: a bisection
    over the 2^32 ordered float32 keys (:func:`_order_key`), 32 passes of a masked sum over the row. It equals the
    full sort's nucleus (the fewest largest logits holding top_p) except when logits tie at t, where the sort keeps
    only as many of the tied tokens as it needs and this keeps them all.
    """
    keys = _order_key(scaled_logits)
    probs = jnp.exp(scaled_logits - log_normaliser[:, None])

    def holds_top_p(threshold: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(keys >= threshold[:, None], probs, 0.0), axis=-1) >= top_p

    def halve(_, bounds):
        low, high = bounds  # holds_top_p(low) is true, holds_top_p(high) false
        middle = (low >> 1) + (high >> 1) + (low & high & 1)
        holds = holds_top_p(middle)
        return jnp.where(holds, middle, low), jnp.where(holds, high, middle)

    low, _ = jax.lax.fori_loop(0, 32, halve, (keys.min(axis=-1), keys.max(axis=-1) + 1))
    return jnp.where(keys >= low[:, None], scaled_logits, -jnp.inf)


def _draw_top_p(
    scaled_logits: jax.Array, key: jax.Array, top_p: jax.Array, candidates: int
) -> tuple[jax.Array, jax.Array]:
    """(token i32[B], sampler log-prob f32[B]) of top-p sampling without top-k.

    The nucleus is searched, and the token drawn, among the `candidates` largest logits (``lax.top_k``); when
    some row's candidates hold less than top_p of its mass, the step finds every row's nucleus over the whole
    vocabulary by bisection instead (:func:`_nucleus_by_bisection`; sorting a 49k vocabulary at every step is slow
    on XLA:CPU).
    """
    vocab = scaled_logits.shape[-1]
    log_normaliser = jax.nn.logsumexp(scaled_logits, axis=-1)

    def whole_vocabulary() -> tuple[jax.Array, jax.Array]:
        ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), scaled_logits.shape)
        return _draw(_nucleus_by_bisection(scaled_logits, log_normaliser, top_p), ids, key)

    if candidates >= vocab:
        return whole_vocabulary()
    values, ids = jax.lax.top_k(scaled_logits, candidates)
    kept, covered = _nucleus(values, log_normaliser, top_p)
    drawn = _draw(kept, ids, key)
    return jax.lax.cond(jnp.all(covered >= top_p), lambda: drawn, whole_vocabulary)


def _draw_filtered(
    scaled_logits: jax.Array, key: jax.Array, config: SamplingConfig, top_p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(token i32[B], sampler log-prob f32[B]) after top-k then top-p (top-p renormalises over the top-k logits)."""
    vocab = scaled_logits.shape[-1]
    nucleus = config.top_p < 1.0
    if config.top_k == 0 and nucleus:
        return _draw_top_p(scaled_logits, key, top_p, config.top_p_candidates)
    if config.top_k == 0:
        return _draw(scaled_logits, jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), scaled_logits.shape), key)
    values, ids = jax.lax.top_k(scaled_logits, min(config.top_k, vocab))
    if nucleus:
        values, _ = _nucleus(values, jax.nn.logsumexp(values, axis=-1), top_p)
    return _draw(values, ids, key)


def _pick(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[b, index[b]] for every row b."""
    return jnp.take_along_axis(table, index[:, None], axis=-1)[:, 0]


def sample_next_token(
    logits: jax.Array, key: jax.Array, config: SamplingConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(token i32[B], sampler log-prob f32[B], model log-prob f32[B]) for next-token logits [B, V]."""
    return _sample(logits, key, config, jnp.float32(config.temperature), jnp.float32(config.top_p))


def _sample(
    logits: jax.Array, key: jax.Array, config: SamplingConfig, temperature: jax.Array, top_p: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`sample_next_token` with temperature and top_p as (traced) f32[] values; `config` gives the structure."""
    logits = logits.astype(jnp.float32)
    if config.temperature == 0:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sampler_logprob = jnp.zeros(token.shape, jnp.float32)
    else:
        token, sampler_logprob = _draw_filtered(logits / temperature, key, config, top_p)
    return token, sampler_logprob, _pick(jax.nn.log_softmax(logits, axis=-1), token)


def _record(
    state: _DecodeState, logits: jax.Array, key: jax.Array, config: SamplingConfig, knobs: tuple[jax.Array, jax.Array]
) -> _DecodeState:
    """Sample column `state.step` from `logits`; finished sequences get pad and mask 0. knobs: (temperature, top_p)."""
    token, sampler_logprob, model_logprob = _sample(logits, jax.random.fold_in(key, state.step), config, *knobs)
    active = ~state.finished
    token = jnp.where(active, token, config.pad_token_id)
    stop_ids = jnp.asarray(config.stop_token_ids, jnp.int32).reshape(-1)
    emitted_stop = (token[:, None] == stop_ids[None, :]).any(axis=-1)

    def put(buffer, column):
        return jax.lax.dynamic_update_index_in_dim(buffer, column.astype(buffer.dtype), state.step, axis=1)

    return state._replace(
        step=state.step + 1,
        finished=state.finished | (active & emitted_stop),
        tokens=put(state.tokens, token),
        response_mask=put(state.response_mask, active),
        sampler_logprobs=put(state.sampler_logprobs, jnp.where(active, sampler_logprob, 0.0)),
        model_logprobs=put(state.model_logprobs, jnp.where(active, model_logprob, 0.0)),
    )


def _last_logits(model: Any, input_ids, positions, attention_mask, cache, layer_weights) -> tuple[jax.Array, Any]:
    """(fp32 logits [B, V] at the last input position, updated cache): the LM head runs on one position only."""
    hidden, cache = model.hidden_states(
        input_ids, positions=positions, attention_mask=attention_mask, cache=cache, layer_weights=layer_weights
    )
    return model.logits(hidden[:, -1]).astype(jnp.float32), cache


def _repeat_rows(tree: Any, generations: int) -> Any:
    """Every batch row of `tree`'s arrays repeated `generations` times consecutively."""
    return jax.tree.map(lambda a: jnp.repeat(a, generations, axis=0), tree) if generations > 1 else tree


def _cast_layers(model: Any, dtype: Any) -> None:
    """The decoder layers' weights of ``model`` cast to ``dtype`` in place, once for the whole decode loop.

    The layer scan casts each layer's weights to the compute dtype as it runs it (the training step's memory wants no
    stacked copy), so decode steps in the scan would read every weight in the parameters' dtype and cast it again at
    every token. Cast once here, the steps read compute-dtype weights, as the unrolled loop's weights split per layer
    once are; the values are the same.
    """
    for layers in (model.model.layers, model.model.last_layer):
        if layers is not None:
            nnx.update(layers, jax.tree.map(lambda a: a.astype(dtype), nnx.state(layers, nnx.Param)))


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "generations"))
def _generate_bucket(graphdef, state, prompt_ids, prompt_mask, rng_key, knobs, config: SamplingConfig, generations):
    """Prefill the bucketed prompts once (their rows left-aligned first), then decode until N tokens or all sequences
    stopped; the :class:`GenerationResult`, its sequences in the bucket's width.

    `knobs` is (temperature, top_p) as f32[] (traced); `config` is their :func:`_compiled_part`. Each prompt is
    prefilled once and its last logits and length repeated for its `generations` rows; its keys and values stay in
    the decode cache once per prompt, as a prefix its rows share (:class:`~mojax.models.llama.SharedPrefix`), and
    each row's cache holds its new tokens only. The decode steps run the layers unrolled on weights and a cache split
    per layer once here (:func:`mojax.models.llama.decode_layers`), or in the layer scan (``config.layer_loop``,
    resolved by :func:`generate`).
    """
    model = nnx.merge(graphdef, state)
    if config.layer_loop == "scan":
        _cast_layers(model, model.config.dtype)
    prompt_ids, prompt_mask = _left_aligned(prompt_ids, prompt_mask)
    prompts, width = prompt_ids.shape
    batch, new = prompts * generations, config.max_new_tokens
    prompt_mask = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    shared = generations > 1
    cache = model.init_cache(prompts, width if shared else width + new)
    logits, cache = _last_logits(model, prompt_ids, positions, prompt_mask, cache, layer_weights=None)
    logits, prompt_lengths = _repeat_rows((logits, prompt_mask.sum(axis=1)), generations)
    if shared:
        prefix = SharedPrefix(keys=cache.keys, values=cache.values, valid=cache.valid)
        cache = model.init_cache(batch, new).replace(prefix=prefix)
    layer_weights = None
    if config.layer_loop == "unrolled":
        cache, layer_weights = cache.per_layer(), model.per_layer_weights()
    start = _DecodeState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        finished=jnp.zeros((batch,), bool),
        tokens=jnp.full((batch, new), config.pad_token_id, jnp.int32),
        response_mask=jnp.zeros((batch, new), jnp.float32),
        sampler_logprobs=jnp.zeros((batch, new), jnp.float32),
        model_logprobs=jnp.zeros((batch, new), jnp.float32),
    )
    start = _record(start, logits, rng_key, config, knobs)

    def unfinished(s: _DecodeState) -> jax.Array:
        return (s.step < new) & ~jnp.all(s.finished)

    def decode_one(s: _DecodeState) -> _DecodeState:
        previous = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1)
        positions = (prompt_lengths + s.step - 1)[:, None]
        ones = jnp.ones((batch, 1), jnp.int32)
        step_logits, cache = _last_logits(model, previous, positions, ones, s.cache, layer_weights)
        return _record(s._replace(cache=cache), step_logits, rng_key, config, knobs)

    end = jax.lax.while_loop(unfinished, decode_one, start)
    prompt_ids, prompt_mask = _repeat_rows((prompt_ids, prompt_mask), generations)
    return GenerationResult(
        tokens=end.tokens,
        response_mask=end.response_mask,
        sampler_logprobs=end.sampler_logprobs,
        model_logprobs=end.model_logprobs,
        sequences=jnp.concatenate([prompt_ids, end.tokens], axis=1),
        sequence_mask=jnp.concatenate([prompt_mask, end.response_mask.astype(jnp.int32)], axis=1),
    )


def _resolved_layer_loop(config: SamplingConfig, state: Any) -> SamplingConfig:
    """`config` with ``layer_loop="auto"`` made concrete: the scan when a (concrete) parameter array is sharded over
    several devices, else unrolled."""
    if config.layer_loop != "auto":
        return config
    sharded = any(
        isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and not leaf.sharding.is_fully_replicated
        for leaf in jax.tree.leaves(state)
    )
    return dataclasses.replace(config, layer_loop="scan" if sharded else "unrolled")


def _split_model(model: Any) -> tuple[Any, Any]:
    """(graphdef, state) from an NNX module or an already split pair."""
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    if isinstance(model, tuple) and len(model) == 2:
        return model
    raise ValueError(
        f"generate: model must be an nnx.Module or a (graphdef, state) pair from nnx.split, got {type(model).__name__}."
    )


def _check_prompt_shapes(prompt_ids: Any, prompt_mask: Any) -> None:
    """ValueError unless ids and mask are matching [B, P] arrays (B, P >= 1) and the ids are integers."""
    ids_shape, mask_shape = jnp.shape(prompt_ids), jnp.shape(prompt_mask)
    if len(ids_shape) != 2 or min(ids_shape) < 1:
        raise ValueError(
            f"generate: prompt_ids must have shape [batch, prompt_length] with both >= 1, got {ids_shape}."
        )
    if mask_shape != ids_shape:
        raise ValueError(f"generate: prompt_mask shape {mask_shape} must equal prompt_ids shape {ids_shape}.")
    if not jnp.issubdtype(jnp.result_type(prompt_ids), jnp.integer):
        raise ValueError(f"generate: prompt_ids must hold integer token ids, got dtype {jnp.result_type(prompt_ids)}.")


def _check_prompt_values(prompt_ids: Any, prompt_mask: Any, model_config: Any, config: SamplingConfig) -> None:
    """ValueError unless the prompts are left- or right-padded, in the vocabulary and within the model context."""
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("generate: prompt_mask must hold only 0 (padding) and 1 (real token).")
    steps = np.diff(mask.astype(np.int8), axis=1)
    one_block = (steps != 0).sum(axis=1) <= 1
    if not (one_block & mask.any(axis=1)).all():
        raise ValueError(
            "generate: prompts must be left-padded or right-padded with at least one real token: each prompt_mask "
            "row must be 0...0 1...1 or 1...1 0...0."
        )
    used = ids[mask.astype(bool)]
    if used.min() < 0 or used.max() >= model_config.vocab_size:
        raise ValueError(
            f"generate: prompt_ids must lie in [0, vocab_size={model_config.vocab_size}), got values in [{used.min()}, {used.max()}]."
        )
    longest = int(mask.sum(axis=1).max())
    if longest + config.max_new_tokens > model_config.max_position_embeddings:
        raise ValueError(
            f"generate: the longest prompt ({longest} tokens) plus max_new_tokens ({config.max_new_tokens}) exceeds the model "
            f"context max_position_embeddings={model_config.max_position_embeddings}; shorten the prompts or max_new_tokens."
        )


def _check_special_tokens(model_config: Any, config: SamplingConfig) -> None:
    """ValueError unless the stop and pad token ids are in the model vocabulary."""
    vocab = model_config.vocab_size
    for name, tokens in (("stop_token_ids", config.stop_token_ids), ("pad_token_id", (config.pad_token_id,))):
        if any(t >= vocab for t in tokens):
            raise ValueError(f"generate: {name} must lie in [0, vocab_size={vocab}), got {tokens}.")


def _check_key(rng_key: Any) -> None:
    """ValueError unless `rng_key` is one PRNG key: typed (jax.random.key) or raw uint32[2] (jax.random.PRNGKey)."""
    dtype, shape = getattr(rng_key, "dtype", None), getattr(rng_key, "shape", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype == jnp.uint32 and shape == (2,)
    if not (typed or raw):
        raise ValueError(
            f"generate: rng_key must be a single jax.random.key(...) or PRNGKey(...), got dtype {dtype} and shape {shape}."
        )


def _with_special_tokens(config: SamplingConfig, model_config: Any, tokenizer: Any) -> SamplingConfig:
    """`config` with its stop and pad ids filled in from the model config and the tokenizer's chat template."""
    stop = model_config.eos_token_ids if config.stop_token_ids is None else config.stop_token_ids
    if tokenizer is not None:
        stop = stop + chat_stop_token_ids(tokenizer)
    pad = config.pad_token_id
    if pad is None:
        fallback = (*model_config.eos_token_ids, 0)[0]
        pad = fallback if model_config.pad_token_id is None else model_config.pad_token_id
    return dataclasses.replace(config, stop_token_ids=tuple(dict.fromkeys(stop)), pad_token_id=pad)


def _ragged_to_arrays(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P], mask i32[B, P]): the prompts of a ragged list, left-padded to the longest one."""
    rows = [np.asarray(row) for row in prompts]
    if not rows or any(row.ndim != 1 or row.size == 0 for row in rows):
        raise ValueError(
            "generate: a list of prompts must hold one or more non-empty lists of token ids, got "
            f"row shapes {[row.shape for row in rows]}."
        )
    width = max(row.size for row in rows)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.result_type(*rows))
    mask = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        ids[b, width - row.size :] = row
        mask[b, width - row.size :] = 1
    return ids, mask


def _left_padded(array: Any, columns: int, value: int) -> Any:
    """`array` [B, P] with `columns` columns of `value` on the left: on the host for a NumPy array (no device
    operation before the sampler's program), else with ``jnp.pad``."""
    if not columns:
        return array
    pad = np.pad if isinstance(array, np.ndarray) else jnp.pad
    return pad(array, ((0, 0), (columns, 0)), constant_values=value)


def _left_aligned(prompt_ids: Any, prompt_mask: Any) -> tuple[jax.Array, jax.Array]:
    """(ids, mask) i32[B, P] with each row's padding moved to the left (right-padded rows rolled right)."""
    ids, mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    trailing_pad = jnp.argmax(mask[:, ::-1], axis=1)
    order = (jnp.arange(mask.shape[1])[None, :] - trailing_pad[:, None]) % mask.shape[1]
    return jnp.take_along_axis(ids, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


def generate(
    model: Any,
    prompt_ids: Any,
    prompt_mask: Any = None,
    rng_key: jax.Array | None = None,
    config: SamplingConfig | None = None,
    *,
    tokenizer: Any = None,
    num_generations: int = 1,
) -> GenerationResult:
    """Sample `config.max_new_tokens` tokens after each prompt, `num_generations` times.

    Works eagerly and inside an outer ``jax.jit``; checks that need the prompt values (padding,
    vocabulary range, context length) run only when the prompts are concrete.

    Args:
      model: a ``LlamaForCausalLM`` (anything with its ``init_cache``, ``hidden_states`` and
        ``logits`` methods and a ``config``) or its ``nnx.split`` pair ``(graphdef, state)``.
      prompt_ids: a ragged Python list of token-id lists, or i32[B, P], each row left-padded
        (0...0 1...1 in the mask) or right-padded (1...1 0...0).
      prompt_mask: i32[B, P], 1 for a real token; None means the lengths of a list's rows, or all
        ones for an array.
      rng_key: one ``jax.random.key`` (or ``PRNGKey``).
      config: the :class:`SamplingConfig`; its ``stop_token_ids=None`` and ``pad_token_id=None``
        are read from ``model.config``.
      tokenizer: a ``transformers`` tokenizer: its eos token and its chat template's end-of-turn
        token (:func:`~mojax.models.tokenizer.chat_stop_token_ids`) are added to the stop ids.
      num_generations: completions per prompt (GRPO's group size G). The result has B * G rows, the G completions
        of prompt i in rows i * G ... i * G + G - 1, each sampled independently; each prompt is prefilled once and
        its KV cache shared by its G rows (what repeating every prompt row G times gives, at 1 / G of the
        prefill's cost).

    Returns:
      The :class:`GenerationResult`; ``sequences`` holds the prompts left-aligned (repeated G times).

    References:
      Holtzman et al., "The Curious Case of Neural Text Degeneration", ICLR 2020, arXiv 1904.09751
      (top-p); Fan et al., "Hierarchical Neural Story Generation", ACL 2018, arXiv 1805.04833 (top-k).

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from mojax.models import LlamaForCausalLM, ModelConfig
      >>> model = LlamaForCausalLM(ModelConfig.tiny(num_hidden_layers=1), rngs=nnx.Rngs(0))
      >>> config = SamplingConfig(max_new_tokens=3, temperature=0.0)
      >>> out = generate(model, [[5, 6, 7], [8]], rng_key=jax.random.key(0), config=config)
      >>> out.tokens.shape, out.sequences.shape
      ((2, 3), (2, 6))
    """
    if not isinstance(config, SamplingConfig):
        raise ValueError(f"generate: config must be a SamplingConfig, got {type(config).__name__}.")
    _check_key(rng_key)
    if not _is_int(num_generations) or num_generations < 1:
        raise ValueError(f"generate: num_generations must be an integer >= 1, got {num_generations!r}.")
    graphdef, state = _split_model(model)
    model_config = model.config if isinstance(model, nnx.Module) else nnx.merge(graphdef, state).config
    config = _with_special_tokens(config, model_config, tokenizer)
    if isinstance(prompt_ids, (list, tuple)):
        prompt_ids, lengths_mask = _ragged_to_arrays(prompt_ids, config.pad_token_id)
        prompt_mask = lengths_mask if prompt_mask is None else np.asarray(prompt_mask)
    if prompt_mask is None:
        prompt_mask = jnp.ones(jnp.shape(prompt_ids), jnp.int32)
    _check_prompt_shapes(prompt_ids, prompt_mask)
    _check_special_tokens(model_config, config)
    if not any(isinstance(x, jax.core.Tracer) for x in (prompt_ids, prompt_mask)):
        _check_prompt_values(prompt_ids, prompt_mask, model_config, config)
    width = jnp.shape(prompt_ids)[1]
    extra = bucket_length(width, config.prompt_bucket_multiple) - width
    result = _generate_bucket(
        graphdef,
        state,
        _left_padded(prompt_ids, extra, config.pad_token_id),
        _left_padded(prompt_mask, extra, 0),
        rng_key,
        (jnp.float32(config.temperature), jnp.float32(config.top_p)),
        _compiled_part(_resolved_layer_loop(config, state)),
        int(num_generations),
    )
    if not extra:
        return result
    # the sequences hold the prompts in their given width: the bucket's padding is the left-aligned rows' first columns
    return result._replace(sequences=result.sequences[:, extra:], sequence_mask=result.sequence_mask[:, extra:])
