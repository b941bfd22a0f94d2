"""Tests for mojax.models.generate: cached sampling against the cache-free forward of a tiny random LLaMA."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mojax.models.config import ModelConfig
from mojax.models.generate import (
    DRAW_BLOCK,
    GenerationResult,
    SamplingConfig,
    _draw,
    _draw_top_p,
    _generate_bucket,
    bucket_length,
    generate,
    sample_next_token,
)
from mojax.models.llama import LlamaForCausalLM

NEW = 5


def sharpened(model, factor=10.0):
    """`model` with every weight but the norm scales times `factor`: peaked logits and attention, so small bugs flip argmaxes."""
    params = nnx.state(model, nnx.Param)
    scale = lambda path, w: w if "norm" in jax.tree_util.keystr(path) else w * factor
    nnx.update(model, jax.tree_util.tree_map_with_path(scale, params))
    return model


@pytest.fixture(scope="module")
def model():
    return sharpened(LlamaForCausalLM(ModelConfig.tiny(), rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def prompts(model):
    """Two left-padded prompts: 3 real tokens and 6 real tokens in 6 columns."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, size=(2, 6)).astype(np.int32)
    mask = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32)
    return np.where(mask == 1, ids, 0).astype(np.int32), mask


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return generate(model, *prompts, jax.random.key(0), SamplingConfig(max_new_tokens=NEW, temperature=0.0))


@jax.jit
def _cache_free_logits(graphdef, state, sequences, mask):
    """Logits of the model's plain causal forward (no KV cache)."""
    return nnx.merge(graphdef, state)(sequences, attention_mask=mask)[0]


def full_forward_logits(model, sequences, mask):
    """Logits of a jitted cache-free forward over whole sequences."""
    return np.asarray(_cache_free_logits(*nnx.split(model), jnp.asarray(sequences), jnp.asarray(mask)), np.float64)


def log_softmax(x):
    """Row-wise log-softmax in NumPy."""
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_adjusted_logprobs(logits, temperature, top_k, top_p):
    """Log-probabilities after temperature, top-k and top-p (HF order), by sorting one row in NumPy."""
    scaled = logits / temperature
    order = np.argsort(-scaled, kind="stable")[: top_k or scaled.size]
    probs = np.exp(log_softmax(scaled[order]))
    kept = order[(np.cumsum(probs) - probs) < top_p]
    out = np.full(scaled.shape, -np.inf)
    out[kept] = log_softmax(scaled[kept])
    return out


def test_greedy_equals_stepwise_argmax_of_cache_free_forward(model, prompts, greedy):
    """Each prompt unpadded at the left of a fixed-width row; causal attention ignores what lies to the right."""
    ids, mask = prompts
    lengths = mask.sum(1)
    rows = np.zeros((2, ids.shape[1] + NEW), np.int32)
    for b, length in enumerate(lengths):
        rows[b, :length] = ids[b, mask[b] == 1]
    for step in range(NEW):
        logits = full_forward_logits(model, rows, np.ones_like(rows))
        for b, length in enumerate(lengths):
            rows[b, length + step] = logits[b, length + step - 1].argmax()
    for b, length in enumerate(lengths):
        np.testing.assert_array_equal(np.asarray(greedy.tokens[b]), rows[b, length : length + NEW])
    np.testing.assert_array_equal(greedy.response_mask, np.ones((2, NEW)))
    np.testing.assert_array_equal(greedy.sampler_logprobs, np.zeros((2, NEW)))


def test_result_shapes_and_full_sequences(prompts, greedy):
    ids, mask = prompts
    assert isinstance(greedy, GenerationResult)
    assert greedy.tokens.dtype == jnp.int32 and greedy.tokens.shape == (2, NEW)
    assert greedy.model_logprobs.dtype == jnp.float32 and greedy.response_mask.dtype == jnp.float32
    np.testing.assert_array_equal(greedy.sequences, np.concatenate([ids, greedy.tokens], 1))
    np.testing.assert_array_equal(greedy.sequence_mask, np.concatenate([mask, np.ones((2, NEW), np.int32)], 1))


def test_graphdef_state_pair_gives_the_same_result(model, prompts, greedy):
    pair = generate(nnx.split(model), *prompts, jax.random.key(0), SamplingConfig(max_new_tokens=NEW, temperature=0.0))
    np.testing.assert_array_equal(pair.tokens, greedy.tokens)


def test_generate_runs_inside_an_outer_jit(model, prompts, greedy):
    graphdef, state = nnx.split(model)
    config = SamplingConfig(max_new_tokens=NEW, temperature=0.0)
    rollout = jax.jit(lambda state, ids, mask: generate((graphdef, state), ids, mask, jax.random.key(0), config).tokens)
    np.testing.assert_array_equal(rollout(state, *prompts), greedy.tokens)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.3, 0, 1.0), (0.8, 7, 0.9), (1.1, 0, 0.8)])
def test_logprobs_match_cache_free_forward(model, prompts, temperature, top_k, top_p):
    config = SamplingConfig(max_new_tokens=NEW, temperature=temperature, top_k=top_k, top_p=top_p)
    result = generate(model, *prompts, jax.random.key(3), config)
    logits = full_forward_logits(model, result.sequences, result.sequence_mask)
    prompt_width = prompts[0].shape[1]
    for b in range(2):
        for j in range(NEW):
            row, token = logits[b, prompt_width - 1 + j], int(result.tokens[b, j])
            adjusted = reference_adjusted_logprobs(row, temperature, top_k, top_p)
            assert np.isfinite(adjusted[token]), "sampled a token outside the top-k/top-p set"
            np.testing.assert_allclose(result.model_logprobs[b, j], log_softmax(row)[token], atol=2e-5)
            np.testing.assert_allclose(result.sampler_logprobs[b, j], adjusted[token], atol=2e-5)


def test_left_padding_does_not_change_results(model, prompts, greedy):
    """Prompt 0 alone (3 columns, bucket 4) against the same prompt left-padded beside a longer one (bucket 8)."""
    ids, mask = prompts
    alone = generate(
        model, ids[:1, 3:], mask[:1, 3:], jax.random.key(0), SamplingConfig(max_new_tokens=NEW, temperature=0.0)
    )
    np.testing.assert_array_equal(alone.tokens[0], greedy.tokens[0])
    np.testing.assert_allclose(alone.model_logprobs[0], greedy.model_logprobs[0], atol=2e-5)


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-6}])
def test_degenerate_filters_equal_greedy(model, prompts, greedy, filters):
    result = generate(
        model, *prompts, jax.random.key(5), SamplingConfig(max_new_tokens=NEW, temperature=1.0, **filters)
    )
    np.testing.assert_array_equal(result.tokens, greedy.tokens)
    np.testing.assert_allclose(result.sampler_logprobs, np.zeros((2, NEW)), atol=1e-6)
    np.testing.assert_allclose(result.model_logprobs, greedy.model_logprobs, atol=1e-6)


def test_stop_tokens_finish_sequences_and_mask_the_rest(model, prompts, greedy):
    """Both rows stop early, so the decode loop also exits before max_new_tokens."""
    stops = (int(greedy.tokens[0, 1]), int(greedy.tokens[1, 2]))
    is_stop = np.isin(np.asarray(greedy.tokens), stops)
    first_stop = [int(np.argmax(row)) for row in is_stop]
    pad = model.config.vocab_size - 1
    config = SamplingConfig(max_new_tokens=NEW, temperature=0.0, stop_token_ids=stops, pad_token_id=pad)
    result = generate(model, *prompts, jax.random.key(0), config)
    for b, last in enumerate(first_stop):
        keep = np.arange(NEW) <= last
        np.testing.assert_array_equal(result.response_mask[b], keep.astype(np.float32))
        np.testing.assert_array_equal(result.tokens[b], np.where(keep, greedy.tokens[b], pad))
        np.testing.assert_allclose(result.model_logprobs[b], np.where(keep, greedy.model_logprobs[b], 0.0), atol=1e-6)
        np.testing.assert_array_equal(result.sequence_mask[b, -NEW:], keep.astype(np.int32))
    assert max(first_stop) < NEW - 1


def test_sampling_is_deterministic_for_a_fixed_key(model, prompts):
    config = SamplingConfig(max_new_tokens=NEW, temperature=1.3)
    first, again = (generate(model, *prompts, jax.random.key(7), config) for _ in range(2))
    other = generate(model, *prompts, jax.random.key(8), config)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.sampler_logprobs, again.sampler_logprobs)
    assert not np.array_equal(first.tokens, other.tokens)


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.3, 0.9)])
def test_a_shared_prefill_equals_repeated_prompt_rows(model, prompts, temperature, top_p):
    """num_generations=G prefills each prompt once; the B * G rows are those of the prompts repeated G times."""
    config = SamplingConfig(max_new_tokens=NEW, temperature=temperature, top_p=top_p)
    shared = generate(model, *prompts, jax.random.key(5), config, num_generations=3)
    repeated = generate(model, *(np.repeat(a, 3, axis=0) for a in prompts), jax.random.key(5), config)
    np.testing.assert_array_equal(shared.tokens, repeated.tokens)
    np.testing.assert_array_equal(shared.sequences, repeated.sequences)
    np.testing.assert_array_equal(shared.sequence_mask, repeated.sequence_mask)
    np.testing.assert_allclose(shared.model_logprobs, repeated.model_logprobs, atol=1e-5)
    np.testing.assert_allclose(shared.sampler_logprobs, repeated.sampler_logprobs, atol=1e-5)
    if temperature > 0:
        groups = np.asarray(shared.tokens).reshape(2, 3, NEW)
        assert all(len({tuple(row) for row in group}) > 1 for group in groups), "a prompt's rows must differ"


def _cache_shapes(program: str, kv_heads: int, head_dim: int) -> set[tuple[int, int]]:
    """{(rows, slots)} of the f32[rows, KV, slots, hd] arrays (KV caches) in a compiled program's text."""
    shapes = re.findall(rf"f32\[(\d+),{kv_heads},(\d+),{head_dim}\]", program)
    return {(int(rows), int(slots)) for rows, slots in shapes}


@pytest.mark.parametrize("loop", ["unrolled", "scan"])
def test_the_decode_steps_hold_each_prompts_keys_once_for_its_generations(model, prompts, loop):
    """With 3 generations the decode steps keep the 2 prompts' keys and values once each ([2, KV, width, hd]) and
    every row's cache only its new tokens ([6, KV, NEW, hd]): no array of 6 rows spans a prompt's width."""
    c = model.config
    graphdef, state = nnx.split(model)
    ids, mask = (jnp.asarray(a) for a in prompts)
    config = SamplingConfig(max_new_tokens=NEW, temperature=0.0, layer_loop=loop)

    def call(s, i, m):
        return generate((graphdef, s), i, m, jax.random.key(0), config, num_generations=3).tokens

    caches = _cache_shapes(jax.jit(call).lower(state, ids, mask).compile().as_text(), c.num_key_value_heads, c.head_dim)
    width = bucket_length(ids.shape[1])
    assert {(2, width), (6, NEW)} <= caches
    assert not [slots for rows, slots in caches if rows == 6 and slots >= width], caches


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.3, 0.9)])
def test_the_layer_scan_samples_what_the_unrolled_layers_sample(model, prompts, temperature, top_p):
    config = SamplingConfig(max_new_tokens=NEW, temperature=temperature, top_p=top_p)
    scanned, unrolled = (
        generate(model, *prompts, jax.random.key(7), dataclasses.replace(config, layer_loop=loop), num_generations=2)
        for loop in ("scan", "unrolled")
    )
    np.testing.assert_array_equal(scanned.tokens, unrolled.tokens)
    np.testing.assert_allclose(scanned.model_logprobs, unrolled.model_logprobs, atol=1e-5)
    np.testing.assert_allclose(scanned.sampler_logprobs, unrolled.sampler_logprobs, atol=1e-5)


@pytest.mark.parametrize("temperature, top_p, loop", [(0.0, 1.0, "auto"), (1.3, 0.9, "auto"), (1.3, 0.9, "scan")])
def test_the_split_parameters_of_probe_mode_sample_as_the_model(model, prompts, temperature, top_p, loop):
    """merge_split's model (final block apart) gives generate the same tokens and log-probs, prefill and decode (the
    layer scan then runs the final block, and its share of the prompts' cache, after the scan)."""
    from mojax.models.llama import merge_split, split_last_layer

    graphdef, params = nnx.split(model, nnx.Param)
    split = merge_split(graphdef, split_last_layer(params))
    config = SamplingConfig(max_new_tokens=NEW, temperature=temperature, top_p=top_p, layer_loop=loop)
    got = generate(split, *prompts, jax.random.key(6), config, num_generations=2)
    expected = generate(model, *prompts, jax.random.key(6), config, num_generations=2)
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_allclose(got.model_logprobs, expected.model_logprobs, atol=1e-5)
    np.testing.assert_allclose(got.sampler_logprobs, expected.sampler_logprobs, atol=1e-5)


@pytest.mark.parametrize("generations", [0, -1, 2.0, None])
def test_num_generations_must_be_a_positive_integer(model, prompts, generations):
    with pytest.raises(ValueError, match="num_generations must be an integer >= 1"):
        generate(model, *prompts, jax.random.key(0), SamplingConfig(max_new_tokens=2), num_generations=generations)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.5, 4, 0.8), (1.2, 0, 0.7)])
def test_sampled_frequencies_follow_the_adjusted_distribution(temperature, top_k, top_p):
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -1.5], np.float32)
    draws = 20_000
    config = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens, sampler_logprob, model_logprob = jax.jit(sample_next_token, static_argnums=2)(
        jnp.broadcast_to(logits, (draws, logits.size)), jax.random.key(11), config
    )
    expected = np.exp(reference_adjusted_logprobs(logits.astype(np.float64), temperature, top_k, top_p))
    counts = np.bincount(np.asarray(tokens), minlength=logits.size)
    support = expected > 0
    assert counts[~support].sum() == 0
    chi_square = (((counts - draws * expected)[support]) ** 2 / (draws * expected[support])).sum()
    assert chi_square < 25.0, (
        f"chi-square {chi_square:.1f} over {support.sum() - 1} degrees of freedom; counts {counts}"
    )
    np.testing.assert_allclose(np.exp(sampler_logprob), expected[np.asarray(tokens)], rtol=1e-5)
    np.testing.assert_allclose(model_logprob, log_softmax(logits.astype(np.float64))[np.asarray(tokens)], atol=1e-6)


class TraceCountingLlama(LlamaForCausalLM):
    """A LlamaForCausalLM that counts how often its decoder stack is traced or run."""

    calls = 0

    def hidden_states(self, *args, **kwargs):
        TraceCountingLlama.calls += 1
        return super().hidden_states(*args, **kwargs)


def test_prompts_in_one_bucket_share_one_compilation():
    counting = TraceCountingLlama(ModelConfig.tiny(), rngs=nnx.Rngs(1))
    config = SamplingConfig(max_new_tokens=2, temperature=0.0)
    width = lambda n: (np.full((1, n), 5, np.int32), np.ones((1, n), np.int32))
    generate(counting, *width(5), jax.random.key(0), config)
    traced = TraceCountingLlama.calls
    assert traced > 0
    generate(counting, *width(7), jax.random.key(1), config)
    assert TraceCountingLlama.calls == traced, "a prompt of the same bucket (8) was traced again"


@pytest.mark.parametrize(
    "n, multiple, expected",
    [(1, None, 1), (5, None, 8), (8, None, 8), (9, None, 16), (1, 16, 16), (17, 16, 32), (32, 16, 32)],
)
def test_bucket_length(n, multiple, expected):
    assert bucket_length(n, multiple) == expected


@pytest.mark.parametrize("n, multiple", [(0, None), (-3, None), (2.5, None), (4, 0), (True, None)])
def test_bucket_length_rejects_bad_input(n, multiple):
    with pytest.raises(ValueError, match="bucket_length"):
        bucket_length(n, multiple)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -0.1, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -1, "top_k"),
        ("max_new_tokens", 0, "max_new_tokens"),
        ("stop_token_ids", (2, -1), "stop_token_ids"),
        ("stop_token_ids", 2.5, "stop_token_ids"),
        ("top_k", 1.5, "top_k"),
        ("temperature", "hot", "temperature"),
        ("pad_token_id", -1, "pad_token_id"),
        ("prompt_bucket_multiple", 0, "prompt_bucket_multiple"),
        ("layer_loop", "loop", r"layer_loop must be one of \('auto', 'unrolled', 'scan'\), got 'loop'"),
    ],
)
def test_sampling_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SamplingConfig(max_new_tokens=4), **{field: value})


def bad_prompt_case(name, model_config):
    """(prompt_ids, prompt_mask, SamplingConfig, expected message) for the invalid call called `name`."""
    ids, mask, two = np.full((2, 4), 5, np.int32), np.ones((2, 4), np.int32), SamplingConfig(max_new_tokens=2)
    return {
        "1-D ids": (ids[0], mask[0], two, "shape"),
        "mask shape": (ids, mask[:, :3], two, "prompt_mask shape"),
        "float ids": (ids.astype(np.float32), mask, two, "integer"),
        "mask with a hole": (ids, np.array([[1, 0, 1, 1], [1, 1, 1, 1]]), two, "left-padded or right-padded"),
        "padding on both sides": (ids, np.array([[0, 1, 1, 0], [1, 1, 1, 1]]), two, "left-padded or right-padded"),
        "empty prompt": (ids, np.array([[0, 0, 0, 0], [1, 1, 1, 1]]), two, "left-padded"),
        "mask values": (ids, mask * 2, two, "only 0"),
        "id too large": (ids + model_config.vocab_size, mask, two, "prompt_ids must lie"),
        "stop id too large": (
            ids,
            mask,
            SamplingConfig(max_new_tokens=2, stop_token_ids=model_config.vocab_size),
            "stop_token_ids",
        ),
        "too long": (
            ids,
            mask,
            SamplingConfig(max_new_tokens=model_config.max_position_embeddings - 3),
            "max_position_embeddings",
        ),
    }[name]


@pytest.mark.parametrize(
    "name",
    [
        "1-D ids",
        "mask shape",
        "float ids",
        "mask with a hole",
        "padding on both sides",
        "empty prompt",
        "mask values",
        "id too large",
        "stop id too large",
        "too long",
    ],
)
def test_generate_rejects_bad_prompts(model, name):
    ids, mask, config, message = bad_prompt_case(name, model.config)
    with pytest.raises(ValueError, match=message):
        generate(model, ids, mask, jax.random.key(0), config)


def test_generate_rejects_a_bad_config_model_or_key(model):
    ids, mask = np.full((1, 2), 5, np.int32), np.ones((1, 2), np.int32)
    with pytest.raises(ValueError, match="SamplingConfig"):
        generate(model, ids, mask, jax.random.key(0), {"max_new_tokens": 2})
    with pytest.raises(ValueError, match="nnx.Module"):
        generate(object(), ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=2))
    for key in (None, np.zeros(2, np.int32), jax.random.split(jax.random.key(0), 2)):
        with pytest.raises(ValueError, match="rng_key"):
            generate(model, ids, mask, key, SamplingConfig(max_new_tokens=2))


def test_sampling_config_normalises_numpy_scalars():
    config = SamplingConfig(
        max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_p=np.float32(0.25), stop_token_ids=[np.int32(4)]
    )
    assert config == SamplingConfig(max_new_tokens=3, temperature=0.5, top_p=0.25, stop_token_ids=(4,))
    assert type(config.temperature) is float and type(config.stop_token_ids[0]) is int


def greedy_cut_at(greedy, stops, pad):
    """(tokens, response mask) of `greedy` had it stopped at the first of `stops` in each row, then padded with `pad`."""
    tokens = np.asarray(greedy.tokens)
    keep = np.cumsum(np.cumsum(np.isin(tokens, stops), axis=1), axis=1) <= 1
    return np.where(keep, tokens, pad), keep.astype(np.float32)


def assert_same_result(result, expected):
    for field in GenerationResult._fields:
        np.testing.assert_array_equal(getattr(result, field), getattr(expected, field), err_msg=field)


def test_ragged_lists_equal_the_left_padded_array(model, prompts, greedy):
    ids, mask = prompts
    rows = [ids[b, mask[b] == 1].tolist() for b in range(len(ids))]
    assert [len(row) for row in rows] == [3, 6]
    config = SamplingConfig(max_new_tokens=NEW, temperature=0.0)
    assert_same_result(generate(model, rows, rng_key=jax.random.key(0), config=config), greedy)


def test_right_padded_array_equals_the_left_padded_one(model, prompts, greedy):
    ids, mask = prompts
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b in range(len(ids)):
        real = ids[b, mask[b] == 1]
        right_ids[b, : real.size], right_mask[b, : real.size] = real, 1
    assert right_mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    config = SamplingConfig(max_new_tokens=NEW, temperature=0.0)
    assert_same_result(generate(model, right_ids, right_mask, jax.random.key(0), config), greedy)


def test_missing_mask_means_every_token_is_real(model, prompts):
    ids = prompts[0]
    config = SamplingConfig(max_new_tokens=NEW, temperature=0.0)
    assert_same_result(
        generate(model, ids, rng_key=jax.random.key(0), config=config),
        generate(model, ids, np.ones_like(ids), jax.random.key(0), config),
    )


def test_stop_and_pad_ids_default_to_the_model_config(model, prompts, greedy):
    """The same weights under a config whose eos is a token greedy decoding emits and whose pad is the last id."""
    stop, pad = int(greedy.tokens[0, 1]), model.config.vocab_size - 1
    config = model.config.replace(eos_token_id=stop, pad_token_id=pad)
    graphdef = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))))[0]
    result = generate((graphdef, nnx.state(model)), *prompts, jax.random.key(0), SamplingConfig(NEW, temperature=0.0))
    tokens, response_mask = greedy_cut_at(greedy, [stop], pad)
    np.testing.assert_array_equal(result.tokens, tokens)
    np.testing.assert_array_equal(result.response_mask, response_mask)
    assert response_mask[0].tolist() == [1, 1, 0, 0, 0]


def chat_tokenizer(end_of_turn_id):
    """A word-level tokenizer whose chat template ends each turn with the special token <|eot|> = `end_of_turn_id`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<|eot|>": end_of_turn_id, "user": 4, "assistant": 5}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}<|eot|> {% endfor %}"
    return tokenizer


def test_generation_stops_at_the_chat_end_of_turn_token(model, prompts, greedy):
    """With the tokenizer, or with the end-of-turn id among explicit stop ids; the config's eos stays a stop id."""
    end_of_turn = int(greedy.tokens[1, 2])
    assert end_of_turn > 5 and end_of_turn not in np.asarray(greedy.tokens[1, :2])
    tokens, response_mask = greedy_cut_at(greedy, [2, end_of_turn], model.config.pad_token_id)
    with_tokenizer = generate(
        model, *prompts, jax.random.key(0), SamplingConfig(NEW, temperature=0.0), tokenizer=chat_tokenizer(end_of_turn)
    )
    explicit = generate(
        model, *prompts, jax.random.key(0), SamplingConfig(NEW, temperature=0.0, stop_token_ids=(2, end_of_turn))
    )
    for result in (with_tokenizer, explicit):
        np.testing.assert_array_equal(result.tokens, tokens)
        np.testing.assert_array_equal(result.response_mask, response_mask)
    assert response_mask[1].tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("prompts", [[5, 6, 7], [[5, 6], []], []])
def test_lists_must_hold_non_empty_rows_of_ids(model, prompts):
    with pytest.raises(ValueError, match="non-empty lists of token ids"):
        generate(model, prompts, rng_key=jax.random.key(0), config=SamplingConfig(max_new_tokens=2))


draw_top_p = jax.jit(_draw_top_p, static_argnums=3)


def assert_draws_follow_the_full_sort(row, top_p, candidates, draws=400):
    """Tokens drawn from `row` lie in the full-sort nucleus, with the full-sort nucleus's log-probabilities."""
    tokens, logprobs = draw_top_p(
        jnp.broadcast_to(jnp.asarray(row), (draws, row.size)), jax.random.key(3), jnp.float32(top_p), candidates
    )
    want = reference_adjusted_logprobs(row.astype(np.float64), 1.0, 0, top_p)
    tokens = np.asarray(tokens)
    assert np.isfinite(want[tokens]).all(), "drew a token outside the nucleus"
    np.testing.assert_allclose(logprobs, want[tokens], rtol=1e-5, atol=1e-6)
    return tokens


@pytest.mark.parametrize("candidates", [1, 3, 8, 64])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_among_candidates_equals_the_full_sort(candidates, top_p):
    """Peaked rows (nucleus inside few candidates) and flat rows (nucleus beyond them: the full-sort fallback).

    The sampler log-probability is normalised over the kept set, so it matches only if the kept set does.
    """
    rng = np.random.default_rng(int(top_p * 1000) + candidates)
    for spread in (8.0, 3.0, 0.3, 0.01):
        assert_draws_follow_the_full_sort((rng.standard_normal(40) * spread).astype(np.float32), top_p, candidates)


def test_top_p_falls_back_to_the_full_sort_when_the_nucleus_exceeds_the_candidates():
    flat = np.linspace(0.1, 0.0, 30).astype(np.float32)
    tokens = assert_draws_follow_the_full_sort(flat, 0.6, 4)
    assert tokens.max() >= 4, "every draw came from the 4 candidates although the nucleus holds ~18 tokens"


def test_changing_temperature_or_top_p_does_not_recompile(model, prompts):
    sample = lambda temperature, top_p: generate(
        model, *prompts, jax.random.key(2), SamplingConfig(NEW, temperature=temperature, top_p=top_p)
    )
    first = sample(1.3, 0.9)
    compiled = _generate_bucket._cache_size()
    others = [sample(0.4, 0.9), sample(1.3, 0.3), sample(2.0, 0.75)]
    assert _generate_bucket._cache_size() == compiled
    for other in others:
        assert not np.array_equal(other.sampler_logprobs, first.sampler_logprobs), "a changed value was not used"


def test_the_two_level_draw_follows_the_distribution_across_blocks():
    """Candidates over three blocks (the last one partial), a hundred of them removed (-inf): never drawn; the
    draws' frequencies (per block and for the likeliest tokens) and log-probabilities follow softmax(values)."""
    rng = np.random.default_rng(5)
    count, draws = 2 * DRAW_BLOCK + 37, 20_000
    values = (rng.standard_normal(count) * 2.5).astype(np.float32)
    values[rng.choice(count, 100, replace=False)] = -np.inf
    ids = np.arange(count, dtype=np.int32) + 1000
    tokens, logprobs = jax.jit(_draw)(
        jnp.broadcast_to(jnp.asarray(values), (draws, count)),
        jnp.broadcast_to(jnp.asarray(ids), (draws, count)),
        jax.random.key(9),
    )
    index = np.asarray(tokens) - 1000
    expected = np.exp(log_softmax(values.astype(np.float64)))
    assert np.isfinite(values[index]).all(), "drew a removed candidate"
    np.testing.assert_allclose(logprobs, np.log(expected[index]), rtol=1e-5, atol=1e-6)
    likeliest = np.argsort(-expected)[:6]
    groups = [
        np.isin(np.arange(count), likeliest, invert=True) & (np.arange(count) // DRAW_BLOCK == b) for b in range(3)
    ]
    groups += [np.arange(count) == token for token in likeliest]
    observed = np.array([np.isin(index, np.flatnonzero(group)).sum() for group in groups])
    want = np.array([expected[group].sum() for group in groups]) * draws
    chi_square = (((observed - want) ** 2) / want).sum()
    assert chi_square < 30.0, f"chi-square {chi_square:.1f} over 8 degrees of freedom; observed {observed}, want {want}"


def _weight_casts_in_loops(jaxpr, weight_shapes, in_loop=False) -> int:
    """Casts of an fp32 array shaped like a decoder weight (stacked or one layer's) to bf16 inside a while loop's body
    (or anywhere, with ``in_loop``), counted through every nested jaxpr (scans, inner jits, custom derivatives)."""
    count = 0
    for eqn in jaxpr.eqns:
        operand = eqn.invars[0].aval if eqn.invars else None
        if (
            in_loop
            and eqn.primitive.name == "convert_element_type"
            and operand.dtype == jnp.float32
            and eqn.params["new_dtype"] == jnp.bfloat16
            and operand.shape in weight_shapes
        ):
            count += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _weight_casts_in_loops(inner, weight_shapes, in_loop or eqn.primitive.name == "while")
    return count


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_decode_steps_read_weights_cast_to_the_compute_dtype_once(layer_loop):
    """fp32 parameters, bf16 compute: no decode step casts a decoder weight; the weights are cast once before the decode
    loop, in the layer scan (``_cast_layers``) as in the unrolled loop (weights split per layer once). The sampled
    tokens are those of the fp32 parameters, cast."""
    from mojax.models.generate import _compiled_part

    config = ModelConfig.tiny(num_hidden_layers=2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    graphdef, state = nnx.split(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    kernels = [leaf for leaf in jax.tree.leaves(state["model"]["layers"]) if leaf.ndim >= 3]  # not the norm scales
    weight_shapes = {leaf.shape for leaf in kernels} | {leaf.shape[1:] for leaf in kernels}
    ids, mask = jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32)
    sampling = SamplingConfig(
        max_new_tokens=3, temperature=0.0, pad_token_id=0, stop_token_ids=(), layer_loop=layer_loop
    )
    args = (graphdef, state, ids, mask, jax.random.key(0), (jnp.float32(0.0), jnp.float32(1.0)))
    traced = _generate_bucket.trace(*args, _compiled_part(sampling), 1)
    assert _weight_casts_in_loops(traced.jaxpr.jaxpr, weight_shapes) == 0
    assert _weight_casts_in_loops(traced.jaxpr.jaxpr, weight_shapes, in_loop=True) > 0  # the cast before the loop
    cast = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state)
    np.testing.assert_array_equal(
        _generate_bucket(*args, _compiled_part(sampling), 1)[0],
        _generate_bucket(graphdef, cast, *args[2:], _compiled_part(sampling), 1)[0],
    )
