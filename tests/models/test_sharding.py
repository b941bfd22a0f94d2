"""Sharded and unsharded models agree; FSDP splits parameter memory; the step has the right collectives."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from mojax.models import KV_CACHE_LOGICAL_AXES, LOGICAL_AXES, LlamaForCausalLM, ModelConfig
from mojax.models.generate import SamplingConfig, generate
from mojax.models.sharding import (
    RULES,
    abstract_sharded,
    batch_sharding,
    create_sharded,
    logical_to_spec,
    make_mesh,
    resolve_rules,
    sharded_init,
    state_shardings,
)


def make_model():
    """The tiny LLaMA, always from the same seed."""
    return LlamaForCausalLM(ModelConfig.tiny(), rngs=nnx.Rngs(0))


def make_batch():
    """A fixed [8, 16] batch of token ids."""
    return jax.random.randint(jax.random.key(1), (8, 16), 0, 256)


def loss_fn(state, graphdef, ids):
    """Next-token cross-entropy and the logits."""
    logits, _ = nnx.merge(graphdef, state)(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean(), logits


TX = optax.adamw(1e-2, eps=1e-4)  # eps near the gradient scale keeps the first Adam step well conditioned


def train_step(state, opt_state, ids, graphdef):
    """Forward, backward and an AdamW update over the parameter state."""
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state, graphdef, ids)
    updates, opt_state = TX.update(grads, opt_state, state)
    return logits, loss, grads, optax.apply_updates(state, updates), opt_state


STEP = jax.jit(train_step, static_argnums=3)


def run_step(model, ids):
    """One compiled train step on ``model`` (sharded or not): host results and the optimised HLO text."""
    graphdef, state = nnx.split(model)
    opt_state = TX.init(state)
    compiled = STEP.lower(state, opt_state, ids, graphdef).compile()
    logits, loss, grads, new_state, _ = compiled(state, opt_state, ids)
    return jax.tree.map(np.asarray, (logits, loss, grads, new_state)), compiled.as_text()


@functools.cache
def sharded_model(preset, shape):
    """The tiny LLaMA created directly sharded by ``preset`` on a mesh of ``shape`` (built once per layout)."""
    return create_sharded(make_model, make_mesh(*shape), preset)


@pytest.fixture(scope="module")
def reference():
    """Unsharded results on one device."""
    return run_step(make_model(), make_batch())[0]


def test_make_mesh_axes_sizes_and_auto_types():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_make_mesh_uses_given_devices():
    mesh = make_mesh(fsdp=4, devices=jax.devices()[4:])
    assert set(mesh.devices.flat) == set(jax.devices()[4:])


@pytest.mark.parametrize("sizes", [dict(data=2, fsdp=2), dict(fsdp=16), dict(data=0, fsdp=8), dict(fsdp=8.0)])
def test_make_mesh_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="mesh"):
        make_mesh(**sizes)


@pytest.mark.parametrize(
    "preset, names, expected",
    [
        ("dp", ("layers", "embed", "mlp"), P(None, None, None)),
        ("fsdp", ("layers", "embed", "mlp"), P(None, "fsdp", None)),
        ("fsdp", ("vocab", "embed"), P(None, "fsdp")),
        ("fsdp_tp", ("layers", "embed", "heads", "head_dim"), P(None, "fsdp", "tensor", None)),
        ("fsdp_tp", ("embed", "vocab"), P("fsdp", "tensor")),
        ("fsdp_tp", ("layers", "norm"), P(None, None)),
        ("fsdp_tp", (), P()),
        ("fsdp_tp", None, P()),
    ],
)
def test_logical_to_spec_presets(preset, names, expected):
    assert logical_to_spec(names, preset) == expected


def test_logical_to_spec_multi_axis_rule():
    rules = {**RULES["fsdp"], "embed": ("fsdp", "tensor")}
    assert logical_to_spec(("vocab", "embed"), rules) == P(None, ("fsdp", "tensor"))


@pytest.mark.parametrize(
    "names, rules, message",
    [
        (("embed", "bogus"), "fsdp", "no rule"),
        (("embed", "mlp"), {**RULES["fsdp"], "mlp": ("fsdp",)}, "at most one dimension"),
        (("embed",), "zero", "unknown sharding preset"),
        (("embed",), {"embedding": ("fsdp",)}, "unknown logical axis"),
        (("embed",), {"embed": ("model",)}, "unknown mesh axes"),
        (("embed",), [("embed", "fsdp")], "mapping"),
    ],
)
def test_bad_rules_raise(names, rules, message):
    with pytest.raises(ValueError, match=message):
        logical_to_spec(names, rules)


def test_resolve_rules_accepts_a_bare_mesh_axis_name():
    assert resolve_rules({"embed": "fsdp"})["embed"] == ("fsdp",)


def test_indivisible_dimension_raises_and_an_override_replicates_it():
    mesh = make_mesh(fsdp=2, tensor=4)
    with pytest.raises(ValueError, match=r"k_proj.*'kv_heads'.* size 2 .*\('tensor',\)"):
        abstract_sharded(make_model, mesh, "fsdp_tp")
    _, state = abstract_sharded(make_model, mesh, {**RULES["fsdp_tp"], "kv_heads": ()})
    attention = state["model"]["layers"]["self_attn"]
    assert attention["k_proj"]["kernel"].sharding.spec == P(None, "fsdp", None, None)
    assert attention["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)


def test_state_shardings_rejects_names_of_the_wrong_rank():
    class Bad(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4, 4)), out_sharding=("embed",), eager_sharding=False)

    _, abstract_state = nnx.split(nnx.eval_shape(Bad))
    with pytest.raises(ValueError, match=r"\['w'\].*1 logical axis names"):
        state_shardings(abstract_state, make_mesh(fsdp=8), "fsdp")


def test_batch_sharding_splits_batch_over_data_and_fsdp():
    sharding = batch_sharding(make_mesh(data=2, fsdp=2, tensor=2))
    assert sharding.spec == P(("data", "fsdp"))
    assert sharding.shard_shape((8, 16)) == (2, 16)


def has_collectives(hlo, present, absent=()):
    """True when every op in ``present`` (a tuple of alternatives each) and no op in ``absent`` is in ``hlo``."""
    return all(any(op in hlo for op in options) for options in present) and not any(op in hlo for op in absent)


# (preset, mesh shape, collectives the compiled step must contain, collectives it must not contain)
LAYOUTS = [
    pytest.param("dp", (8, 1, 1), [("all-reduce",)], ("all-gather",), marks=pytest.mark.slow),
    ("fsdp", (1, 8, 1), [("all-gather",), ("reduce-scatter", "all-reduce")], ()),
    pytest.param("fsdp", (2, 2, 2), [("all-gather",), ("reduce-scatter", "all-reduce")], (), marks=pytest.mark.slow),
    ("fsdp_tp", (2, 2, 2), [("all-gather",), ("all-reduce",)], ()),
    ("fsdp_tp", (1, 4, 2), [("all-gather",), ("all-reduce",)], ()),
]


@pytest.mark.parametrize("preset, shape, present, absent", LAYOUTS)
def test_sharded_step_matches_unsharded(reference, preset, shape, present, absent):
    mesh = make_mesh(*shape)
    model = sharded_model(preset, shape)
    _, abstract_state = abstract_sharded(make_model, mesh, preset)
    for array, target in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(abstract_state), strict=False):
        assert array.sharding.is_equivalent_to(target.sharding, array.ndim)
    ids = jax.device_put(make_batch(), batch_sharding(mesh))
    (logits, loss, grads, new_state), hlo = run_step(model, ids)
    assert has_collectives(hlo, present, absent), f"collectives of {preset} {shape}: {sorted(set(ops(hlo)))}"
    ref_logits, ref_loss, ref_grads, ref_state = reference
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), new_state, ref_state)


def per_device_elements(state):
    """Number of parameter elements held by each device."""
    held = {}
    for array in jax.tree.leaves(state):
        for shard in array.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.size
    return held


def test_fsdp_holds_an_eighth_of_the_parameters_per_device():
    state = nnx.state(sharded_model("fsdp", (1, 8, 1)))
    total = sum(a.size for a in jax.tree.leaves(state))
    sizes = {".".join(map(str, path)): value.size for path, value in nnx.to_flat_state(state)}
    expected = sum(size // 8 if "embed" in LOGICAL_AXES[path] else size for path, size in sizes.items())
    held = per_device_elements(state)
    assert sorted(sizes) == sorted(LOGICAL_AXES)
    assert len(held) == 8
    for count in held.values():
        assert count == expected
        assert count < 0.13 * total


def test_sharded_init_never_holds_the_whole_model_on_one_device():
    _, init = sharded_init(make_model, make_mesh(fsdp=8), "fsdp")
    memory = init.lower().compile().memory_analysis()
    total = sum(value.size * 4 for value in jax.tree.leaves(nnx.state(nnx.eval_shape(make_model))))
    assert memory.output_size_in_bytes < 0.13 * total
    assert memory.output_size_in_bytes + memory.temp_size_in_bytes < 0.5 * total  # a full copy is >= total


def ops(hlo):
    """Names of the collective operations in an HLO text."""
    names = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    return [name for name in names if name in hlo]


def test_has_collectives_can_fail():
    assert not has_collectives("all-reduce", [("all-gather",)])
    assert not has_collectives("all-reduce all-gather", [("all-reduce",)], ("all-gather",))
    assert has_collectives("reduce-scatter all-gather", [("all-gather",), ("reduce-scatter", "all-reduce")])


def test_sharded_greedy_sampling_matches_unsharded():
    ids = make_batch()
    mask = jnp.ones_like(ids).at[:4, :5].set(0)
    config = SamplingConfig(max_new_tokens=6, temperature=0.0)
    expected = generate(make_model(), ids, mask, jax.random.key(0), config)
    mesh = make_mesh(fsdp=4, tensor=2)
    sharded_ids = jax.device_put(ids, batch_sharding(mesh))
    sharded = generate(sharded_model("fsdp_tp", (1, 4, 2)), sharded_ids, mask, jax.random.key(0), config)
    np.testing.assert_array_equal(sharded.tokens, expected.tokens)
    np.testing.assert_allclose(sharded.model_logprobs, expected.model_logprobs, rtol=1e-5, atol=1e-5)


def test_fsdp_sharded_weights_decode_in_the_layer_scan():
    """layer_loop "auto" keeps the layer scan for sharded weights (split per layer before the decode loop, XLA gathers
    more of them at once: the compiled program's temporaries grow) and unrolls for unsharded ones; both loops sample
    the same tokens."""
    import dataclasses

    from mojax.models.generate import _compiled_part, _generate_bucket, _resolved_layer_loop

    mesh = make_mesh(fsdp=8)
    model = create_sharded(
        lambda: LlamaForCausalLM(ModelConfig.tiny(num_hidden_layers=4), rngs=nnx.Rngs(0)), mesh, "fsdp"
    )
    graphdef, state = nnx.split(model)
    ids = jax.device_put(make_batch()[:, :8], batch_sharding(mesh))
    mask = jnp.ones_like(ids).at[:4, :3].set(0)
    config = SamplingConfig(max_new_tokens=4, temperature=0.0, pad_token_id=0, stop_token_ids=())
    assert _resolved_layer_loop(config, state).layer_loop == "scan"
    assert _resolved_layer_loop(config, nnx.state(make_model())).layer_loop == "unrolled"
    loops = [dataclasses.replace(config, layer_loop=loop) for loop in ("scan", "unrolled")]
    knobs = (jnp.float32(0.0), jnp.float32(1.0))
    temporaries = [
        _generate_bucket.lower(graphdef, state, ids, mask, jax.random.key(0), knobs, _compiled_part(loop), 1)
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
        for loop in loops
    ]
    assert temporaries[0] < temporaries[1]
    scanned, unrolled = (generate(model, ids, mask, jax.random.key(0), loop) for loop in loops)
    np.testing.assert_array_equal(scanned.tokens, unrolled.tokens)
    np.testing.assert_allclose(scanned.model_logprobs, unrolled.model_logprobs, atol=1e-5)


def test_fsdp_activations_stay_split_by_batch_under_set_mesh():
    """With the mesh set, the residual stream is constrained to the batch split: the compiled step's
    temporaries stay near one device's share of the batch instead of the whole global batch."""
    mesh = make_mesh(fsdp=8)
    graphdef, state = nnx.split(sharded_model("fsdp", (1, 8, 1)))
    # 4 rows per device, so the activations, not the tiny model's weights, dominate the temporaries
    ids = jax.device_put(jax.random.randint(jax.random.key(1), (32, 16), 0, 256), batch_sharding(mesh))
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state).model(ids)[0])
    gradient = jax.jit(jax.grad(lambda state, ids: loss_fn(state, graphdef, ids)[0]))
    loose_forward, loose_gradient = forward.lower(state, ids).compile(), gradient.lower(state, ids).compile()
    with jax.set_mesh(mesh):
        tight_forward, tight_gradient = forward.lower(state, ids).compile(), gradient.lower(state, ids).compile()
        hidden = tight_forward(state, ids)
    assert hidden.sharding.shard_shape(hidden.shape)[0] == ids.shape[0] // 8
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(loose_forward(state, ids)), rtol=1e-5, atol=1e-5)
    temporaries = lambda compiled: compiled.memory_analysis().temp_size_in_bytes
    assert temporaries(tight_gradient) < 0.5 * temporaries(loose_gradient)


def test_every_preset_splits_the_batch_over_data_and_fsdp():
    for preset in RULES:
        assert logical_to_spec(("batch", None), preset) == P(("data", "fsdp"), None)
        assert logical_to_spec(KV_CACHE_LOGICAL_AXES["keys"], preset)[1:4:2] == (("data", "fsdp"), None)


def test_constrain_resolves_logical_activation_axes_under_set_mesh():
    from mojax.models.sharding import activation_rules, constrain

    x = jnp.ones((8, 4))
    assert constrain(x, ("batch", None)) is x  # no mesh: untouched
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    spec = lambda f: jax.jit(f).lower(x).compile().output_shardings.spec  # noqa: E731
    with jax.set_mesh(mesh):
        assert spec(lambda x: constrain(x, ("batch", None))) == P(("data", "fsdp"))
        with activation_rules({**RULES["fsdp"], "batch": ("fsdp",), "embed": ("tensor",)}):
            assert spec(lambda x: constrain(x, ("batch", "embed"))) == P("fsdp", "tensor")
        assert spec(lambda x: constrain(x[:3], ("batch", None))) == P()  # 3 rows do not split over 4 shards


def test_the_head_matmul_has_the_plain_products_collectives_with_the_vocabulary_split():
    """An untied LM head split over its vocabulary (fsdp_tp), hidden rows split by batch: differentiating
    ``head_matmul`` (its weight gradient on the rows' written-out transpose) compiles to the same collectives as
    differentiating ``token_matmul``: the written-out transpose adds no communication."""
    from mojax._numerics import head_matmul, token_matmul

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    hidden = jax.device_put(jax.random.normal(jax.random.key(0), (8, 16, 32)), batch_sharding(mesh, "fsdp_tp"))
    spec = logical_to_spec(LOGICAL_AXES["lm_head.kernel"], "fsdp_tp")
    kernel = jax.device_put(jax.random.normal(jax.random.key(1), (32, 256)), jax.sharding.NamedSharding(mesh, spec))
    assert spec == P("fsdp", "tensor")

    def collectives(matmul):
        gradient = jax.jit(jax.grad(lambda x, w: jnp.sum(matmul(x, w) ** 2), argnums=(0, 1)))
        hlo = gradient.lower(hidden, kernel).compile().as_text()
        return sorted(
            re.findall(r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)\(", hlo)
        )

    plain = collectives(token_matmul)
    assert plain and collectives(head_matmul) == plain
