"""The preference trainer with LoRA adapters: only the adapters train, they are the default probe set, and the
on-the-fly reference is the base model with the adapters disabled (the same log-probs as the precomputed ones)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from test_dpo import without_timing

from mojax.rl.dpo import DPOTrainer, make_dpo_step
from mojax.rl.dpo_config import load_dpo_config
from mojax.rl.logging import read_metrics
from mojax.xla_cpu import batched_pullback_options

LORA = [
    "steps=2",
    "lora.rank=4",
    "lora.alpha=8",
    "lora.targets=[q_proj, v_proj]",
    "optimizer.learning_rate=0.05",
    "logging.tensorboard=false",
    "logging.progress=false",
    "export=false",
]


@functools.cache
def lora_run(root: str, reference: str) -> tuple[DPOTrainer, object, list[dict]]:
    """A two-step LoRA run: (trainer, parameters before training, metrics)."""
    output = Path(root) / reference
    trainer = DPOTrainer(
        load_dpo_config("dpo_tiny", [f"output_dir={output}", *LORA, f"preference.reference={reference}"])
    )
    start = jax.tree.map(np.asarray, trainer.state.params)
    trainer.train()
    return trainer, start, read_metrics(output)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dpo_lora"))


def leaves_by_kind(params) -> tuple[list, list]:
    """(adapter leaves, other leaves) of an nnx Param state."""
    adapters, others = [], []
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        (adapters if isinstance(leaf, nnx.LoRAParam) else others).append(np.asarray(leaf.get_value()))
    return adapters, others


def test_only_the_adapters_train_and_they_are_the_probe_set(root):
    trainer, start, _ = lora_run(root, "on_the_fly")
    adapters_before, others_before = leaves_by_kind(start)
    adapters_after, others_after = leaves_by_kind(trainer.state.params)
    assert adapters_after and len(adapters_after) == len(adapters_before)
    for before, after in zip(others_before, others_after, strict=True):
        np.testing.assert_array_equal(before, after)
    assert any(np.abs(after - before).max() > 0 for before, after in zip(adapters_before, adapters_after, strict=True))
    probe = jax.tree.leaves(trainer.probe_mask)
    kinds = [
        isinstance(leaf, nnx.LoRAParam)
        for leaf in jax.tree.leaves(trainer.state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    ]
    assert probe == kinds


def test_the_on_the_fly_reference_is_the_base_model_with_adapters_disabled(root):
    """Zero-initialised adapters make the precomputed reference the base model, which the on-the-fly reference of
    a LoRA policy recomputes with the adapters off: both runs see the same reference log-probs at every step."""
    trainer, _, on_the_fly = lora_run(root, "on_the_fly")
    assert trainer.reference_params is None  # no copy of the weights
    _, _, precomputed = lora_run(root, "precompute")
    assert len(on_the_fly) == len(precomputed) == 2
    for got, want in zip(on_the_fly, precomputed, strict=True):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert on_the_fly[1]["rewards/margins"] != 0.0  # the adapters moved the policy away from its reference


def test_a_resumed_lora_run_restores_its_adapters_and_matches_a_straight_run(root, tmp_path):
    """The checkpoint holds the adapters alone (a resumed run reads the base model again from ``model.path``)."""
    straight, _, want = lora_run(root, "on_the_fly")
    for steps in (1, 2):
        trainer = DPOTrainer(
            load_dpo_config(
                "dpo_tiny", [f"output_dir={tmp_path}", *LORA, "preference.reference=on_the_fly", f"steps={steps}"]
            )
        )
        trainer.train()
    assert len(trainer.checkpoint_tree()["train"].params) == sum(trainer.trainable_flags) < len(trainer.trainable_flags)
    for got, expected in zip(
        jax.tree.leaves(trainer.state.params), jax.tree.leaves(straight.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert without_timing(read_metrics(tmp_path)) == without_timing(want)


def test_adapter_dropout_is_refused_before_anything_compiles(tmp_path):
    with pytest.raises(ValueError, match=r"`lora.dropout` is 0.1; expected 0 \(the preference trainer applies no"):
        load_dpo_config("dpo_tiny", [f"output_dir={tmp_path}", "lora.rank=4", "lora.dropout=0.1"])


def test_the_step_computes_no_gradient_of_the_frozen_weights(tmp_path):
    """The step differentiates the adapters alone: its compiled program has fewer FLOPs than the same step
    differentiating every weight (whose frozen gradients the optimizer would drop)."""
    trainer = DPOTrainer(load_dpo_config("dpo_tiny", [f"output_dir={tmp_path}", *LORA]))
    args = (trainer.state, trainer._place(trainer.pairs_for_step(1)), trainer.reference_params)
    every_weight = jax.jit(
        make_dpo_step(trainer.policy, trainer.combiner, trainer.optimizer, trainer.spec, trainer.probe_mask),
        compiler_options=batched_pullback_options(),  # as the trainer's step (a jit nested in a jit cannot take them)
    )
    flops = {
        name: step.lower(*args).compile().cost_analysis()["flops"]
        for name, step in (("adapters", trainer._step_fn), ("every weight", every_weight))
    }
    assert flops["adapters"] < 0.95 * flops["every weight"], flops  # 0.88 on the tiny model
