"""Objectives of the multi-objective RL trainer and their scoring into one f32[B, n] reward matrix.

An :class:`Objective` names one reward column. Its ``fn`` is one of three kinds:

1. a batched Python callable with TRL's reward-function signature
   ``fn(prompts, completions, *, completion_ids, **columns) -> list[float | None]`` over decoded strings;
   dataset columns are passed as keywords, each only to the functions that accept it (by name or
   ``**kwargs``);
2. a jit-able JAX function of token ids marked with :func:`token_reward`,
   ``fn(prompt_ids i32[B, P], prompt_mask, completion_ids i32[B, T], completion_mask) -> f32[B]``;
3. a frozen :class:`mojax.models.heads.LlamaRewardModel` marked with :func:`reward_model`, scored on the
   concatenated prompt and completion tokens at the last real token (found from the masks, so any
   padding works and no ``pad_token_id`` is needed).

:func:`score` evaluates every objective on one batch. ``None`` (or NaN) means "not applicable" and
becomes NaN in that objective's column only, which the advantage estimators exclude from group
statistics (TRL's convention). Anything else that is not a finite number is an error naming the
objective and the sample. Costs (``kind="cost"``) are scored as given; :func:`signed` negates them
for every combiner that maximises (all but a Lagrangian, which constrains costs directly).
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mojax import _checks
from mojax.models.heads import LlamaRewardModel
from mojax.models.hf import parameter_digest

KINDS = ("reward", "cost")
REWARD_MODEL_DIGEST_PREFIX = "objectives."
""":func:`reward_model_digests` keys are this prefix and the objective's name (its config key)."""
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")
"""Names a dataset column may not take: they are the reward function's own arguments."""

_EXPECTED_SIGNATURE = (
    "fn(prompts, completions, *, completion_ids, **columns): two positional arguments and the keyword "
    "`completion_ids` (or **kwargs)"
)


@dataclasses.dataclass(frozen=True)
class TokenReward:
    """A jit-able reward of token ids, ``fn(prompt_ids, prompt_mask, completion_ids, completion_mask) -> f32[B]``."""

    fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
    compiled: Callable = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "compiled", jax.jit(self.fn))


def token_reward(fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]) -> TokenReward:
    """Marks a JAX function of token ids as an objective's ``fn`` (jitted once per input shape).

    Args:
        fn: ``fn(prompt_ids i32[B, P], prompt_mask i32[B, P], completion_ids i32[B, T],
            completion_mask i32[B, T]) -> f32[B]``; masks are 1 on real tokens. NaN means "not applicable".

    Returns:
        A :class:`TokenReward` to pass as ``Objective(name, fn=...)``.

    References:
        The rule-based token rewards of G. Sheng et al., "HybridFlow: A Flexible and Efficient RLHF
        Framework" (verl), EuroSys 2025, arXiv 2409.19256.

    Example:
        >>> length = token_reward(lambda p, pm, c, cm: cm.sum(-1).astype(jnp.float32))
        >>> objective = Objective("length", length)
        >>> score([objective], ["", ""], ["ab", "a"], completion_ids=[[3, 4], [3]],
        ...       prompt_ids=np.zeros((2, 1), np.int32))
        array([[2.],
               [1.]], dtype=float32)
    """
    if not callable(fn):
        raise TypeError(_checks.message("token_reward", "fn", f"is a {type(fn).__name__}", "a callable"))
    return TokenReward(fn)


def _last_token_scores(
    graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, mask: jax.Array, label: int
) -> jax.Array:
    """f32[B]: the reward model's `label` score at the rightmost position where `mask` is 1 (0 for none)."""
    model = nnx.merge(graphdef, state)
    scores = model.token_scores(jnp.where(mask > 0, input_ids, 0), attention_mask=mask)
    positions = jnp.arange(mask.shape[1], dtype=jnp.int32)
    last = jnp.argmax(positions[None, :] * (mask > 0), axis=-1)
    return jnp.take_along_axis(scores[..., label], last[:, None], axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A frozen reward model scored on prompt + completion ids; see :func:`reward_model`."""

    model: LlamaRewardModel
    label: int = 0
    compiled: Callable = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        graphdef, state = nnx.split(self.model)
        scores = jax.jit(_last_token_scores, static_argnums=(0, 4))
        object.__setattr__(self, "compiled", lambda ids, mask: scores(graphdef, state, ids, mask, self.label))


def reward_model(model: LlamaRewardModel, label: int = 0) -> RewardModel:
    """Marks a :class:`~mojax.models.heads.LlamaRewardModel` as an objective's ``fn``.

    The model is frozen at this call (its parameters are captured); it scores ``[prompt | completion]``
    with the concatenated masks as attention mask and takes output `label` at the last real token,
    jitted once per shape.

    Args:
        model: the reward model (HF ``LlamaForSequenceClassification`` layout).
        label: which of its ``num_labels`` outputs is this objective.

    Returns:
        A :class:`RewardModel` to pass as ``Objective(name, fn=...)``.

    References:
        L. Ouyang et al., "Training language models to follow instructions with human feedback",
        NeurIPS 2022, arXiv 2203.02155.
    """
    if not isinstance(model, LlamaRewardModel):
        raise TypeError(_checks.message("reward_model", "model", f"is a {type(model).__name__}", "a LlamaRewardModel"))
    label = _checks.integer("reward_model", "label", label, minimum=0)
    if label >= model.num_labels:
        raise ValueError(
            _checks.message(
                "reward_model", "label", f"is {label}", f"an output index < num_labels = {model.num_labels}"
            )
        )
    return RewardModel(model, label)


def reward_model_digests(objectives: Sequence[Objective]) -> dict[str, str]:
    """``{"objectives.NAME": parameter_digest}`` for every objective scored by a :func:`reward_model`: what a
    resumed run compares with its first start (the checkpoint holds no reward model; see :mod:`mojax.rl.run`)."""
    return {
        REWARD_MODEL_DIGEST_PREFIX + objective.name: parameter_digest(objective.fn.model)
        for objective in objectives
        if isinstance(objective.fn, RewardModel)
    }


def _accepted_keywords(name: str, fn: Callable) -> frozenset[str] | None:
    """The keywords `fn` accepts (None: any, through **kwargs); TypeError unless it fits the reward signature."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as error:
        raise TypeError(
            _checks.message("Objective", "fn", f"of objective {name!r} has no readable signature", _EXPECTED_SIGNATURE)
        ) from error
    parameters = list(signature.parameters.values())
    kinds = [parameter.kind for parameter in parameters]
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_positional_only = [p for p in positional[2:] if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]
    keywords = frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    takes_two = len(positional) >= 2 or inspect.Parameter.VAR_POSITIONAL in kinds
    takes_any_keyword = inspect.Parameter.VAR_KEYWORD in kinds
    if not takes_two or required_positional_only or not (takes_any_keyword or "completion_ids" in keywords):
        raise TypeError(
            _checks.message("Objective", "fn", f"of objective {name!r} has signature {signature}", _EXPECTED_SIGNATURE)
        )
    return None if takes_any_keyword else keywords


@dataclasses.dataclass(frozen=True)
class Objective:
    """One named reward column of the trainer.

    Attributes:
        name: the metric name, ``[A-Za-z0-9_-]+`` (``rewards/{name}/mean``, ``combiner/weight/{name}``).
        fn: a batched reward callable, a :func:`token_reward` or a :func:`reward_model`.
        weight: the combiner's initial (or fixed) weight for this objective, a finite float >= 0.
        kind: "reward" (maximised) or "cost" (minimised: negated by :func:`signed`).

    Example:
        >>> from mojax.rl.rewards import conciseness
        >>> Objective("short", conciseness(target=10), weight=0.5)
        Objective(name='short', fn=<function ...reward...>, weight=0.5, kind='reward')
        >>> Objective("short", lambda texts: [1.0] * len(texts))
        Traceback (most recent call last):
        TypeError: Objective: `fn` of objective 'short' has signature (texts); expected fn(prompts, ...
    """

    name: str
    fn: Callable[..., Sequence[float | None]] | TokenReward | RewardModel
    weight: float = 1.0
    kind: str = "reward"
    keywords: frozenset[str] | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _checks.names("Objective", "name", [self.name])
        object.__setattr__(self, "weight", _checks.nonnegative("Objective", "weight", self.weight))
        _checks.choice("Objective", "kind", self.kind, KINDS)
        if isinstance(self.fn, TokenReward | RewardModel):
            keywords = frozenset()
        elif callable(self.fn):
            keywords = _accepted_keywords(self.name, self.fn)
        else:
            raise TypeError(
                _checks.message(
                    "Objective", "fn", f"of objective {self.name!r} is a {type(self.fn).__name__}", _EXPECTED_SIGNATURE
                )
            )
        object.__setattr__(self, "keywords", keywords)

    @property
    def sign(self) -> float:
        """+1 for a reward, -1 for a cost."""
        return 1.0 if self.kind == "reward" else -1.0

    def accepts(self, column: str) -> bool:
        """Whether the dataset column `column` is passed to ``fn`` as a keyword."""
        return self.keywords is None or column in self.keywords


def signed(scores: np.ndarray | jax.Array, objectives: Sequence[Objective]) -> np.ndarray | jax.Array:
    """Scores with every cost column negated, so that every column is to be maximised.

    Args:
        scores: f32[B, n], one column per objective (NaN stays NaN).
        objectives: the n objectives, in column order.

    Returns:
        f32[B, n]: ``scores * sign``.

    References:
        J. Dai et al., "Safe RLHF: Safe Reinforcement Learning from Human Feedback", ICLR 2024,
        arXiv 2310.12773 (rewards maximised, costs constrained).
    """
    signs = np.asarray([objective.sign for objective in objectives], np.float32)
    if scores.shape[-1] != signs.size:
        raise ValueError(
            _checks.message("signed", "scores", f"has {scores.shape[-1]} columns", f"{signs.size}, one per objective")
        )
    return scores * signs


def _column_values(where: str, name: str, values: Any, batch_size: int) -> np.ndarray:
    """f64[B] from a Python reward's output: None -> NaN; errors name the objective and the sample."""
    if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
        raise TypeError(
            f"{where}: objective {name!r} returned a {type(values).__name__}; "
            f"expected a list of {batch_size} floats or None, one per sample."
        )
    if len(values) != batch_size:
        sample = min(len(values), batch_size)
        raise ValueError(
            f"{where}: objective {name!r} returned {len(values)} scores for {batch_size} samples "
            f"(sample {sample} {'has no score' if len(values) < batch_size else 'does not exist'}); "
            f"expected one float or None per sample."
        )
    column = np.empty((batch_size,), np.float64)
    for sample, value in enumerate(values):
        if value is None:
            column[sample] = np.nan
        elif isinstance(value, numbers.Real | np.bool_) or (
            isinstance(value, np.ndarray | jax.Array) and value.ndim == 0
        ):
            column[sample] = float(value)
        else:
            raise TypeError(
                f"{where}: objective {name!r} returned {value!r} ({type(value).__name__}) for sample {sample}; "
                f"expected a float, or None for 'not applicable'."
            )
    return column


def _check_finite_or_nan(where: str, name: str, column: np.ndarray) -> np.ndarray:
    """`column` unchanged; ValueError naming the first sample with an infinite score."""
    infinite = np.flatnonzero(np.isinf(column))
    if infinite.size:
        sample = int(infinite[0])
        raise ValueError(
            f"{where}: objective {name!r} returned {column[sample]} for sample {sample}; "
            f"expected a finite float, or None for 'not applicable'."
        )
    return column


def _first_failing_sample(objective: Objective, prompts, completions, kwargs: dict) -> str:
    """Reruns a failed batched reward one sample at a time to say which sample fails on its own."""
    for sample in range(len(completions)):
        single = {key: [value[sample]] for key, value in kwargs.items()}
        try:
            objective.fn([prompts[sample]], [completions[sample]], **single)
        except Exception:  # noqa: BLE001 (any failure locates the sample)
            return f"sample {sample} fails on its own"
    return "no sample fails on its own"


def _python_scores(objective: Objective, prompts, completions, id_lists, columns) -> np.ndarray:
    """f64[B] of a batched Python reward, called with the columns it accepts."""
    kwargs = {"completion_ids": id_lists} | {key: value for key, value in columns.items() if objective.accepts(key)}
    try:
        values = objective.fn(prompts, completions, **kwargs)
    except Exception as error:
        located = _first_failing_sample(objective, prompts, completions, kwargs)
        raise RuntimeError(
            f"score: objective {objective.name!r} raised {type(error).__name__}: {error} ({located})."
        ) from error
    return _column_values("score", objective.name, values, len(completions))


def _array_scores(objective: Objective, arrays: tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
    """f64[B] of a token reward or a reward model (its compiled function applied to `arrays`)."""
    try:
        column = np.asarray(objective.fn.compiled(*arrays), np.float64)
    except Exception as error:
        raise RuntimeError(f"score: objective {objective.name!r} raised {type(error).__name__}: {error}.") from error
    if column.shape != (batch_size,):
        raise ValueError(
            f"score: objective {objective.name!r} returned shape {column.shape}; expected ({batch_size},), one per sample."
        )
    return column


def _padded(where: str, ids: Any, mask: Any, batch_size: int, arg: str) -> tuple[np.ndarray, np.ndarray]:
    """i32[B, L] ids and mask from a right-padded list of lists or from an array (+ mask, default all ones)."""
    if isinstance(ids, np.ndarray | jax.Array):
        ids = np.asarray(ids)
        mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask)
    else:
        lengths = [len(row) for row in ids]
        width = max(lengths, default=0)
        mask = np.asarray([[1] * length + [0] * (width - length) for length in lengths], np.int32).reshape(-1, width)
        ids = np.asarray([list(row) + [0] * (width - len(row)) for row in ids], np.int64).reshape(-1, width)
    if ids.ndim != 2 or ids.shape[0] != batch_size or mask.shape != ids.shape:
        raise ValueError(
            _checks.message(where, arg, f"has shape {ids.shape} (mask {mask.shape})", f"[{batch_size}, L] ids and mask")
        )
    return ids.astype(np.int32), mask.astype(np.int32)


def _id_lists(ids: Any, mask: Any) -> list[list[int]]:
    """Ragged list[list[int]] of the real tokens (mask 1) of an id array, or the lists as given."""
    if not isinstance(ids, np.ndarray | jax.Array):
        return [list(row) for row in ids]
    ids = np.asarray(ids)
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
    return [row[keep].tolist() for row, keep in zip(ids, mask, strict=True)]


def _check_columns(columns: Mapping[str, Sequence] | None, batch_size: int) -> dict[str, Sequence]:
    """The dataset columns, each with one entry per sample and a name that is no reward argument."""
    columns = dict(columns or {})
    for key, values in columns.items():
        if key in RESERVED_COLUMNS:
            raise ValueError(
                _checks.message("score", "columns", f"holds {key!r}", f"no column named {RESERVED_COLUMNS}")
            )
        if not hasattr(values, "__len__") or len(values) != batch_size:
            size = len(values) if hasattr(values, "__len__") else type(values).__name__
            raise ValueError(
                _checks.message("score", "columns", f"[{key!r}] has {size} entries", f"{batch_size}, one per sample")
            )
    return columns


def _token_arrays(
    objectives: Sequence[Objective], batch_size: int, prompt_ids, prompt_mask, completion_ids, completion_mask
) -> tuple[np.ndarray, ...] | None:
    """(prompt_ids, prompt_mask, completion_ids, completion_mask) as i32 arrays when an objective reads tokens."""
    readers = [objective.name for objective in objectives if isinstance(objective.fn, TokenReward | RewardModel)]
    if not readers:
        return None
    if prompt_ids is None:
        raise ValueError(
            _checks.message("score", "prompt_ids", f"is None with token objectives {readers}", "token ids")
        )
    prompt = _padded("score", prompt_ids, prompt_mask, batch_size, "prompt_ids")
    return prompt + _padded("score", completion_ids, completion_mask, batch_size, "completion_ids")


def score(
    objectives: Sequence[Objective],
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    completion_ids: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    columns: Mapping[str, Sequence] | None = None,
    prompt_ids: np.ndarray | jax.Array | None = None,
    prompt_mask: np.ndarray | jax.Array | None = None,
    completion_mask: np.ndarray | jax.Array | None = None,
) -> np.ndarray:
    """Scores a batch of completions under every objective: one column per objective.

    Args:
        objectives: the n objectives (distinct names).
        prompts: B decoded prompts.
        completions: B decoded completions.
        completion_ids: the completions' tokens, list[list[int]] (ragged) or i32[B, T] with `completion_mask`.
        columns: dataset columns, name -> B values; each is passed as a keyword to the Python rewards that
            accept it (e.g. ``answer`` for ``exact_match``).
        prompt_ids: i32[B, P] prompt tokens (any padding); needed by token rewards and reward models.
        prompt_mask: i32[B, P], 1 on real prompt tokens (default all ones).
        completion_mask: i32[B, T], 1 on real completion tokens (default all ones for an array, built from
            the lengths for lists).

    Returns:
        f32[B, n] scores as the objectives give them (costs not negated; see :func:`signed`); NaN where an
        objective returned None or NaN ("not applicable").

    Raises:
        TypeError: an objective returned a non-number (names the objective and the sample).
        ValueError: a wrong number of scores or an infinite score (names the objective and the sample).
        RuntimeError: an objective raised; the cause is chained and the failing sample located when it
            fails on its own.

    References:
        L. von Werra et al., "TRL: Transformer Reinforcement Learning", GitHub, 2020 (reward-function
        signature; None for samples a reward does not apply to).

    Example:
        >>> from mojax.rl.rewards import char_fraction, exact_match
        >>> objectives = [Objective("a", char_fraction("a")), Objective("correct", exact_match())]
        >>> score(objectives, ["q1", "q2"], ["aab", "7"], completion_ids=[[1, 1, 2], [5]],
        ...       columns={"answer": ["3", None]})
        array([[0.6666667, 0.       ],
               [0.       ,       nan]], dtype=float32)
    """
    objectives = tuple(objectives)
    for objective in objectives:
        if not isinstance(objective, Objective):
            raise TypeError(_checks.message("score", "objectives", f"holds a {type(objective).__name__}", "Objectives"))
    _checks.names("score", "objectives", [objective.name for objective in objectives])
    prompts, completions = list(prompts), list(completions)
    batch_size = len(completions)
    if len(prompts) != batch_size or len(completion_ids) != batch_size:
        raise ValueError(
            _checks.message(
                "score",
                "prompts",
                f"has {len(prompts)} entries, completions {batch_size}, completion_ids {len(completion_ids)}",
                "one prompt, completion and id list per sample",
            )
        )
    columns = _check_columns(columns, batch_size)
    id_lists = _id_lists(completion_ids, completion_mask)
    tokens = _token_arrays(objectives, batch_size, prompt_ids, prompt_mask, completion_ids, completion_mask)
    scores = np.empty((batch_size, len(objectives)), np.float64)
    for index, objective in enumerate(objectives):
        if isinstance(objective.fn, TokenReward):
            column = _array_scores(objective, tokens, batch_size)
        elif isinstance(objective.fn, RewardModel):
            sequence = (np.concatenate(tokens[0::2], 1), np.concatenate(tokens[1::2], 1))
            column = _array_scores(objective, sequence, batch_size)
        else:
            column = _python_scores(objective, prompts, completions, id_lists, columns)
        scores[:, index] = _check_finite_or_nan("score", objective.name, column)
    return scores.astype(np.float32)
