"""Held-out evaluation: greedy by default (unchanged), or k sampled completions per prompt with a fixed key."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mojax.rl.config import load_config
from mojax.rl.trainer import Trainer

NAMES = ("a_rate", "b_count", "brevity")
SMALL = [
    "steps=1",
    "data.prompts_per_step=2",
    "rollout.num_generations=2",
    "rollout.max_completion_length=6",
    "rollout.max_prompt_length=8",
    "data.num_prompts=6",
    "data.eval_prompts=tiny",
    "eval_steps=1",
    "logging.progress=false",
    "logging.tensorboard=false",
    "export=false",
]
SAMPLED = {"eval_temperature": 1.0, "eval_num_generations": 3, "eval_top_p": 0.9}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return Trainer(load_config("tiny", [f"output_dir={tmp_path_factory.mktemp('eval')}", *SMALL]))


def evaluate_with(trainer, **keys):
    """The trainer's evaluation under its config with `keys` changed (the same policy, no new trainer)."""
    configured = trainer.config
    trainer.config = dataclasses.replace(configured, **keys)
    try:
        return trainer.evaluate()
    finally:
        trainer.config = configured


def test_greedy_evaluation_is_the_mean_reward_of_one_greedy_completion_per_prompt(trainer):
    metrics = trainer.evaluate()
    assert sorted(metrics) == sorted(f"eval/rewards/{name}/mean" for name in NAMES)
    greedy = dataclasses.replace(trainer.sampling, temperature=0.0, top_k=0, top_p=1.0)
    rollout = trainer.rollout(trainer.eval_prompts, trainer._step_key(7, 3), greedy, 1)
    raw, _ = trainer.score(trainer.eval_prompts, rollout, 1)
    assert raw.shape == (6, 3)
    for index, name in enumerate(NAMES):
        np.testing.assert_allclose(metrics[f"eval/rewards/{name}/mean"], raw[:, index].mean(), rtol=1e-6)


def test_sampled_evaluation_is_deterministic_and_differs_from_greedy(trainer):
    sampled = evaluate_with(trainer, **SAMPLED)
    assert sorted(sampled) == sorted(f"eval/rewards/{name}/{stat}" for name in NAMES for stat in ("mean", "std"))
    assert evaluate_with(trainer, **SAMPLED) == sampled
    trainer.step = 5  # the key is fixed: a later (or resumed) evaluation of the same policy draws the same samples
    try:
        assert evaluate_with(trainer, **SAMPLED) == sampled
    finally:
        trainer.step = 0
    greedy = trainer.evaluate()
    assert any(sampled[key] != greedy[key] for key in greedy)
    assert any(sampled[f"eval/rewards/{name}/std"] > 0 for name in NAMES)


def test_sampled_evaluation_scores_k_completions_per_prompt(trainer):
    calls = []
    original = trainer.score

    def recording(rows, rollout, generations):
        calls.append((len(rows), rollout.tokens.shape[0], generations))
        return original(rows, rollout, generations)

    trainer.score = recording
    try:
        evaluate_with(trainer, **SAMPLED)
    finally:
        del trainer.score
    assert calls == [(6, 18, 3)]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("eval_num_generations=2", "`eval_num_generations` is 2 with greedy evaluation"),
        ("eval_top_p=0", "`eval_top_p`"),
        ("eval_temperature=-1", "`eval_temperature`"),
        ("eval_num_generations=0", "`eval_num_generations`"),
    ],
)
def test_bad_evaluation_keys_raise_before_anything_compiles(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_config("tiny", [f"output_dir={tmp_path}", *SMALL, override])
