"""Sharded and unsharded models agree; FSDP splits parameter memory; the step has the right collectives."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from mojax.models.sharding import (
    RULES,
    abstract_sharded,
    batch_sharding,
    create_sharded,
    logical_to_spec,
    make_mesh,
    resolve_rules,
    state_shardings,
)


class TinyLM(nnx.Module):
    """Stand-in LLaMA-shaped model using every logical axis name of the shared vocabulary."""

    def __init__(self, *, kv_heads=2, rngs):
        vocab, embed, heads, head_dim, mlp, layers = 64, 32, 4, 8, 64, 2
        self.kv_heads = kv_heads

        def param(shape, names):
            return nnx.Param(nnx.with_partitioning(nnx.initializers.normal(0.1), names)(rngs.params(), shape))

        self.embed = param((vocab, embed), ("vocab", "embed"))
        self.q = param((layers, embed, heads, head_dim), ("layers", "embed", "heads", "head_dim"))
        self.k = param((layers, embed, kv_heads, head_dim), ("layers", "embed", "kv_heads", "head_dim"))
        self.o = param((layers, heads, head_dim, embed), ("layers", "heads", "head_dim", "embed"))
        self.up = param((layers, embed, mlp), ("layers", "embed", "mlp"))
        self.down = param((layers, mlp, embed), ("layers", "mlp", "embed"))
        self.norm = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("layers", "norm"))(rngs.params(), (layers, embed)))
        self.head = param((embed, vocab), ("embed", "vocab"))

    def __call__(self, input_ids):
        x = self.embed[...][input_ids]

        def layer(x, w):
            q, k, o, up, down, norm = w
            y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * norm
            qh = jnp.einsum("bte,ehd->bthd", y, q)
            kh = jnp.repeat(jnp.einsum("bte,ehd->bthd", y, k), q.shape[1] // k.shape[1], axis=2)
            scores = jnp.einsum("bthd,bshd->bhts", qh, kh) / np.sqrt(q.shape[-1])
            causal = jnp.tril(jnp.ones(scores.shape[-2:], bool))
            attn = jax.nn.softmax(jnp.where(causal, scores, -1e9), -1)
            x = x + jnp.einsum("bhts,bshd,hde->bte", attn, qh, o)
            return x + jax.nn.silu(x @ up) @ down, None

        weights = (self.q[...], self.k[...], self.o[...], self.up[...], self.down[...], self.norm[...])
        x, _ = jax.lax.scan(layer, x, weights)
        return x @ self.head[...], None


def make_model(kv_heads=2):
    """The test model, always from the same seed."""
    return TinyLM(kv_heads=kv_heads, rngs=nnx.Rngs(0))


def make_batch():
    """A fixed [8, 16] batch of token ids."""
    return jax.random.randint(jax.random.key(1), (8, 16), 0, 64)


def loss_fn(model, ids):
    """Next-token cross-entropy."""
    logits, _ = model(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


TX = optax.adamw(1e-2)


def train_step(state, opt_state, ids, graphdef):
    """Forward, backward and an AdamW update over the parameter state."""
    model = nnx.merge(graphdef, state)
    logits, _ = model(ids)
    loss, grads = jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), ids))(state)
    updates, opt_state = TX.update(grads, opt_state, state)
    return logits, loss, grads, optax.apply_updates(state, updates), opt_state


STEP = jax.jit(train_step, static_argnums=3)


def run_step(model, ids):
    """One train step on ``model`` (sharded or not), returning host numpy results."""
    graphdef, state = nnx.split(model)
    logits, loss, grads, new_state, _ = STEP(state, TX.init(state), ids, graphdef)
    return jax.tree.map(np.asarray, (logits, loss, grads, new_state))


@pytest.fixture(scope="module")
def reference():
    """Unsharded results on one device."""
    with nnx.use_eager_sharding(False):
        model = make_model()
    return run_step(model, make_batch())


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
    with pytest.raises(ValueError, match=r"'kv_heads'.* size 2 .*\('tensor',\)"):
        abstract_sharded(make_model, mesh, "fsdp_tp")
    _, state = abstract_sharded(make_model, mesh, {**RULES["fsdp_tp"], "kv_heads": ()})
    assert state["k"].sharding.spec == P(None, "fsdp", None, None)
    assert state["q"].sharding.spec == P(None, "fsdp", "tensor", None)


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


LAYOUTS = [
    ("dp", (8, 1, 1)),
    ("fsdp", (2, 2, 2)),
    ("fsdp", (1, 8, 1)),
    ("fsdp_tp", (2, 2, 2)),
    ("fsdp_tp", (1, 4, 2)),
]


@pytest.mark.parametrize("preset, shape", LAYOUTS)
def test_sharded_step_matches_unsharded(reference, preset, shape):
    mesh = make_mesh(*shape)
    model = create_sharded(make_model, mesh, preset)
    _, abstract_state = abstract_sharded(make_model, mesh, preset)
    for array, target in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(abstract_state)):
        assert array.sharding.is_equivalent_to(target.sharding, array.ndim)
    ids = jax.device_put(make_batch(), batch_sharding(mesh))
    logits, loss, grads, new_state = run_step(model, ids)
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
    model = create_sharded(make_model, make_mesh(fsdp=8), "fsdp")
    state = nnx.state(model)
    total = sum(a.size for a in jax.tree.leaves(state))
    replicated = state["norm"][...].size
    held = per_device_elements(state)
    assert len(held) == 8
    for count in held.values():
        assert count == (total - replicated) // 8 + replicated
        assert count < 0.15 * total


def compiled_step_text(preset, shape):
    """Optimised HLO of the train step for one layout."""
    mesh = make_mesh(*shape)
    graphdef, state = nnx.split(create_sharded(make_model, mesh, preset))
    ids = jax.device_put(make_batch(), batch_sharding(mesh))
    return STEP.lower(state, TX.init(state), ids, graphdef).compile().as_text()


def test_compiled_steps_contain_the_expected_collectives():
    dp = compiled_step_text("dp", (8, 1, 1))
    fsdp = compiled_step_text("fsdp", (1, 8, 1))
    assert "all-reduce" in dp and "all-gather" not in dp
    assert "all-gather" in fsdp
    assert "reduce-scatter" in fsdp or "all-reduce" in fsdp
