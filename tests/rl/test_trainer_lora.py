"""The RL trainer with LoRA adapters in probe mode: the probe set is the final block's adapters (split from the
stacked layers), only the adapters train, and the split changes nothing but the probe set; a probe set of every
adapter without a shared term (KL in the loss, entropy bonus) runs as full mode."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_trainer import small_config, without_timing

from mojax.combiners import per_objective_grads
from mojax.models import LlamaForCausalLM, lora_mask, save_pretrained
from mojax.rl.logging import read_metrics
from mojax.rl.trainer import Trainer, build_policy, response_fn
from mojax.rl.update import denominators, make_train_step, minibatch_losses, objective_cosines

LORA = [
    "lora.rank=4",
    "lora.alpha=8",
    "lora.targets=[q_proj, v_proj]",
    "combiner.name=mgda",
    "combiner.mode=probe",
    "kl.beta=0.05",
    "optimizer.learning_rate=0.05",
]


def flat(tree) -> dict[str, object]:
    """{dotted path: leaf} of an nnx state (Variables as leaves)."""
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return {
        ".".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_variable)
    }


@functools.cache
def lora_run(root: str, *overrides: str) -> tuple[Trainer, dict[str, np.ndarray], list[dict]]:
    """Three training steps (lora_b starts at zero, so lora_a's first gradient comes once lora_b has moved):
    (trainer, parameters before training, metrics); `overrides` (e.g. a combiner.probe) come after ``LORA``."""
    overrides = tuple(override for override in overrides if override)
    output = Path(root) / ("-".join(overrides).replace("=", "_") or "default")
    trainer = Trainer(small_config(output, *LORA, "steps=3", *overrides))
    start = {path: np.asarray(leaf.get_value()) for path, leaf in flat(trainer.state.params).items()}
    trainer.train()
    trainer.close()
    return trainer, start, read_metrics(output)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("rl_lora"))


def test_the_default_probe_set_is_the_final_blocks_adapters(root):
    trainer, _, _ = lora_run(root, "")
    assert trainer.split
    leaves = flat(trainer.state.params)
    selected = {path for path, flag in flat(trainer.probe_mask).items() if flag.get_value()}
    final_adapters = {p for p, leaf in leaves.items() if isinstance(leaf, nnx.LoRAParam) and ".last_layer." in p}
    assert selected == final_adapters and len(final_adapters) == 4  # lora_a and lora_b of q_proj and v_proj
    every_layer, _, _ = lora_run(root, "combiner.probe=[lora_]")  # with LORA's KL in the loss it stays probe mode
    every_adapter = {path for path, flag in flat(every_layer.probe_mask).items() if flag.get_value()}
    adapters = {p for p, leaf in flat(every_layer.state.params).items() if isinstance(leaf, nnx.LoRAParam)}
    assert every_layer.split and every_adapter == adapters and len(adapters) == 8  # both parts of the split layers


@pytest.mark.parametrize(
    ("overrides", "layers", "shared_term", "mode"),
    [
        ((), 2, {}, "probe"),  # the final block's adapters
        (("combiner.probe=[lora_]",), 2, {}, "full"),  # every layer's
        (("combiner.probe=[lora_]",), 2, {"kl_in_loss": True}, "probe"),  # its pass is probe mode's weighted one
        (("combiner.probe=[lora_]",), 2, {"entropy_coef": 0.01}, "probe"),
        (("combiner.probe=[last_layer]",), 2, {}, "probe"),  # the final block's weights and adapters, not the others
        ((), 1, {}, "full"),  # one block: the default set is every adapter
        (("combiner.probe=[model]", "lora.rank=0"), 2, {}, "probe"),  # the untied head is trained and left out
        (("combiner.probe=[model, lm_head]", "lora.rank=0"), 2, {}, "full"),
    ],
)
def test_a_probe_set_holding_every_trained_parameter_without_a_shared_term_makes_the_update_full_mode(
    tmp_path, overrides, layers, shared_term, mode
):
    from mojax.rl.tiny import tiny_model_config
    from mojax.rl.trainer import attach_lora, update_mode
    from mojax.rl.update import UpdateSpec

    config = small_config(tmp_path, *LORA, *overrides)
    model_config = tiny_model_config(num_hidden_layers=layers)
    model = LlamaForCausalLM(model_config, rngs=nnx.Rngs(0))
    attach_lora(model, config.lora, 1)
    params = nnx.split(model, nnx.Param, ...)[1]
    spec = UpdateSpec("probe", 3, "mgda", (), **{"kl_in_loss": False, **shared_term})
    assert update_mode(spec, config, params, model_config) == mode
    for other in ("scalar", "full"):
        assert update_mode(spec._replace(mode=other), config, params, model_config) == other


def test_every_layers_adapters_in_the_probe_set_train_as_full_mode_without_the_kl_in_the_loss(root):
    """``combiner.probe: [lora_]`` differentiates every trained parameter per objective, so without a shared term the
    trainer runs full mode's update (the same Gram, weights and combined gradient as probe mode, without its weighted
    backward pass): the run is the explicit full-mode run, metric for metric and bit for bit."""
    every_adapter, _, metrics = lora_run(root, "combiner.probe=[lora_]", "kl.beta=0")
    full_mode, _, want = lora_run(root, "combiner.mode=full", "kl.beta=0")
    assert every_adapter.update_spec.mode == "full" and not every_adapter.split and every_adapter.probe_mask is None
    assert without_timing(metrics) == without_timing(want)
    for got, expected in zip(
        jax.tree.leaves(every_adapter.state.params), jax.tree.leaves(full_mode.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_only_the_adapters_train_in_every_layer(root):
    trainer, start, _ = lora_run(root, "")
    after = flat(trainer.state.params)
    moved = {path for path, leaf in after.items() if not np.array_equal(np.asarray(leaf.get_value()), start[path])}
    adapters = {path for path, leaf in after.items() if isinstance(leaf, nnx.LoRAParam)}
    assert moved == adapters  # the trunk's adapters too: one backward of the weighted loss reaches every layer


def test_the_split_policy_samples_as_the_unsplit_one_and_the_reference_is_the_base_model(root):
    """Same seed, same initial adapters: step 1 samples the same completions in probe mode (split) as in full mode
    (unsplit), since the merged split policy is the unsplit one; once the adapters have moved, the KL to the
    reference is positive (the reference of the split state is the base model, adapters off, not the policy)."""
    _, _, split = lora_run(root, "")
    full_mode, _, unsplit = lora_run(root, "combiner.mode=full")
    assert not full_mode.split
    rewards = [key for key in split[0] if key.startswith("rewards/")]
    assert rewards and {key: split[0][key] for key in rewards} == {key: unsplit[0][key] for key in rewards}
    assert split[0]["kl"] == 0.0 and split[-1]["kl"] > 0.0


def test_the_split_state_samples_in_place_what_its_merged_copy_samples(root):
    """The rollout samples from merge_split's model of the split state (no concatenated copy of the layer weights, as
    policy_model makes for export); after training it draws the merged policy's tokens and log-probs."""
    from mojax.models.generate import generate

    trainer, _, _ = lora_run(root, "")
    in_place, merged = trainer.sampling_model(), trainer.policy_model()
    assert in_place.model.last_layer is not None and merged.model.last_layer is None
    ids, mask = np.asarray([[5, 6, 7, 8], [0, 9, 10, 11]]), np.asarray([[1, 1, 1, 1], [0, 1, 1, 1]])
    got, want = (generate(model, ids, mask, jax.random.key(1), trainer.sampling) for model in (in_place, merged))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.model_logprobs, want.model_logprobs, atol=1e-5)


def test_full_mode_combines_the_adapters_gradients_alone(tmp_path):
    """The frozen weights' gradients are neither computed nor seen by the combiner: the update's objective cosines
    (from the Gram its combiner reads) are those of the adapters' per-objective gradients, not of the whole model's."""
    trainer = Trainer(small_config(tmp_path, *LORA, "combiner.mode=full"))
    batch = trainer.prepare(1).batch
    spec, n = trainer.update_spec, trainer.update_spec.num_objectives
    params = jax.tree.map(jnp.copy, trainer.state.params)
    unstopped = response_fn(trainer.graphdef, trainer.rest, split=trainer.split)

    def losses(p):
        beta = jnp.float32(trainer.kl_coef)
        return minibatch_losses(unstopped, p, batch, denominators(batch.mask, spec), beta, spec)[0][:n]

    adapters_only = np.asarray(objective_cosines(per_objective_grads(losses, params, probe_mask=lora_mask(params))[1]))
    whole_model = np.asarray(objective_cosines(per_objective_grads(losses, params)[1]))
    assert np.abs(adapters_only - whole_model).max() > 0.01  # the two Grams differ (by 0.02 here)
    cosines = np.asarray(trainer.update(batch, 1)["cosines"])
    np.testing.assert_allclose(cosines, adapters_only, atol=1e-4)


def test_the_update_computes_no_gradient_of_the_frozen_weights(tmp_path):
    """Dropped right after the pullbacks, the frozen weights' gradients are never computed: the compiled update has
    fewer FLOPs than the same update that keeps every weight's gradient (for the optimizer to drop)."""
    trainer = Trainer(small_config(tmp_path, *LORA, "combiner.mode=full"))
    batch = trainer.prepare(1).batch
    args = (trainer.state, batch, jax.random.key(0), jnp.float32(trainer.kl_coef), None)
    every_weight = jax.jit(make_train_step(trainer.policy, trainer.combiner, trainer.optimizer, trainer.update_spec))
    flops = {
        name: step.lower(*args).compile().cost_analysis()["flops"]
        for name, step in (("adapters", trainer._train_step), ("every weight", every_weight))
    }
    assert flops["adapters"] < 0.9 * flops["every weight"], flops


def test_a_checkpoint_holds_the_adapters_alone_and_resumes_like_a_straight_run(root):
    """The frozen base weights are left out of the checkpoint (it takes fewer bytes on disk than they do); a run stopped
    after step 2 and resumed, its base read again from ``model.path``, ends where the straight run does, bit for bit."""
    straight, _, want = lora_run(root, "")
    output = Path(root) / "resumed"
    for steps in (2, 3):
        trainer = Trainer(small_config(output, *LORA, f"steps={steps}"))
        trainer.train()
        trainer.close()
    for got, expected in zip(
        jax.tree.leaves(trainer.state.params), jax.tree.leaves(straight.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert without_timing(read_metrics(output)) == without_timing(want)
    leaves = jax.tree.leaves(trainer.state.params)
    frozen = sum(leaf.nbytes for leaf, trains in zip(leaves, trainer.trainable_flags, strict=True) if not trains)
    saved = sum(path.stat().st_size for path in (output / "checkpoints" / "3").rglob("*") if path.is_file())
    assert saved < frozen / 2, (saved, frozen)


def test_a_resumed_run_refuses_base_weights_that_changed_since_its_start(tmp_path):
    """The checkpoint holds no base weights, so a resumed run reads them again from ``model.path``: the same files
    resume, other weights under the same path are refused with the file named."""
    model, tokenizer = build_policy(small_config(tmp_path / "unused"))
    save_pretrained(model, tmp_path / "model", tokenizer=tokenizer)
    overrides = (*LORA, f"model.path={tmp_path / 'model'}")
    for steps in (1, 2):
        trainer = Trainer(small_config(tmp_path / "run", *overrides, f"steps={steps}"))
        trainer.train()
        trainer.close()
    assert trainer.step == 2 and [record["step"] for record in read_metrics(tmp_path / "run")] == [1, 2]
    other, _ = build_policy(small_config(tmp_path / "unused", "model.init_seed=1"))
    save_pretrained(other, tmp_path / "model", tokenizer=tokenizer)
    with pytest.raises(
        ValueError, match=r"(?s)`model.path` holds weight files that differ .*\['model.safetensors'\].*new output_dir"
    ):
        Trainer(small_config(tmp_path / "run", *overrides, "steps=3")).train()
