"""The preference trainer's configuration (``mojax dpo``): frozen dataclasses with a docstring per field.

The model, optimizer, logging, checkpoint and mesh sections are those of :mod:`mojax.rl.config`; YAML loading and
``dotted.key=value`` overrides use its helpers, so the same rules hold (unknown keys and mistyped values are errors
naming the dotted key, raised before anything is compiled). Option names are TRL's ``DPOConfig`` ones where TRL has
one (``loss_type``, ``loss_weights``, ``beta``, ``label_smoothing``, ``simpo_gamma``, ``cpo_alpha``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mojax import _checks as checks
from mojax.rl import config as rl_config

LENGTH_AVERAGED_LOSSES = ("ipo", "simpo")
"""Losses that see length-averaged log-probabilities when ``preference.length_average`` is None (as in TRL)."""
TINY_PAIR_SETTINGS = ("one_token", "shared_prefix")
"""Settings of the built-in ``"tiny_synthetic"`` pairs (see :func:`mojax.rl.dpo.tiny_preference_pairs`)."""
SENTIMENT_PAIR_SETTINGS = ("one_token", "short_suffix", "long_suffix")
"""Settings of the built-in ``"sentiment_synthetic"`` pairs (``mojax.data.synthetic_sentiment_pairs``)."""
PAIR_SETTINGS = {"tiny_synthetic": TINY_PAIR_SETTINGS, "sentiment_synthetic": SENTIMENT_PAIR_SETTINGS}
"""The built-in pair sources and their settings."""
MITIGATIONS = ("npo", "shared_prefix", "learned_mask")
"""The mitigations of gradient entanglement that ``preference.mitigation`` may name."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceSection:
    """The preference loss, its reference, the entanglement probe and the mitigation."""

    loss_type: Any = "sigmoid"
    """A name of ``mojax.rl.preference.PREFERENCE_LOSSES`` or a list of them (summed with ``loss_weights``)."""
    loss_weights: Sequence[float] | None = None
    """One weight per loss of ``loss_type``; None: all ones."""
    beta: float = 0.1
    """The inverse temperature beta of the loss and of the implicit rewards."""
    label_smoothing: float = 0.0
    """TRL's conservative label smoothing eps in [0, 0.5]."""
    simpo_gamma: float = 0.5
    """SimPO's target margin."""
    cpo_alpha: float = 1.0
    """CPO's weight of the chosen response's negative log-likelihood."""
    reference: str = "precompute"
    """``"precompute"``: the initial policy's log-probs of every pair once before training; ``"on_the_fly"``: a frozen
    copy of the initial parameters scores each batch."""
    length_average: bool | None = None
    """Divide sequence log-probs by the response length; None: True for ipo and simpo, False otherwise (TRL)."""
    rdpo_alpha: float = 0.01
    """R-DPO's length penalty alpha: the logit is beta D - alpha (|y_w| - |y_l|), lengths in tokens (EOS included)."""
    mitigation: Any = "none"
    """``"none"``, or one or a list of ``"npo"`` (pairwise-normalised gradient with per-pair probe norms),
    ``"shared_prefix"`` (the common prefix of chosen and rejected left out of both log-probs) and ``"learned_mask"``
    (trained per-token masks with an L1 penalty, on top of the shared-prefix mask when both are given)."""
    mask_l1: float = 0.01
    """``learned_mask``: weight of the L1 penalty mask_l1 * mean(mu) over the response tokens of the batch."""
    mask_learning_rate: float = 0.1
    """``learned_mask``: step size of plain gradient descent on the mask logits (one logit per token of every pair)."""
    mask_init: float = 3.0
    """``learned_mask``: initial logit of every token (sigmoid(3) = 0.95: nearly the unmasked log-probs)."""
    probe: Sequence[str] = ()
    """Parameter path substrings of the probe set of the entanglement statistics and of NPO's norms; empty: the final
    norm plus the LM head when untied (never a tied vocabulary-sized embedding). A tied model's default adds every
    decoder layer's ``post_attention_layernorm`` and ``mlp.down_proj`` (the stacked leaves hold all the layers), so
    each measured response's pullback runs through the whole trunk: ``["model.norm"]`` measures on the final norm
    alone, whose pullbacks run through the LM head only."""
    entanglement_pairs: int = 4
    """Pairs per step (the first of the batch) that get the per-pair entanglement statistics (0: none)."""
    entanglement_every: int = 1
    """Measure the entanglement statistics at steps 1, 1 + k, 1 + 2k, ... only (k = this value; 1: every step). The
    other steps run a second compiled program without them, which trains the same (NPO still reads its norms at every
    step): on SmolLM2-135M the default statistics add half the time of the step without them."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairDataSection:
    """The preference pairs of a single-objective run and how they are tokenised."""

    pairs: Any = "tiny_synthetic"
    """``"tiny_synthetic"``, ``"sentiment_synthetic"``, a .jsonl/.json/.parquet path or a list of
    ``{prompt, chosen, rejected}`` rows."""
    setting: str = "one_token"
    """The setting of a built-in source. ``"tiny_synthetic"``: ``"one_token"`` (the rejected response is the chosen
    one with one character changed) or ``"shared_prefix"`` (a shared prefix, then different suffixes).
    ``"sentiment_synthetic"``: ``"one_token"``, ``"short_suffix"`` or ``"long_suffix"`` (movie-review pairs of the
    gradient-entanglement paper: a shared review, then one differing sentiment word, a short or a long suffix)."""
    snippets: Any = None
    """``"sentiment_synthetic"`` only: the review snippets, a list of strings or a text file with one per line;
    None: the Rotten Tomatoes snippets of ``mojax.data.movie_reviews`` (fetched once into the mojax cache)."""
    num_pairs: int = 32
    """How many pairs to draw for a built-in source, and the limit for other sources."""
    pairs_per_step: int = 8
    """Pairs per training step (per objective in a multi-objective run)."""
    max_prompt_length: int = 16
    """Longest prompt in tokens (longer prompts keep their last tokens)."""
    max_completion_length: int = 16
    """Longest response in tokens, end-of-sequence token included (longer responses are cut)."""
    seed: int = 0
    """Seed of the synthetic pairs, and of the shuffle and ``num_pairs`` selection of loaded ones."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairObjectiveSection:
    """One named objective of a multi-objective run: its own preference pairs."""

    name: str
    """The objective's name ([A-Za-z0-9_-]+): the metric keys use it."""
    pairs: Any
    """Its pairs, in the forms of ``data.pairs``."""
    setting: str = "one_token"
    """As ``data.setting``, for built-in pairs."""
    weight: float = 1.0
    """Its weight where the combiner has weights (linear weights, P-GAPO's preference)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MarginRewardSection:
    """One reward whose margin r(x, y_w) - r(x, y_l) shifts MODPO's loss (named as the RL config's objectives)."""

    name: str
    """The reward's name ([A-Za-z0-9_-]+)."""
    fn: str
    """A built-in reward of ``mojax.rl.rewards.BUILTIN_REWARDS`` or ``"module:function"``."""
    weight: float = 0.0
    """Its MODPO weight w_k (>= 0); ``modpo.weight`` and every reward's weight sum to 1."""
    kind: str = "reward"
    """``"reward"`` or ``"cost"`` (negated before the margin)."""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Options of the reward factory."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModpoSection:
    """MODPO: the preference loss on the pairs, shifted by the weighted reward margins of other objectives."""

    weight: float = 1.0
    """w_0, the weight of the objective the pairs express (> 0)."""
    rewards: Sequence[MarginRewardSection] = ()
    """The other objectives' rewards, scored once on every pair's chosen and rejected texts; empty: plain loss."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceCombinerSection:
    """The combiner of the per-objective preference losses' gradients (full mode)."""

    name: str = "linear"
    """A name of ``mojax.combiners.REGISTRY`` that reads no rewards, signal or advantages (Gram combiners, linear)."""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword options of the combiner's factory."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """A whole preference-optimisation run."""

    output_dir: str
    """Where metrics, checkpoints and the exported policy go; rerunning on it resumes."""
    steps: int
    """The step at which the run stops (nothing else depends on it)."""
    seed: int = 0
    """Seed of the pair order: each pass over a pair set is a new permutation drawn from it."""
    model: rl_config.ModelSection = rl_config.ModelSection()
    """The policy (its initial parameters are the reference)."""
    lora: rl_config.LoraSection = rl_config.LoraSection()
    """Low-rank adapters (rank 0: full fine-tuning). With adapters only they are trained, they are the default probe
    set, and the on-the-fly reference is the base model with the adapters disabled (no copy of the weights); adapter
    dropout is not applied by the preference trainer, so ``lora.dropout`` must be 0."""
    preference: PreferenceSection = PreferenceSection()
    """The loss."""
    data: PairDataSection = PairDataSection()
    """The pairs."""
    objectives: Sequence[PairObjectiveSection] = ()
    """Named pair sources, one per objective (multi-objective DPO); empty: one objective on ``data.pairs``."""
    modpo: ModpoSection = ModpoSection()
    """MODPO's reward margins (off without rewards)."""
    combiner: PreferenceCombinerSection = PreferenceCombinerSection()
    """The multi-objective combiner."""
    optimizer: rl_config.OptimizerSection = rl_config.OptimizerSection()
    """The optimizer."""
    logging: rl_config.LoggingSection = rl_config.LoggingSection()
    """Reporting (``samples_per_step`` is unused: nothing is sampled)."""
    checkpoint: rl_config.CheckpointSection = rl_config.CheckpointSection()
    """Checkpoints."""
    mesh: rl_config.MeshSection = rl_config.MeshSection()
    """Sharding."""
    max_consecutive_skips: int = 3
    """Stop the run after this many consecutive skipped updates (non-finite loss, gradient or weight)."""
    export: bool = True
    """Write the final policy as a Hugging Face folder ``OUTPUT_DIR/policy``."""

    def __post_init__(self) -> None:
        validate(self)

    @property
    def loss_types(self) -> tuple[str, ...]:
        """``preference.loss_type`` as a tuple of names."""
        loss_type = self.preference.loss_type
        return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)

    @property
    def mitigations(self) -> tuple[str, ...]:
        """``preference.mitigation`` as a tuple of names (empty for ``"none"``)."""
        mitigation = self.preference.mitigation
        names = (mitigation,) if isinstance(mitigation, str) else tuple(mitigation)
        return tuple(name for name in names if name != "none")

    @property
    def length_average(self) -> bool:
        """Whether the losses see length-averaged log-probabilities (``preference.length_average`` resolved)."""
        if self.preference.length_average is not None:
            return self.preference.length_average
        return any(name in LENGTH_AVERAGED_LOSSES for name in self.loss_types)


_CHOICES = {
    "preference.reference": ("precompute", "on_the_fly"),
    "optimizer.schedule": ("constant", "cosine", "linear"),
    "optimizer.name": ("adamw", "sgd"),
    "model.dtype": ("float32", "bfloat16"),
    "mesh.rules": ("dp", "fsdp", "fsdp_tp"),
}
_POSITIVE_INTS = (
    "steps",
    "data.num_pairs",
    "data.pairs_per_step",
    "data.max_prompt_length",
    "data.max_completion_length",
    "preference.entanglement_every",
    "checkpoint.save_steps",
    "checkpoint.max_to_keep",
    "max_consecutive_skips",
)


def _get(config: Any, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), config)


def validate(config: DPOConfig) -> None:
    """Cross-field checks of a DPOConfig; ValueError (TypeError for a wrong type) naming the key and what was expected."""
    from mojax.combiners import REGISTRY
    from mojax.rl.preference import PREFERENCE_LOSSES, check_combiner_for_preference

    where = "DPOConfig"
    for key, options in _CHOICES.items():
        checks.choice(where, key, _get(config, key), options)
    for key in _POSITIVE_INTS:
        checks.integer(where, key, _get(config, key), minimum=1)
    rl_config.check_model_section(where, config.model)
    rl_config.check_checkpoint_section(where, config.checkpoint)
    preference = config.preference
    checks.integer(where, "preference.entanglement_pairs", preference.entanglement_pairs, minimum=0)
    checks.integer(where, "lora.rank", config.lora.rank, minimum=0)
    if config.lora.dropout != 0:
        seen = f"is {config.lora.dropout}"
        raise ValueError(checks.message(where, "lora.dropout", seen, "0 (the preference trainer applies no dropout)"))
    names = config.loss_types
    if not names:
        raise ValueError(checks.message(where, "preference.loss_type", "is empty", "a loss name or a list of them"))
    for name in names:
        if not isinstance(name, str):
            raise TypeError(checks.message(where, "preference.loss_type", f"holds {name!r}", "loss names (strings)"))
        checks.choice(where, "preference.loss_type", name, PREFERENCE_LOSSES)
    if preference.loss_weights is not None:
        checks.finite_vector(where, "preference.loss_weights", preference.loss_weights, length=len(names))
    checks.positive(where, "preference.beta", preference.beta)
    checks.in_range(
        where, "preference.label_smoothing", preference.label_smoothing, low=0.0, high=0.5, high_open="robust" in names
    )
    checks.nonnegative(where, "preference.cpo_alpha", preference.cpo_alpha)
    checks.finite(where, "preference.rdpo_alpha", preference.rdpo_alpha)
    mitigations = config.mitigations
    for name in mitigations:
        if not isinstance(name, str):
            raise TypeError(checks.message(where, "preference.mitigation", f"holds {name!r}", "mitigation names"))
        checks.choice(where, "preference.mitigation", name, ("none", *MITIGATIONS))
    if len(set(mitigations)) != len(mitigations):
        raise ValueError(
            checks.message(where, "preference.mitigation", f"repeats a name in {list(mitigations)}", "distinct names")
        )
    checks.nonnegative(where, "preference.mask_l1", preference.mask_l1)
    checks.positive(where, "preference.mask_learning_rate", preference.mask_learning_rate)
    checks.finite(where, "preference.mask_init", preference.mask_init)
    if "learned_mask" in mitigations and preference.reference != "on_the_fly":
        raise ValueError(
            checks.message(
                where,
                "preference.reference",
                f"is {preference.reference!r} with mitigation 'learned_mask'",
                "'on_the_fly' (the reference's log-probs read the learned mask too)",
            )
        )
    if "npo" in mitigations:
        anchored = [name for name in names if not PREFERENCE_LOSSES[name].margin_based]
        if anchored:
            raise ValueError(
                checks.message(
                    where, "preference.loss_type", f"holds {anchored} with mitigation 'npo'", "margin_based losses"
                )
            )
    _check_setting(where, "data", config.data.pairs, config.data.setting)
    _check_modpo(where, config)
    checks.choice(where, "combiner.name", config.combiner.name, REGISTRY)
    check_combiner_for_preference(config.combiner.name)
    if config.objectives:
        checks.names(where, "objectives[].name", [objective.name for objective in config.objectives])
        for objective in config.objectives:
            checks.nonnegative(where, f"objectives.{objective.name}.weight", objective.weight)
            _check_setting(where, f"objectives.{objective.name}", objective.pairs, objective.setting)
    checks.positive(where, "optimizer.learning_rate", config.optimizer.learning_rate)
    if config.optimizer.schedule != "constant" and config.optimizer.schedule_steps is None:
        raise ValueError(
            checks.message(
                where, "optimizer.schedule_steps", "is None", f"the decay length for {config.optimizer.schedule!r}"
            )
        )


def _check_setting(where: str, prefix: str, pairs: Any, setting: str) -> None:
    """The setting must be one of its built-in source's (other sources ignore it)."""
    if isinstance(pairs, str) and pairs in PAIR_SETTINGS:
        checks.choice(where, f"{prefix}.setting", setting, PAIR_SETTINGS[pairs])


def _check_modpo(where: str, config: DPOConfig) -> None:
    """MODPO's rewards: distinct names, weights with w_0 > 0 on the simplex, one margin-based loss."""
    from mojax.rl.preference import PREFERENCE_LOSSES

    modpo = config.modpo
    if not modpo.rewards:
        return
    checks.names(where, "modpo.rewards[].name", [reward.name for reward in modpo.rewards])
    checks.positive(where, "modpo.weight", modpo.weight)
    for reward in modpo.rewards:
        checks.nonnegative(where, f"modpo.rewards.{reward.name}.weight", reward.weight)
        checks.choice(where, f"modpo.rewards.{reward.name}.kind", reward.kind, ("reward", "cost"))
    total = modpo.weight + sum(reward.weight for reward in modpo.rewards)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(
            checks.message(where, "modpo.weight", f"and the rewards' weights sum to {total:g}", "weights summing to 1")
        )
    names = config.loss_types
    if len(names) != 1 or not PREFERENCE_LOSSES[names[0]].margin_based:
        raise ValueError(
            checks.message(
                where, "preference.loss_type", f"is {list(names)} with modpo.rewards", "one margin_based loss"
            )
        )


def load_dpo_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> DPOConfig:
    """A validated DPOConfig from a YAML path, the name of a built-in config (``"dpo_tiny"``), or a mapping.

    Args:
      source: a YAML file, ``"dpo_tiny"``, or plain nested data.
      overrides: ``dotted.key=value`` assignments applied in order (values are YAML scalars).

    Returns:
      The frozen :class:`DPOConfig`.

    Example:
      >>> config = load_dpo_config("dpo_tiny", ["output_dir=/tmp/dpo", "preference.loss_type=ipo"])
      >>> config.preference.loss_type, config.length_average
      ('ipo', True)
    """
    return rl_config.from_dict(DPOConfig, rl_config.read_config_data(source, overrides, where="load_dpo_config"))
