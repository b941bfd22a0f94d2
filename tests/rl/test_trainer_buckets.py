"""Response-length bucketing: the update runs on the smallest bucket holding the longest completion, same result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mojax.rl.config import load_config
from mojax.rl.rollout import response_bucket
from mojax.rl.run import fetch
from mojax.rl.trainer import Trainer, cut_responses
from mojax.rl.update import Batch

BUCKETS = (2, 4)
MAX_LENGTH = 6
SMALL = [
    "steps=1",
    "data.prompts_per_step=2",
    "rollout.num_generations=2",
    f"rollout.max_completion_length={MAX_LENGTH}",
    "rollout.max_prompt_length=8",
    "data.num_prompts=8",
    "eval_steps=0",
    "logging.progress=false",
    "logging.tensorboard=false",
    "export=false",
    "optimizer.name=sgd",  # the parameter change is lr x gradient (Adam would turn float noise on a ~0 gradient into lr)
]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("buckets")
    return Trainer(load_config("tiny", [f"output_dir={output_dir}", *SMALL, f"rollout.length_buckets={list(BUCKETS)}"]))


@pytest.fixture(scope="module")
def prepared(trainer):
    return trainer.prepare(1)


def full_width_batch(prepared) -> Batch:
    """The update's batch of a prepared step at the sampler's full width (what the trainer built before bucketing)."""
    rollout = prepared.rollout
    return Batch(
        prompt_ids=rollout.prompt_ids,
        prompt_mask=rollout.prompt_mask,
        tokens=rollout.tokens,
        mask=rollout.response_mask,
        old_logp=rollout.old_logp,
        ref_logp=rollout.ref_logp,
        advantages=jnp.moveaxis(prepared.advantages, 0, 1),
        rewards=prepared.batch.rewards,
        group_ids=rollout.group_ids,
    )


def ended_after(batch: Batch, length: int) -> Batch:
    """The batch as if every completion had stopped after at most `length` tokens (the rest padding, masked)."""
    keep = (np.arange(batch.tokens.shape[1]) < length).astype(np.float32)
    return batch._replace(
        mask=batch.mask * keep,
        old_logp=batch.old_logp * keep,
        ref_logp=batch.ref_logp * keep,
        advantages=batch.advantages * keep,
    )


def update_from(trainer, state, batch):
    """(update metrics, parameter changes) of one update of `batch` from a copy of `state`."""
    trainer.state = jax.tree.map(jnp.copy, state)
    metrics = trainer.update(batch, 1)
    after, before = jax.tree.leaves(fetch(trainer.state.params)), jax.tree.leaves(fetch(state.params))
    return metrics, [a - b for a, b in zip(after, before, strict=True)]


def test_response_bucket_is_the_smallest_bucket_holding_the_longest_completion():
    for lengths, want in [((0, 0), 2), ((1, 2), 2), ((3, 1), 4), ((4, 4), 4), ((5, 0), 6), ((6, 2), 6)]:
        mask = (np.arange(MAX_LENGTH)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
        assert response_bucket(mask, BUCKETS, MAX_LENGTH) == want, lengths
        assert response_bucket(mask, (), MAX_LENGTH) == MAX_LENGTH


def test_the_trainer_updates_on_the_bucket_of_the_longest_completion(prepared):
    width = response_bucket(prepared.rollout.response_mask, BUCKETS, MAX_LENGTH)
    assert prepared.batch.tokens.shape[1] == prepared.batch.mask.shape[1] == width
    assert prepared.batch.advantages.shape[2] == width
    np.testing.assert_array_equal(prepared.batch.mask, prepared.rollout.response_mask[:, :width])


def test_a_bucketed_update_equals_the_full_width_update(trainer, prepared):
    initial = jax.tree.map(jnp.copy, trainer.state)
    full = ended_after(full_width_batch(prepared), 3)
    cut = cut_responses(full, response_bucket(full.mask, BUCKETS, MAX_LENGTH))
    assert cut.tokens.shape[1] == 4 and not np.any(full.mask[:, 4:])
    want_metrics, want_changes = update_from(trainer, initial, full)
    got_metrics, got_changes = update_from(trainer, initial, cut)
    for key in ("loss", "grad_norm", "kl", "entropy", "clip_ratio"):
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert float(want_metrics["grad_norm"]) > 0
    largest = max(float(np.abs(change).max()) for change in want_changes)
    assert largest > 0
    for got, want in zip(got_changes, want_changes, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * largest)  # parameter rounding: ~1e-8
    trainer.state = initial


def test_the_update_compiles_at_most_once_per_bucket(trainer, prepared):
    full = full_width_batch(prepared)
    full = full._replace(
        mask=np.ones_like(full.mask)
    )  # every length 0..MAX_LENGTH reachable below (shapes matter here)
    widths = []
    for length in range(MAX_LENGTH + 1):
        batch = ended_after(full, length)
        widths.append(response_bucket(batch.mask, BUCKETS, MAX_LENGTH))
        trainer.update(cut_responses(batch, widths[-1]), 1)
    assert sorted(set(widths)) == [2, 4, 6]
    assert trainer._train_step._cache_size() <= len(BUCKETS) + 1


@pytest.mark.parametrize(
    ("buckets", "error", "match"),
    [
        ("[4, 2]", ValueError, r"`rollout.length_buckets` is \[4, 2\]; expected strictly increasing"),
        ("[2, 2]", ValueError, "strictly increasing widths"),
        ("[2, 8]", ValueError, "of at most rollout.max_completion_length = 6"),
        ("[0, 2]", ValueError, "`rollout.length_buckets.0`"),
        ("[two]", TypeError, "`rollout.length_buckets.0` is 'two'; expected an integer"),
    ],
)
def test_bad_length_buckets_raise_before_anything_compiles(tmp_path, buckets, error, match):
    with pytest.raises(error, match=match):
        load_config("tiny", [f"output_dir={tmp_path}", *SMALL, f"rollout.length_buckets={buckets}"])
