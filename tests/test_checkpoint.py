"""Checkpoints restore model, optimizer, step and key exactly, onto other meshes, and resume training."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mojax.checkpoint import Checkpointer
from mojax.models import LlamaForCausalLM, ModelConfig
from mojax.models.sharding import create_sharded, make_mesh


def make_model():
    return LlamaForCausalLM(ModelConfig.tiny(num_hidden_layers=1), rngs=nnx.Rngs(0))


def make_optimizer(model):
    return nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, key):
    """One AdamW step on a batch of token ids drawn from ``key``; returns the loss."""
    ids = jax.random.randint(key, (8, 9), 0, 256)

    def loss_fn(m):
        logits, _ = m(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

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


def up_proj(model):
    """The stacked MLP up-projection kernel [L, D, F] ("layers", "embed", "mlp")."""
    return model.model.layers.mlp.up_proj.kernel


def host_params(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def assert_trees_equal(a, b):
    """Same paths and bit-identical leaves (Variable metadata such as eager_sharding may differ)."""
    a, b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [path for path, _ in a] == [path for path, _ in b]
    for (path, x), (_, y) in zip(a, b, strict=False):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_crash_and_resume_matches_an_uninterrupted_run(tmp_path):
    mesh = make_mesh(fsdp=8)
    model = create_sharded(make_model, mesh, "fsdp")
    uninterrupted = nnx.clone(model)
    full_losses, _ = train(uninterrupted, make_optimizer(uninterrupted), jax.random.key(7), 0, 6)
    full_params = host_params(uninterrupted)

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
    assert up_proj(model).sharding.spec == P(None, "fsdp", None)
    resumed_losses, _ = train(model, optimizer, key, step, 6)
    assert first_losses[:4] == full_losses[:4]
    assert resumed_losses == full_losses[4:]
    assert_trees_equal(host_params(model), full_params)


@pytest.mark.parametrize(
    "mesh_shape, rules, up_spec",
    [
        pytest.param(None, None, P(None, None, None), marks=pytest.mark.slow),
        ((2, 2, 2), "fsdp_tp", P(None, "fsdp", "tensor")),
    ],
)
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
    assert up_proj(restored.model).sharding.spec == up_spec
    assert len(up_proj(restored.model).sharding.device_set) == (1 if mesh is None else 8)
    assert_trees_equal(host_params(restored.model), host_params(model))
    assert_trees_equal(nnx.state(restored.optimizer), nnx.state(optimizer))
    assert restored.optimizer.opt_state[0].mu["model"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == up_spec
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
