"""Run logging: metrics.jsonl, TensorBoard scalars, decoded samples and a progress bar.

The trainer hands every finished step's metrics, a flat mapping from names such as ``loss`` or
``rewards/{name}/mean`` to numbers, to one ``MetricLogger``; ``CompositeLogger`` fans them out to
several (the JSONL file, TensorBoard, the progress bar, or a user's own, e.g. Weights & Biases). The
JSON Lines files follow TRL's metric names, put ``step`` first, write NaN and inf as ``null`` (strict
JSON) and flush every line, so a crashed run keeps all its finished steps. When a run resumes from a
checkpoint at step s, the lines written after s by the interrupted run are dropped before appending,
so each step appears once; TensorBoard does the same with a purge step.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mojax import _checks

METRICS_FILE = "metrics.jsonl"
"""Name of the metrics file inside a run's output directory."""

SAMPLES_FILE = "samples.jsonl"
"""Name of the decoded-samples file inside a run's output directory."""


@runtime_checkable
class MetricLogger(Protocol):
    """Anything that takes one step's metrics at a time; implement it to send metrics elsewhere (e.g. W&B)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records the metrics of the finished step `step` (1 for the first)."""

    def close(self) -> None:
        """Flushes and releases what the logger holds."""


def _file_in(path: str | os.PathLike[str], default_name: str) -> Path:
    """`path` itself, or `path / default_name` when `path` is an existing directory (a run's output directory)."""
    path = Path(path)
    return path / default_name if path.is_dir() else path


def _json_number(value: Any) -> float | None:
    """float(value) for a finite number, None for NaN and inf (JSON has neither)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _json_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, parsed object) for each non-blank line; a last line cut short by a crash is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                return
            raise ValueError(f"{path}: line {number} is not valid JSON; expected one JSON object per line.") from None


def _open_for_append(where: str, path: Path, resume_from_step: int | None) -> Any:
    """Opens `path` for appending after keeping only the lines with step <= resume_from_step (none when None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if resume_from_step is None:
        return path.open("w", encoding="utf-8")
    last_step = _checks.integer(where, "resume_from_step", resume_from_step, minimum=0)
    if path.exists():
        kept = [line for line, record in _json_records(path) if record.get("step", math.inf) <= last_step]
        scratch = path.with_name(path.name + ".tmp")
        scratch.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept), encoding="utf-8")
        os.replace(scratch, path)
    return path.open("a", encoding="utf-8")


def _write_line(stream: Any, record: Mapping[str, Any]) -> None:
    """One strict-JSON line, flushed at once."""
    stream.write(json.dumps(record, allow_nan=False) + "\n")
    stream.flush()


class JsonlLogger:
    """Writes one JSON object per step, ``{"step": s, name: value, ...}``, to a run's metrics.jsonl.

    Args:
      path: the file to write, or an existing run directory (the file is then ``path / "metrics.jsonl"``).
      resume_from_step: the step restored from a checkpoint: the lines of later steps are dropped and new ones
        appended. None starts a new file (an old one at `path` is replaced).

    Example:
      >>> import tempfile
      >>> from mojax.rl.logging import JsonlLogger, read_metrics
      >>> run_dir = tempfile.mkdtemp()
      >>> logger = JsonlLogger(run_dir)
      >>> logger.log(1, {"loss": 0.5, "kl": float("nan")})
      >>> logger.close()
      >>> open(f"{run_dir}/metrics.jsonl").read()
      '{"step": 1, "loss": 0.5, "kl": null}\\n'
      >>> read_metrics(run_dir)
      [{'step': 1, 'loss': 0.5, 'kl': nan}]
    """

    def __init__(self, path: str | os.PathLike[str], *, resume_from_step: int | None = None):
        self.path = _file_in(path, METRICS_FILE)
        self._stream = _open_for_append("JsonlLogger", self.path, resume_from_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Appends ``{"step": step, **metrics}`` (NaN and inf as null; a `step` key in `metrics` is ignored) and flushes."""
        step = _checks.integer("JsonlLogger.log", "step", step, minimum=0)
        record = {"step": step, **{name: _json_number(value) for name, value in metrics.items() if name != "step"}}
        _write_line(self._stream, record)

    def close(self) -> None:
        """Closes the file."""
        self._stream.close()


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, float]]:
    """The records of a run's metrics.jsonl, in file order, with null read back as NaN.

    Args:
      run_dir: a run's output directory, or the metrics file itself.

    Returns:
      One dict per logged step (``step`` an int, every other value a float).
    """
    path = _file_in(run_dir, METRICS_FILE)
    return [
        {name: math.nan if value is None else value for name, value in record.items()}
        for _, record in _json_records(path)
    ]


class TensorBoardLogger:
    """Writes every metric as a TensorBoard scalar under its own name (tensorboardX event files).

    Args:
      log_dir: directory of the event files (created if missing).
      resume_from_step: the step restored from a checkpoint: TensorBoard hides the events of later steps that
        an interrupted run wrote to the same directory.
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, resume_from_step: int | None = None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as error:
            raise ImportError(
                'TensorBoardLogger needs tensorboardX; install it with `pip install "mojax[tensorboard]"`.'
            ) from error
        purge_step = None
        if resume_from_step is not None:
            purge_step = _checks.integer("TensorBoardLogger", "resume_from_step", resume_from_step, minimum=0) + 1
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(logdir=str(self.log_dir), purge_step=purge_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Adds one scalar per metric at `step` and flushes."""
        step = _checks.integer("TensorBoardLogger.log", "step", step, minimum=0)
        for name, value in metrics.items():
            if name != "step":
                self._writer.add_scalar(name, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file."""
        self._writer.close()


class CompositeLogger:
    """Forwards each step's metrics to every logger it holds, in order.

    Args:
      *loggers: ``MetricLogger`` instances (``JsonlLogger``, ``TensorBoardLogger``, ``ProgressBar``, your own).
    """

    def __init__(self, *loggers: MetricLogger):
        for i, logger in enumerate(loggers):
            if not isinstance(logger, MetricLogger):
                raise TypeError(
                    _checks.message(
                        "CompositeLogger", f"loggers[{i}]", f"is a {type(logger).__name__}", "a MetricLogger"
                    )
                )
        self.loggers = loggers

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Calls ``log(step, metrics)`` on every logger."""
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        """Closes every logger."""
        for logger in self.loggers:
            logger.close()


class SamplesLogger:
    """Appends a few decoded completions per step to a run's samples.jsonl.

    Each line is ``{"step", "prompt", "completion", "rewards": {name: value}}`` with NaN rewards (not
    applicable) written as null.

    Args:
      path: the file to write, or an existing run directory (the file is then ``path / "samples.jsonl"``).
      max_samples: how many of each step's completions to keep (the first ones of the batch).
      resume_from_step: as for ``JsonlLogger``.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, max_samples: int = 4, resume_from_step: int | None = None
    ) -> None:
        self.path = _file_in(path, SAMPLES_FILE)
        self.max_samples = _checks.integer("SamplesLogger", "max_samples", max_samples, minimum=1)
        self._stream = _open_for_append("SamplesLogger", self.path, resume_from_step)

    def log(
        self,
        step: int,
        prompts: Sequence[str],
        completions: Sequence[str],
        rewards: Mapping[str, Sequence[float]],
    ) -> None:
        """Writes one line per sample for the first `max_samples` samples of the batch.

        Args:
          step: the finished step the samples were drawn in.
          prompts: B decoded prompts.
          completions: B decoded completions.
          rewards: objective name -> B reward values.
        """
        where = "SamplesLogger.log"
        step = _checks.integer(where, "step", step, minimum=0)
        if len(prompts) != len(completions):
            raise ValueError(
                _checks.message(
                    where, "completions", f"has {len(completions)} entries", f"{len(prompts)}, one per prompt"
                )
            )
        for name, values in rewards.items():
            if len(values) != len(prompts):
                raise ValueError(
                    _checks.message(where, f"rewards[{name!r}]", f"has {len(values)} entries", f"{len(prompts)}")
                )
        for i in range(min(self.max_samples, len(prompts))):
            _write_line(
                self._stream,
                {
                    "step": step,
                    "prompt": prompts[i],
                    "completion": completions[i],
                    "rewards": {name: _json_number(values[i]) for name, values in rewards.items()},
                },
            )

    def close(self) -> None:
        """Closes the file."""
        self._stream.close()


def reward_postfix(metrics: Mapping[str, float], objective_names: Sequence[str]) -> dict[str, str]:
    """{name: mean reward with 3 decimals} for the objectives whose ``rewards/{name}/mean`` is in `metrics`."""
    return {
        name: f"{float(metrics[key]):.3f}" for name in objective_names if (key := f"rewards/{name}/mean") in metrics
    }


class ProgressBar:
    """A tqdm bar over the training steps whose postfix shows each objective's mean reward; a ``MetricLogger``.

    Args:
      total_steps: the step the run ends at.
      initial_step: the step it starts from (0, or the step restored from a checkpoint).
      objective_names: the objectives whose ``rewards/{name}/mean`` the postfix shows.
      disable: True hides the bar, False shows it, None (default) shows it only when stderr is a terminal.
      file: the stream to draw on (default stderr).
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int,
        objective_names: Sequence[str],
        *,
        disable: bool | None = None,
        file: Any = None,
    ) -> None:
        from tqdm import tqdm

        where = "ProgressBar"
        total_steps = _checks.integer(where, "total_steps", total_steps, minimum=0)
        initial_step = _checks.integer(where, "initial_step", initial_step, minimum=0)
        self.objective_names = _checks.names(where, "objective_names", objective_names)
        stream = sys.stderr if file is None else file
        if disable is None:
            disable = not (hasattr(stream, "isatty") and stream.isatty())
        self._bar = tqdm(total=total_steps, initial=initial_step, disable=disable, file=stream, unit="step")

    @property
    def disabled(self) -> bool:
        """Whether the bar is hidden."""
        return bool(self._bar.disable)

    @property
    def postfix(self) -> str:
        """The postfix text the bar shows now."""
        return self._bar.postfix or ""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Moves the bar to `step` and shows the step's mean rewards."""
        step = _checks.integer("ProgressBar.log", "step", step, minimum=0)
        self._bar.set_postfix(reward_postfix(metrics, self.objective_names), refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()
