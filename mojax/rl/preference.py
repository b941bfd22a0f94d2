"""Preference-optimisation losses (the DPO family), their metrics, MODPO, and per-objective stacking.

Every loss acts on per-pair sequence log-probabilities f32[B] (``sequence_logps``; pass length-averaged
ones for IPO and SimPO, as TRL does). With s = log pi(y|x) - log pi_ref(y|x) for a reference-based loss,
s = log pi(y|x) for a reference-free one, and the margin D = s_chosen - s_rejected, the registry
``PREFERENCE_LOSSES`` holds (beta = ``beta``, eps = ``label_smoothing``, and the logistic loss
h_eps(z) = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), TRL's conservative smoothing):

    sigmoid   h_eps(beta D)                                        DPO, Rafailov et al. 2023
    robust    ((1 - eps)(-log sigmoid(beta D)) + eps log sigmoid(-beta D)) / (1 - 2 eps)
    ipo       (D - 1/(2 beta))^2                                   Azar et al. 2024
    hinge     relu(1 - beta D)                                     SLiC, Zhao et al. 2023
    simpo     h_eps(beta D - simpo_gamma), reference-free          Meng et al. 2024
    rdpo      h_eps(beta D - rdpo_alpha (|y_w| - |y_l|))           Park et al. 2024
    dpop      h_eps(beta (D - dpop_lambda relu(-s_chosen)))        Pal et al. 2024
    cpo       h_eps(beta D) + cpo_alpha nll_w, reference-free      Xu et al. 2024
    nca_pair  -log sigmoid(beta s_w) - (log sigmoid(-beta s_w) + log sigmoid(-beta s_l)) / 2   Chen et al. 2024
    bco_pair  -log sigmoid(beta s_w - delta) - log sigmoid(delta - beta s_l)                  Jung et al. 2024
    apo_zero  (1 - sigmoid(beta s_w)) + sigmoid(beta s_l)          D'Oosterlinck et al. 2024
    sft       nll_w

where nll_w is the per-token mean negative log-likelihood of the chosen response (option ``chosen_nll``;
without it -chosen_logps, which is that mean when the log-probabilities are length-averaged). The
first six are ``margin_based``: their value depends on D alone (R-DPO's length term is data, not a
function of the parameters), which is what the gradient-entanglement analysis and MODPO's margins
assume. BCO's shift delta (``bco_delta``) is TRL's running mean of the batch-mean implicit reward (``update_bco_shift``),
carried by the trainer as state. Option names are TRL's; ``rpo_alpha`` adds rpo_alpha * nll_w once to
the combined loss, as TRL does.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mojax import _checks, combiners
from mojax._numerics import safe_divide

Options = Mapping[str, Any]


class PreferenceLossRecord(NamedTuple):
    """One per-pair loss: ``fn(s_chosen f32[B], s_rejected f32[B], beta, options) -> f32[B]``.

    ``margin_based``: fn depends on s_chosen - s_rejected only, so fn(D, 0, ...) is the loss at margin D.
    ``needs_reference``: s = log pi - log pi_ref (True) or s = log pi (False).
    ``requires``: options that have no default and must be given.
    """

    fn: Callable[[jax.Array, jax.Array, float, Options], jax.Array]
    margin_based: bool
    needs_reference: bool
    requires: tuple[str, ...] = ()


class ImplicitRewards(NamedTuple):
    """beta (log pi - log pi_ref) of the chosen and rejected responses and their difference, f32[B] each."""

    chosen: jax.Array
    rejected: jax.Array
    margin: jax.Array


class BcoShift(NamedTuple):
    """Running mean of the batch-mean implicit reward (BCO's delta) and the number of batches seen, f32[]."""

    mean: jax.Array
    count: jax.Array


def _logistic(z: jax.Array, options: Options) -> jax.Array:
    """h_eps(z) = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), eps = label_smoothing."""
    eps = options["label_smoothing"]
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _chosen_nll(s_chosen: jax.Array, options: Options) -> jax.Array:
    """Per-token mean NLL of the chosen response: the ``chosen_nll`` option, else -log pi(y_w) as given."""
    return -s_chosen if options["chosen_nll"] is None else options["chosen_nll"]


def _sigmoid(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    return _logistic(beta * (s_w - s_l), options)


def _robust(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    eps, z = options["label_smoothing"], beta * (s_w - s_l)
    return ((1.0 - eps) * -jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _ipo(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    return (s_w - s_l - 1.0 / (2.0 * beta)) ** 2


def _hinge(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    return jax.nn.relu(1.0 - beta * (s_w - s_l))


def _simpo(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    return _logistic(beta * (s_w - s_l) - options["simpo_gamma"], options)


def _rdpo(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    lengths = options["chosen_lengths"] - options["rejected_lengths"]
    return _logistic(beta * (s_w - s_l) - options["rdpo_alpha"] * lengths, options)


def _dpop(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    return _logistic(beta * (s_w - s_l - options["dpop_lambda"] * jax.nn.relu(-s_w)), options)


def _cpo(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    return _logistic(beta * (s_w - s_l), options) + options["cpo_alpha"] * _chosen_nll(s_w, options)


def _nca_pair(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    return -jax.nn.log_sigmoid(beta * s_w) - 0.5 * (jax.nn.log_sigmoid(-beta * s_w) + jax.nn.log_sigmoid(-beta * s_l))


def _bco_pair(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    delta = jax.lax.stop_gradient(options["bco_delta"])
    return -jax.nn.log_sigmoid(beta * s_w - delta) - jax.nn.log_sigmoid(-(beta * s_l - delta))


def _apo_zero(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    return (1.0 - jax.nn.sigmoid(beta * s_w)) + jax.nn.sigmoid(beta * s_l)


def _sft(s_w: jax.Array, s_l: jax.Array, beta: float, options: Options) -> jax.Array:
    return _chosen_nll(s_w, options)


PREFERENCE_LOSSES: Mapping[str, PreferenceLossRecord] = types.MappingProxyType(
    {
        "sigmoid": PreferenceLossRecord(_sigmoid, margin_based=True, needs_reference=True),
        "robust": PreferenceLossRecord(_robust, margin_based=True, needs_reference=True),
        "ipo": PreferenceLossRecord(_ipo, margin_based=True, needs_reference=True),
        "hinge": PreferenceLossRecord(_hinge, margin_based=True, needs_reference=True),
        "simpo": PreferenceLossRecord(_simpo, margin_based=True, needs_reference=False),
        "rdpo": PreferenceLossRecord(
            _rdpo,
            margin_based=True,
            needs_reference=True,
            requires=("rdpo_alpha", "chosen_lengths", "rejected_lengths"),
        ),
        "dpop": PreferenceLossRecord(_dpop, margin_based=False, needs_reference=True),
        "cpo": PreferenceLossRecord(_cpo, margin_based=False, needs_reference=False),
        "nca_pair": PreferenceLossRecord(_nca_pair, margin_based=False, needs_reference=True),
        "bco_pair": PreferenceLossRecord(_bco_pair, margin_based=False, needs_reference=True, requires=("bco_delta",)),
        "apo_zero": PreferenceLossRecord(_apo_zero, margin_based=False, needs_reference=True),
        "sft": PreferenceLossRecord(_sft, margin_based=False, needs_reference=False),
    }
)
"""Per-pair preference losses by TRL ``loss_type`` name (read-only)."""

_OPTION_DEFAULTS: Mapping[str, Any] = types.MappingProxyType(
    {
        "label_smoothing": 0.0,
        "simpo_gamma": 0.5,
        "cpo_alpha": 1.0,
        "rpo_alpha": None,
        "rdpo_alpha": None,
        "dpop_lambda": 50.0,
        "chosen_nll": None,
        "chosen_lengths": None,
        "rejected_lengths": None,
        "bco_delta": None,
    }
)
_ARRAY_OPTIONS = ("chosen_nll", "chosen_lengths", "rejected_lengths", "bco_delta")


def _loss_types(where: str, loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """The loss names as a tuple: known, distinct, at least one."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise ValueError(_checks.message(where, "loss_type", "is empty", "a loss name or a non-empty list of them"))
    for name in names:
        if not isinstance(name, str):
            raise TypeError(_checks.message(where, "loss_type", f"holds {name!r}", "loss names (strings)"))
        _checks.choice(where, "loss_type", name, PREFERENCE_LOSSES)
    if len(set(names)) != len(names):
        raise ValueError(_checks.message(where, "loss_type", f"repeats a name in {list(names)}", "distinct names"))
    return names


def _checked_options(where: str, names: tuple[str, ...], options: Options) -> dict[str, Any]:
    """Defaults filled in, scalar hyperparameters checked, required options present; unknown names are a TypeError."""
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise TypeError(
            _checks.message(where, "options", f"has unknown names {unknown}", f"names among {sorted(_OPTION_DEFAULTS)}")
        )
    merged = {**_OPTION_DEFAULTS, **options}
    merged["label_smoothing"] = _checks.in_range(
        where, "label_smoothing", merged["label_smoothing"], low=0.0, high=0.5, high_open="robust" in names
    )
    merged["simpo_gamma"] = _checks.finite(where, "simpo_gamma", merged["simpo_gamma"])
    for name in ("cpo_alpha", "dpop_lambda"):
        merged[name] = _checks.nonnegative(where, name, merged[name])
    if merged["rpo_alpha"] is not None:
        merged["rpo_alpha"] = _checks.nonnegative(where, "rpo_alpha", merged["rpo_alpha"])
    if merged["rdpo_alpha"] is not None:
        merged["rdpo_alpha"] = _checks.finite(where, "rdpo_alpha", merged["rdpo_alpha"])
    for name in names:
        missing = [option for option in PREFERENCE_LOSSES[name].requires if merged[option] is None]
        if missing:
            raise ValueError(_checks.message(where, "options", f"lack {missing} for {name!r}", f"{missing} given"))
    for option in _ARRAY_OPTIONS:
        if merged[option] is not None:
            merged[option] = jnp.asarray(merged[option], jnp.float32)
    return merged


def _log_ratios(
    where: str,
    record: PreferenceLossRecord,
    name: str,
    logps: tuple[jax.Array, jax.Array],
    ref_logps: tuple[jax.Array | None, jax.Array | None],
) -> tuple[jax.Array, jax.Array]:
    """(s_chosen, s_rejected): log-ratios to the reference for a reference-based loss, else the log-probs."""
    if not record.needs_reference:
        return logps
    if any(ref is None for ref in ref_logps):
        raise ValueError(
            _checks.message(where, "ref_chosen_logps / ref_rejected_logps", "are missing", f"both for {name!r}")
        )
    return tuple(logp - jnp.asarray(ref, jnp.float32) for logp, ref in zip(logps, ref_logps, strict=True))


def _pair_logps(where: str, chosen_logps: Any, rejected_logps: Any) -> tuple[jax.Array, jax.Array]:
    chosen, rejected = jnp.asarray(chosen_logps, jnp.float32), jnp.asarray(rejected_logps, jnp.float32)
    if chosen.ndim != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            _checks.message(
                where,
                "chosen_logps / rejected_logps",
                f"have shapes {chosen.shape} and {rejected.shape}",
                "f32[B] each",
            )
        )
    return chosen, rejected


def preference_loss(
    loss_type: str | Sequence[str],
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    *,
    beta: float = 0.1,
    **options: Any,
) -> jax.Array:
    """Per-pair preference loss f32[B]: one registry loss, or TRL's weighted sum of several.

    Args:
      loss_type: a name of ``PREFERENCE_LOSSES`` or a list of distinct names.
      chosen_logps: f32[B] sequence log-probabilities log pi(y_w|x) (length-averaged for ipo, simpo).
      rejected_logps: f32[B] log pi(y_l|x).
      ref_chosen_logps: f32[B] log pi_ref(y_w|x); required by reference-based losses.
      ref_rejected_logps: f32[B] log pi_ref(y_l|x).
      beta: inverse temperature (> 0, a Python number).
      **options: TRL's names: ``loss_weights`` (one per loss, default ones), ``label_smoothing`` (0),
        ``simpo_gamma`` (0.5), ``cpo_alpha`` (1.0), ``rpo_alpha`` (None), ``rdpo_alpha`` with
        ``chosen_lengths`` / ``rejected_lengths`` f32[B], ``dpop_lambda`` (50), ``bco_delta`` f32[]
        (``update_bco_shift``), ``chosen_nll`` f32[B].

    Returns:
      f32[B]: sum_k loss_weights[k] * loss_k per pair (+ rpo_alpha * nll_w when ``rpo_alpha`` is set).

    References:
      Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
      NeurIPS 2023, arXiv 2305.18290. Azar et al., "A General Theoretical Paradigm to Understand Learning
      from Human Preferences", AISTATS 2024, arXiv 2310.12036. Meng et al., "SimPO: Simple Preference
      Optimization with a Reference-Free Reward", NeurIPS 2024, arXiv 2405.14734. Park et al.,
      "Disentangling Length from Quality in Direct Preference Optimization", ACL Findings 2024, arXiv
      2403.19159. Pal et al., "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive",
      2024, arXiv 2402.13228. Xu et al., "Contrastive Preference Optimization", ICML 2024, arXiv 2401.08417.
      Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards", NeurIPS 2024,
      arXiv 2402.05369. Jung et al., "Binary Classifier Optimization for Large Language Model Alignment",
      2024, arXiv 2404.04656. D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive
      Revisions", 2024, arXiv 2408.06266. Pang et al., "Iterative Reasoning Preference Optimization",
      NeurIPS 2024, arXiv 2404.19733 (``rpo_alpha``).

    Example:
      >>> import jax.numpy as jnp
      >>> loss = preference_loss("sigmoid", jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]),
      ...                        jnp.array([-2.0]), beta=0.5)
      >>> round(float(loss[0]), 4)  # -log sigmoid(0.5 * ((-1 + 2) - (-3 + 2)))
      0.3133
    """
    where = "preference_loss"
    names = _loss_types(where, loss_type)
    beta = _checks.positive(where, "beta", beta)
    weights = options.pop("loss_weights", None)
    weights = (1.0,) * len(names) if weights is None else _checks.finite_vector(where, "loss_weights", weights).tolist()
    if len(weights) != len(names):
        raise ValueError(
            _checks.message(where, "loss_weights", f"has {len(weights)} entries", f"{len(names)}, one per loss_type")
        )
    options = _checked_options(where, names, options)
    logps = _pair_logps(where, chosen_logps, rejected_logps)
    total = jnp.zeros_like(logps[0])
    for name, weight in zip(names, weights, strict=True):
        record = PREFERENCE_LOSSES[name]
        s_chosen, s_rejected = _log_ratios(where, record, name, logps, (ref_chosen_logps, ref_rejected_logps))
        total = total + weight * record.fn(s_chosen, s_rejected, beta, options)
    if options["rpo_alpha"] is not None:
        total = total + options["rpo_alpha"] * _chosen_nll(logps[0], options)
    return total


def sequence_logps(token_logps: jax.Array, mask: jax.Array, *, average: bool = False) -> jax.Array:
    """Sequence log-probabilities f32[B] from token log-probabilities f32[B, T] and a (soft) mask f32[B, T].

    Args:
      token_logps: f32[B, T] log pi(y_t | x, y_<t).
      mask: f32[B, T] response mask (1 on response tokens; a soft mask in [0, 1] weights tokens).
      average: divide by the mask's sum (SimPO's and IPO's length normalisation); 0 for an empty row.

    Returns:
      f32[B] sum_t mask * token_logps, or that sum over sum_t mask.

    References:
      Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward", NeurIPS 2024,
      arXiv 2405.14734.
    """
    token_logps, mask = jnp.asarray(token_logps, jnp.float32), jnp.asarray(mask, jnp.float32)
    if token_logps.ndim != 2 or token_logps.shape != mask.shape:
        raise ValueError(
            _checks.message(
                "sequence_logps",
                "token_logps / mask",
                f"have shapes {token_logps.shape} and {mask.shape}",
                "f32[B, T] each",
            )
        )
    total = jnp.sum(token_logps * mask, axis=-1)
    return safe_divide(total, jnp.sum(mask, axis=-1)) if average else total


def implicit_rewards(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    *,
    beta: float = 0.1,
) -> ImplicitRewards:
    """DPO's implicit rewards beta (log pi - log pi_ref) (beta log pi without a reference) and their margins.

    Args:
      chosen_logps, rejected_logps: f32[B] policy sequence log-probabilities.
      ref_chosen_logps, ref_rejected_logps: f32[B] reference log-probabilities, both or neither.
      beta: the loss's beta.

    Returns:
      ``ImplicitRewards(chosen, rejected, margin)``, f32[B] each, with no gradient.

    References:
      Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
      NeurIPS 2023, arXiv 2305.18290.
    """
    where = "implicit_rewards"
    beta = _checks.positive(where, "beta", beta)
    logps = _pair_logps(where, chosen_logps, rejected_logps)
    refs = (ref_chosen_logps, ref_rejected_logps)
    if (refs[0] is None) != (refs[1] is None):
        raise ValueError(
            _checks.message(where, "ref_chosen_logps / ref_rejected_logps", "has one of two", "both or neither")
        )
    if refs[0] is not None:
        logps = tuple(logp - jnp.asarray(ref, jnp.float32) for logp, ref in zip(logps, refs, strict=True))
    chosen, rejected = jax.lax.stop_gradient((beta * logps[0], beta * logps[1]))
    return ImplicitRewards(chosen, rejected, chosen - rejected)


def reward_accuracy(margin: jax.Array) -> jax.Array:
    """mean[margin > 0] over the pairs, f32[] (0 for an empty batch)."""
    margin = jnp.asarray(margin, jnp.float32)
    return safe_divide(jnp.sum(margin > 0).astype(jnp.float32), jnp.asarray(margin.size, jnp.float32))


def preference_metrics(
    rewards: ImplicitRewards, chosen_logps: jax.Array, rejected_logps: jax.Array
) -> dict[str, jax.Array]:
    """TRL's DPO metrics: ``rewards/{chosen,rejected,margins,accuracies}`` and ``logps/{chosen,rejected}`` (batch means)."""
    return {
        "rewards/chosen": jnp.mean(rewards.chosen),
        "rewards/rejected": jnp.mean(rewards.rejected),
        "rewards/margins": jnp.mean(rewards.margin),
        "rewards/accuracies": reward_accuracy(rewards.margin),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(chosen_logps)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(rejected_logps)),
    }


def init_bco_shift() -> BcoShift:
    """BCO's shift before the first batch: mean 0, no batch seen."""
    return BcoShift(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def update_bco_shift(shift: BcoShift, rewards: ImplicitRewards) -> BcoShift:
    """Fold this batch's mean implicit reward (chosen and rejected together) into the running mean delta.

    TRL updates its running moments with one number per batch, mean(cat(r_w, r_l)), then uses the
    updated mean: delta_k = (1/k) sum_{j <= k} batch_mean_j. Pass ``bco_delta=new_shift.mean``.

    Args:
      shift: the state carried by the trainer (``init_bco_shift()`` first).
      rewards: this batch's ``implicit_rewards``.

    Returns:
      The updated ``BcoShift``.

    References:
      Jung et al., "Binary Classifier Optimization for Large Language Model Alignment", 2024, arXiv 2404.04656.
    """
    batch_mean = jnp.mean(jnp.concatenate([rewards.chosen, rewards.rejected]))
    count = shift.count + 1.0
    return BcoShift(shift.mean + (batch_mean - shift.mean) / count, count)


def modpo_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    margin_chosen: jax.Array,
    margin_rejected: jax.Array,
    *,
    weights: Sequence[float],
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    **options: Any,
) -> jax.Array:
    """MODPO: a margin loss on objective 0's pairs, shifted by the other objectives' reward margins, f32[B].

    With w = (w_0, w_rest), the loss is l(R) at R = (beta D - w_rest . (r_w - r_l)) / w_0, where l is the
    margin loss ``loss_type`` written as a function of its logit beta D; for ``sigmoid`` that is
    -log sigmoid((beta D - w_rest . (r_w - r_l)) / w_0). Zero margins and w_0 = 1 give DPO.

    Args:
      chosen, rejected, ref_chosen, ref_rejected: f32[B] sequence log-probabilities for objective 0's pairs.
      margin_chosen, margin_rejected: f32[n - 1, B] rewards r_1..r_{n-1}(x, y) of the other objectives
        (frozen reward models or implicit DPO rewards; held constant, no gradient flows into them).
      weights: f32[n] preference weights on the simplex, w_0 > 0.
      beta: DPO's beta.
      loss_type: a ``margin_based`` loss of ``PREFERENCE_LOSSES``.
      **options: that loss's options, as for ``preference_loss``.

    Returns:
      f32[B] per-pair loss.

    References:
      Zhou et al., "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference
      Optimization", ACL Findings 2024, arXiv 2310.03708.

    Example:
      >>> import jax.numpy as jnp
      >>> zeros = jnp.zeros((1, 1))
      >>> loss = modpo_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5]),
      ...                   zeros, zeros, weights=[1.0, 0.0], beta=1.0)
      >>> round(float(loss[0]), 4)  # DPO: -log sigmoid(1.0 * (0.5 - (-0.5)))
      0.3133
    """
    where = "modpo_loss"
    names = _loss_types(where, loss_type)
    record = PREFERENCE_LOSSES[names[0]]
    if len(names) != 1 or not record.margin_based:
        raise ValueError(_checks.message(where, "loss_type", f"is {loss_type!r}", "one margin_based loss name"))
    beta = _checks.positive(where, "beta", beta)
    weights = _checks.simplex(where, "weights", weights)
    if weights[0] <= 0:
        raise ValueError(_checks.message(where, "weights", f"has w_0 = {weights[0]:g}", "w_0 > 0"))
    rewards_w, rewards_l = (jnp.asarray(m, jnp.float32) for m in (margin_chosen, margin_rejected))
    logps = _pair_logps(where, chosen, rejected)
    expected = (weights.size - 1, logps[0].shape[0])
    if rewards_w.shape != expected or rewards_l.shape != expected:
        raise ValueError(
            _checks.message(
                where,
                "margin_chosen / margin_rejected",
                f"have shapes {rewards_w.shape}, {rewards_l.shape}",
                f"{expected}",
            )
        )
    options = _checked_options(where, names, options)
    s_chosen, s_rejected = _log_ratios(where, record, names[0], logps, (ref_chosen, ref_rejected))
    margin = jax.lax.stop_gradient(jnp.tensordot(jnp.asarray(weights[1:], jnp.float32), rewards_w - rewards_l, axes=1))
    effective = (beta * (s_chosen - s_rejected) - margin) / (float(weights[0]) * beta)
    return record.fn(effective, jnp.zeros_like(effective), beta, options)


def stack_preference_losses(pair_losses: jax.Array, objective_ids: jax.Array, num_objectives: int) -> jax.Array:
    """Per-objective preference losses f32[n]: the mean of ``pair_losses`` over each objective's pairs.

    Each pair belongs to the preference data of one objective; an id outside [0, n) (e.g. -1 for padding)
    excludes the pair, and an objective with no pair gets 0 (with a zero gradient, never NaN).

    Args:
      pair_losses: f32[B] from ``preference_loss``.
      objective_ids: i32[B] objective of each pair.
      num_objectives: n.

    Returns:
      f32[n], to feed a Gram combiner (``check_combiner_for_preference``).

    Example:
      >>> import jax.numpy as jnp
      >>> stack_preference_losses(jnp.array([1.0, 2.0, 3.0]), jnp.array([0, 1, 0]), 2).tolist()
      [2.0, 2.0]

    References:
      Zhou et al., "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference
      Optimization", ACL Findings 2024, arXiv 2310.03708 (one preference dataset per objective).
    """
    n = _checks.integer("stack_preference_losses", "num_objectives", num_objectives, minimum=1)
    pair_losses = jnp.asarray(pair_losses, jnp.float32)
    membership = jax.nn.one_hot(jnp.asarray(objective_ids), n, dtype=jnp.float32)
    if pair_losses.ndim != 1 or membership.shape[0] != pair_losses.shape[0]:
        raise ValueError(
            _checks.message(
                "stack_preference_losses",
                "pair_losses / objective_ids",
                f"have shapes {pair_losses.shape} and {jnp.shape(objective_ids)}",
                "f32[B] and i32[B]",
            )
        )
    return safe_divide(jnp.tensordot(pair_losses, membership, axes=1), jnp.sum(membership, axis=0))


_PER_SAMPLE_READS = ("rewards", "signal", "advantages")


def check_combiner_for_preference(name_or_reads: str | Iterable[str]) -> tuple[str, ...]:
    """The combiner's ``reads`` if it can weight preference losses; ValueError if it needs rollout statistics.

    Preference data has no per-sample rewards, reward-signal covariances or advantages, so combiners that
    read ``rewards``, ``signal`` or ``advantages`` (CTWA, PAMA, Lagrangian) cannot run on it; Gram and
    fixed-weight combiners can.

    Args:
      name_or_reads: a combiner name, looked up as ``mojax.combiners.REGISTRY[name].reads``, or that
        ``reads`` tuple itself.

    Returns:
      The ``reads`` tuple.
    """
    where = "check_combiner_for_preference"
    if isinstance(name_or_reads, str):
        registry = getattr(combiners, "REGISTRY", None)
        if registry is None or name_or_reads not in registry:
            known = sorted(registry) if registry is not None else "none (no combiner registry; pass the reads tuple)"
            raise ValueError(_checks.message(where, "name_or_reads", f"is {name_or_reads!r}", f"a combiner in {known}"))
        reads = tuple(registry[name_or_reads].reads)
        seen = f"names {name_or_reads!r}, which reads"
    else:
        reads = tuple(name_or_reads)
        seen = "reads"
    for read in reads:
        if not isinstance(read, str):
            raise TypeError(_checks.message(where, "name_or_reads", f"holds {read!r}", "names of combiner inputs"))
    needed = [read for read in reads if read in _PER_SAMPLE_READS]
    if needed:
        raise ValueError(
            _checks.message(
                where,
                "name_or_reads",
                f"{seen} {needed}",
                f"a combiner reading none of {list(_PER_SAMPLE_READS)}: preference pairs have no rewards, signal or advantages",
            )
        )
    return reads
