"""Checkpoints of model, optimizer, step, PRNG key and JSON metadata, restorable onto any mesh."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mojax.models.sharding import Rules, abstract_sharded, make_mesh


class Restored(NamedTuple):
    """Everything ``Checkpointer.restore_latest`` brings back."""

    model: nnx.Module
    optimizer: nnx.Optimizer
    step: int
    rng_key: jax.Array
    metadata: dict


def _require_typed_key(rng_key: Any) -> None:
    """Raise unless ``rng_key`` is a typed PRNG key array (from ``jax.random.key``)."""
    if not (isinstance(rng_key, jax.Array) and jax.dtypes.issubdtype(rng_key.dtype, jax.dtypes.prng_key)):
        raise ValueError(
            f"rng_key must be a typed PRNG key from jax.random.key(...), got {getattr(rng_key, 'dtype', type(rng_key))}"
        )


def _require_json(metadata: Any) -> dict:
    """``metadata`` as a dict, raising unless it is a JSON-serialisable mapping."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping, got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(dict(metadata)))
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from None


def _restore_target(mesh: Mesh | None, rules: str | Rules | None) -> tuple[Mesh, str | Rules]:
    """The mesh and rules to restore onto: both given, or neither (one device, replicated)."""
    if (mesh is None) != (rules is None):
        raise ValueError("give both mesh and rules to restore sharded, or neither to restore onto one device")
    if mesh is None:
        return make_mesh(devices=jax.devices()[:1]), "dp"
    return mesh, rules


class Checkpointer:
    """Orbax CheckpointManager over (model, nnx.Optimizer, PRNG key, metadata), saving asynchronously."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, save_interval_steps: int = 1):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be a positive integer or None (keep all), got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be a positive integer, got {save_interval_steps}")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(
        self,
        step: int,
        *,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        rng_key: jax.Array,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Start an asynchronous save of ``step``; returns False when the save interval skips it."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        _require_typed_key(rng_key)
        info = {
            "step": step,
            "rng_impl": str(jax.random.key_impl(rng_key)),
            "rng_data_shape": list(jax.random.key_data(rng_key).shape),
            "metadata": _require_json({} if metadata is None else metadata),
        }
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(nnx.state(model)),
                optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
                rng_key=ocp.args.StandardSave({"key_data": jax.random.key_data(rng_key)}),
                info=ocp.args.JsonSave(info),
            ),
        )

    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        """Steps that have a finished checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def restore_latest(
        self,
        *,
        model_factory: Callable[[], nnx.Module],
        optimizer_factory: Callable[[nnx.Module], nnx.Optimizer],
        mesh: Mesh | None = None,
        rules: str | Rules | None = None,
    ) -> Restored:
        """Restore the newest checkpoint, laid out on ``mesh`` by ``rules`` (any mesh, not only the saving one)."""
        mesh, rules = _restore_target(mesh, rules)
        self.wait()
        step = self._manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint found in {self._manager.directory}")
        info = self._manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]
        model_def, model_target = abstract_sharded(model_factory, mesh, rules)
        optimizer_def, optimizer_target = abstract_sharded(lambda: optimizer_factory(model_factory()), mesh, rules)
        key_target = jax.ShapeDtypeStruct(
            tuple(info["rng_data_shape"]), "uint32", sharding=NamedSharding(mesh, PartitionSpec())
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(model_target),
                optimizer=ocp.args.StandardRestore(optimizer_target),
                rng_key=ocp.args.StandardRestore({"key_data": key_target}),
            ),
        )
        return Restored(
            model=nnx.merge(model_def, restored["model"]),
            optimizer=nnx.merge(optimizer_def, restored["optimizer"]),
            step=info["step"],
            rng_key=jax.random.wrap_key_data(restored["rng_key"]["key_data"], impl=info["rng_impl"]),
            metadata=info["metadata"],
        )

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
