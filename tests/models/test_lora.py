"""LoRA adapters: neutral at init, switchable off for the reference, mergeable, trainable alone, checkpointable."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hf_fixtures import random_llama

from mojax.models import ModelConfig
from mojax.models.hf import load_causal_lm, save_pretrained
from mojax.models.llama import (
    LoraCall,
    Projection,
    apply_split,
    default_probe_mask,
    merge_last_layer,
    project,
    split_last_layer,
)
from mojax.models.lora import (
    LoraConfig,
    adapter_state,
    adapters_only,
    add_lora,
    load_adapter_state,
    load_adapters,
    lora_config,
    lora_mask,
    merge_lora,
    save_adapters,
)

CONFIG = ModelConfig.tiny(attention_bias=True)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.25, targets=TARGETS)

_forward = nnx.jit(lambda m, ids, adapters: m(ids, adapters=adapters)[0], static_argnums=2)
_dropout_forward = nnx.jit(lambda m, ids, key: m(ids, dropout_rng=key)[0])


def _ids(seed=0, B=2, T=6):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 256, (B, T)), jnp.int32)


def _perturb_adapters(model, seed=0):
    """Give every B matrix random values, so the adapters change the outputs."""
    rng = np.random.default_rng(seed)
    for module in model.model.layers.projections().values():
        if hasattr(module, "lora_b"):
            module.lora_b[...] = jnp.asarray(0.2 * rng.standard_normal(module.lora_b.shape), jnp.float32)
    return model


def _adapted(seed=0):
    """The tiny biased LLaMA with random weights and non-zero adapters on every projection."""
    model = add_lora(random_llama(CONFIG, seed=seed), LORA, rngs=nnx.Rngs(seed + 1))
    return _perturb_adapters(model, seed + 2)


@pytest.fixture(scope="module")
def adapted():
    return _adapted()


def test_fresh_adapters_leave_the_logits_unchanged():
    model = random_llama(CONFIG, seed=3)
    ids = _ids(1)
    base = _forward(model, ids, True)
    add_lora(model, LORA, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_forward(model, ids, True), base)
    a = model.model.layers.mlp.down_proj.lora_a[...]
    assert float(jnp.abs(a).max()) <= 1 / np.sqrt(CONFIG.intermediate_size)  # PEFT's kaiming_uniform(a=sqrt(5))
    assert float(jnp.abs(a).max()) > 0.5 / np.sqrt(CONFIG.intermediate_size)
    np.testing.assert_array_equal(model.model.layers.mlp.down_proj.lora_b[...], 0.0)


def test_adapter_shapes_types_and_logical_axes(adapted):
    attn = adapted.model.layers.self_attn
    assert attn.q_proj.lora_a.shape == (2, 64, 4) and attn.q_proj.lora_b.shape == (2, 4, 4, 16)
    assert attn.o_proj.lora_a.shape == (2, 4, 16, 4) and attn.o_proj.lora_b.shape == (2, 4, 64)
    assert isinstance(attn.k_proj.lora_a, nnx.LoRAParam)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(adapter_state(adapted))))
    axes = {".".join(map(str, k)): tuple(v.get_value()) for k, v in specs.items()}
    assert axes["model.layers.self_attn.o_proj.lora_a"] == ("layers", "heads", "head_dim", None)
    assert axes["model.layers.mlp.down_proj.lora_b"] == ("layers", None, "embed")
    assert len(axes) == 2 * len(TARGETS)


def test_disabled_adapters_give_the_base_model(adapted):
    ids = _ids(2)
    base_graphdef, base_state = nnx.split(random_llama(CONFIG, seed=0))
    base = _forward(nnx.merge(base_graphdef, base_state), ids, True)
    np.testing.assert_array_equal(_forward(adapted, ids, False), base)
    assert float(jnp.abs(_forward(adapted, ids, True) - base).max()) > 1e-2


def test_projection_matches_a_numpy_transcription():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # [B, T, H, hd]: o_proj's input
    w = rng.standard_normal((4, 5, 6)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    a = rng.standard_normal((4, 5, 2)).astype(np.float32)
    b = rng.standard_normal((2, 6)).astype(np.float32)
    got = project(jnp.asarray(x), Projection(*map(jnp.asarray, (w, bias, a, b))), 2, LoraCall(scaling=0.5), 0)
    expected = np.zeros((2, 3, 6), np.float32)
    for i in range(2):
        for t in range(3):
            flat = x[i, t].reshape(-1)
            expected[i, t] = flat @ w.reshape(20, 6) + bias + 0.5 * (flat @ a.reshape(20, 2)) @ b
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dropout_only_with_a_key(adapted):
    ids = _ids(5)
    plain = _forward(adapted, ids, True)
    first = _dropout_forward(adapted, ids, jax.random.key(0))
    np.testing.assert_array_equal(first, _dropout_forward(adapted, ids, jax.random.key(0)))
    assert float(jnp.abs(first - plain).max()) > 1e-3
    assert float(jnp.abs(first - _dropout_forward(adapted, ids, jax.random.key(1))).max()) > 1e-3
    # the base path never drops: with adapters disabled a key changes nothing
    no_adapters = nnx.jit(lambda m, i, k: m(i, adapters=False, dropout_rng=k)[0])(adapted, ids, jax.random.key(0))
    np.testing.assert_array_equal(no_adapters, _forward(adapted, ids, False))


def test_merged_equals_unmerged_and_export_is_merged(adapted, tmp_path):
    ids = _ids(6)
    expected = _forward(adapted, ids, True)
    save_pretrained(adapted, tmp_path)
    assert lora_config(adapted) == LORA  # exporting leaves the model's adapters in place
    merged = merge_lora(nnx.clone(adapted))
    assert lora_config(merged) is None and not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(_forward(merged, ids, True), expected, atol=2e-5)
    np.testing.assert_allclose(_forward(load_causal_lm(tmp_path), ids, True), expected, atol=2e-5)


def test_only_adapters_move_under_the_lora_mask(adapted):
    graphdef, params = nnx.split(adapted, nnx.Param)
    mask = lora_mask(params)
    assert sum(jax.tree.leaves(mask)) == 2 * len(TARGETS)
    tx = adapters_only(optax.adamw(1e-2, weight_decay=0.1), params)
    ids = _ids(7)

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids[:, :-1])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(p, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(p), opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    new, opt_state = params, tx.init(params)
    for _ in range(3):
        new, opt_state = step(new, opt_state)
    assert float(loss(new)) < float(loss(params))
    for (path, before), (_, after) in zip(nnx.to_flat_state(params), nnx.to_flat_state(new), strict=True):
        if isinstance(before, nnx.LoRAParam):
            assert not np.array_equal(before.get_value(), after.get_value()), path
        else:
            np.testing.assert_array_equal(before.get_value(), after.get_value())


def test_probe_mask_selects_the_final_blocks_adapters_and_split_apply_matches(adapted):
    graphdef, params = nnx.split(adapted, nnx.Param)
    split = split_last_layer(params)
    mask = default_probe_mask(split)
    selected = {path for path, v in nnx.to_flat_state(mask) if v.get_value()}
    adapters = {path for path, v in nnx.to_flat_state(split) if isinstance(v, nnx.LoRAParam)}
    assert len(adapters) == 4 * len(TARGETS)  # lora_a and lora_b in layers and in last_layer
    assert selected == {path for path in adapters if "last_layer" in path} and len(selected) == 2 * len(TARGETS)
    # a state without a last_layer (the trainer's one-layer models): every adapter is probed
    unsplit = {path for path, v in nnx.to_flat_state(default_probe_mask(params)) if v.get_value()}
    assert unsplit == {path for path, v in nnx.to_flat_state(params) if isinstance(v, nnx.LoRAParam)}
    ids = _ids(8)
    np.testing.assert_allclose(apply_split(graphdef, split, ids), _forward(adapted, ids, True), atol=1e-5)
    # gradients of the adapters agree once merged back
    loss = lambda p: nnx.merge(graphdef, p)(ids)[0].sum()
    split_loss = lambda p: apply_split(graphdef, p, ids).sum()
    got = merge_last_layer(jax.grad(split_loss)(split))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, jax.grad(loss)(params))


def test_adapter_checkpoint_round_trips(adapted, tmp_path):
    ids = _ids(9)
    expected = _forward(adapted, ids, True)
    save_adapters(adapted, tmp_path)
    restored = load_adapters(random_llama(CONFIG, seed=0), tmp_path)
    assert lora_config(restored) == LORA
    np.testing.assert_array_equal(_forward(restored, ids, True), expected)
    # the state functions: a fresh adapter set takes the saved values
    fresh = add_lora(random_llama(CONFIG, seed=0), LORA, rngs=nnx.Rngs(5))
    load_adapter_state(fresh, adapter_state(adapted))
    np.testing.assert_array_equal(_forward(fresh, ids, True), expected)
    other = add_lora(random_llama(CONFIG, seed=0), LoraConfig(rank=2, targets=TARGETS), rngs=nnx.Rngs(5))
    with pytest.raises(ValueError, match="load_adapter_state: `state` has .* of shape"):
        load_adapter_state(other, adapter_state(adapted))
    with pytest.raises(ValueError, match="load_adapters: `model` has adapters"):
        load_adapters(other, tmp_path)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=0), ValueError, "LoraConfig: `rank` is 0; expected an integer >= 1."),
        (dict(rank=2.0), TypeError, "`rank` is a float"),
        (dict(alpha=0.0), ValueError, "`alpha` is 0"),
        (dict(dropout=1.0), ValueError, r"`dropout` is 1; expected a number in \[0, 1\)"),
        (dict(targets=("q_proj", "wq")), ValueError, "`targets` is 'wq'"),
        (dict(targets="q_proj"), TypeError, "`targets` is 'q_proj'"),
        (dict(targets=("q_proj", "q_proj")), ValueError, "distinct"),
    ],
)
def test_lora_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**kwargs)


def test_adding_twice_and_merging_nothing_are_errors(adapted):
    with pytest.raises(ValueError, match="add_lora: `model` already has adapters"):
        add_lora(adapted, LORA, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="merge_lora: `model` has no adapters"):
        merge_lora(random_llama(CONFIG, seed=0))
    with pytest.raises(TypeError, match="add_lora: `model` is a Linear"):
        add_lora(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(0))


def test_adapters_shard_by_their_kernel_axes():
    from jax.sharding import PartitionSpec as P

    from mojax.models import LlamaForCausalLM
    from mojax.models.sharding import abstract_sharded, make_mesh

    make = lambda: add_lora(LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(1))  # noqa: E731
    _, state = abstract_sharded(make, make_mesh(fsdp=4, tensor=2), "fsdp_tp")
    attention = state["model"]["layers"]["self_attn"]
    assert attention["q_proj"]["lora_a"].sharding.spec == P(None, "fsdp", None)
    assert attention["q_proj"]["lora_b"].sharding.spec == P(None, None, "tensor", None)
    assert attention["o_proj"]["lora_b"].sharding.spec == P(None, None, "fsdp")
