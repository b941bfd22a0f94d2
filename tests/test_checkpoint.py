"""Checkpoints restore model, optimizer, step and key exactly, onto other meshes, and resume training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mojax.checkpoint import Checkpointer
from mojax.models.sharding import create_sharded, make_mesh


class TinyMLP(nnx.Module):
    """Stand-in model whose parameters carry logical axis names."""

    def __init__(self, *, rngs):
        init = nnx.initializers.normal(0.3)
        self.up = nnx.Param(nnx.with_partitioning(init, ("embed", "mlp"))(rngs.params(), (16, 32)))
        self.down = nnx.Param(nnx.with_partitioning(init, ("mlp", "embed"))(rngs.params(), (32, 16)))

    def __call__(self, x):
        return jnp.tanh(x @ self.up[...]) @ self.down[...]


def make_model():
    with nnx.use_eager_sharding(False):
        return TinyMLP(rngs=nnx.Rngs(0))


def make_optimizer(model):
    return nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, key):
    """One AdamW step on a batch drawn from ``key``; returns the loss."""
    x = jax.random.normal(key, (8, 16))

    def loss_fn(m):
        return jnp.mean((m(x) - jnp.sin(x)) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train(model, optimizer, key, start, stop, checkpointer=None, save_every=1):
    """Train steps [start, stop), saving every ``save_every`` steps; returns (losses, key)."""
    losses = []
    for step in range(start, stop):
        key, batch_key = jax.random.split(key)
        losses.append(float(train_step(model, optimizer, batch_key)))
        if checkpointer is not None and (step + 1) % save_every == 0:
            checkpointer.save(step + 1, model=model, optimizer=optimizer, rng_key=key, metadata={"loss": losses[-1]})
    return losses, key


def host_params(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def assert_trees_equal(a, b):
    """Same paths and bit-identical leaves (Variable metadata such as eager_sharding may differ)."""
    a, b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [path for path, _ in a] == [path for path, _ in b]
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_crash_and_resume_matches_an_uninterrupted_run(tmp_path):
    mesh = make_mesh(fsdp=8)
    model = create_sharded(make_model, mesh, "fsdp")
    full_losses, _ = train(model, make_optimizer(model), jax.random.key(7), 0, 6)
    full_params = host_params(model)

    model = create_sharded(make_model, mesh, "fsdp")
    with Checkpointer(tmp_path, max_to_keep=2) as checkpointer:
        first_losses, _ = train(model, make_optimizer(model), jax.random.key(7), 0, 5, checkpointer, save_every=2)
    del model

    with Checkpointer(tmp_path) as checkpointer:
        model, optimizer, step, key, metadata = checkpointer.restore_latest(
            model_factory=make_model, optimizer_factory=make_optimizer, mesh=mesh, rules="fsdp"
        )
        assert checkpointer.all_steps() == [2, 4]
    assert step == 4 and int(optimizer.step[...]) == 4
    assert metadata == {"loss": first_losses[3]}
    assert model.up.sharding.spec == P("fsdp", None)
    resumed_losses, _ = train(model, optimizer, key, step, 6)
    assert first_losses[:4] == full_losses[:4]
    assert resumed_losses == full_losses[4:]
    assert_trees_equal(host_params(model), full_params)


@pytest.mark.parametrize("mesh_shape, rules, up_spec", [(None, None, P(None, None)), ((2, 2, 2), "fsdp_tp", P("fsdp", "tensor"))])
def test_restore_onto_a_different_mesh(tmp_path, mesh_shape, rules, up_spec):
    model = create_sharded(make_model, make_mesh(fsdp=8), "fsdp")
    optimizer = make_optimizer(model)
    _, key = train(model, optimizer, jax.random.key(3), 0, 2)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(2, model=model, optimizer=optimizer, rng_key=key, metadata={"run": "a"})
        checkpointer.wait()
        mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
        restored = checkpointer.restore_latest(
            model_factory=make_model, optimizer_factory=make_optimizer, mesh=mesh, rules=rules
        )
    assert restored.model.up.sharding.spec == up_spec
    assert len(restored.model.up.sharding.device_set) == (1 if mesh is None else 8)
    assert_trees_equal(host_params(restored.model), host_params(model))
    assert_trees_equal(nnx.state(restored.optimizer), nnx.state(optimizer))
    assert restored.optimizer.opt_state[0].mu["up"].sharding.spec == up_spec
    np.testing.assert_array_equal(jax.random.key_data(restored.rng_key), jax.random.key_data(key))
    assert jax.random.key_impl(restored.rng_key) == jax.random.key_impl(key)
    expected, _ = train(model, optimizer, key, 2, 3)
    resumed, _ = train(restored.model, restored.optimizer, restored.rng_key, 2, 3)
    np.testing.assert_allclose(resumed, expected, rtol=1e-6)


def test_max_to_keep_and_save_interval(tmp_path):
    model = make_model()
    optimizer = make_optimizer(model)
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as checkpointer:
        saved = [checkpointer.save(s, model=model, optimizer=optimizer, rng_key=jax.random.key(0)) for s in range(7)]
        checkpointer.wait()
        assert saved == [True, False, True, False, True, False, True]
        assert checkpointer.all_steps() == [4, 6]


def test_typed_keys_of_other_implementations_round_trip(tmp_path):
    model = make_model()
    key = jax.random.key(5, impl="rbg")
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(0, model=model, optimizer=make_optimizer(model), rng_key=key)
        restored = checkpointer.restore_latest(model_factory=make_model, optimizer_factory=make_optimizer)
    assert restored.metadata == {}
    assert jax.random.key_impl(restored.rng_key) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng_key), jax.random.key_data(key))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(step=-1), "step must be a non-negative integer"),
        (dict(rng_key=jax.random.PRNGKey(0)), "typed PRNG key"),
        (dict(metadata={"x": object()}), "JSON-serialisable"),
        (dict(metadata=[1, 2]), "mapping"),
    ],
)
def test_save_rejects_bad_input(tmp_path, kwargs, message):
    model = make_model()
    args = dict(step=0, model=model, optimizer=make_optimizer(model), rng_key=jax.random.key(0)) | kwargs
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(ValueError, match=message):
        checkpointer.save(args.pop("step"), **args)


def test_restore_rejects_bad_input(tmp_path):
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            checkpointer.restore_latest(model_factory=make_model, optimizer_factory=make_optimizer)
        with pytest.raises(ValueError, match="both mesh and rules"):
            checkpointer.restore_latest(
                model_factory=make_model, optimizer_factory=make_optimizer, mesh=make_mesh(fsdp=8)
            )
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
