"""The multi-objective RL trainer end to end on the tiny task: runs, resumes bit for bit, reports, refuses bad input."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mojax.rl.config import CONFIG_DIR, load_config
from mojax.rl.logging import read_metrics
from mojax.rl.trainer import CRASH_ENV, Trainer, build_critic, build_policy

REPO = Path(__file__).resolve().parents[2]
# A small run: 2 prompts x 2 generations, 6 new tokens; every test of this file shares these settings.
SMALL = [
    "data.prompts_per_step=2",
    "rollout.num_generations=2",
    "rollout.max_completion_length=6",
    "rollout.max_prompt_length=8",
    "data.num_prompts=8",
    "eval_steps=0",
    "logging.progress=false",
    "logging.tensorboard=false",
    "export=false",
    "checkpoint.save_steps=1",  # resumption is tested from every step
]


def small_config(output_dir: Path, *overrides: str):
    return load_config("tiny", [f"output_dir={output_dir}", *SMALL, *overrides])


def params_of(trainer: Trainer) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(trainer.state.params)]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if not k.startswith("timing/")} for record in records]


@functools.cache
def straight_run(root: str) -> tuple[list[np.ndarray], list[dict], list[tuple[int, int]]]:
    """Four uninterrupted steps; records after each step how many programs the train step and the scorer compiled."""
    cache_sizes = []
    trainer = Trainer(
        small_config(Path(root) / "straight", "steps=4"),
        callbacks=[
            lambda step, metrics: cache_sizes.append((trainer._train_step._cache_size(), trainer._logp._cache_size()))
        ],
    )
    trainer.train()
    trainer.close()
    return params_of(trainer), read_metrics(Path(root) / "straight"), cache_sizes


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


def test_steps_after_the_first_do_not_recompile(run_root):
    _, records, cache_sizes = straight_run(run_root)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert cache_sizes == [(1, 1)] * 4


def test_metrics_use_the_documented_keys(run_root):
    _, records, _ = straight_run(run_root)
    record = records[-1]
    for name in ("a_rate", "b_count", "brevity"):
        for key in (
            f"rewards/{name}/mean",
            f"rewards/{name}/std",
            f"advantages/{name}/abs_mean",
            f"combiner/weight/{name}",
        ):
            assert key in record, key
        assert f"interference/cov/{name}" in record and f"interference/frac_neg/{name}" in record
    for key in (
        "loss",
        "grad_norm",
        "learning_rate",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "entropy",
        "clip_ratio",
        "completions/mean_length",
        "completions/clipped_ratio",
        "skipped_updates",
        "interference/index",
        "timing/rollout",
        "timing/rewards",
        "timing/update",
    ):
        assert key in record, key
    assert record["skipped_updates"] == 0
    assert all(np.isfinite(record[key]) for key in ("loss", "grad_norm", "kl", "entropy"))


def test_rerun_with_more_steps_equals_a_straight_run(run_root):
    want_params, want_records, _ = straight_run(run_root)
    output = Path(run_root) / "resumed"
    first = Trainer(small_config(output, "steps=2"))
    first.train()
    first.close()
    second = Trainer(small_config(output, "steps=4"))
    second.train()
    second.close()
    assert second.step == 4
    for got, want in zip(params_of(second), want_params, strict=True):
        np.testing.assert_array_equal(got, want)
    assert without_timing(read_metrics(output)) == without_timing(want_records)


def test_kill_9_mid_run_resumes_bit_identically(run_root):
    want_params, want_records, _ = straight_run(run_root)
    output = Path(run_root) / "crashed"
    script = (
        "from mojax.rl.config import load_config; from mojax.rl.trainer import Trainer; "
        f"Trainer(load_config('tiny', {[f'output_dir={output}', *SMALL, 'steps=4']!r})).train()"
    )
    env = {**os.environ, CRASH_ENV: "3", "PYTHONPATH": str(REPO)}
    crashed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert [record["step"] for record in read_metrics(output)] == [1, 2]
    resumed = Trainer(small_config(output, "steps=4"))
    resumed.train()
    resumed.close()
    for got, want in zip(params_of(resumed), want_params, strict=True):
        np.testing.assert_array_equal(got, want)
    assert without_timing(read_metrics(output)) == without_timing(want_records)


def test_the_adaptive_kl_coefficient_resumes_to_its_last_bit(tmp_path):
    """The adaptive controller updates beta in float64 on the host; the checkpoint keeps all 64 bits, so a resumed run
    logs (and trains with) the coefficients of a straight run."""
    adaptive = ("kl.beta=0.05", "kl.controller=adaptive", "kl.target=0.01", "kl.horizon=100")
    runs = {"straight": (3,), "resumed": (2, 3)}
    for name, stops in runs.items():
        for steps in stops:
            trainer = Trainer(small_config(tmp_path / name, *adaptive, f"steps={steps}"))
            trainer.train()
            trainer.close()
    want = [record["kl_coef"] for record in read_metrics(tmp_path / "straight")]
    assert len(set(want)) == 3  # the controller moved it at every step
    assert [record["kl_coef"] for record in read_metrics(tmp_path / "resumed")] == want
    assert without_timing(read_metrics(tmp_path / "resumed")) == without_timing(read_metrics(tmp_path / "straight"))


def test_a_changed_config_refuses_to_resume(run_root):
    output = Path(run_root) / "straight"
    straight_run(run_root)
    with pytest.raises(ValueError, match=r"differs from the run .* in \['optimizer.learning_rate'\]"):
        Trainer(small_config(output, "steps=5", "optimizer.learning_rate=0.5")).train()


def test_a_resumed_run_refuses_a_reward_model_whose_parameters_changed(tmp_path):
    """A checkpoint holds no reward model: the resumed run's own must digest as the first start's did. A model built
    again with the same parameters resumes; one of another seed is refused, the objective named."""
    from flax import nnx

    from mojax.models.heads import LlamaRewardModel
    from mojax.rl.rewards import Objective, reward_model
    from mojax.rl.tiny import tiny_model_config

    def scored_by_a_reward_model(seed: int) -> list[Objective]:
        model = LlamaRewardModel(tiny_model_config(), num_labels=1, rngs=nnx.Rngs(seed))
        return [Objective("rm", reward_model(model))]

    entries = "objectives=[{name: rm, fn: 'mojax.rl.tiny:tiny_prompts'}]"  # a name for the objective given in code
    for steps in (1, 2):
        trainer = Trainer(small_config(tmp_path, entries, f"steps={steps}"), objectives=scored_by_a_reward_model(0))
        trainer.train()
        trainer.close()
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2]
    with pytest.raises(
        ValueError, match=r"(?s)`objectives` score with reward models whose parameters differ .*\['objectives.rm'\]"
    ):
        Trainer(small_config(tmp_path, entries, "steps=3"), objectives=scored_by_a_reward_model(1)).train()


def test_the_rollout_samples_from_the_parameters_pair_what_the_merged_policy_samples(tmp_path):
    """Unsplit parameters reach the sampler as a (graphdef, state) pair, with no model object built and split again
    at every rollout; it draws the merged policy's tokens and log-probabilities."""
    from mojax.models.generate import generate

    trainer = Trainer(small_config(tmp_path))
    pair = trainer.sampling_model()
    assert isinstance(pair, tuple) and not trainer.split
    ids, mask = np.asarray([[5, 6, 7, 8], [0, 9, 10, 11]]), np.asarray([[1, 1, 1, 1], [0, 1, 1, 1]])
    got, want = (generate(m, ids, mask, jax.random.key(1), trainer.sampling) for m in (pair, trainer.policy_model()))
    for field in ("tokens", "model_logprobs", "sampler_logprobs", "sequences"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def test_a_checkpoint_of_another_state_layout_is_refused_with_the_step_and_the_remedy(run_root, tmp_path):
    straight_run(run_root)
    output = tmp_path / "copy"
    shutil.copytree(Path(run_root) / "straight", output)

    class WithExtraState(Trainer):
        def checkpoint_tree(self):
            return {**super().checkpoint_tree(), "extra": jnp.zeros(3)}

    with pytest.raises(
        ValueError,
        match=r"(?s)`output_dir` holds a checkpoint at step 4 whose state does not match.*extra.*new output_dir",
    ):
        WithExtraState(small_config(output, "steps=5")).train()


def test_grpo_raises_the_mean_reward_of_a_single_objective(tmp_path):
    config = small_config(
        tmp_path,
        "steps=12",
        "optimizer.learning_rate=0.02",
        "rollout.num_generations=4",
        "data.prompts_per_step=4",
        "objectives=[{name: brevity, fn: conciseness, options: {target: 6, unit: chars}}]",
    )
    trainer = Trainer(config)
    trainer.train()
    trainer.close()
    rewards = [record["rewards/brevity/mean"] for record in read_metrics(tmp_path)]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards


def test_a_reward_that_raises_stops_the_run_with_the_last_checkpoint_intact(tmp_path):
    calls = []

    def fails_on_second_call(prompts, completions, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the reward service is down")
        return [1.0] * len(completions)

    from mojax.rl.rewards import Objective

    config = small_config(tmp_path, "steps=3", "objectives=[{name: flaky, fn: 'mojax.rl.tiny:tiny_prompts'}]")
    trainer = Trainer(config, objectives=[Objective("flaky", fails_on_second_call)])
    with pytest.raises(RuntimeError, match="flaky"):
        trainer.train()
    trainer.close()
    assert trainer._manager().all_steps() == [1]
    assert [record["step"] for record in read_metrics(tmp_path)] == [1]


def test_save_seconds_saves_when_that_long_has_passed_since_the_last_checkpoint(tmp_path):
    """With an hour's cadence and no step cadence, the first step saves (no checkpoint yet), the next ones do not until
    the last; with no time cadence only the last step saves."""
    no_step_cadence = ("steps=4", "checkpoint.save_steps=1000", "checkpoint.max_to_keep=5")
    for name, extra, want in (("hourly", ["checkpoint.save_seconds=3600"], [1, 4]), ("by_steps", [], [4])):
        trainer = Trainer(small_config(tmp_path / name, *no_step_cadence, *extra))
        trainer.train()
        assert trainer._manager().all_steps() == want, name
        trainer.close()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("combiner.name=not_a_combiner", "`combiner.name` is 'not_a_combiner'; expected one of"),
        ("rollout.num_generations=1", "`rollout.num_generations` is 1 with the group estimator"),
        ("rollout.tempreature=0.5", "`rollout.tempreature` is not a known key"),
        ("algorithm.num_minibatches=3", "does not divide the batch of 4 completions"),
        ("combiner.mode=probe", "`combiner.mode` is 'probe' for 'linear'"),
        ("combiner.pullbacks=vmap", "`combiner.pullbacks` is 'vmap'; expected one of"),
        ("optimizer.schedule=cosine", "`optimizer.schedule_steps` is None"),
        ("model.remat=dot", "`model.remat` is 'dot'; expected one of"),
        ("model.attention_kernel=flash", "`model.attention_kernel` is 'flash'; expected one of"),
        ("optimizer.max_grad_norm=0", r"`optimizer.max_grad_norm` is 0; expected a number in \(0, inf\] \(or null"),
        ("algorithm.estimator_options={scale: group}", r"`algorithm.estimator_options` has \['scale'\] for 'grpo'"),
        ("algorithm.estimator_options={scale_rewards: std}", "`algorithm.estimator_options.scale_rewards` is 'std'"),
        ("checkpoint.save_seconds=-1", r"`checkpoint.save_seconds` is -1(\.0)?; expected"),
    ],
)
def test_bad_configs_raise_before_anything_compiles(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        small_config(tmp_path, "steps=1", override)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN's attention can run on a GPU")
def test_cudnn_attention_is_refused_off_a_gpu_when_the_policy_is_built(tmp_path):
    with pytest.raises(ValueError, match="attention_kernel='cudnn' cannot run here: it runs on NVIDIA GPUs only"):
        build_policy(small_config(tmp_path, "steps=1", "model.attention_kernel=cudnn"))


def test_the_attention_kernel_reaches_the_policy_and_the_critic(tmp_path):
    """``model.attention_kernel`` is set on the policy and copied to the critic built from it (the kernels' numerics:
    tests/models/test_llama.py)."""
    policy, _ = build_policy(small_config(tmp_path, "steps=1", "model.attention_kernel=xla"))
    assert policy.model.attention_kernel == "xla"
    assert build_critic(policy, 2, seed=0).model.attention_kernel == "xla"
    default, _ = build_policy(small_config(tmp_path, "steps=1"))
    assert default.model.attention_kernel == build_critic(default, 2, seed=0).model.attention_kernel == "mojax"


def test_wrong_types_raise_type_errors(tmp_path):
    with pytest.raises(TypeError, match="`rollout.temperature` is 'hot'; expected a number"):
        small_config(tmp_path, "steps=1", "rollout.temperature=hot")


def test_prompts_longer_than_the_limit_are_rejected_when_truncation_is_off(tmp_path):
    config = small_config(tmp_path, "steps=1", "rollout.truncate_prompts=error", "rollout.max_prompt_length=2")
    with pytest.raises(ValueError, match="at most rollout.max_prompt_length = 2"):
        Trainer(config).train()


def test_the_example_config_is_the_packaged_tiny_config():
    assert (REPO / "examples" / "tiny.yaml").read_text() == (CONFIG_DIR / "tiny.yaml").read_text()


def test_cli_trains_and_plots(tmp_path, capsys):
    from mojax.cli import main

    assert main(["train", "tiny", f"output_dir={tmp_path}", *SMALL, "steps=1"]) == 0
    assert "rewards/a_rate/mean" in capsys.readouterr().out
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "rewards.png").stat().st_size > 1000


def test_vocabulary_chunks_give_the_policys_log_probs_and_entropies():
    """Whole vocabulary or chunks, stacked or split (probe mode's) parameters: the model's logits' log-probs."""
    from flax import nnx

    from mojax.models import LlamaForCausalLM, split_last_layer
    from mojax.rl.losses import token_entropy, token_logprobs
    from mojax.rl.tiny import tiny_model_config
    from mojax.rl.trainer import response_fn

    model = LlamaForCausalLM(tiny_model_config(), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    prompt, mask = jnp.asarray([[3, 4, 5, 6]]), jnp.ones((1, 4), jnp.int32)
    tokens, response_mask = jnp.asarray([[7, 8, 2]]), jnp.ones((1, 3), jnp.float32)
    logits = model(jnp.concatenate([prompt, tokens], axis=1))[0][:, 3:6]
    want = (token_logprobs(logits, tokens), token_entropy(logits))
    split = split_last_layer(params)
    for state, is_split, chunk_size in [
        (params, False, None),
        (params, False, 17),
        (split, True, None),
        (split, True, 17),
    ]:
        got = response_fn(graphdef, rest, split=is_split, chunk_size=chunk_size)(
            state, prompt, mask, tokens, response_mask
        )
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5)


def test_evaluation_runs_every_eval_steps_and_the_export_loads_back(tmp_path):
    from mojax.models import load_causal_lm

    trainer = Trainer(small_config(tmp_path, "steps=2", "eval_steps=2", "data.eval_prompts=tiny", "export=true"))
    trainer.train()
    trainer.close()
    records = read_metrics(tmp_path)
    assert "eval/rewards/a_rate/mean" not in records[0]
    assert all(np.isfinite(records[1][f"eval/rewards/{name}/mean"]) for name in ("a_rate", "b_count", "brevity"))
    loaded = load_causal_lm(tmp_path / "policy")
    ids = jnp.asarray([[3, 4, 5]])
    model = trainer.policy_model()
    np.testing.assert_allclose(np.asarray(loaded(ids)[0]), np.asarray(model(ids)[0]), atol=1e-5)


def test_the_samplers_log_probs_equal_the_recomputed_old_logp(tmp_path):
    """rollout.use_sampler_logps skips the scoring forward; the sampler's log-probs are the policy's on its tokens.
    With one update per rollout (the default: its update reads no old_logp) the rollout keeps the sampler's too."""
    settings = {
        "recomputed": ("rollout.use_sampler_logps=false", "algorithm.num_iterations=2"),
        "sampled": ("rollout.use_sampler_logps=true", "algorithm.num_iterations=2"),
        "default": (),
    }
    rollouts = {}
    for name, overrides in settings.items():
        trainer = Trainer(small_config(tmp_path / name, *overrides))
        assert trainer.update_spec.on_policy == (name == "default")
        rows = trainer.prompts_for_step(1)
        rollouts[name] = trainer.rollout(rows, jax.random.key(3), trainer.sampling, 2)
        trainer.close()
    recomputed, sampled = rollouts["recomputed"], rollouts["sampled"]
    np.testing.assert_array_equal(sampled.tokens, recomputed.tokens)
    np.testing.assert_array_equal(sampled.response_mask, recomputed.response_mask)
    assert np.abs(np.asarray(recomputed.old_logp)).sum() > 0
    assert not np.array_equal(sampled.old_logp, recomputed.old_logp)  # two computations: equal to float rounding
    np.testing.assert_allclose(sampled.old_logp, recomputed.old_logp, atol=2e-5)
    np.testing.assert_array_equal(rollouts["default"].old_logp, sampled.old_logp)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("algorithm.advantage_estimator=gae",),
        ("kl.beta=0.05", "kl.placement=reward", "combiner.name=pama"),
        ("algorithm.objective_aggregation=sum_then_normalize",),
    ],
)
def test_the_compiled_advantages_and_statistics_equal_their_op_by_op_run(tmp_path, overrides):
    """The trainer compiles its advantage estimate and its interference statistics (one program per rollout shape,
    shared by every trainer of the process); they equal the same functions run op by op, to float rounding."""
    from mojax.rl.trainer import _estimate_advantages, interference_statistics

    trainer = Trainer(small_config(tmp_path, "steps=1", *overrides))
    prepared = trainer.prepare(1)
    compiled = trainer.advantages(prepared.oriented, prepared.rollout)
    with jax.disable_jit():
        eager = trainer.advantages(prepared.oriented, prepared.rollout)
        weights = jnp.asarray([0.2, 0.3, 0.5])
        statistics = interference_statistics(weights, eager.advantages, prepared.rollout, prepared.oriented)
    np.testing.assert_allclose(compiled.advantages, eager.advantages, rtol=1e-5, atol=1e-6)
    assert (compiled.returns is None) == (eager.returns is None) == ("gae" not in str(overrides))
    compiled_statistics = jax.jit(interference_statistics)(
        weights, eager.advantages, prepared.rollout, prepared.oriented
    )
    for field, value in statistics._asdict().items():
        np.testing.assert_allclose(getattr(compiled_statistics, field), value, rtol=1e-5, atol=1e-7, err_msg=field)
    programs = _estimate_advantages._cache_size()
    Trainer(small_config(tmp_path / "again", "steps=1", *overrides)).prepare(1)
    assert _estimate_advantages._cache_size() == programs  # the second trainer reuses the first one's program


def test_a_wider_prompt_compiles_neither_the_advantages_nor_the_statistics_again(tmp_path):
    """The advantages and the interference statistics read the responses alone: a batch whose prompts are padded to
    another width (another ``rollout.prompt_bucket_multiple`` bucket) reuses their programs and gives the same
    metrics."""
    from mojax.rl.trainer import _estimate_advantages, _interference_statistics

    trainer = Trainer(small_config(tmp_path, "steps=1"))
    prepared = trainer.prepare(1)
    rollout = prepared.rollout
    wider = rollout._replace(
        prompt_ids=np.pad(np.asarray(rollout.prompt_ids), ((0, 0), (8, 0))),
        prompt_mask=np.pad(np.asarray(rollout.prompt_mask), ((0, 0), (8, 0))),
    )
    update = {"weights": np.full(3, 1 / 3, np.float32), "cosines": np.full((3, 3), np.nan, np.float32)}
    update |= dict.fromkeys(("loss", "grad_norm", "kl", "entropy", "clip_ratio"), 0.0)
    programs, metrics = [], []
    for batch in (rollout, wider):
        advantages = trainer.advantages(prepared.oriented, batch).advantages
        metrics.append(trainer._metrics(prepared.raw, prepared.oriented, batch, advantages, update))
        programs.append((_estimate_advantages._cache_size(), _interference_statistics._cache_size()))
    assert programs[1] == programs[0]
    assert metrics[1] == metrics[0]
    assert np.isfinite(metrics[0]["interference/index"])


def test_the_kl_in_the_reward_lowers_each_score_by_beta_times_its_summed_kl(tmp_path):
    """With ``kl.placement=reward`` GRPO's advantages are those of the scores minus beta sum_t (log pi_old - log
    pi_ref) over each response (after one update, so that the policy has left the reference)."""
    from mojax.rl.advantages import AdvantageInputs, compute_advantages

    trainer = Trainer(small_config(tmp_path, "steps=2", "kl.beta=0.5", "kl.placement=reward"))
    trainer.train_step()
    prepared = trainer.prepare(2)
    rollout = prepared.rollout
    kl = np.sum((np.asarray(rollout.old_logp) - np.asarray(rollout.ref_logp)) * np.asarray(rollout.response_mask), 1)
    assert np.abs(kl).max() > 1e-4
    penalised = np.asarray(prepared.oriented) - trainer.kl_coef * kl[:, None]
    expected = compute_advantages(
        "grpo", AdvantageInputs(scores=jnp.asarray(penalised), mask=rollout.response_mask, group_ids=rollout.group_ids)
    ).advantages
    actual = trainer.advantages(prepared.oriented, rollout).advantages
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
