"""Value and reward heads on the LLaMA trunk.

* :class:`LlamaValueModel`: one critic with ``num_objectives`` outputs per token,
  ``values f32[B, T, n]``. A separate critic per objective is simply n instances with
  ``num_objectives=1``.
* :class:`LlamaRewardModel`: HF ``LlamaForSequenceClassification`` layout (``score.weight``
  (num_labels, hidden), no bias) and the same pooling as transformers 5.23: the score of the
  **rightmost token whose id is not** ``pad_token_id`` (found from ``input_ids``, not from the
  attention mask), so left and right padding both work; with ``pad_token_id=None`` only batch
  size 1 is allowed and the last token is scored. A row made only of pad tokens is scored at
  position 0, as HF does.

Both reuse :class:`mojax.models.llama.LlamaModel` under the attribute ``model`` so their trunk
parameters have the same paths (and HF names) as ``LlamaForCausalLM``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mojax._numerics import token_matmul
from mojax.models.config import ModelConfig
from mojax.models.llama import KVCache, LlamaModel, param_variable


class ValueHead(nnx.Module):
    """Linear ``hidden -> n`` with bias; fp32 output. Params: kernel [D, n] ("embed", None), bias [n]."""

    def __init__(self, hidden_size: int, num_outputs: int, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.kernel = param_variable(rngs, (hidden_size, num_outputs), ("embed", None), param_dtype)
        self.bias = param_variable(rngs, (num_outputs,), (None,), param_dtype, init=nnx.initializers.zeros)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return token_matmul(hidden, self.kernel[...]) + self.bias[...].astype(jnp.float32)


def _require_positive_int(name: str, value: object) -> None:
    """ValueError unless `value` is an int >= 1 (the number of head outputs)."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class LlamaValueModel(nnx.Module):
    """Trunk + value head: ``model(input_ids, ...) -> (values f32[B, T, n], cache)``."""

    def __init__(self, config: ModelConfig, num_objectives: int, *, remat: bool | str = "dots", rngs: nnx.Rngs):
        _require_positive_int("num_objectives", num_objectives)
        self.config = config
        self.num_objectives = num_objectives
        self.model = LlamaModel(config, remat=remat, rngs=rngs)
        self.value_head = ValueHead(config.hidden_size, num_objectives, param_dtype=config.param_dtype, rngs=rngs)

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        return self.model(input_ids, positions=positions, attention_mask=attention_mask, cache=cache)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        h, cache = self.hidden_states(input_ids, positions=positions, attention_mask=attention_mask, cache=cache)
        return self.value_head(h), cache


def last_non_pad_index(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """i32[B]: HF 5.23 ``GenericForSequenceClassification`` pooling index.

    ``argmax(arange(T) * (input_ids != pad))``: the rightmost non-pad token (0 for an all-pad
    row). With ``pad_token_id=None`` the last position (HF uses -1; only B == 1 is allowed).
    """
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError(
                "Cannot handle batch sizes > 1 if no padding token is defined "
                "(config.pad_token_id is None), as in transformers"
            )
        return jnp.full((B,), T - 1, jnp.int32)
    non_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(T, dtype=jnp.int32)[None, :] * non_pad, axis=-1).astype(jnp.int32)


class LlamaRewardModel(nnx.Module):
    """HF ``LlamaForSequenceClassification``: ``model(input_ids, ...) -> scores f32[B, num_labels]``."""

    def __init__(self, config: ModelConfig, num_labels: int = 1, *, remat: bool | str = "dots", rngs: nnx.Rngs):
        _require_positive_int("num_labels", num_labels)
        self.config = config
        self.num_labels = num_labels
        self.model = LlamaModel(config, remat=remat, rngs=rngs)
        self.score = ScoreHead(config.hidden_size, num_labels, param_dtype=config.param_dtype, rngs=rngs)

    def token_scores(
        self, input_ids: jax.Array, *, positions: jax.Array | None = None, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Per-token scores f32[B, T, num_labels] (HF ``score(hidden_states)`` before pooling)."""
        h, _ = self.model(input_ids, positions=positions, attention_mask=attention_mask)
        return self.score(h)

    def __call__(
        self, input_ids: jax.Array, *, positions: jax.Array | None = None, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        idx = last_non_pad_index(input_ids, self.config.pad_token_id)
        scores = self.token_scores(input_ids, positions=positions, attention_mask=attention_mask)
        return jnp.take_along_axis(scores, idx[:, None, None], axis=1)[:, 0, :]


class ScoreHead(nnx.Module):
    """HF ``score`` Linear without bias: kernel [D, num_labels] ("embed", None); fp32 output."""

    def __init__(self, hidden_size: int, num_labels: int, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.kernel = param_variable(rngs, (hidden_size, num_labels), ("embed", None), param_dtype)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return token_matmul(hidden, self.kernel[...])
