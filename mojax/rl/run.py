"""What every mojax training run shares: its output folder, resumption, checkpoints, loggers and the step loop.

:class:`mojax.rl.trainer.Trainer` (RL) and :class:`mojax.rl.dpo.DPOTrainer` (preference optimisation) subclass
:class:`Run` and provide ``train_step()`` (one step, returning its metrics) and the state they checkpoint. A run
writes ``OUTPUT_DIR/config.yaml`` on its first start and refuses to resume with a config that changed beyond
``steps``, ``output_dir`` and logging keys; it saves an Orbax checkpoint every ``checkpoint.save_steps`` steps (and at
the last one) unless the step's update was skipped, and stops after ``max_consecutive_skips`` skipped updates with the
last good checkpoint intact.

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

Callback = Callable[[int, Mapping[str, float]], None]
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
    """

    config: Any
    output_dir: Path
    state: Any
    step: int
    names: tuple[str, ...]
    callbacks: tuple[Callback, ...]
    mesh: Mesh | None
    tokenizer: Any
    _checkpoints: ocp.CheckpointManager | None = None

    # ----------------------------------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def train_step(self) -> dict[str, float]:
        """Run one step and return its metrics (the subclass's algorithm)."""

    @abc.abstractmethod
    def policy_model(self) -> Any:
        """The current policy as an NNX model (the subclass knows its parameter layout)."""

    def checkpoint_tree(self) -> dict[str, Any]:
        """What a checkpoint holds: by default the training state."""
        return {"train": typed_keys_to_data(self.state)}

    def load_checkpoint_tree(self, restored: Mapping[str, Any]) -> None:
        """Set the run's state from a restored :meth:`checkpoint_tree`."""
        self.state = data_to_typed_keys(restored["train"], self.state)

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
            options = ocp.CheckpointManagerOptions(max_to_keep=self.config.checkpoint.max_to_keep)
            self._checkpoints = ocp.CheckpointManager((self.output_dir / "checkpoints").absolute(), options=options)
        return self._checkpoints

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
        """Write config.yaml on a fresh run; on a resumed one, refuse a config that changed beyond steps/logging."""
        path = self.output_dir / "config.yaml"
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
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mojax: config checked")  # every process read it before it is written
        if is_main_process():
            path.write_text(yaml.safe_dump(current, sort_keys=False))

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
                if skips == 0 and (
                    self.step % self.config.checkpoint.save_steps == 0 or self.step == self.config.steps
                ):
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
