"""Objectives, score(), resolve() and the running normaliser of mojax.rl.rewards."""

import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import random_module
from hypothesis import given
from hypothesis import strategies as st

from mojax.models import ModelConfig, parameter_digest
from mojax.models.heads import LlamaRewardModel
from mojax.rl.rewards import (
    BUILTIN_REWARDS,
    Objective,
    char_fraction,
    init_normalizer,
    normalize,
    resolve,
    reward_model,
    reward_model_digests,
    score,
    signed,
    token_reward,
    update_normalizer,
)


def constant(value):
    """A batched reward giving `value` to every sample."""
    return lambda prompts, completions, **columns: [value] * len(completions)


def returning(values):
    """A batched reward returning `values` whatever the batch."""
    return lambda prompts, completions, **columns: values


PROMPTS, COMPLETIONS, IDS = ["p0", "p1", "p2"], ["aa", "ab", "bb"], [[3, 3], [3, 4], [4, 4]]


def score_one(fn, **kwargs):
    return score([Objective("bad", fn)], PROMPTS, COMPLETIONS, completion_ids=IDS, **kwargs)


# ---------------------------------------------------------------- Objective construction


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"name": "a b"}, ValueError, "`name` holds 'a b'"),
        ({"name": 3}, TypeError, "`name` holds 3"),
        ({"weight": -0.5}, ValueError, "`weight` is -0.5"),
        ({"weight": math.inf}, ValueError, "`weight` is inf"),
        ({"weight": "1"}, TypeError, "`weight` is a str"),
        ({"kind": "penalty"}, ValueError, "`kind` is 'penalty'; expected one of 'reward', 'cost'"),
        ({"fn": 3.0}, TypeError, "`fn` of objective 'ok' is a float"),
    ],
)
def test_objective_rejects_bad_fields_with_the_project_message(kwargs, error, text):
    fields = {"name": "ok", "fn": constant(1.0)} | kwargs
    with pytest.raises(error, match=re.escape(text)):
        Objective(**fields)


def reward_only_texts(texts):
    return texts


def reward_without_ids(prompts, completions):
    return completions


def reward_positional_only_extra(prompts, completions, extra, /, *, completion_ids):
    return completions


@pytest.mark.parametrize("fn", [reward_only_texts, reward_without_ids, reward_positional_only_extra])
def test_objective_rejects_a_wrong_arity_naming_the_objective(fn):
    with pytest.raises(TypeError, match=r"`fn` of objective 'style' has signature \(.*\); expected fn\(prompts, "):
        Objective("style", fn)


def reward_keyword_ids(prompts, completions, *, completion_ids):
    return [0.0] * len(completions)


def reward_varargs(*args, **kwargs):
    return [0.0] * len(args[1])


def reward_ids_positional_or_keyword(prompts, completions, completion_ids, answer=None):
    return [0.0] * len(completions)


@pytest.mark.parametrize("fn", [reward_keyword_ids, reward_varargs, reward_ids_positional_or_keyword])
def test_objective_accepts_every_spelling_of_the_trl_signature(fn):
    objective = Objective("ok", fn, weight=2, kind="cost")
    assert objective.weight == 2.0 and isinstance(objective.weight, float) and objective.sign == -1.0


def test_signed_negates_only_cost_columns():
    objectives = [Objective("r", constant(1.0)), Objective("c", constant(1.0), kind="cost")]
    scores = np.asarray([[1.0, 2.0], [np.nan, -3.0]], np.float32)
    np.testing.assert_array_equal(signed(scores, objectives), [[1.0, -2.0], [np.nan, 3.0]])
    with pytest.raises(ValueError, match="has 1 columns; expected 2"):
        signed(scores[:, :1], objectives)


# ---------------------------------------------------------------- score(): values and errors


def test_score_stacks_one_column_per_objective_and_none_is_nan_in_its_column_only():
    objectives = [
        Objective("a", char_fraction("a")),
        Objective("maybe", returning([0.5, None, True])),
        Objective("nan", returning([float("nan"), np.float32(2.0), jnp.asarray(3.0)])),
    ]
    scores = score(objectives, PROMPTS, COMPLETIONS, completion_ids=IDS)
    assert scores.shape == (3, 3) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, [[1.0, 0.5, np.nan], [0.5, np.nan, 2.0], [0.0, 1.0, 3.0]])


@pytest.mark.parametrize(
    "values, error, text",
    [
        ([1.0, 2.0], ValueError, "objective 'bad' returned 2 scores for 3 samples (sample 2 has no score)"),
        ([1.0] * 4, ValueError, "objective 'bad' returned 4 scores for 3 samples (sample 3 does not exist)"),
        ([1.0, math.inf, 0.0], ValueError, "objective 'bad' returned inf for sample 1; expected a finite float"),
        ([0.0, 0.0, -math.inf], ValueError, "objective 'bad' returned -inf for sample 2"),
        (["x", 1.0, 1.0], TypeError, "objective 'bad' returned 'x' (str) for sample 0; expected a float, or None"),
        ([1.0, [1.0], 1.0], TypeError, "returned [1.0] (list) for sample 1"),
        (1.0, TypeError, "objective 'bad' returned a float; expected a list of 3 floats or None"),
        ("abc", TypeError, "objective 'bad' returned a str"),
    ],
)
def test_score_errors_name_the_objective_and_the_sample(values, error, text):
    with pytest.raises(error, match=re.escape(text)):
        score_one(returning(values))


def test_score_wraps_an_exception_chains_it_and_locates_the_sample():
    def fragile(prompts, completions, **columns):
        return [1.0 / completion.count("a") for completion in completions]

    with pytest.raises(
        RuntimeError, match=r"objective 'bad' raised ZeroDivisionError: .*\(sample 2 fails on its own\)"
    ) as info:
        score_one(fragile)
    assert isinstance(info.value.__cause__, ZeroDivisionError)

    def batch_only(prompts, completions, **columns):
        if len(completions) > 1:
            raise KeyError("batch")
        return [0.0]

    with pytest.raises(RuntimeError, match=r"raised KeyError: 'batch' \(no sample fails on its own\)"):
        score_one(batch_only)


def test_dataset_columns_reach_only_the_functions_that_accept_them():
    seen = {}

    def named(prompts, completions, *, completion_ids, answer):
        seen["named"] = (completion_ids, answer)
        return [0.0] * len(completions)

    def catch_all(prompts, completions, **columns):
        seen["catch_all"] = columns
        return [0.0] * len(completions)

    def bare(prompts, completions, *, completion_ids):
        return [0.0] * len(completions)

    columns = {"answer": ["1", "2", "3"], "level": np.asarray([1, 2, 3])}
    objectives = [Objective("named", named), Objective("catch_all", catch_all), Objective("bare", bare)]
    score(objectives, PROMPTS, COMPLETIONS, completion_ids=IDS, columns=columns)
    assert seen["named"] == (IDS, ["1", "2", "3"])
    assert sorted(seen["catch_all"]) == ["answer", "completion_ids", "level"]
    np.testing.assert_array_equal(seen["catch_all"]["level"], [1, 2, 3])


@pytest.mark.parametrize(
    "columns, text",
    [
        ({"completions": [1, 2, 3]}, "`columns` holds 'completions'"),
        ({"answer": ["1"]}, "`columns` ['answer'] has 1 entries"),
    ],
)
def test_score_rejects_reserved_or_misaligned_columns(columns, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        score_one(constant(0.0), columns=columns)


def test_score_passes_real_tokens_of_an_id_array_as_lists():
    seen = []

    def record(prompts, completions, *, completion_ids):
        seen.append(completion_ids)
        return [0.0] * len(completions)

    ids = np.asarray([[5, 6, 0], [7, 0, 0], [8, 9, 1]])
    mask = np.asarray([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    score([Objective("r", record)], PROMPTS, COMPLETIONS, completion_ids=ids, completion_mask=mask)
    assert seen == [[[5, 6], [7], [8, 9, 1]]]


# ---------------------------------------------------------------- token rewards and reward models

TRACES = []


def _masked_mean_id(prompt_ids, prompt_mask, completion_ids, completion_mask):
    TRACES.append(completion_ids.shape)
    count = jnp.sum(completion_mask, -1)
    mean = jnp.sum(completion_ids * completion_mask, -1) / jnp.maximum(count, 1)
    return jnp.where(count > 0, mean + 0.5 * jnp.sum(prompt_ids * prompt_mask, -1), jnp.nan)


MEAN_ID = token_reward(_masked_mean_id)


def test_token_reward_is_jitted_once_per_shape_and_matches_numpy():
    prompt_ids, prompt_mask = np.asarray([[0, 2], [1, 1], [3, 4]]), np.asarray([[0, 1], [1, 1], [1, 1]])
    ids, mask = np.asarray([[5, 6, 9], [7, 9, 9], [9, 9, 9]]), np.asarray([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    kwargs = dict(completion_ids=ids, completion_mask=mask, prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    TRACES.clear()
    first = score([Objective("mean", MEAN_ID)], PROMPTS, COMPLETIONS, **kwargs)
    second = score([Objective("mean", MEAN_ID)], PROMPTS, COMPLETIONS, **kwargs)
    expected = [(5 + 6) / 2 + 0.5 * 2, 7 + 0.5 * (1 + 1), np.nan]  # the last completion is empty: not applicable
    np.testing.assert_allclose(first[:, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(first, second)
    assert TRACES == [(3, 3)]
    from_lists = score([Objective("mean", MEAN_ID)], PROMPTS, COMPLETIONS, completion_ids=[[5, 6], [7], [1, 2, 3, 4]],
                       prompt_ids=prompt_ids, prompt_mask=prompt_mask)  # fmt: skip
    np.testing.assert_allclose(from_lists[:, 0], [6.5, 8.0, 2.5 + 3.5], rtol=1e-6)
    assert TRACES == [(3, 3), (3, 4)]


def test_token_rewards_need_prompt_ids_and_a_batch_shaped_output():
    with pytest.raises(ValueError, match=re.escape("`prompt_ids` is None with token objectives ['mean']")):
        score([Objective("mean", MEAN_ID)], PROMPTS, COMPLETIONS, completion_ids=IDS)
    scalar = token_reward(lambda p, pm, c, cm: jnp.sum(c).astype(jnp.float32))
    with pytest.raises(ValueError, match=re.escape("objective 'sum' returned shape (); expected (3,)")):
        score([Objective("sum", scalar)], PROMPTS, COMPLETIONS, completion_ids=IDS, prompt_ids=np.zeros((3, 1)))
    with pytest.raises(ValueError, match=re.escape("`prompt_ids` has shape (2, 1)")):
        score([Objective("mean", MEAN_ID)], PROMPTS, COMPLETIONS, completion_ids=IDS, prompt_ids=np.zeros((2, 1)))
    with pytest.raises(TypeError, match="`fn` is a int"):
        token_reward(3)


@pytest.fixture(scope="module")
def tiny_reward_model():
    config = ModelConfig.tiny(num_hidden_layers=1)
    return random_module(lambda: LlamaRewardModel(config, num_labels=2, rngs=nnx.Rngs(0)), seed=3)


def test_reward_model_scores_the_last_real_token_of_prompt_plus_completion(tiny_reward_model):
    prompt_ids = np.asarray([[0, 0, 11, 12], [13, 14, 15, 16]])  # left padding on row 0
    prompt_mask = (prompt_ids > 0).astype(np.int32)
    completions = [[21, 22, 23], [24]]
    objective = Objective("rm", reward_model(tiny_reward_model, label=1))
    scores = score([objective], ["", ""], ["", ""], completion_ids=completions, prompt_ids=prompt_ids,
                   prompt_mask=prompt_mask)  # fmt: skip
    # HF pooling (rightmost non-pad token, pad id 0) on the unpadded sequences, right-padded into one batch
    unpadded = np.asarray([[11, 12, 21, 22, 23], [13, 14, 15, 16, 24]])
    expected = nnx.jit(lambda model, ids: model(ids, attention_mask=ids > 0))(tiny_reward_model, unpadded)[:, 1]
    np.testing.assert_allclose(scores[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_reward_model_checks_its_arguments(tiny_reward_model):
    with pytest.raises(ValueError, match="`label` is 2; expected an output index < num_labels = 2"):
        reward_model(tiny_reward_model, label=2)
    with pytest.raises(TypeError, match="`model` is a function"):
        reward_model(lambda ids: ids)


def test_parameter_digest_changes_with_any_bit_of_the_state(tiny_reward_model):
    """Equal states digest alike; one element nudged by one ulp, or another initialisation, digest otherwise."""
    config = ModelConfig.tiny(num_hidden_layers=1)
    twin = random_module(lambda: LlamaRewardModel(config, num_labels=2, rngs=nnx.Rngs(0)), seed=3)
    assert parameter_digest(twin) == parameter_digest(tiny_reward_model)
    kernel = twin.score.kernel
    kernel[...] = kernel[...].at[0, 0].set(jnp.nextafter(kernel[0, 0], jnp.inf))
    assert parameter_digest(twin) != parameter_digest(tiny_reward_model)
    other = random_module(lambda: LlamaRewardModel(config, num_labels=2, rngs=nnx.Rngs(0)), seed=4)
    assert parameter_digest(other) != parameter_digest(tiny_reward_model)


def test_reward_model_digests_name_the_objectives_scored_by_a_reward_model(tiny_reward_model):
    objectives = [Objective("short", constant(1.0)), Objective("rm", reward_model(tiny_reward_model, label=1))]
    assert reward_model_digests(objectives) == {"objectives.rm": parameter_digest(tiny_reward_model)}
    assert reward_model_digests(objectives[:1]) == {}


# ---------------------------------------------------------------- resolve()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_rewards.py").write_text(
        "def shouting(prompts, completions, **columns):\n"
        "    return [float(c.isupper()) for c in completions]\n"
        "def longer_than(n):\n"
        "    return lambda prompts, completions, **columns: [float(len(c) > n) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_rewards", raising=False)
    return "user_rewards"


def test_resolve_builds_builtins_with_options(user_module):
    objective = resolve({"name": "b", "fn": "char_fraction", "weight": 0.25, "kind": "cost", "options": {"chars": "b"}})
    assert (objective.name, objective.weight, objective.kind) == ("b", 0.25, "cost")
    assert objective.fn(["", ""], ["ab", "bb"], completion_ids=[[], []]) == [0.5, 1.0]


def test_resolve_imports_a_reward_or_a_factory_by_module_path(user_module):
    plain = resolve({"name": "caps", "fn": "user_rewards:shouting"})
    made = resolve({"name": "long", "fn": "user_rewards:longer_than", "options": {"n": 1}})
    scores = score([plain, made], ["", ""], ["OK", "no"], completion_ids=[[], []])
    np.testing.assert_array_equal(scores, [[1.0, 1.0], [0.0, 1.0]])


@pytest.mark.parametrize(
    "spec, error, text",
    [
        (
            {"name": "x", "fn": "vader"},
            ValueError,
            "`fn` is 'vader'; expected a built-in reward (" + ", ".join(BUILTIN_REWARDS),
        ),
        ({"name": "x", "fn": "user_rewards:missing"}, ValueError, "`fn` is 'user_rewards:missing' ("),
        ({"name": "x", "fn": "no_such_module_xyz:f"}, ValueError, "`fn` is 'no_such_module_xyz:f' ("),
        (
            {"name": "x", "fn": "conciseness", "options": {"target": 5, "units": "words"}},
            TypeError,
            "options of 'conciseness': target, unit",
        ),
        (
            {"name": "x", "fn": "user_rewards:longer_than", "options": {"m": 1}},
            TypeError,
            "options of user_rewards:longer_than: n",
        ),
        (
            {"name": "x", "fn": "mojax.rl.rewards.text:per_completion"},
            TypeError,
            "`fn` of objective 'x' has signature (rule",
        ),
        ({"name": "x"}, ValueError, "`spec` has keys ['name']; expected 'name' and 'fn'"),
        ({"name": "x", "fn": "sentiment", "wieght": 1}, ValueError, "`spec` has keys ['fn', 'name', 'wieght']"),
        ({"name": "x", "fn": len}, TypeError, "`fn` is a builtin_function_or_method; expected a string"),
        ({"name": "x y", "fn": "sentiment"}, ValueError, "`name` holds 'x y'"),
    ],
)
def test_resolve_errors_say_what_is_known(user_module, spec, error, text):
    with pytest.raises(error, match=re.escape(text)):
        resolve(spec)


def test_every_builtin_scores_a_batch_with_its_default_options():
    objectives = [Objective(name, factory()) for name, factory in BUILTIN_REWARDS.items()]
    scores = score(objectives, ["q", "q"], ["<answer>4</answer>", ""], completion_ids=[[1], []],
                   columns={"answer": ["4", "5"]})  # fmt: skip
    assert scores.shape == (2, len(BUILTIN_REWARDS))
    assert np.all(np.isfinite(scores))


# ---------------------------------------------------------------- running normaliser vs numpy

UPDATE = jax.jit(update_normalizer)
NORMALIZE = jax.jit(normalize)
scores_4x3 = st.lists(st.one_of(st.floats(-100, 100, width=32), st.just(math.nan)), min_size=12, max_size=12)


@given(st.lists(scores_4x3, min_size=1, max_size=4))
def test_normalizer_matches_numpy_over_all_batches_seen(batch_list):
    batches = [np.asarray(batch, np.float32).reshape(4, 3) for batch in batch_list]
    state = init_normalizer(3)
    for batch in batches:
        state = UPDATE(state, batch)
    seen = np.concatenate(batches).astype(np.float64)
    finite = np.isfinite(seen)
    count = finite.sum(0)
    mean = np.asarray([seen[finite[:, j], j].mean() if count[j] else 0.0 for j in range(3)])
    variance = np.asarray([seen[finite[:, j], j].var() if count[j] else 0.0 for j in range(3)])
    np.testing.assert_array_equal(state.count, count)
    np.testing.assert_allclose(state.mean, mean, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(state.m2) / np.maximum(count, 1), variance, rtol=1e-3, atol=1e-2)
    probe = np.asarray([[0.0, 50.0, np.nan]], np.float32)
    std = np.sqrt(variance)
    expected = (probe - mean) / np.where(std > 1e-6, std, 1.0)
    got = np.asarray(NORMALIZE(state, probe))
    assert np.all(np.isnan(got) == np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * max(1.0, float(np.nanmax(np.abs(expected)))))


def test_normalizer_edge_cases_are_nan_free():
    state = init_normalizer(2)
    np.testing.assert_array_equal(normalize(state, jnp.asarray([[3.0, -1.0]])), [[3.0, -1.0]])  # nothing seen: identity
    unchanged = update_normalizer(state, jnp.full((4, 2), jnp.nan))
    assert all(np.array_equal(a, b) for a, b in zip(unchanged, state, strict=True))
    single = update_normalizer(state, jnp.asarray([[2.0, 5.0]]))  # std 0: only centred
    np.testing.assert_array_equal(normalize(single, jnp.asarray([[3.0, 5.0]])), [[1.0, 0.0]])
    with pytest.raises(ValueError, match="`n` is 0"):
        init_normalizer(0)
