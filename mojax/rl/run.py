"""What every mojax training run shares: its output folder, resumption, checkpoints, loggers and the step loop.

:class:`mojax.rl.trainer.Trainer` (RL) and :class:`mojax.rl.dpo.DPOTrainer` (preference optimisation) subclass
:class:`Run` and provide ``train_step()`` (one step, returning its metrics) and the state they checkpoint. A run
writes ``OUTPUT_DIR/config.yaml`` on its first start and refuses to resume with a config that changed beyond
``steps``, ``output_dir`` and logging keys; it saves an Orbax checkpoint every ``checkpoint.save_steps`` steps (and at
the last one, and every ``checkpoint.save_seconds`` if set) unless the step's update was skipped, and stops after
``max_consecutive_skips`` skipped updates with the last good checkpoint intact.

Checkpoints hold the trained parameters alone (:attr:`Run.trainable_flags`): LoRA's frozen base model is read again
from ``model.path`` at resumption, and ``OUTPUT_DIR/weight_digests.json`` (sha256 of the policy's weight files and of
the reward models' parameters at the first start) makes a resumed run refuse weights that changed.

A run may span several processes (``jax.distributed`` with a global mesh): every process runs the same loop on the
same data, :func:`fetch` gathers device arrays to every host for host-side work, checkpoints are written by every
process together (Orbax), and only process 0 writes config.yaml, metrics, samples, TensorBoard and the export.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mojax import _checks as checks
from mojax.rl import config as rl_config
from mojax.rl.logging import CompositeLogger, JsonlLogger, ProgressBar, TensorBoardLogger
from mojax.rl.rewards.objectives import REWARD_MODEL_DIGEST_PREFIX

Callback = Callable[[int, Mapping[str, float]], None]
WEIGHT_DIGESTS = "weight_digests.json"
"""The file of ``output_dir`` holding :attr:`Run.weight_digests` of the run's first start."""
CRASH_ENV = "MOJAX_CRASH_AT_STEP"
"""Test hook: kill the process with SIGKILL right after the update of this step, before its checkpoint is saved."""


def is_main_process() -> bool:
    """True on the process that writes the run's files (process 0; the only one without ``jax.distributed``)."""
    return jax.process_index() == 0


def fetch(tree: Any) -> Any:
    """Host numpy copies of a pytree's arrays, gathered from every process where an array spans several.

    With more than one process every process must call it with the same tree (the gather is a collective).
    """

    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def place(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """A pytree of host values as global arrays with `sharding`; every process holds the same values and keeps its
    own shards (works across processes, unlike ``jax.device_put`` of a committed local array)."""

    def one(x: Any) -> jax.Array:
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(one, tree)


def place_sharded(tree: Any, shardings: Any) -> Any:
    """A pytree of arrays placed leaf by leaf with a matching pytree of shardings (see :func:`place`)."""
    return jax.tree.map(place, fetch(tree), shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf that does not yet live on `mesh` replicated over it (leaves already on the mesh are kept)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x: Any) -> Any:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                place(fetch(jax.random.key_data(x)), replicated), impl=jax.random.key_impl(x)
            )
        return place(fetch(x), replicated)

    return jax.tree.map(one, tree)


def typed_keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys replaced by their uint32 data (Orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def float64_bits(value: float) -> np.ndarray:
    """The 64 bits of a Python float as uint32[2], so that a checkpoint (JAX arrays: no float64 without x64) keeps a
    host-side float exactly; :func:`float_from_bits` is the inverse."""
    return np.asarray([value], np.float64).view(np.uint32)


def float_from_bits(bits: Any) -> float:
    """The Python float whose :func:`float64_bits` are ``bits``."""
    return float(np.asarray(bits, np.uint32).view(np.float64)[0])


def without_frozen(state: Any, trainable_flags: list[bool] | None) -> Any:
    """``state`` (a NamedTuple with ``params``) with ``params`` cut to the list of its trained leaves, the leaves whose
    flag is True; unchanged when ``trainable_flags`` is None."""
    if trainable_flags is None:
        return state
    leaves = jax.tree.leaves(state.params)
    return state._replace(params=[leaf for leaf, flag in zip(leaves, trainable_flags, strict=True) if flag])


def with_frozen(saved: Any, params: Any, trainable_flags: list[bool] | None) -> Any:
    """The inverse of :func:`without_frozen`: ``saved.params`` (the trained leaves) put back among the frozen leaves
    of ``params``."""
    if trainable_flags is None:
        return saved
    trained = iter(saved.params)
    leaves, treedef = jax.tree.flatten(params)
    merged = [next(trained) if flag else leaf for leaf, flag in zip(leaves, trainable_flags, strict=True)]
    return saved._replace(params=jax.tree.unflatten(treedef, merged))


def data_to_typed_keys(tree: Any, template: Any) -> Any:
    """The inverse of :func:`typed_keys_to_data`, guided by a template holding the typed keys."""
    return jax.tree.map(
        lambda x, t: (
            jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
            if jnp.issubdtype(t.dtype, jax.dtypes.prng_key)
            else x
        ),
        tree,
        template,
    )


class Run(abc.ABC):
    """The shared machinery of a training run; subclasses set the attributes below in ``__init__``.

    Attributes:
      config: the run's frozen config (with output_dir, steps, logging, checkpoint, max_consecutive_skips, export).
      output_dir: ``Path(config.output_dir)``.
      state: the checkpointed training state (a pytree with ``consecutive_skips``).
      step: the last finished step (0 before the first).
      names: the objectives' names (the progress bar shows their rewards).
      callbacks: ``callback(step, metrics)`` run after every step.
      mesh: the device mesh, or None.
      tokenizer: saved beside the exported policy.
      trainable_flags: one bool per leaf of ``state.params``, False for the weights that the run never changes
        (LoRA's base model), or None (every leaf trains). Checkpoints leave the frozen leaves out: a resumed run keeps
        those it read from ``model.path`` (:attr:`weight_digests` checks that they are the same).
      weight_digests: ``{file name: sha256}`` of the files the policy's initial weights were read from (none for
        weights built from a seed), and ``{"objectives.NAME": sha256}`` of each reward model's parameters
        (:func:`mojax.rl.rewards.reward_model_digests`); a resumed run refuses any that changed since its first start.
    """

    config: Any
    output_dir: Path
    state: Any
    step: int
    names: tuple[str, ...]
    callbacks: tuple[Callback, ...]
    mesh: Mesh | None
    tokenizer: Any
    trainable_flags: list[bool] | None = None
    weight_digests: Mapping[str, str] = {}
    _checkpoints: ocp.CheckpointManager | None = None

    # ----------------------------------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def train_step(self) -> dict[str, float]:
        """Run one step and return its metrics (the subclass's algorithm)."""

    @abc.abstractmethod
    def policy_model(self) -> Any:
        """The current policy as an NNX model (the subclass knows its parameter layout)."""

    def checkpoint_tree(self) -> dict[str, Any]:
        """What a checkpoint holds: by default the training state without its frozen parameters
        (:func:`without_frozen`); a LoRA run's checkpoint is then its adapters, optimizer and run state alone."""
        return {"train": typed_keys_to_data(without_frozen(self.state, self.trainable_flags))}

    def load_checkpoint_tree(self, restored: Mapping[str, Any]) -> None:
        """Set the run's state from a restored :meth:`checkpoint_tree` (the frozen parameters kept as they are)."""
        saved = data_to_typed_keys(restored["train"], without_frozen(self.state, self.trainable_flags))
        self.state = with_frozen(saved, self.state.params, self.trainable_flags)

    def log_step(self, metrics: Mapping[str, float]) -> None:  # noqa: B027 (an optional hook; the default reports nothing)
        """Extra per-step reports beside the metrics (the RL trainer writes samples.jsonl)."""

    def open_logs(self, resumed_at: int | None) -> None:  # noqa: B027 (an optional hook; the default reports nothing)
        """Open the extra reports of :meth:`log_step` (resuming after step `resumed_at`)."""

    def close_logs(self) -> None:  # noqa: B027 (an optional hook; the default reports nothing)
        """Close the extra reports."""

    # ---------------------------------------------------------------------------------------------- machinery
    def on_mesh(self) -> contextlib.AbstractContextManager:
        """``jax.set_mesh`` of the run's mesh (activations are then split by batch), or nothing without a mesh."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _manager(self) -> ocp.CheckpointManager:
        if self._checkpoints is None:
            checkpoint = self.config.checkpoint
            by_time = (
                None
                if checkpoint.save_seconds is None
                else ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
                    minimum_interval_secs=checkpoint.save_seconds
                )
            )
            options = ocp.CheckpointManagerOptions(max_to_keep=checkpoint.max_to_keep, save_decision_policy=by_time)
            self._checkpoints = ocp.CheckpointManager((self.output_dir / "checkpoints").absolute(), options=options)
        return self._checkpoints

    def save_is_due(self) -> bool:
        """Whether to save after the current step: at every ``checkpoint.save_steps``-th step and the last one, and with
        ``checkpoint.save_seconds`` when that long has passed since the last checkpoint and none is being written
        (process 0 decides and tells the others, so call it on every process)."""
        checkpoint = self.config.checkpoint
        if self.step % checkpoint.save_steps == 0 or self.step == self.config.steps:
            return True
        return checkpoint.save_seconds is not None and self._manager().should_save(self.step)

    def save(self) -> None:
        """Save the state after the current step (asynchronously; ``close`` waits)."""
        self._manager().save(self.step, args=ocp.args.StandardSave(self.checkpoint_tree()), force=True)

    def restore(self) -> bool:
        """Restore the latest checkpoint of output_dir, if any; True when one was restored."""
        manager = self._manager()
        step = manager.latest_step()
        if step is None:
            return False
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.checkpoint_tree())
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except ValueError as error:
            difference = str(error).split("If this mismatch is intentional")[0].strip()  # Orbax's own API hint
            seen = f"holds a checkpoint at step {step} whose state does not match this run's ({difference})"
            expected = "a checkpoint written by this version of mojax for this config, or a new output_dir"
            raise ValueError(checks.message(type(self).__name__, "output_dir", seen, expected)) from error
        self.load_checkpoint_tree(restored)
        self.step = int(step)
        return True

    def check_resumable(self) -> None:
        """Write config.yaml and the weight digests on a fresh run; on a resumed one, refuse a config that changed
        beyond steps/logging, or initial weight files that changed (:attr:`weight_digests`)."""
        path, digests = self.output_dir / "config.yaml", self.output_dir / WEIGHT_DIGESTS
        current = rl_config.to_dict(self.config)
        if path.exists():
            # Read back through the config class, so keys added since the run started count at their defaults.
            saved = rl_config.to_dict(rl_config.from_dict(type(self.config), yaml.safe_load(path.read_text())))
            changed = rl_config.changed_keys(saved, current)
            if changed:
                raise ValueError(
                    checks.message(
                        type(self).__name__,
                        "config",
                        f"differs from the run in {self.output_dir} in {changed}",
                        "the same config when resuming (only steps, output_dir and logging may change), or a new output_dir",
                    )
                )
        if digests.exists():  # a run started before the digests were kept has none
            self.check_weight_digests(json.loads(digests.read_text()))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mojax: config checked")  # every process read it before it is written
        if is_main_process():
            path.write_text(yaml.safe_dump(current, sort_keys=False))
            digests.write_text(json.dumps(dict(self.weight_digests), indent=1))

    def check_weight_digests(self, saved: Mapping[str, str]) -> None:
        """Raise unless the policy's initial weight files and the reward models hash as they did at the run's first
        start (``saved``); files are named by file name, reward models ``objectives.NAME``."""
        changed = sorted(
            name
            for name in saved.keys() | self.weight_digests.keys()
            if saved.get(name) != self.weight_digests.get(name)
        )
        files = [name for name in changed if not name.startswith(REWARD_MODEL_DIGEST_PREFIX)]
        if files:
            raise ValueError(
                checks.message(
                    type(self).__name__,
                    "model.path",
                    f"holds weight files that differ from those the run in {self.output_dir} started from: {files}",
                    "the same weights when resuming (a checkpoint holds the trained weights alone, not LoRA's frozen "
                    "base model, and the reference policy is read again from them too), or a new output_dir",
                )
            )
        if changed:
            raise ValueError(
                checks.message(
                    type(self).__name__,
                    "objectives",
                    f"score with reward models whose parameters differ from those the run in {self.output_dir} "
                    f"started with: {changed}",
                    "the same reward models when resuming (a checkpoint holds no reward model, and another one "
                    "changes the rewards the resumed steps learn from), or a new output_dir",
                )
            )

    def loggers(self, resumed_at: int | None) -> CompositeLogger:
        """metrics.jsonl, TensorBoard (unless disabled) and the progress bar; none on processes other than 0."""
        if not is_main_process():
            return CompositeLogger()
        logging = self.config.logging
        loggers = [JsonlLogger(self.output_dir / "metrics.jsonl", resume_from_step=resumed_at)]
        if logging.tensorboard:
            loggers.append(TensorBoardLogger(self.output_dir / "tensorboard", resume_from_step=resumed_at))
        loggers.append(
            ProgressBar(self.config.steps, self.step, self.names, disable=None if logging.progress else True)
        )
        return CompositeLogger(*loggers)

    def train(self) -> dict[str, float]:
        """Train until ``config.steps`` (resuming from output_dir's latest checkpoint); returns the last metrics."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.check_resumable()
        resumed_at = self.step if self.restore() else None
        logger = self.loggers(resumed_at)
        self.open_logs(resumed_at)
        metrics: dict[str, float] = {}
        try:
            crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
            while self.step < self.config.steps:
                metrics = self.train_step()
                if crash_at == self.step:
                    os.kill(os.getpid(), signal.SIGKILL)
                self.log_step(metrics)
                logger.log(self.step, metrics)
                for callback in self.callbacks:
                    callback(self.step, metrics)
                skips = int(fetch(self.state.consecutive_skips))
                if skips >= self.config.max_consecutive_skips:
                    raise RuntimeError(
                        f"{type(self).__name__}: {skips} consecutive updates were skipped (non-finite loss, gradient or "
                        f"combiner weight) at step {self.step}; the last good checkpoint is kept."
                    )
                if skips == 0 and self.save_is_due():
                    self.save()
        finally:
            if self._checkpoints is not None:
                self._checkpoints.wait_until_finished()
            logger.close()
            self.close_logs()
        if self.config.export:
            self.export(self.output_dir / "policy")
        return metrics

    def export(self, path: str | os.PathLike) -> Path:
        """Write the current policy as a Hugging Face folder (weights with LoRA merged, config, tokenizer); with several
        processes every process gathers the weights and process 0 writes them."""
        from flax import nnx

        from mojax.models import save_pretrained

        model = self.policy_model()
        if jax.process_count() > 1:
            nnx.update(model, jax.tree.map(jnp.asarray, fetch(nnx.state(model, nnx.Param))))
        if is_main_process():
            save_pretrained(model, path, tokenizer=self.tokenizer)
            (Path(path) / "mojax_run.json").write_text(json.dumps({"step": self.step, "objectives": list(self.names)}))
        return Path(path)

    def close(self) -> None:
        """Finish pending saves and release the checkpoint manager."""
        if self._checkpoints is not None:
            self._checkpoints.close()
            self._checkpoints = None
