"""Full mode's update equals its definition: combiner(per-objective gradients) + gradient of the shared term.

The reference builds the n + 1 gradients of [L_1 .. L_n, shared] with ``jax.jacrev`` of the vector loss (the way the
update computed them before it skipped the shared term's pullback when that term is zero) on a small softmax policy,
so the check is cheap and independent of the update's pullbacks (vmapped or sequential) and of where it takes the
combined gradient's norm.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mojax.combiners import REGISTRY, ObjectiveTrees, make, tree_gram
from mojax.rl.update import (
    Batch,
    TrainState,
    UpdateSpec,
    clip_to_norm,
    denominators,
    make_train_step,
    minibatch_losses,
    norm_from_gram,
    shared_term_is_zero,
)
from mojax.testing import conditionals

N, B, P, T, V, D = 2, 4, 2, 3, 5, 3


def policy(params, prompt_ids, prompt_mask, tokens, mask):
    """A one-layer softmax policy over V tokens: (log-probs of `tokens` f32[B, T], entropies f32[B, T])."""
    del prompt_ids, prompt_mask, mask
    logits = params["embed"][tokens] @ params["head"]
    logp_all = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
    return picked, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


@functools.cache
def inputs() -> tuple[dict, Batch]:
    rng = np.random.default_rng(0)
    params = {
        "embed": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
        "head": jnp.asarray(rng.normal(size=(D, V)), jnp.float32),
    }
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    logp, _ = policy(params, None, None, tokens, None)
    batch = Batch(
        prompt_ids=jnp.zeros((B, P), jnp.int32),
        prompt_mask=jnp.ones((B, P), jnp.int32),
        tokens=tokens,
        mask=jnp.asarray([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], jnp.float32),
        old_logp=logp + jnp.asarray(rng.normal(scale=0.1, size=(B, T)), jnp.float32),
        ref_logp=logp + jnp.asarray(rng.normal(scale=0.3, size=(B, T)), jnp.float32),
        advantages=jnp.asarray(rng.normal(size=(B, N, T)), jnp.float32),
        rewards=jnp.asarray(rng.normal(size=(B, N)), jnp.float32),
        group_ids=jnp.asarray([0, 0, 1, 1], jnp.int32),
    )
    return params, batch


def spec_for(name: str, entropy_coef: float, sequential: bool = False, kl_in_loss: bool = True) -> UpdateSpec:
    return UpdateSpec(
        mode="full",
        num_objectives=N,
        combiner_name=name,
        reads=REGISTRY[name].reads,
        entropy_coef=entropy_coef,
        sequential_pullbacks=sequential,
        kl_in_loss=kl_in_loss,
    )


def initial_state(combiner, optimizer) -> TrainState:
    """The train state at :func:`inputs`' parameters: fresh optimizer and combiner states, no skips."""
    params, _ = inputs()
    return TrainState(params, optimizer.init(params), combiner.init(params), jnp.int32(0), jnp.int32(0))


def program_text(step, state: TrainState) -> str:
    """The compiled text of the jitted ``step`` on :func:`inputs`' batch at beta 0."""
    _, batch = inputs()
    return step.lower(state, batch, jax.random.key(0), jnp.float32(0), None).compile().as_text()


def reference_params(name: str, beta: float, entropy_coef: float, kl_in_loss: bool = True) -> dict:
    """SGD (learning rate 1) on combiner(g_1 .. g_n) + g_shared, the n + 1 gradients from jax.jacrev."""
    params, batch = inputs()
    spec = spec_for(name, entropy_coef, kl_in_loss=kl_in_loss)
    divide = denominators(batch.mask, spec)
    vector = lambda p: minibatch_losses(policy, p, batch, divide, jnp.float32(beta), spec)[0]  # noqa: E731
    stacked = jax.jacrev(vector)(params)
    combiner = make(name, N)
    extras = {"losses": vector(params)[:N]} if "losses" in spec.reads else {}
    combined, _ = combiner.update(jax.tree.map(lambda g: g[:N], stacked), combiner.init(params), params, **extras)
    return jax.tree.map(lambda p, c, g: p - (c + g[N]), params, combined, stacked)


@functools.cache
def compiled_step(name: str, entropy_coef: float, sequential: bool = False, kl_in_loss: bool = True):
    """The jitted full-mode step (beta is traced: one compilation serves every beta)."""
    spec = spec_for(name, entropy_coef, sequential, kl_in_loss)
    return jax.jit(make_train_step(policy, make(name, N), optax.sgd(1.0), spec))


def full_mode_params(
    name: str, beta: float, entropy_coef: float, sequential: bool = False, kl_in_loss: bool = True
) -> dict:
    _, batch = inputs()
    combiner, optimizer = make(name, N), optax.sgd(1.0)
    step = compiled_step(name, entropy_coef, sequential, kl_in_loss)
    state = initial_state(combiner, optimizer)
    new_state, metrics = step(state, batch, jax.random.key(0), jnp.float32(beta), None)
    assert int(metrics["skipped"]) == 0
    return new_state.params


@pytest.mark.parametrize(
    ("name", "beta", "entropy_coef", "sequential", "kl_in_loss"),
    [
        ("mgda", 0.0, 0.0, False, True),
        ("mgda", 0.5, 0.0, False, True),
        ("mgda", 0.0, 0.1, False, True),
        ("mgda", 0.5, 0.1, False, True),
        ("upgrad", 0.5, 0.0, False, True),
        ("mgda", 0.0, 0.0, True, True),
        ("mgda", 0.5, 0.1, True, True),
        ("mgda", 0.5, 0.0, False, False),  # no shared term: its pullback is skipped
        ("mgda", 0.5, 0.0, True, False),
    ],
)
def test_full_mode_update_equals_combined_gradients_plus_the_shared_gradient(
    name, beta, entropy_coef, sequential, kl_in_loss
):
    """Batched (vmapped) and sequential (lax.map) pullbacks alike."""
    got = full_mode_params(name, beta, entropy_coef, sequential, kl_in_loss)
    want = reference_params(name, beta, entropy_coef, kl_in_loss)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["full", "probe"])
@pytest.mark.parametrize(("sequential", "separate"), [(True, True), (False, False)])
def test_pullbacks_in_sequence_leave_separate_trees_that_the_combiner_reads(mode, sequential, separate, monkeypatch):
    """Without a mesh, the step's pullbacks in sequence are n separate gradient trees (no stacked copy), and the
    combiner and the Gram get them as ``ObjectiveTrees`` (probe mode: with every leaf in the probe); batched ones stay
    stacked."""
    from mojax.rl import update

    seen = []
    monkeypatch.setattr(update, "tree_gram", lambda objectives: seen.append(objectives) or tree_gram(objectives))
    params, batch = inputs()
    combiner, optimizer = make("mgda", N), optax.sgd(1.0)
    state = initial_state(combiner, optimizer)
    spec = spec_for("mgda", 0.0, sequential, kl_in_loss=False)._replace(mode=mode)
    step = make_train_step(policy, combiner, optimizer, spec, [True] * len(jax.tree.leaves(params)))
    jax.jit(step).lower(state, batch, jax.random.key(0), jnp.float32(0), None)
    assert seen and all(isinstance(objectives, ObjectiveTrees) == separate for objectives in seen)
    if separate:
        assert len(seen[0].trees) == N and jax.tree.structure(seen[0].trees[0]) == jax.tree.structure(params)


def test_the_shared_term_changes_the_update_when_it_is_on():
    off, on = full_mode_params("mgda", 0.0, 0.0), full_mode_params("mgda", 0.5, 0.1)
    assert (
        max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(on), strict=True))
        > 1e-3
    )


@pytest.mark.parametrize(
    ("kl_in_loss", "entropy_coef", "zero"),
    [(True, 0.0, False), (False, 0.0, True), (True, 0.1, False), (False, 0.1, False)],
)
def test_the_shared_term_is_zero_only_without_entropy_bonus_and_kl_in_the_loss(kl_in_loss, entropy_coef, zero):
    spec = UpdateSpec("full", N, "mgda", (), kl_in_loss=kl_in_loss, entropy_coef=entropy_coef)
    assert shared_term_is_zero(spec) is zero


def test_the_logged_cosines_reuse_the_combiners_gram():
    """XLA merges the cosine matrix's Gram with the combiner's: one n x n dot per parameter leaf outside the rare
    rescaling branch (taken only when the raw fp32 Gram over- or underflows)."""
    params, _ = inputs()
    combiner, optimizer = make("mgda", N), optax.sgd(1.0)
    state = initial_state(combiner, optimizer)
    lines = program_text(compiled_step("mgda", 0.0), state).splitlines()
    gram_dots = [line for line in lines if re.search(rf"= f32\[{N},{N}\]\{{[0-9,]*\}} dot\(", line)]
    outside_rescaling = [line for line in gram_dots if "cond/branch" not in line]
    assert len(outside_rescaling) == len(jax.tree.leaves(params))


def _step_hlo(kl_in_loss: bool, sequential: bool) -> str:
    combiner, optimizer = make("mgda", N), optax.sgd(1.0)
    state = initial_state(combiner, optimizer)
    return program_text(compiled_step("mgda", 0.0, sequential, kl_in_loss), state)


@pytest.mark.parametrize("sequential", [False, True])
def test_without_a_shared_term_the_step_runs_no_shared_pullback_and_no_conditional(sequential):
    """The skip is decided when the step is traced: no (n + 1)-th backward pass, and no conditional (whose skipping
    branch would materialise a zero gradient tree to add) but the optimizer's skip of a non-finite update, which
    branches when the pullbacks run in sequence, and the Gram's rescaling of separate trees (``tree_gram``)."""
    skipped, with_kl = _step_hlo(False, sequential), _step_hlo(True, sequential)
    dots = lambda text: len(re.findall(r" dot\(", text))  # noqa: E731
    assert dots(skipped) < dots(with_kl)
    assert len(conditionals(skipped, gram_rescaling=True)) == int(sequential)  # separate trees in sequence
    assert len(conditionals(skipped)) == int(sequential)


def _stepping_branch_inputs(kl_in_loss: bool, shape: str) -> int:
    """How many arrays of ``shape`` the full-mode step (in sequence, AdamW, clipped) hands the branch of its optimizer
    conditional that steps: the larger count of the two branches' inputs (the other takes the old state)."""
    spec = spec_for("mgda", 0.0, True, kl_in_loss)._replace(max_grad_norm=1e-3)
    combiner, optimizer = make("mgda", N), optax.adamw(1e-2)
    state = initial_state(combiner, optimizer)
    text = program_text(jax.jit(make_train_step(policy, combiner, optimizer, spec)), state)
    (skip,) = conditionals(text)
    branches = re.findall(r"%([\w.\-]+)", re.search(r"branch_computations=\{([^}]*)\}", skip).group(1))
    headers = [line for line in text.splitlines() for name in branches if line.startswith(f"%{name} (")]
    return max(header.split(") -> ")[0].count(shape) for header in headers)


@pytest.mark.parametrize(("kl_in_loss", "gradients"), [(False, N), (True, 1)])
def test_without_a_shared_term_the_optimizer_step_combines_the_n_gradients_itself(kl_in_loss, gradients):
    """Without a shared term the combined, clipped gradient is computed inside the optimizer's conditional (where
    XLA fuses it into AdamW's moment updates, and it is never written out): the stepping branch takes each leaf's n
    gradients besides its parameter and two moments. With one, the sum with the shared gradient comes first."""
    assert _stepping_branch_inputs(kl_in_loss, f"f32[{D},{V}]") == gradients + 3


def test_beyond_the_fused_limit_the_optimizer_step_takes_the_combination_written_out(monkeypatch):
    """With more objectives than ``MAX_OBJECTIVES_FUSED_INTO_THE_STEP`` the combination is computed before the
    conditional, which takes it (one array per leaf) in place of the n gradients; the update stays the same."""
    from mojax.rl import update

    fused = full_mode_params("mgda", 0.0, 0.0, sequential=True, kl_in_loss=False)
    monkeypatch.setattr(update, "MAX_OBJECTIVES_FUSED_INTO_THE_STEP", N - 1)
    compiled_step.cache_clear()
    try:
        assert _stepping_branch_inputs(False, f"f32[{D},{V}]") == 1 + 3
        written = full_mode_params("mgda", 0.0, 0.0, sequential=True, kl_in_loss=False)
    finally:
        compiled_step.cache_clear()
    for a, b in zip(jax.tree.leaves(written), jax.tree.leaves(fused), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _stacked_gradients(peak: float = 1e30) -> dict:
    """Three objectives' gradients; the second leaf's ~``peak`` entries overflow a raw fp32 Gram."""
    rng = np.random.default_rng(0)
    return {
        "a": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3, 7)) * peak, jnp.float32),
    }


def test_norm_from_gram_is_the_combinations_norm_without_reading_it():
    stacked, weights = _stacked_gradients(), jnp.asarray([0.2, -0.5, 1.3], jnp.float32)
    norm, finite = norm_from_gram(*tree_gram(stacked), weights)
    combination = [
        np.tensordot(np.asarray(weights, np.float64), np.asarray(g, np.float64), 1) for g in stacked.values()
    ]
    want = np.sqrt(sum(np.sum(c**2) for c in combination))
    assert bool(finite) and float(norm) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    ("poison", "weights"),
    [(jnp.inf, (0.2, -0.5, 1.3)), (jnp.nan, (0.2, -0.5, 1.3)), (None, (1e10, 0.0, 0.0)), (None, (jnp.nan, 0.0, 0.0))],
    ids=["inf-gradient", "nan-gradient", "combination-overflows", "nan-weight"],
)
def test_norm_from_gram_flags_what_makes_the_combination_non_finite(poison, weights):
    stacked = _stacked_gradients()
    if poison is not None:
        stacked["a"] = stacked["a"].at[1, 2, 3].set(poison)
    _, finite = norm_from_gram(*tree_gram(stacked), jnp.asarray(weights, jnp.float32))
    assert not bool(finite)


@pytest.mark.parametrize("max_norm", [0.5, 50.0, None])
def test_clip_to_norm_is_optaxs_global_norm_clip_within_two_ulp(max_norm):
    """The gradient to the bit where it is not clipped (max_norm 50 or None), optax's clip within 2 ulp where it is."""
    grads = _stacked_gradients(peak=3.0)
    norm = optax.tree.norm(grads)
    got = clip_to_norm(grads, norm, max_norm)
    want = grads if max_norm is None else optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())[0]
    clipped = max_norm is not None and max_norm < float(norm)
    assert clipped is (max_norm == 0.5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if clipped:
            np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=2)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if clipped:
        assert float(optax.tree.norm(got)) == pytest.approx(max_norm, rel=1e-6)
