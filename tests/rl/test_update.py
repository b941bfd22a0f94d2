"""The jitted RL update on a fixed rollout: micro-batching, probe/full equivalence, linear = combined rewards, skips,
and the same result on 8 simulated devices (FSDP) as on one."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mojax.models import merge_last_layer
from mojax.rl import advantages as rl_advantages
from mojax.rl.config import load_config
from mojax.rl.trainer import Trainer
from mojax.rl.update import Batch
from mojax.testing import conditionals

# 4 prompts x 2 generations = 8 completions: divisible by 8 devices and by 2 micro-batches.
BASE = [
    "output_dir=unused",
    "steps=1",
    "data.prompts_per_step=4",
    "rollout.num_generations=2",
    "rollout.max_completion_length=6",
    "rollout.max_prompt_length=8",
    "data.num_prompts=8",
    "kl.log_kl=false",
    "optimizer.name=sgd",
    "optimizer.learning_rate=1.0",
    "optimizer.max_grad_norm=null",
]
"""Plain SGD with learning rate 1 and no clipping: parameter changes are the gradients themselves (Adam's first
step, lr * sign(g), would magnify round-off in near-zero gradients)."""


@functools.cache
def trainer(*overrides: str) -> Trainer:
    """A trainer on the tiny task (cached per overrides: each compiles its own update)."""
    return Trainer(load_config("tiny", [*BASE, *overrides]))


@functools.cache
def fixed_batch() -> Batch:
    """The first rollout of the tiny task, scored and turned into advantages by the default (linear, grpo) trainer."""
    return trainer().prepare(1).batch


def unsplit_leaves(run: Trainer) -> list[np.ndarray]:
    """The trainer's parameter leaves, with probe mode's split final block merged back (every mode's leaves align)."""
    params = merge_last_layer(run.state.params) if run.split else run.state.params
    return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def params_after(overrides: tuple[str, ...], batch: Batch, updates: int = 1) -> list[np.ndarray]:
    """Parameters after `updates` updates on `batch` (:func:`unsplit_leaves`) of the trainer of `overrides`."""
    return updated(trainer(*overrides), batch, updates)


def updated(run: Trainer, batch: Batch, updates: int = 1) -> list[np.ndarray]:
    """Parameters after `updates` updates of `run` on `batch` (:func:`unsplit_leaves`), from its initial state (which
    is restored after)."""
    start = run.state
    run.state = jax.tree.map(jnp.copy, start)
    for step in range(1, updates + 1):
        run.update(batch, step)
    result = unsplit_leaves(run)
    run.state = start
    return result


def assert_trees_close(got, want, atol):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def test_one_update_per_rollout_takes_the_ratios_denominator_from_its_own_forward():
    """One PPO epoch and one minibatch with the KL in the loss (the default): the update's own log-probabilities,
    gradient stopped, are the ratio's denominator. The same step as with old_logp recomputed by a forward pass (the
    KL-in-reward trainer still reads it), and whatever the batch's old_logp holds."""
    batch = fixed_batch()
    run, reading = trainer(), trainer("kl.placement=reward")
    assert run.update_spec.on_policy and not reading.update_spec.on_policy
    recomputed = batch.mask * run._logp(run.state.params, batch.prompt_ids, batch.prompt_mask, batch.tokens)
    on_policy = params_after((), batch._replace(old_logp=recomputed))
    assert_trees_close(params_after(("kl.placement=reward",), batch._replace(old_logp=recomputed)), on_policy, 1e-6)
    shifted = batch._replace(old_logp=recomputed + 0.5)  # ratios e^-0.5, outside the clip range
    assert_trees_close(params_after((), shifted), on_policy, atol=0)
    moved = params_after(("kl.placement=reward",), shifted)
    assert max(np.abs(a - b).max() for a, b in zip(moved, on_policy, strict=True)) > 1e-4


@pytest.mark.parametrize("combiner", [("combiner.name=linear",), ("combiner.name=mgda", "combiner.mode=probe")])
def test_micro_batched_gradients_equal_full_batch_gradients(combiner):
    batch = fixed_batch()
    whole = params_after(combiner, batch)
    split = params_after((*combiner, "algorithm.num_microbatches=2"), batch)
    assert_trees_close(split, whole, atol=2e-6)


@pytest.mark.parametrize("mode", ["scalar", "full"])
def test_micro_batches_run_in_one_loop_holding_one_copy_of_the_pass(mode):
    """Two micro-batches lower to as many matmuls as one: the forward and backward pass appears once, inside the
    accumulation loop (seeding the sum with the first micro-batch outside the loop doubled them, and the compiler
    kept both copies' temporaries). The head's gradients in both: its token kernel needs one micro-batch."""
    combiner = "linear" if mode == "scalar" else "mgda"
    weights = jnp.ones(3) / 3 if mode == "scalar" else None

    def matmuls(microbatches: int) -> int:
        run = trainer(
            f"combiner.name={combiner}",
            f"combiner.mode={mode}",
            f"algorithm.num_microbatches={microbatches}",
            "combiner.head_gram=gradients",
        )
        program = run._train_step.lower(run.state, fixed_batch(), jax.random.key(0), jnp.float32(0.1), weights)
        return program.as_text().count("stablehlo.dot_general")

    assert matmuls(2) == matmuls(1) > 0


def test_scalar_mode_combiners_compile_one_and_the_same_train_step():
    """The weights enter as data, so linear, CTWA and PAMA lower to identical programs (one compilation)."""
    batch = fixed_batch()

    def program(combiner: str) -> str:
        run = trainer(f"combiner.name={combiner}")
        state = run.state._replace(combiner_state=None)
        return run._train_step.lower(state, batch, jax.random.key(0), jnp.float32(0.1), jnp.ones(3) / 3).as_text()

    linear = program("linear")
    assert program("ctwa") == linear
    assert program("pama") == linear


@pytest.mark.parametrize("pullbacks", ["batched", "sequential"])
def test_probe_mode_with_every_parameter_in_the_probe_equals_full_mode(pullbacks, monkeypatch):
    """On the tiny LLaMA (a layer scan: vmap leaves the objective axis second there, lax.map writes it first). The
    trainer runs such a probe set as full mode (:func:`mojax.rl.trainer.update_mode`); probe mode is forced here."""
    import mojax.rl.trainer as rl_trainer

    batch = fixed_batch()
    full = params_after(("combiner.name=mgda", "combiner.mode=full", f"combiner.pullbacks={pullbacks}"), batch)
    everything = ("combiner.name=mgda", "combiner.mode=probe", "combiner.probe=[model, lm_head]")
    assert trainer(*everything).update_spec.mode == "full"
    monkeypatch.setattr(rl_trainer, "update_mode", lambda spec, config, params, model_config: spec.mode)
    forced = Trainer(load_config("tiny", [*BASE, *everything]))
    assert forced.update_spec.mode == "probe"
    assert_trees_close(updated(forced, batch), full, atol=2e-6)


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("algorithm.entropy_coef=0.05",),
        ("algorithm.entropy_coef=0.05", "algorithm.num_microbatches=2"),
        ("lora.rank=2", "lora.alpha=4", "combiner.probe=[last_layer, lm_head]"),
    ],
    ids=["one pass", "shared term", "micro-batches", "lora, a frozen head in the probe"],
)
def test_probe_mode_steps_along_the_weighted_gradient_of_every_parameter(extra):
    """Probe mode's update is minus the gradient of sum_i w_i L_i + shared with the weights it reports (SGD, learning
    rate 1, no clip): with a shared term (an entropy bonus; the KL's gradient is zero at the first step), with
    micro-batches (the weighted pass then runs the forward again), and with LoRA, where the adapters step so and the
    frozen weights stay put, even the head the probe differentiates."""
    from mojax.rl.update import denominators, minibatch_losses

    run = trainer("combiner.name=upgrad", "combiner.mode=probe", *extra)  # MGDA's step is zero on this batch
    batch, spec, beta = fixed_batch(), run.update_spec, jnp.float32(run.kl_coef)
    start = run.state
    run.state = jax.tree.map(jnp.copy, start)
    weights = jnp.asarray(run.update(batch, 1)["weights"])
    moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), run.state.params, start.params)
    run.state = start

    def weighted_loss(params):
        vector = minibatch_losses(run.policy, params, batch, denominators(batch.mask, spec), beta, spec)[0]
        return jnp.dot(weights, vector[:-1]) + vector[-1]

    grads = jax.grad(weighted_loss)(start.params)
    trains = run.trainable_flags or [True] * len(jax.tree.leaves(grads))
    want = [-np.asarray(g) if flag else 0 * g for g, flag in zip(jax.tree.leaves(grads), trains, strict=True)]
    assert float(optax.tree.norm(want)) > 0.01  # 0.02 with LoRA (lora_b starts at zero), above 0.1 without
    for got, expected in zip(jax.tree.leaves(moved), want, strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("probe", "combiner.pullbacks=sequential"),
        ("full", "combiner.pullbacks=batched"),
        ("full", "combiner.pullbacks=sequential"),
        ("full", "algorithm.entropy_coef=0.05"),
    ],
    ids=["probe, separate trees", "full, stacked", "full, separate trees", "full, shared term"],
)
def test_the_heads_token_kernel_gives_the_same_step_as_its_gradients(mode, extra):
    """``combiner.head_gram: kernel`` (the head's share of the Gram as C K C^T, its gradient formed once, weighted)
    and ``gradients`` give the same weights, cosines and step, for the stacked gradients and separate trees; in full
    mode also with a shared term (an entropy bonus), whose gradient is then added apart from the Gram."""
    common = ("combiner.name=upgrad", f"combiner.mode={mode}", extra)
    assert_kernel_steps_as_gradients(
        {setting: trainer(*common, f"combiner.head_gram={setting}") for setting in SETTINGS}
    )


SETTINGS = ("kernel", "gradients")


def assert_kernel_steps_as_gradients(runs: dict[str, Trainer]) -> None:
    """The ``kernel`` and ``gradients`` trainers of ``runs`` give the same weights, cosines, norm and step on the
    fixed batch, its advantages made to conflict so that the weights differ."""
    batch = fixed_batch()  # objective 0's advantages are zero: give it a mix of the others', then a conflict
    mixed = batch.advantages.at[:, 0].set(0.3 * batch.advantages[:, 1] + batch.advantages[:, 2])
    batch = batch._replace(advantages=mixed * jnp.asarray([0.5, 1.0, -2.0])[None, :, None])
    assert runs["kernel"].head_kernel is not None and runs["gradients"].head_kernel is None
    results = {}
    for setting, run in runs.items():
        start = run.state
        run.state = jax.tree.map(jnp.copy, start)
        metrics = run.update(batch, 1)
        results[setting] = (metrics, unsplit_leaves(run))
        run.state = start
    (kernel_metrics, kernel_params), (metrics, params) = results["kernel"], results["gradients"]
    weights = np.asarray(metrics["weights"])
    assert np.ptp(weights) > 0.05  # the objectives get different weights, so the head's Gram share matters
    np.testing.assert_allclose(kernel_metrics["weights"], weights, atol=2e-5)
    np.testing.assert_allclose(kernel_metrics["cosines"], metrics["cosines"], atol=2e-5)
    np.testing.assert_allclose(kernel_metrics["grad_norm"], metrics["grad_norm"], rtol=1e-5)
    assert_trees_close(kernel_params, params, atol=2e-6)


@pytest.mark.parametrize(
    "extra",
    ["combiner.pullbacks=batched", "combiner.pullbacks=sequential", "algorithm.entropy_coef=0.05"],
    ids=["stacked", "separate trees", "shared term"],
)
def test_a_tied_heads_token_kernel_gives_the_same_full_mode_step_as_its_gradients(extra, monkeypatch):
    """The same for a head tied to the embedding in full mode: the table's Gram share from the kernel and the input
    cotangents, its gradient the weighted head part plus one scatter of the weighted input cotangents (and the
    shared term's)."""
    import mojax.rl.trainer as trainer_module
    from mojax.rl.tiny import tiny_model_config

    monkeypatch.setattr(
        trainer_module, "tiny_model_config", lambda **fields: tiny_model_config(tie_word_embeddings=True, **fields)
    )
    common = [*BASE, "combiner.name=upgrad", "combiner.mode=full", extra]
    runs = {s: Trainer(load_config("tiny", [*common, f"combiner.head_gram={s}"])) for s in SETTINGS}
    assert runs["kernel"].model.config.tie_word_embeddings and runs["kernel"].head_kernel.input_embeddings is not None
    assert_kernel_steps_as_gradients(runs)
    probe = ["combiner.mode=probe", "combiner.probe=[last_layer, embed_tokens]", "combiner.head_gram=kernel"]
    with pytest.raises(ValueError, match="tied to the embedding, in probe mode"):
        Trainer(load_config("tiny", [*common, *probe]))


def test_gram_rows_factor_a_psd_gram_even_a_singular_one():
    from mojax.rl.update import gram_rows

    vectors = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    vectors[3] = 2 * vectors[1]  # rank 3
    gram = vectors @ vectors.T
    rows = np.asarray(gram_rows(jnp.asarray(gram)))
    assert rows.shape == (4, 4) and np.all(np.isfinite(rows))
    np.testing.assert_allclose(rows @ rows.T, gram, atol=1e-4 * np.abs(gram).max())


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (("lora.rank=2", "lora.alpha=4", "combiner.probe=[last_layer, lm_head]"), "the LM head is frozen"),
        (("lora.rank=2", "lora.alpha=4", "combiner.mode=full"), "the LM head is frozen"),
        (("combiner.probe=[last_layer, model.norm]",), "no LM head is differentiated per objective"),
        (("algorithm.logits_chunk_size=2",), "logits_chunk_size is set"),
        (("algorithm.num_microbatches=2",), "num_microbatches > 1"),
    ],
    ids=["frozen head", "full mode, frozen head", "no head", "vocabulary chunks", "micro-batches"],
)
def test_head_gram_kernel_says_why_it_cannot_apply_and_auto_falls_back(extra, reason):
    common = ("combiner.name=mgda", "combiner.mode=probe", *extra)
    with pytest.raises(ValueError, match=f"combiner.head_gram.*is 'kernel', but .*{re.escape(reason)}"):
        Trainer(load_config("tiny", [*BASE, *common, "combiner.head_gram=kernel"]))
    assert trainer(*common, "combiner.head_gram=auto").head_kernel is None


def test_kernel_pays_off_for_fewer_tokens_than_about_n_times_the_hidden_size():
    from mojax.rl.update import kernel_pays_off

    assert kernel_pays_off(192, 3, (512, 32000))  # the 56M benchmark: 16 completions of 12 tokens
    assert not kernel_pays_off(16384, 3, (4096, 32000))  # 64 x 256 tokens at LLaMA-7B's width
    assert kernel_pays_off(7000, 8, (4096, 32000)) and not kernel_pays_off(7000, 1, (4096, 32000))
    # a tied head also pays for its input part, n M D (N + M): SmolLM2's benchmark, 16 x (8 + 12) input tokens
    assert kernel_pays_off(192, 3, (576, 49152), input_tokens=320)
    assert kernel_pays_off(192, 3, (576, 49152), 2000) and not kernel_pays_off(192, 3, (576, 49152), 3000)


def test_probe_patterns_name_the_split_final_block_and_leaving_the_untied_head_out_costs_fewer_flops():
    """Probe mode splits the final block from the stacked layers whatever the patterns: ``last_layer`` selects it
    alone, so the default set without the untied head is expressible, and its step compiles to fewer FLOPs (the
    head's n weight-gradient products are gone)."""
    default = trainer("combiner.name=mgda", "combiner.mode=probe")
    no_head = trainer("combiner.name=mgda", "combiner.mode=probe", "combiner.probe=[last_layer, model.norm]")
    assert default.split and no_head.split and not default.model.config.tie_word_embeddings

    def selected(run):
        paths = [
            ".".join(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(run.state.params)
        ]
        return {path for path, flag in zip(paths, jax.tree.leaves(run.probe_mask), strict=True) if flag}

    head = {path for path in selected(default) if path.startswith("lm_head")}
    assert head and selected(no_head) == selected(default) - head
    assert all(path.startswith(("model.last_layer.", "model.norm.")) for path in selected(no_head))

    def flops(run):
        args = (run.state, fixed_batch(), jax.random.key(0), jnp.float32(0.1), None)
        return run._train_step.lower(*args).compile().cost_analysis()["flops"]

    assert flops(no_head) < flops(default)


@pytest.mark.parametrize(("microbatches", "forwards"), [(1, 1), (2, 4)])
def test_probe_mode_takes_the_weighted_backward_from_the_probe_forward(microbatches, forwards):
    """One micro-batch: the probe pullbacks and the weighted one come from one forward pass (one trace of the
    policy). Two: each micro-batch's forward runs twice (the probe's pass, then the weighted one), each traced once
    for the shapes of its sum and once in its loop."""
    from mojax.rl.update import make_train_step

    run = trainer("combiner.name=mgda", "combiner.mode=probe", f"algorithm.num_microbatches={microbatches}")
    traces = []

    def policy(*args):
        traces.append(1)
        return run.policy(*args)

    step = make_train_step(policy, run.combiner, run.optimizer, run.update_spec, jax.tree.leaves(run.probe_mask))
    jax.make_jaxpr(step)(run.state, fixed_batch(), jax.random.key(0), jnp.float32(0.0), None)
    assert len(traces) == forwards


def test_linear_on_rloo_advantages_equals_one_objective_on_the_combined_reward():
    """On-policy (ratio 1) the PPO loss is linear in the advantages, and RLOO is linear in the rewards."""
    batch = fixed_batch()
    weights = np.asarray([0.5, 2.0, 1.0], np.float32)
    inputs = rl_advantages.AdvantageInputs(batch.rewards, batch.mask, batch.group_ids)
    per_objective = rl_advantages.compute_advantages("rloo", inputs).advantages
    combined_rewards = batch.rewards @ weights
    single = rl_advantages.compute_advantages(
        "rloo", rl_advantages.AdvantageInputs(combined_rewards[:, None], batch.mask, batch.group_ids)
    ).advantages
    weighted = params_after(
        ("combiner.options={weights: [0.5, 2.0, 1.0]}",), batch._replace(advantages=jnp.moveaxis(per_objective, 0, 1))
    )
    one = params_after(
        ("combiner.options={weights: [1.0, 0.0, 0.0]}",),
        batch._replace(advantages=jnp.moveaxis(jnp.concatenate([single, jnp.zeros_like(per_objective[1:])]), 0, 1)),
    )
    assert_trees_close(weighted, one, atol=2e-6)


def test_a_non_finite_loss_skips_the_update_and_counts_it():
    batch = fixed_batch()
    run = trainer()
    start = jax.tree.map(jnp.copy, run.state)
    poisoned = batch._replace(advantages=batch.advantages.at[0, 0, 0].set(jnp.nan))
    run.state = jax.tree.map(jnp.copy, start)
    metrics = run.update(poisoned, 1)
    assert (
        int(run.state.skipped_updates) == 1 and int(run.state.consecutive_skips) == 1 and int(metrics["skipped"]) == 1
    )
    for got, want in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(start.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    run.update(batch, 2)
    assert int(run.state.consecutive_skips) == 0 and int(run.state.skipped_updates) == 1
    run.state = start


@pytest.mark.parametrize("mode", ["probe", "full"])
def test_five_updates_on_8_devices_with_fsdp_equal_one_device(mode):
    """On the mesh the per-objective pullbacks run in sequence, sharded; on one device they are batched."""
    assert jax.device_count() == 8
    batch = fixed_batch()
    single = params_after(("combiner.name=mgda", f"combiner.mode={mode}"), batch, updates=5)
    sharded_run = ("combiner.name=mgda", f"combiner.mode={mode}", "mesh.shape={fsdp: 8}")
    sharded = params_after(sharded_run, batch, updates=5)
    leaf = jax.tree.leaves(trainer(*sharded_run).state.params)[0]
    assert "fsdp" in str(leaf.sharding.spec)
    assert_trees_close(sharded, single, atol=1e-5)


def test_pullbacks_auto_runs_them_in_sequence_and_batched_ones_compile_without_ynn_reductions():
    """ "auto" runs the n pullbacks in sequence, off a mesh too; "batched" vmaps them, and only then does the step
    compile with the XLA:CPU options that keep batched pullbacks right (tests/test_xla_cpu.py)."""
    from mojax.rl.update import UpdateSpec

    full = ("combiner.name=mgda", "combiner.mode=full")
    assert trainer(*full).update_spec.sequential_pullbacks
    assert trainer("combiner.name=mgda", "combiner.mode=probe").update_spec.sequential_pullbacks
    assert trainer(*full, "combiner.pullbacks=batched").update_spec.batched_pullbacks
    assert not trainer(*full).update_spec.batched_pullbacks
    assert not UpdateSpec("scalar", 3, "linear", (), sequential_pullbacks=False).batched_pullbacks


def test_pullbacks_auto_runs_them_in_sequence_on_a_mesh_keeping_each_gradient_sharded():
    """On a mesh ``combiner.pullbacks`` "auto" runs the n pullbacks one after another, each objective's gradient
    constrained to its parameters' FSDP sharding; left to itself the partitioner all-reduces them whole onto every
    device (they feed only the Gram), so the compiled step holds about twice the scratch memory."""
    from mojax.rl.update import make_train_step

    probe = ("combiner.name=mgda", "combiner.mode=probe")
    run = trainer(*probe, "mesh.shape={fsdp: 8}")
    assert run.update_spec.sequential_pullbacks

    def scratch_bytes(param_shardings) -> int:
        flags = jax.tree.leaves(run.probe_mask)
        step = make_train_step(
            run.policy, run.combiner, run.optimizer, run.update_spec, flags, param_shardings=param_shardings
        )
        with run.on_mesh():
            lowered = jax.jit(step, donate_argnums=0).lower(
                run.state, fixed_batch(), jax.random.key(0), jnp.float32(0.0), None
            )
        return lowered.compile().memory_analysis().temp_size_in_bytes

    sharded = scratch_bytes(jax.tree.map(lambda leaf: leaf.sharding, run.state.params))
    assert sharded < 0.6 * scratch_bytes(None)


def test_the_sharded_rollout_samples_the_same_tokens():
    single, sharded = trainer(), trainer("mesh.shape={fsdp: 8}")
    rows = single.prompts_for_step(1)
    key = jax.random.key(3)
    with sharded.on_mesh():
        on_mesh = sharded.rollout(rows, key, sharded.sampling, 2)
    np.testing.assert_array_equal(
        np.asarray(on_mesh.tokens), np.asarray(single.rollout(rows, key, single.sampling, 2).tokens)
    )


def test_a_mesh_that_does_not_divide_the_micro_batch_is_refused():
    with pytest.raises(ValueError, match="data \\* fsdp = 8 does not divide the micro-batch of 4"):
        Trainer(load_config("tiny", [*BASE, "mesh.shape={fsdp: 8}", "algorithm.num_microbatches=2"]))


@pytest.mark.parametrize(
    ("poison", "dtype", "finite"),
    [
        pytest.param(None, jnp.float32, True, id="finite"),
        pytest.param(3e38, jnp.float32, True, id="near-the-fp32-maximum"),
        pytest.param(jnp.inf, jnp.float32, False, id="inf"),
        pytest.param(-jnp.inf, jnp.float32, False, id="minus-inf"),
        pytest.param(jnp.nan, jnp.float32, False, id="nan"),
        pytest.param(jnp.inf, jnp.bfloat16, False, id="bf16-inf"),
    ],
)
def test_all_finite_finds_one_non_finite_entry_in_any_leaf(poison, dtype, finite):
    """One entry of one leaf decides; integer leaves are always finite."""
    from mojax.rl.update import all_finite

    leaf = jnp.arange(12.0, dtype=dtype).reshape(3, 4)
    if poison is not None:
        leaf = leaf.at[2, 1].set(poison)
    trees = ({"a": jnp.ones((5,), jnp.float32), "b": leaf}, jnp.arange(4), ())
    assert bool(jax.jit(all_finite)(*trees)) is finite


def test_the_kl_is_in_the_loss_only_when_beta_starts_above_zero():
    """beta stays 0 when it starts there (the adaptive controller multiplies it), so the update leaves the KL out of
    the loss and full mode skips the shared term's pullback; the KL is still logged."""
    assert not trainer().update_spec.kl_in_loss
    assert not trainer("kl.controller=adaptive").update_spec.kl_in_loss
    assert trainer("kl.beta=0.1").update_spec.kl_in_loss
    assert not trainer("kl.beta=0.1", "kl.placement=reward").update_spec.kl_in_loss


@pytest.mark.parametrize(
    "mode", [(), ("combiner.name=upgrad", "combiner.mode=full"), ("combiner.name=upgrad", "combiner.mode=probe")]
)
def test_the_update_clips_the_combined_gradient_to_max_grad_norm(mode):
    """SGD with learning rate 1: the step is minus the gradient. With optimizer.max_grad_norm at half the gradient's
    norm it is the unclipped step scaled by one half, in every mode (full mode takes the norm from the Gram)."""
    batch = fixed_batch()
    start = unsplit_leaves(trainer(*mode))

    def step(*clip: str) -> list[np.ndarray]:
        return [a - b for a, b in zip(params_after((*mode, *clip), batch), start, strict=True)]

    unclipped = step()
    norm = float(np.sqrt(sum(np.sum(leaf.astype(np.float64) ** 2) for leaf in unclipped)))
    assert norm > 0.1  # a step the clip halves visibly (MGDA's is zero on this batch: one objective has no gradient)
    clip = f"optimizer.max_grad_norm={norm / 2}"
    assert trainer(*mode, clip).update_spec.max_grad_norm == norm / 2
    assert trainer(*mode, clip, "lora.rank=2").update_spec.max_grad_norm is None  # the adapters' optimizer clips
    assert_trees_close(step(clip), [leaf / 2 for leaf in unclipped], atol=1e-6)


@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("finite", [True, False])
def test_step_if_finite_steps_or_keeps_the_old_state_to_the_bit(finite, branch):
    """One AdamW step when the flag is set, the old parameters and moments bit for bit when it is not; through the
    conditional or the select."""
    import optax

    from mojax.rl.update import step_if_finite

    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones((4,))}
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda leaf: 0.5 - leaf, params)
    got_params, got_state = jax.jit(
        lambda flag, grads, opt_state, params: step_if_finite(
            flag, optimizer, lambda: grads, opt_state, params, branch=branch
        )
    )(jnp.asarray(finite), grads, opt_state, params)
    updates, stepped_state = optimizer.update(grads, opt_state, params)
    want_params, want_state = (optax.apply_updates(params, updates), stepped_state) if finite else (params, opt_state)
    jax.tree.map(np.testing.assert_array_equal, (got_params, got_state), (want_params, want_state))


def test_step_if_finite_updates_donated_moments_in_place_without_copies():
    """The donated parameters and AdamW moments are stepped where they lie: the compiled step copies none of them (a
    select of every stepped leaf against its old value made XLA:CPU copy both moments first)."""
    import optax

    from mojax.rl.update import all_finite, step_if_finite

    optimizer = optax.adamw(1e-2)
    params = {"w": jnp.ones((64, 96)), "v": jnp.ones((96, 32))}
    grads = jax.tree.map(lambda leaf: 0.1 * leaf, params)

    def step(params, opt_state, grads):
        return step_if_finite(all_finite(grads), optimizer, lambda: grads, opt_state, params)

    program = jax.jit(step, donate_argnums=(0, 1)).lower(params, optimizer.init(params), grads).compile().as_text()
    entry = program[program.index("\nENTRY") :]
    assert not re.findall(r"= f32\[[\d,]+\]\S* copy\(", entry)


@pytest.mark.parametrize(
    ("mode", "conditional"),
    [
        ((), True),
        (("combiner.name=upgrad", "combiner.mode=probe"), True),
        (("combiner.name=upgrad", "combiner.mode=full"), True),
        (("combiner.name=upgrad", "combiner.mode=probe", "combiner.pullbacks=batched"), True),
        (("combiner.name=upgrad", "combiner.mode=full", "combiner.pullbacks=batched"), False),
    ],
)
def test_the_optimizer_step_branches_but_in_full_mode_with_batched_pullbacks(mode, conditional):
    """The trainer's step skips a non-finite update with the conditional, except in full mode with batched pullbacks
    (where the conditional measured slower) which selects; its KL-free full-mode step has no other conditional but
    the Gram's rescaling of separate trees (``tree_gram``)."""
    t = trainer(*mode)
    lowered = t._train_step.lower(t.state, fixed_batch(), jax.random.key(0), jnp.float32(t.kl_coef), None)
    assert bool(conditionals(lowered.compile().as_text())) is conditional
