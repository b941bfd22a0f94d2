"""mojax LLaMA: cache consistency, padding invariance, dtypes, logical axes, eval_shape (torch-free).

HF numerical parity lives in test_hf.py (needs torch).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_log import compilations
from flax import nnx
from hf_fixtures import random_llama

from mojax._numerics import COLUMNS_MAX_ROWS, columns_matmul, head_matmul, rows_contraction, token_matmul
from mojax.models import LOGICAL_AXES, LlamaForCausalLM, ModelConfig
from mojax.models.llama import (
    INPUT_DIMS,
    PARAM_AXIS_NAMES,
    LoraCall,
    OutputMajor,
    Projection,
    SharedPrefix,
    apply_rope,
    attention,
    causal_attention,
    causal_mask,
    check_attention_kernel,
    fused_causal_attention,
    output_major,
    project,
    rope_inv_freq,
)


@pytest.fixture(scope="module")
def model():
    return random_llama(ModelConfig.tiny(), seed=0)


@pytest.fixture(scope="module")
def fwd():
    return nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask)[0])


@pytest.fixture(scope="module")
def step():
    return nnx.jit(lambda m, ids, mask, cache: m(ids, attention_mask=mask, cache=cache))


def _ids(B, T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 256, (B, T)), jnp.int32)


def test_forward_shapes(model):
    ids = _ids(2, 5)
    out = nnx.eval_shape(lambda m: (m(ids), m.hidden_states(ids)), model)
    (logits, cache), (h, _) = out
    assert logits.shape == (2, 5, 256) and logits.dtype == jnp.float32 and cache is None
    assert h.shape == (2, 5, 64) and h.dtype == jnp.float32


def test_left_padding_does_not_change_real_tokens(model, fwd):
    ids = _ids(2, 8, seed=1)
    # row 1: 3 left pads with arbitrary ids; its real tokens are ids[1, 3:]
    mask = jnp.asarray([[1] * 8, [0] * 3 + [1] * 5], jnp.int32)
    out = fwd(model, ids, mask)
    alt = ids.at[1, :3].set(jnp.asarray([7, 99, 200]))
    out_alt = fwd(model, alt, mask)
    np.testing.assert_allclose(out[1, 3:], out_alt[1, 3:], atol=1e-6)
    # unpadded reference for row 1: the same tokens moved to the front (right padding), whose
    # default positions are the same 0..4
    right = jnp.concatenate([ids[1:, 3:], ids[1:, :3]], axis=1)
    ref = fwd(model, jnp.concatenate([ids[:1], right]), jnp.asarray([[1] * 8, [1] * 5 + [0] * 3]))
    np.testing.assert_allclose(out[1, 3:], ref[1, :5], atol=2e-5)
    np.testing.assert_allclose(out[0], ref[0], atol=1e-6)
    assert np.isfinite(np.asarray(out)).all()
    # the LM head applied to hidden_states gives the logits
    h, _ = nnx.jit(lambda m, ids, mask: m.hidden_states(ids, attention_mask=mask))(model, ids, mask)
    np.testing.assert_allclose(model.logits(h), out, atol=1e-5)


def test_cache_prefill_then_decode_matches_full_forward(model, fwd, step):
    B, P, G = 2, 6, 2
    ids = _ids(B, P + G, seed=2)
    mask = jnp.asarray([[1] * (P + G), [0] * 2 + [1] * (P + G - 2)], jnp.int32)
    full = fwd(model, ids, mask)
    cache = model.init_cache(B, P + G + 2)
    assert cache.keys.shape == (2, B, 2, P + G + 2, 16) and cache.valid.dtype == jnp.bool_
    logits, cache = step(model, ids[:, :P], mask[:, :P], cache)
    outs = [logits]
    for t in range(P, P + G):
        logits, cache = step(model, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        outs.append(logits)
    inc = jnp.concatenate(outs, axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(inc)[real], np.asarray(full)[real], atol=2e-5)
    assert int(cache.index) == P + G
    np.testing.assert_array_equal(cache.lengths, [P + G, P + G - 2])
    np.testing.assert_array_equal(cache.valid[:, P + G :], False)


@pytest.mark.parametrize("columns", [True, False])
def test_per_layer_weights_give_the_scans_logits_and_cache(model, step, columns):
    """decode_layers (unrolled over weights and cache arrays split per layer, with kernels output-major or not)
    equals the layer scan on the stacked cache, chunk after chunk, whichever kind of cache each call is handed."""
    ids = _ids(2, 7, seed=4)
    mask = jnp.asarray([[1] * 7, [0] * 3 + [1] * 4], jnp.int32)
    layer_weights = lambda m: m.per_layer_weights(columns=columns)  # noqa: E731
    unrolled = nnx.jit(lambda m, i, mk, c: m(i, attention_mask=mk, cache=c, layer_weights=layer_weights(m)))
    assert isinstance(layer_weights(model)[0].o_proj.kernel, OutputMajor) == columns
    scan_cache = unrolled_cache = model.init_cache(2, 9)
    for chunk in (slice(0, 5), slice(5, 6), slice(6, 7)):
        want, scan_cache = step(model, ids[:, chunk], mask[:, chunk], scan_cache)
        got, unrolled_cache = unrolled(model, ids[:, chunk], mask[:, chunk], unrolled_cache)
        np.testing.assert_allclose(got, want, atol=2e-5)
        assert unrolled_cache.is_per_layer and not scan_cache.is_per_layer
        assert len(unrolled_cache.keys) == model.config.num_hidden_layers
    unrolled_cache = unrolled_cache.stacked()
    for field in ("keys", "values", "valid", "index"):
        np.testing.assert_allclose(getattr(unrolled_cache, field), getattr(scan_cache, field), atol=2e-6)
    # the scan takes a per-layer cache too (it stacks it) and continues from it
    more = _ids(2, 1, seed=5)
    ones = jnp.ones((2, 1), jnp.int32)
    from_split, split_after = step(model, more, ones, scan_cache.per_layer())
    from_stacked, stacked_after = step(model, more, ones, scan_cache)
    np.testing.assert_array_equal(from_split, from_stacked)
    np.testing.assert_array_equal(split_after.keys, stacked_after.keys)
    assert len(model.per_layer_weights()) == model.config.num_hidden_layers
    with pytest.raises(ValueError, match="need a KV cache and 2 layers; got 2 layers and no cache"):
        model(ids, layer_weights=model.per_layer_weights())
    with pytest.raises(ValueError, match="got 1 layers and a cache"):
        model(ids, cache=model.init_cache(2, 9), layer_weights=model.per_layer_weights()[:1])


def test_cache_explicit_positions(model, step):
    """Chunks written at the cache index with caller positions equal one forward with the same positions."""
    ids = _ids(2, 8, seed=3)
    ones = jnp.ones((2, 8), jnp.int32)
    pos = jnp.arange(8)[None].repeat(2, 0) + 5
    full, _ = nnx.jit(lambda m, i, p: m(i, positions=p))(model, ids, pos)
    run = nnx.jit(lambda m, i, mk, p, c: m(i, attention_mask=mk, positions=p, cache=c))
    cache = model.init_cache(2, 9)
    a, cache = run(model, ids[:, :6], ones[:, :6], pos[:, :6], cache)
    b, cache = run(model, ids[:, 6:], ones[:, 6:], pos[:, 6:], cache)
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, atol=2e-5)


@pytest.mark.parametrize("kv_heads,tie", [(4, False), (1, True)])
def test_mha_mqa_tied_structure(kv_heads, tie):
    cfg = ModelConfig.tiny(num_key_value_heads=kv_heads, tie_word_embeddings=tie)
    m = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(m, nnx.Param)
    assert ("lm_head" in state) != tie
    assert m.model.layers.self_attn.k_proj.kernel.shape == (2, 64, kv_heads, 16)
    logits, _ = nnx.eval_shape(lambda m: m(jnp.ones((1, 3), jnp.int32)), m)
    assert logits.shape == (1, 3, 256)
    # numerical parity of MHA / MQA / tied heads against transformers is in test_hf.py


def test_gqa_equals_repeated_kv_mha():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 5, 8)), jnp.float32)  # [B, KV, S, hd], the cache's layout
    v = jnp.asarray(rng.standard_normal((2, 2, 5, 8)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 3, 5)) > 0.3)
    out = attention(q, k, v, mask)
    ref = attention(q, jnp.repeat(k, 2, axis=1), jnp.repeat(v, 2, axis=1), mask)  # HF repeat_kv
    np.testing.assert_allclose(out, ref, atol=1e-6)
    time_major = lambda a: jnp.swapaxes(jnp.repeat(a, 2, axis=1), 1, 2)  # noqa: E731
    dense = jax.nn.dot_product_attention(q, time_major(k), time_major(v), mask=mask[:, None])
    np.testing.assert_allclose(out, dense, atol=1e-5)


def _compiled_text(fn, *args) -> str:
    """The text of ``fn``'s compiled program for ``args``."""
    return jax.jit(fn).lower(*args).compile().as_text()


def _layout_moves(fn, *args) -> list[str]:
    """The copies and transposes of the compiled program's entry computation (fusion bodies excluded)."""
    program = _compiled_text(fn, *args)
    entry = program[program.index("\nENTRY") :].splitlines()
    return [line for line in entry if re.search(r"%[\w.\-]*(copy|transpose)[\w.\-]* = ", line)]


def test_projection_weight_gradient_reads_the_tokens_in_place():
    """x^T dy over [B, T] tokens is one contraction of token rows: no transposed copy of x or dy (two contracted
    token axes made XLA:CPU copy one out for every weight gradient)."""
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    cotangent = jax.random.normal(jax.random.key(1), (4, 8, 2, 16))  # q_proj-like output [B, T, H, hd]

    def weight_gradient(kernel, x, cotangent):
        return jax.grad(lambda k: jnp.sum(project(x, Projection(k), 1, LoraCall(), 0) * cotangent))(kernel)

    kernel = jax.random.normal(jax.random.key(2), (16, 2, 16))
    assert not _layout_moves(weight_gradient, kernel, x, cotangent)
    want = np.einsum("btd,bthe->dhe", np.asarray(x, np.float64), np.asarray(cotangent, np.float64))
    np.testing.assert_allclose(weight_gradient(kernel, x, cotangent), want, rtol=1e-5, atol=1e-5)


def test_attention_moves_only_the_queries_between_layouts():
    """Attention's forward and backward lay out q (into [B, KV, G T, hd] rows) and its output and cotangent, never
    the scores or probabilities: every copy in the compiled program has q's size, not the scores' B KV G T S."""
    B, T, H, KV, hd = 2, 8, 6, 2, 16
    q = jax.random.normal(jax.random.key(0), (B, T, H, hd))
    k, v = jax.random.normal(jax.random.key(1), (2, B, KV, T, hd))
    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
    gradients = jax.grad(lambda q, k, v, mask: jnp.sum(attention(q, k, v, mask) ** 2), argnums=(0, 1, 2))
    moves = _layout_moves(gradients, q, k, v, mask)
    sizes = {int(np.prod([int(n) for n in re.search(r"f32\[([\d,]+)\]", line).group(1).split(",")])) for line in moves}
    assert moves and sizes == {B * T * H * hd}, moves


def _attention_case(T: int, B: int = 2, H: int = 6, KV: int = 2, hd: int = 16):
    """Random q [B, T, H, hd], k, v [B, KV, T, hd] and the causal mask of a batch whose second row has 5 left pads."""
    q = jax.random.normal(jax.random.key(0), (B, T, H, hd))
    k, v = jax.random.normal(jax.random.key(1), (2, B, KV, T, hd))
    valid = jnp.ones((B, T), bool).at[1, :5].set(False)
    return q, k, v, causal_mask(valid, jnp.arange(T, dtype=jnp.int32))


@pytest.mark.parametrize("T", [64, 70, 20], ids=["4 blocks", "uneven blocks", "one block"])
def test_causal_attention_gives_attentions_outputs_and_gradients(T):
    """Every query row with an allowed key gets attention's output, and the gradients through those rows are
    attention's (rows with none, left pads here, get a finite output of their own)."""
    q, k, v, mask = _attention_case(T)
    attended = mask.any(-1)[..., None, None]  # [B, T, 1, 1]
    cotangent = jax.random.normal(jax.random.key(2), q.shape) * attended

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask) * cotangent)

    blocked, whole = jax.jit(causal_attention)(q, k, v, mask), jax.jit(attention)(q, k, v, mask)
    assert np.isfinite(np.asarray(blocked)).all()
    np.testing.assert_allclose(blocked * attended, whole * attended, rtol=1e-5, atol=1e-6)
    grads, want_grads = (
        jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v) for fn in (causal_attention, attention)
    )
    for mine, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(mine, want, rtol=1e-5, atol=1e-5)


def test_attention_to_a_shared_prefix_equals_the_prefix_copied_into_every_row():
    """P = 2 prefixes of W = 7 slots (one with 3 invalid slots), each shared by 3 rows with 4 own slots and T = 2
    queries: the same output as attention over every row's copy of its prefix followed by its own slots."""
    P, rows, H, KV, hd, W, S, T = 2, 3, 6, 2, 16, 7, 4, 2
    B = P * rows
    q = jax.random.normal(jax.random.key(0), (B, T, H, hd))
    k, v = jax.random.normal(jax.random.key(1), (2, B, KV, S, hd))
    prefix_k, prefix_v = jax.random.normal(jax.random.key(2), (2, P, KV, W, hd))
    prefix_valid = jnp.ones((P, W), bool).at[1, :3].set(False)
    own_valid = jnp.ones((B, S), bool).at[:, 3:].set(False).at[4, 1:].set(False)
    mask = causal_mask(own_valid, jnp.asarray([1, 2], jnp.int32))
    copied = lambda a: jnp.repeat(a, rows, axis=0)  # noqa: E731
    shared = jax.jit(attention)(q, k, v, mask, (prefix_k, prefix_v, copied(prefix_valid)))
    full_mask = jnp.concatenate([jnp.broadcast_to(copied(prefix_valid)[:, None], (B, T, W)), mask], axis=-1)
    want = jax.jit(attention)(
        q, jnp.concatenate([copied(prefix_k), k], 2), jnp.concatenate([copied(prefix_v), v], 2), full_mask
    )
    np.testing.assert_allclose(shared, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(shared, jax.jit(attention)(q, k, v, mask), atol=1e-2)  # the prefix is read


def test_a_decode_on_a_shared_prefix_cache_equals_one_on_a_copied_cache(model, step):
    """Two prompts prefilled once, each prefix shared by 3 rows that decode different tokens: the layer scan and the
    per-layer decode on the shared cache (each row's own slots: 2) give the logits, lengths and new keys of the scan
    on a cache holding a copy of the prompt in every row."""
    rows, W, new = 3, 5, 2
    prompt_mask = jnp.asarray([[1] * W, [0] * 2 + [1] * (W - 2)], jnp.int32)
    _, prefill = step(model, _ids(2, W, seed=6), prompt_mask, model.init_cache(2, W))
    shared = model.init_cache(2 * rows, new).replace(prefix=SharedPrefix(prefill.keys, prefill.values, prefill.valid))
    copied = model.init_cache(2 * rows, W + new)
    copied = copied.replace(
        keys=copied.keys.at[:, :, :, :W].set(jnp.repeat(prefill.keys, rows, axis=1)),
        values=copied.values.at[:, :, :, :W].set(jnp.repeat(prefill.values, rows, axis=1)),
        valid=copied.valid.at[:, :W].set(jnp.repeat(prefill.valid, rows, axis=0)),
        index=jnp.int32(W),
    )
    np.testing.assert_array_equal(shared.lengths, copied.lengths)
    unrolled = nnx.jit(lambda m, i, mk, c: m(i, attention_mask=mk, cache=c, layer_weights=m.per_layer_weights()))
    per_layer = shared.per_layer()
    assert per_layer.prefix.keys[0].shape == (2, 2, W, 16) and per_layer.keys[0].shape == (6, 2, new, 16)
    ones = jnp.ones((2 * rows, 1), jnp.int32)
    for t in range(new):
        token = _ids(2 * rows, 1, seed=10 + t)
        want, copied = step(model, token, ones, copied)
        scanned, shared = step(model, token, ones, shared)
        got, per_layer = unrolled(model, token, ones, per_layer)
        np.testing.assert_allclose(scanned, want, atol=2e-5)
        np.testing.assert_allclose(got, want, atol=2e-5)
    for cache in (shared, per_layer.stacked()):
        np.testing.assert_array_equal(cache.lengths, copied.lengths)
        np.testing.assert_allclose(cache.keys, copied.keys[:, :, :, W:], atol=2e-6)
        assert cache.prefix.keys.shape == (2, 2, 2, W, 16)
    with pytest.raises(ValueError, match="cannot share 2 prefixes"):
        model(_ids(3, 1), cache=model.init_cache(3, new).replace(prefix=shared.prefix))


def test_causal_attention_contracts_each_query_block_with_its_past_keys_only():
    """4 blocks of 16 queries (G = 3 heads each: 48 rows) against 16, 32, 48 and 64 keys: no dot spans all 64 queries."""
    q, k, v, mask = _attention_case(64)
    shapes = set(_dot_shapes(lambda q, k, v: causal_attention(q, k, v, mask), q, k, v))
    assert shapes == {(2, 2, 48, keys) for keys in (16, 32, 48, 64)}  # scores; the outputs are [2, 2, 48, hd = 16]
    assert (2, 2, 192, 64) in set(_dot_shapes(lambda q, k, v: attention(q, k, v, mask), q, k, v))


def _padded_rows(B: int, T: int) -> jax.Array:
    """bool[B, T] with left padding, right padding, both, none and a single real token across the rows."""
    spans = [(5, T), (0, T - 7), (3, T - 4), (0, T), (T - 1, T)]
    return jnp.asarray([[start <= t < stop for t in range(T)] for start, stop in spans[:B]])


def test_fused_attention_equals_blocked_attention_on_left_and_right_padded_rows():
    """``jax.nn.dot_product_attention`` (XLA's implementation, whose arguments the cuDNN kernel shares) on rows rotated
    to right padding: causal_attention's output on every real query and its gradients (cotangents on real queries only,
    as a loss masked to real tokens gives); pad queries stay finite."""
    B, T, H, KV, hd = 5, 40, 6, 2, 16
    q = jax.random.normal(jax.random.key(0), (B, T, H, hd))
    k, v = jax.random.normal(jax.random.key(1), (2, B, KV, T, hd))
    valid = _padded_rows(B, T)
    mask = causal_mask(valid, jnp.arange(T, dtype=jnp.int32))
    real = valid[..., None, None]
    cotangent = jax.random.normal(jax.random.key(2), q.shape) * real
    fused = lambda q, k, v, mask: fused_causal_attention(q, k, v, mask[:, -1], "xla")  # noqa: E731

    got, want = jax.jit(fused)(q, k, v, mask), jax.jit(causal_attention)(q, k, v, mask)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got * real, want * real, rtol=1e-5, atol=1e-6)
    grads, want_grads = (
        jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, mask) * cotangent), argnums=(0, 1, 2)))(q, k, v)
        for fn in (fused, causal_attention)
    )
    for mine, expected in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-5)


def test_fused_attention_poisons_a_row_whose_real_tokens_have_a_gap():
    """A gap inside a row's real tokens cannot be expressed by rotation and lengths: that row comes out NaN, the others
    as before."""
    B, T, H, KV, hd = 2, 16, 2, 1, 8
    q = jax.random.normal(jax.random.key(0), (B, T, H, hd))
    k, v = jax.random.normal(jax.random.key(1), (2, B, KV, T, hd))
    valid = jnp.ones((B, T), bool).at[1, 6:9].set(False)
    out = np.asarray(jax.jit(fused_causal_attention, static_argnums=4)(q, k, v, valid, "xla"))
    assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()


def test_a_model_with_fused_attention_gives_the_logits_and_gradients_of_the_default(model):
    """``set_attributes(attention_kernel="xla")`` on the whole causal LM: the default kernel's logits on real tokens
    and its parameter gradients for a loss on them, with left- and right-padded rows."""
    ids = _ids(5, 24, seed=4)
    mask = _padded_rows(5, 24).astype(jnp.int32)

    def loss(m):
        logits = m(ids, attention_mask=mask)[0]
        return jnp.sum(jnp.tanh(logits) * mask[..., None]), logits

    (_, want_logits), want = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    fused = nnx.clone(model)
    fused.set_attributes(attention_kernel="xla")
    assert fused.model.attention_kernel == "xla" and model.model.attention_kernel == "mojax"
    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(fused)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(want_logits)[real], atol=2e-5)
    for mine, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(mine, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


def test_input_embeddings_stand_in_for_the_lookup_and_their_cotangent_is_the_lookups_gradient(model):
    """hidden_states with the table's rows at the ids as ``input_embeddings`` equals the lookup; the table's gradient
    through the lookup is the scatter of their cotangent; a wrong shape is refused before tracing."""
    ids = _ids(2, 5)
    table = model.model.embed_tokens.embedding[...]
    rows = jnp.take(table, ids, axis=0)
    np.testing.assert_array_equal(model.hidden_states(ids, input_embeddings=rows)[0], model.hidden_states(ids)[0])

    def loss(rows):
        return jnp.sum(jnp.sin(model.hidden_states(ids, input_embeddings=rows)[0]))

    cotangent = jax.grad(loss)(rows)
    scattered = jnp.zeros_like(table).at[ids.reshape(-1)].add(cotangent.reshape(-1, table.shape[1]))
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m.hidden_states(ids)[0])))(model)
    np.testing.assert_allclose(scattered, grads.model.embed_tokens.embedding[...], atol=1e-6)
    with pytest.raises(ValueError, match=r"input_embeddings shape \(2, 5, 3\) != \(batch, time, hidden_size\)"):
        model.hidden_states(ids, input_embeddings=rows[..., :3])


def test_attention_kernels_are_checked_before_tracing(model):
    """An unknown kernel, and cuDNN's where it cannot run (this CPU process, float32 compute, odd head dims), are
    refused with what was wrong and what would do."""
    with pytest.raises(ValueError, match=r"attention_kernel is 'flash'; expected one of \('mojax', 'xla', 'cudnn'\)"):
        check_attention_kernel("flash", model.config)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="runs on NVIDIA GPUs only.*computes in float32.*Use 'mojax' or 'xla'"):
            check_attention_kernel("cudnn", model.config)
    with pytest.raises(ValueError, match="head dimension that is a multiple of 8 up to 256, and the model's is 12"):
        check_attention_kernel("cudnn", model.config.replace(head_dim=12, dtype=jnp.bfloat16))
    check_attention_kernel("xla", model.config)
    broken = nnx.clone(model)
    broken.set_attributes(attention_kernel="flash")
    with pytest.raises(ValueError, match="attention_kernel is 'flash'"):
        broken(_ids(1, 4))


def test_a_long_forward_without_cache_equals_the_cache_prefill(model, fwd, step):
    """At 64 tokens the layers run blocked causal attention without a cache; prefilling a cache runs attention whole."""
    ids = _ids(2, 64, seed=3)
    mask = jnp.ones((2, 64), jnp.int32).at[1, :5].set(0)
    prefill, _ = step(model, ids, mask, model.init_cache(2, 64))
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(fwd(model, ids, mask))[real], np.asarray(prefill)[real], atol=2e-5)


def _dot_shapes(fn, *args) -> list[tuple[int, ...]]:
    """The result shapes of the dots in the compiled program of ``fn``."""
    dots = re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} dot\(", _compiled_text(fn, *args))
    return [tuple(int(n) for n in shape.split(",")) for shape in dots]


def test_columns_matmul_keeps_the_weights_as_the_left_operand():
    """rows @ kernel_t^T computed as kernel_t @ rows^T: the compiled dot yields [out, rows] (XLA folds the plain
    transposes of (kernel_t @ rows.T).T back into a dot yielding [rows, out], with the weights on the right)."""
    rng = np.random.default_rng(0)
    rows, kernel_t = rng.standard_normal((4, 32), np.float32), rng.standard_normal((96, 32), np.float32)
    assert _dot_shapes(columns_matmul, rows, kernel_t) == [(96, 4)]
    assert _dot_shapes(lambda r, k: (k @ r.T).T, rows, kernel_t) == [(4, 96)]  # what the barriers prevent
    want = np.asarray(rows, np.float64) @ np.asarray(kernel_t, np.float64).T
    np.testing.assert_allclose(columns_matmul(rows, kernel_t), want, rtol=1e-5, atol=1e-5)
    half = columns_matmul(jnp.asarray(rows, jnp.bfloat16), jnp.asarray(kernel_t, jnp.bfloat16), jnp.float32)
    assert half.dtype == jnp.float32 and half.shape == (4, 96)
    np.testing.assert_allclose(half, want, rtol=0.05, atol=0.3)


def _dot_contracting_dims(fn, *args) -> list[tuple[str, str]]:
    """(lhs, rhs) contracting dimensions of each dot in the compiled program of ``fn``."""
    return re.findall(
        r"lhs_contracting_dims=\{([\d,]*)\}, rhs_contracting_dims=\{([\d,]*)\}", _compiled_text(fn, *args)
    )


def test_rows_contraction_multiplies_plain_operands_on_the_cpu():
    """a^T b over the rows compiles to a dot of a's written-out transpose and b (contracting a^T's columns and b's
    rows); the plain einsum contracts both operands' leading axes (an Eigen dot with a transposed operand on XLA:CPU),
    which the barrier prevents XLA from folding back to."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((24, 8), np.float32), rng.standard_normal((24, 40), np.float32)
    assert _dot_contracting_dims(rows_contraction, a, b) == [("1", "0")]
    assert _dot_contracting_dims(lambda a, b: jnp.einsum("nk,nm->km", a, b), a, b) == [("0", "0")]
    want = np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
    np.testing.assert_allclose(rows_contraction(a, b), want, rtol=1e-5, atol=1e-5)
    half = rows_contraction(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16), jnp.float32)
    assert half.dtype == jnp.float32 and half.shape == (8, 40)
    np.testing.assert_allclose(half, want, rtol=0.05, atol=0.3)


def _head_matmul_case(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(2), 4)
    x, kernel = jax.random.normal(keys[0], (2, 3, 8), dtype), jax.random.normal(keys[1], (8, 40), dtype)
    tangents = jax.random.normal(keys[2], x.shape, dtype), jax.random.normal(keys[3], kernel.shape, dtype)
    return x, kernel, tangents


MATMULS = (token_matmul, head_matmul)


def test_head_matmul_is_token_matmul_with_the_same_derivatives():
    """Outputs, reverse-mode gradients (bf16 inputs keep their dtypes) and forward-mode tangents of token_matmul."""
    x, kernel, tangents = _head_matmul_case()
    probe = jax.random.normal(jax.random.key(5), (2, 3, 40))
    np.testing.assert_allclose(head_matmul(x, kernel), token_matmul(x, kernel), rtol=1e-6, atol=1e-6)
    grads = [jax.grad(lambda x, w, f=f: jnp.sum(probe * f(x, w)), argnums=(0, 1))(x, kernel) for f in MATMULS]
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jvps = [jax.jvp(f, (x, kernel), tangents)[1] for f in MATMULS]
    np.testing.assert_allclose(jvps[0], jvps[1], rtol=1e-5, atol=1e-5)
    frozen = [jax.grad(lambda x, f=f: jnp.sum(probe * f(x, kernel)))(x) for f in MATMULS]
    np.testing.assert_allclose(frozen[0], frozen[1], rtol=1e-5, atol=1e-5)
    half_x, half_kernel, _ = _head_matmul_case(jnp.bfloat16)
    half = jax.grad(lambda x, w: jnp.sum(probe * head_matmul(x, w)), argnums=(0, 1))(half_x, half_kernel)
    assert [g.dtype for g in half] == [jnp.bfloat16, jnp.bfloat16]


def test_head_matmul_contracts_plain_operands_and_skips_a_frozen_kernel():
    """Its weight gradient runs on x's written-out transpose (token_matmul's as a dot contracting both operands' token
    axis); with the kernel not differentiated, the backward pass holds one dot (the input gradient) besides the
    forward's."""
    x, kernel, _ = _head_matmul_case()

    def gradient(f, argnums):
        return jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=argnums)

    assert ("0", "0") in _dot_contracting_dims(gradient(token_matmul, (0, 1)), x, kernel)
    assert ("0", "0") not in _dot_contracting_dims(gradient(head_matmul, (0, 1)), x, kernel)
    assert len(_dot_contracting_dims(gradient(head_matmul, 0), x, kernel)) == 2


@pytest.mark.parametrize("name", ["q_proj", "o_proj"])
def test_an_output_major_kernel_projects_as_the_kernel(name):
    """project() with the kernel transposed [*out, *in] (OutputMajor) gives the [*in, *out] kernel's outputs and
    gradients, adapters included; q_proj contracts one axis (D), o_proj two (H, hd)."""
    input_dims = INPUT_DIMS[name]
    x_shape, kernel_shape = ((2, 3, 16), (16, 2, 8)) if input_dims == 1 else ((2, 3, 2, 8), (2, 8, 16))
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], x_shape)
    kernel = jax.random.normal(keys[1], kernel_shape)
    lora_a = jax.random.normal(keys[2], (*kernel_shape[:input_dims], 3))
    lora_b = jax.random.normal(keys[3], (3, *kernel_shape[input_dims:]))
    transposed = output_major(kernel, input_dims)
    assert transposed.array.shape == (*kernel_shape[input_dims:], *kernel_shape[:input_dims])

    def outputs(kernel, x):
        return project(x, Projection(kernel, lora_a=lora_a, lora_b=lora_b), input_dims, LoraCall(scaling=0.5), 0)

    np.testing.assert_allclose(outputs(transposed, x), outputs(kernel, x), rtol=1e-5, atol=1e-5)
    x_gradient = lambda k: jax.grad(lambda x: jnp.sum(jnp.sin(outputs(k, x))))(x)  # noqa: E731
    np.testing.assert_allclose(x_gradient(transposed), x_gradient(kernel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [4, COLUMNS_MAX_ROWS, COLUMNS_MAX_ROWS + 16])
def test_the_tied_head_gives_the_same_logits_and_gradients_either_side_of_the_columns_threshold(rows):
    """The tied LM head multiplies the columns of few token rows (on the CPU backend, these tests') and the rows of
    many; both are hidden @ E^T."""
    model = random_llama(ModelConfig.tiny(tie_word_embeddings=True), seed=1)
    hidden = jax.random.normal(jax.random.key(rows), (rows, 1, model.config.hidden_size))
    vocab = model.config.vocab_size
    assert _dot_shapes(model.logits, hidden) == [(vocab, rows) if rows <= COLUMNS_MAX_ROWS else (rows, vocab)]
    embedding = np.asarray(model.model.embed_tokens.embedding[...], np.float64)
    want = np.asarray(hidden, np.float64) @ embedding.T
    np.testing.assert_allclose(model.logits(hidden), want, rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(jax.random.key(1), want.shape)
    gradient = jax.grad(lambda h: jnp.sum(model.logits(h) * weights))(hidden)
    np.testing.assert_allclose(gradient, np.asarray(weights, np.float64) @ embedding, rtol=1e-5, atol=1e-5)


def test_rope_is_relative():
    inv = rope_inv_freq(ModelConfig.tiny())
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

    def dot(pq, pk):
        from mojax.models.llama import rope_cos_sin

        cq, sq = rope_cos_sin(jnp.asarray([[pq]]), inv, jnp.float32)
        ck, sk = rope_cos_sin(jnp.asarray([[pk]]), inv, jnp.float32)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert dot(7, 3) == pytest.approx(dot(14, 10), abs=1e-4)


def test_llama3_inv_freq_matches_reference():
    cfg = ModelConfig.tiny(
        rope_theta=500000.0,
        head_dim=16,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32),
    )
    inv = rope_inv_freq(cfg)
    base = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    wl = 2 * np.pi / base
    ref = np.where(
        wl < 32 / 4,
        base,
        np.where(wl > 32 / 1, base / 8, (1 - (32 / wl - 1) / 3) * base / 8 + (32 / wl - 1) / 3 * base),
    )
    np.testing.assert_allclose(inv, ref, rtol=1e-5)
    assert not np.allclose(inv, base)


def test_bf16_compute_and_params(model, fwd):
    cfg = ModelConfig.tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    m = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model)))
    assert m.model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    ids = _ids(2, 8, seed=7)
    mask = jnp.ones((2, 8), jnp.int32)
    logits = fwd(m, ids, mask)
    h = nnx.eval_shape(lambda m: m.hidden_states(ids)[0], m)
    assert logits.dtype == jnp.float32 and h.dtype == jnp.bfloat16
    ref = fwd(model, ids, mask)
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.1
    cache = m.init_cache(2, 4)
    assert cache.keys.dtype == jnp.bfloat16


def test_bf16_compute_casts_each_layers_weights_inside_the_layer_scan():
    """fp32 parameters, bf16 compute: the compiled forward+backward holds no bf16 copy of a whole stacked weight
    [L, ...] (a cast ahead of the scan does, and its gradient in bf16 too): each layer's weights are cast in the scan
    body. Its gradients stay fp32."""
    cfg = ModelConfig.tiny(num_hidden_layers=3, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    graphdef, state = nnx.split(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    ids = _ids(2, 8, seed=3)

    def loss(state):
        logits, _ = nnx.merge(graphdef, state)(ids)
        return jnp.mean(logits**2)

    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    stacked = {leaf.shape for leaf in jax.tree.leaves(state["model"]["layers"])}
    assert stacked and all(shape[0] == 3 for shape in stacked)
    for shape in stacked:
        assert f"bf16[{','.join(map(str, shape))}]" not in hlo
        assert f"f32[{','.join(map(str, shape))}]" in hlo
    grads = jax.grad(loss)(state)
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_logical_axes_and_eval_shape_70b():
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(ModelConfig.llama_70b(), rngs=nnx.Rngs(0)))
    specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    flat = {
        ".".join(str(k) for k in path): tuple(v.get_value()) if hasattr(v, "get_value") else tuple(v)
        for path, v in nnx.to_flat_state(specs)
    }
    assert flat == LOGICAL_AXES
    for names in flat.values():
        assert set(names) <= set(PARAM_AXIS_NAMES)
    q = abstract.model.layers.self_attn.q_proj.kernel
    assert q.shape == (80, 8192, 64, 128)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == ModelConfig.llama_70b().num_params()


def test_real_init():
    cfg = ModelConfig.tiny(num_hidden_layers=1)
    m = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    assert float(jnp.std(m.model.embed_tokens.embedding[...])) == pytest.approx(0.02, rel=0.1)
    np.testing.assert_array_equal(m.model.norm.scale[...], 1.0)


@pytest.mark.parametrize("layers", [1, 3])
def test_forward_flops_match_xlas_count_of_the_compiled_forward(layers, monkeypatch):
    """XLA's cost analysis counts every operation of the program, so the matmul count is a little below it; it counts
    a loop's body once, so the layers are unrolled (the scan runs them one after another anyway)."""
    config = ModelConfig.tiny(num_hidden_layers=layers, hidden_size=128, intermediate_size=512, vocab_size=1024)
    graphdef, state = nnx.split(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    ids = jnp.zeros((2, 32), jnp.int32)
    monkeypatch.setattr(jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True))
    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)[0])
    xla_flops = forward.lower(state, ids).compile().cost_analysis()["flops"]
    assert 0.97 * xla_flops <= config.forward_flops(2 * 32, 32) <= xla_flops


def test_cache_overflow_is_an_error_outside_jit(model):
    cache = model.init_cache(1, 4)
    with pytest.raises(ValueError, match="do not fit"):
        model(_ids(1, 5), cache=cache)
    with pytest.raises(ValueError, match="cache overflow"):
        model(_ids(1, 2), cache=cache.replace(index=jnp.int32(3)))
    with pytest.raises(ValueError, match="batch size"):
        model(_ids(2, 1), cache=cache)


def test_layer_weights_use_hf_names(model):
    from mojax.models.llama import LayerWeights, Projection

    weights = model.model.layers.weights()
    assert isinstance(weights, LayerWeights) and isinstance(weights.o_proj, Projection)
    assert LayerWeights._fields == (
        "input_layernorm",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "post_attention_layernorm",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert weights.q_proj.bias is None and weights.q_proj.lora_a is None
    assert weights.o_proj.kernel.shape == (2, 4, 16, 64)


def test_causal_mask_with_and_without_cache_matches_a_loop():
    from mojax.models.llama import KVCache, causal_mask, key_slots

    rng = np.random.default_rng(3)
    new = jnp.asarray(rng.random((2, 3)) > 0.3)
    cache_valid = jnp.asarray(rng.random((2, 7)) > 0.3)
    cache = KVCache(keys=jnp.zeros((1, 2, 1, 7, 2)), values=jnp.zeros((1, 2, 1, 7, 2)), valid=cache_valid, index=2)
    for c in (None, cache):
        valid, slots, index = key_slots(new, c)
        mask = np.asarray(causal_mask(valid, slots))
        if c is None:
            expected_valid, offset = np.asarray(new), 0
            assert index is None
        else:
            expected_valid, offset = np.asarray(cache_valid).copy(), 2
            expected_valid[:, 2:5] = np.asarray(new)
            assert int(index) == 2
        np.testing.assert_array_equal(valid, expected_valid)
        for b in range(2):
            for t in range(3):
                for s in range(valid.shape[1]):
                    assert mask[b, t, s] == (expected_valid[b, s] and s <= offset + t)


@pytest.fixture(scope="module")
def split_case():
    from mojax.models.llama import split_last_layer

    model = random_llama(ModelConfig.tiny(num_hidden_layers=3), seed=4)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, split_last_layer(params)


def _split_loss(graphdef, ids):
    from mojax.models.llama import apply_split

    return lambda split: jnp.mean(jnp.sin(apply_split(graphdef, split, ids[:, :-1], attention_mask=ids[:, :-1] > 5)))


def test_split_last_layer_shapes_and_exact_inverse(split_case):
    from mojax.models.llama import merge_last_layer

    _, params, split = split_case
    trunk = split["model"]
    assert trunk["layers"]["mlp"]["down_proj"]["kernel"].shape == (2, 128, 64)
    assert trunk["last_layer"]["mlp"]["down_proj"]["kernel"].shape == (1, 128, 64)
    np.testing.assert_array_equal(
        trunk["last_layer"]["input_layernorm"]["scale"][...][0],
        params["model"]["layers"]["input_layernorm"]["scale"][...][2],
    )
    merged = merge_last_layer(split)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_split_and_merge_each_compile_one_program(split_case):
    """Every leaf's slices (or concatenation) in one compiled program, which the persistent cache can keep; op by op
    each leaf shape compiled its own slicing programs (18 for SmolLM2's state)."""
    from mojax.models.llama import merge_last_layer, split_last_layer

    _, params, _ = split_case
    twin = jax.block_until_ready(jax.tree.map(lambda leaf: leaf + 0, params))  # the same shapes, built before counting
    jax.clear_caches()
    with compilations() as split_programs:
        split = jax.block_until_ready(split_last_layer(twin))
    with compilations() as merge_programs:
        jax.block_until_ready(merge_last_layer(split))
    assert [len(split_programs), len(merge_programs)] == [1, 1]


def test_apply_split_logits_and_gradients_equal_the_model(split_case):
    from mojax.models.llama import merge_last_layer

    graphdef, params, split = split_case
    ids = _ids(2, 7, seed=5)

    def loss(p):
        return jnp.mean(jnp.sin(nnx.merge(graphdef, p)(ids[:, :-1], attention_mask=ids[:, :-1] > 5)[0]))

    (value, grads), (split_value, split_grads) = jax.jit(
        lambda p, s: (jax.value_and_grad(loss)(p), jax.value_and_grad(_split_loss(graphdef, ids))(s))
    )(params, split)
    np.testing.assert_allclose(split_value, value, rtol=1e-6)
    merged = merge_last_layer(split_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), merged, grads)
    assert float(jnp.abs(split_grads["model"]["last_layer"]["mlp"]["up_proj"]["kernel"][...]).max()) > 0


def test_output_rows_give_those_rows_hidden_states_and_gradients(split_case):
    """``output_rows`` gives the hidden states at those positions, and the gradients of a loss on them, of the whole
    forward: split (the final block computes its queries and MLP at those rows only) and unsplit (sliced after), with
    left padding; the split model's final block runs on the rows alone (its MLP matmuls have 2 x 3 rows where the
    layer scan's have 2 x 9), and gives the same rows with the layers' fused attention kernel. A cache or a non-slice
    is refused."""
    from mojax.models.llama import merge_split

    graphdef, params, split = split_case
    ids = _ids(2, 9, seed=11)
    mask = jnp.asarray([[1] * 9, [0] * 3 + [1] * 6], jnp.int32)
    rows = slice(5, 8)

    def hidden(model, output_rows=None, kernel="mojax"):
        model.model.attention_kernel = kernel
        return model.hidden_states(ids, attention_mask=mask, output_rows=output_rows)[0]

    def loss(p, merge, output_rows):
        h = hidden(merge(p), output_rows)
        return jnp.sum(jnp.sin(h if output_rows is not None else h[:, rows]) * jnp.arange(1, 65))

    unsplit = lambda p: nnx.merge(graphdef, p)  # noqa: E731
    split_model = lambda s: merge_split(graphdef, s)  # noqa: E731
    want = jax.jit(lambda p: hidden(unsplit(p))[:, rows])(params)
    for merge, state in ((unsplit, params), (split_model, split)):
        got = jax.jit(lambda p, merge=merge: hidden(merge(p), rows))(state)
        assert got.shape == (2, 3, 64)
        np.testing.assert_allclose(got, want, atol=2e-6)
        grads = jax.jit(jax.grad(lambda p, merge=merge: loss(p, merge, rows)))(state)
        expected = jax.jit(jax.grad(lambda p, merge=merge: loss(p, merge, None)))(state)
        for mine, full in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(mine, full, rtol=1e-4, atol=1e-5 * float(jnp.abs(full).max()))
    fused = jax.jit(lambda s: hidden(split_model(s), rows, kernel="xla"))(split)
    np.testing.assert_allclose(fused, want, atol=2e-5)
    rows_of_mlp = [s[-2] for s in _dot_shapes(lambda s: hidden(split_model(s), rows), split) if s[-1] == 128]
    assert 2 * 3 in rows_of_mlp and 2 * 9 in rows_of_mlp
    model = unsplit(params)
    with pytest.raises(
        ValueError, match="output_rows must be a slice of positions and needs a forward without a cache"
    ):
        model.hidden_states(ids, output_rows=slice(0, 2), cache=model.init_cache(2, 9))
    with pytest.raises(ValueError, match=r"output_rows must be a slice.*got \[0, 1\]"):
        model.hidden_states(ids, output_rows=[0, 1])


def test_the_split_model_fills_and_reads_a_kv_cache_as_the_model(split_case, step):
    """merge_split's model with a cache: the prefill (layer scan, then the final block) and per-layer decode steps give
    the unsplit model's logits and cache."""
    from mojax.models.llama import merge_split

    graphdef, params, split = split_case
    model, split_model = nnx.merge(graphdef, params), merge_split(graphdef, split)
    ids = _ids(2, 7, seed=8)
    mask = jnp.asarray([[1] * 7, [0] * 2 + [1] * 5], jnp.int32)
    unrolled = nnx.jit(lambda m, i, mk, c: m(i, attention_mask=mk, cache=c, layer_weights=m.per_layer_weights()))
    cache, split_cache = model.init_cache(2, 8), split_model.init_cache(2, 8)
    for chunk, call in ((slice(0, 5), step), (slice(5, 6), unrolled), (slice(6, 7), unrolled)):
        want, cache = call(model, ids[:, chunk], mask[:, chunk], cache)
        got, split_cache = call(split_model, ids[:, chunk], mask[:, chunk], split_cache)
        np.testing.assert_allclose(got, want, atol=2e-5)
        if chunk.start == 0:
            np.testing.assert_allclose(split_cache.keys, cache.keys, atol=2e-6)
    assert len(split_model.per_layer_weights()) == 3
    jax.tree.map(np.testing.assert_array_equal, split_model.per_layer_weights()[2], model.per_layer_weights()[2])
    for field in ("keys", "values"):
        np.testing.assert_allclose(jnp.stack(getattr(split_cache, field)), jnp.stack(getattr(cache, field)), atol=2e-6)


def test_default_probe_mask_selects_last_block_norm_and_untied_head(split_case):
    from mojax.models.llama import default_probe_mask, split_last_layer

    _, _, split = split_case
    selected = {".".join(map(str, k)) for k, v in nnx.to_flat_state(default_probe_mask(split)) if v.get_value()}
    assert selected == {
        "lm_head.kernel",
        "model.norm.scale",
        *(".".join(map(str, k)) for k, _ in nnx.to_flat_state(split) if k[:2] == ("model", "last_layer")),
    }
    assert len(selected) == 11
    tied = nnx.eval_shape(lambda: LlamaForCausalLM(ModelConfig.tiny(tie_word_embeddings=True), rngs=nnx.Rngs(0)))
    tied_split = split_last_layer(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(tied, nnx.Param)))
    tied_selected = {k for k, v in nnx.to_flat_state(default_probe_mask(tied_split)) if v.get_value()}
    assert len(tied_selected) == 10 and ("model", "embed_tokens", "embedding") not in tied_selected


def test_split_errors(split_case):
    from mojax.models.llama import apply_split, merge_last_layer, split_last_layer

    graphdef, params, split = split_case
    with pytest.raises(ValueError, match="already has a model.last_layer"):
        split_last_layer(split)
    with pytest.raises(ValueError, match="has no model.last_layer"):
        merge_last_layer(params)
    with pytest.raises(ValueError, match="has no model.last_layer"):
        apply_split(graphdef, params, _ids(1, 2))
    with pytest.raises(ValueError, match="no model.layers"):
        split_last_layer(nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0))))


def _with_remat(model, remat):
    """The same arrays under another rematerialisation policy (only the graph differs)."""
    twin = nnx.eval_shape(lambda: LlamaForCausalLM(model.config, remat=remat, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.split(twin)[0], nnx.state(model))


def _saved_residual_elements(model, ids):
    """Number of array elements the backward pass of a loss on ``model`` keeps, from JAX's residual listing."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    graphdef, state = nnx.split(model)
    loss = lambda s: jnp.mean(jnp.sin(nnx.merge(graphdef, s)(ids)[0]))  # noqa: E731
    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        print_saved_residuals(loss, state)
    shapes = re.findall(r"^\w+\[([\d,]*)\]", listing.getvalue(), flags=re.M)
    assert shapes, listing.getvalue()
    return sum(int(np.prod([int(d) for d in shape.split(",") if d])) for shape in shapes)


def test_remat_policies_give_the_same_gradients_and_keep_less_for_the_backward():
    from mojax.models.llama import REMAT_POLICIES, apply_split, remat_policy, split_last_layer

    model = random_llama(ModelConfig.tiny(num_hidden_layers=3), seed=6)
    ids = _ids(2, 9, seed=6)
    grads, kept = {}, {}
    for remat in REMAT_POLICIES:
        twin = _with_remat(model, remat)
        graphdef, params = nnx.split(twin, nnx.Param)
        split = split_last_layer(params)
        whole = lambda p, g=graphdef: jnp.mean(jnp.sin(nnx.merge(g, p)(ids)[0]))  # noqa: E731
        last = lambda s, g=graphdef: jnp.mean(jnp.sin(apply_split(g, s, ids)))  # noqa: E731
        grads[remat] = jax.jit(lambda p, s, f=whole, h=last: (jax.grad(f)(p), jax.grad(h)(s)))(params, split)
        kept[remat] = _saved_residual_elements(twin, ids)
    for value in grads.values():
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), value, grads["none"])
    assert kept["full"] < kept["dots"] < kept["none"]
    assert (remat_policy(True), remat_policy(False)) == ("full", "none")
    assert LlamaForCausalLM(ModelConfig.tiny(), rngs=nnx.Rngs(0)).model.remat == "dots"


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match=r"remat is 'dot'; expected True, False or one of \('dots', 'full', 'none'\)"):
        LlamaForCausalLM(ModelConfig.tiny(), remat="dot", rngs=nnx.Rngs(0))
