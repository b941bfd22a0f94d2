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
    mitigation: str = "none"
    """``"none"``, ``"npo"`` (pairwise-normalised gradient with per-pair probe norms) or ``"shared_prefix"`` (the
    common prefix of chosen and rejected left out of both log-probs)."""
    probe: Sequence[str] = ()
    """Parameter path substrings of the probe set of the entanglement statistics and of NPO's norms; empty: the final
    norm plus the LM head when untied (never a tied vocabulary-sized embedding)."""
    entanglement_pairs: int = 4
    """Pairs per step (the first of the batch) that get the per-pair entanglement statistics (0: none)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairDataSection:
    """The preference pairs of a single-objective run and how they are tokenised."""

    pairs: Any = "tiny_synthetic"
    """``"tiny_synthetic"``, a .jsonl/.json/.parquet path or a list of ``{prompt, chosen, rejected}`` rows."""
    setting: str = "one_token"
    """``"tiny_synthetic"`` only: ``"one_token"`` (the rejected response is the chosen one with one character
    changed) or ``"shared_prefix"`` (a shared prefix, then different suffixes)."""
    num_pairs: int = 32
    """How many pairs to draw for ``"tiny_synthetic"``, and the limit for other sources."""
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
    """As ``data.setting``, for ``"tiny_synthetic"`` pairs."""
    weight: float = 1.0
    """Its weight where the combiner has weights (linear weights, P-GAPO's preference)."""


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
    preference: PreferenceSection = PreferenceSection()
    """The loss."""
    data: PairDataSection = PairDataSection()
    """The pairs."""
    objectives: Sequence[PairObjectiveSection] = ()
    """Named pair sources, one per objective (multi-objective DPO); empty: one objective on ``data.pairs``."""
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
    def length_average(self) -> bool:
        """Whether the losses see length-averaged log-probabilities (``preference.length_average`` resolved)."""
        if self.preference.length_average is not None:
            return self.preference.length_average
        return any(name in LENGTH_AVERAGED_LOSSES for name in self.loss_types)


_CHOICES = {
    "preference.reference": ("precompute", "on_the_fly"),
    "preference.mitigation": ("none", "npo", "shared_prefix"),
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
    preference = config.preference
    checks.integer(where, "preference.entanglement_pairs", preference.entanglement_pairs, minimum=0)
    names = config.loss_types
    if not names:
        raise ValueError(checks.message(where, "preference.loss_type", "is empty", "a loss name or a list of them"))
    for name in names:
        if not isinstance(name, str):
            raise TypeError(checks.message(where, "preference.loss_type", f"holds {name!r}", "loss names (strings)"))
        checks.choice(where, "preference.loss_type", name, PREFERENCE_LOSSES)
    unsupported = [name for name in names if PREFERENCE_LOSSES[name].requires]
    if unsupported:
        raise ValueError(
            checks.message(
                where,
                "preference.loss_type",
                f"holds {unsupported}, whose per-pair options the trainer does not provide",
                "losses without required options (sigmoid, robust, ipo, hinge, simpo, dpop, cpo, nca_pair, apo_zero, sft)",
            )
        )
    if preference.loss_weights is not None:
        checks.finite_vector(where, "preference.loss_weights", preference.loss_weights, length=len(names))
    checks.positive(where, "preference.beta", preference.beta)
    checks.in_range(
        where, "preference.label_smoothing", preference.label_smoothing, low=0.0, high=0.5, high_open="robust" in names
    )
    checks.nonnegative(where, "preference.cpo_alpha", preference.cpo_alpha)
    if preference.mitigation == "npo":
        anchored = [name for name in names if not PREFERENCE_LOSSES[name].margin_based]
        if anchored:
            raise ValueError(
                checks.message(
                    where, "preference.loss_type", f"holds {anchored} with mitigation 'npo'", "margin_based losses"
                )
            )
    checks.choice(where, "data.setting", config.data.setting, TINY_PAIR_SETTINGS)
    checks.choice(where, "combiner.name", config.combiner.name, REGISTRY)
    check_combiner_for_preference(config.combiner.name)
    if config.objectives:
        checks.names(where, "objectives[].name", [objective.name for objective in config.objectives])
        for objective in config.objectives:
            checks.nonnegative(where, f"objectives.{objective.name}.weight", objective.weight)
            checks.choice(where, f"objectives.{objective.name}.setting", objective.setting, TINY_PAIR_SETTINGS)
    checks.positive(where, "optimizer.learning_rate", config.optimizer.learning_rate)
    if config.optimizer.schedule != "constant" and config.optimizer.schedule_steps is None:
        raise ValueError(
            checks.message(
                where, "optimizer.schedule_steps", "is None", f"the decay length for {config.optimizer.schedule!r}"
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
