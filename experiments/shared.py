"""Helpers shared by the experiments: the tiny-task config, a run loop that keeps every step's metrics, statistics
over seeds, JSON output and the command line (``--quick`` / ``--out``).

Every experiment builds :class:`mojax.rl.trainer.Trainer` objects in one process and steps them with
``train_step`` (no checkpoints, no loggers), so a run costs its steps plus one trace of the update. Runs whose
programs are identical (same method, another seed) load the update from JAX's persistent compilation cache; the
cache directory is the one the test suite uses, so running an experiment also warms the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mojax.compilation_cache import enable_persistent_cache

QUIET = (
    "eval_steps=0",
    "logging.tensorboard=false",
    "logging.progress=false",
    "export=false",
)
"""Overrides that switch off evaluation, TensorBoard, the progress bar and the export."""


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """``--quick`` (1 seed, 2 steps, a temporary output folder), ``--out``, ``--config`` and ``--set KEY=VALUE``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 2 steps, the config's quick_methods, results in a temp folder"
    )
    parser.add_argument("--out", default=None, help="where results/ and the plots go (default: beside run.py)")
    parser.add_argument("--config", default=None, help="the experiment's YAML (default: config.yaml beside run.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra trainer overrides")
    return parser.parse_args(argv)


def output_folder(args: argparse.Namespace, here: Path) -> Path:
    """The folder receiving ``results/`` and the plots: ``--out``, a fresh temp folder in quick mode, else `here`."""
    if args.out is not None:
        return Path(args.out)
    return Path(tempfile.mkdtemp(prefix="mojax-experiment-")) if args.quick else here


def read_config(path: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """An experiment's YAML: ``steps``, ``seeds``, ``base`` (dotted key -> value) and ``methods`` (name -> dotted
    key -> value); `extra` ``key=value`` overrides (``--set``) are appended to ``base``."""
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    config["base"] = [*as_overrides(config.get("base") or {}), *extra]
    config["methods"] = {name: as_overrides(entries or {}) for name, entries in config["methods"].items()}
    return config


def base_model_path(config: Mapping[str, Any]) -> str:
    """The ``model.path`` that a read config's ``base`` overrides set: the last one, or the tiny model without any."""
    paths = [entry.split("=", 1)[1] for entry in config["base"] if entry.startswith("model.path=")]
    return paths[-1] if paths else "tiny"


def as_overrides(entries: Mapping[str, Any]) -> list[str]:
    """``key=value`` overrides of a mapping from dotted keys to values."""
    return [f"{key}={_yaml_scalar(value)}" for key, value in entries.items()]


def _yaml_scalar(value: Any) -> str:
    """A value written as the one-line YAML that ``load_config`` parses back (flow style for lists and maps)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def make_trainer(overrides: Sequence[str], *, seed: int, steps: int, output_dir: Path):
    """A Trainer on the built-in tiny config with `overrides`, seeded by `seed` (sampling, init and prompt order)."""
    from mojax.rl.config import load_config
    from mojax.rl.trainer import Trainer

    config = load_config(
        "tiny",
        [
            f"output_dir={output_dir}",
            f"steps={steps}",
            f"seed={seed}",
            f"model.init_seed={seed}",
            f"data.seed={seed}",
            *QUIET,
            *overrides,
        ],
    )
    return Trainer(config)


def run_steps(trainer: Any, steps: int) -> list[dict[str, float]]:
    """Step `trainer` `steps` times; every step's metrics plus ``wall_time`` (seconds of the whole step)."""
    history = []
    for _ in range(steps):
        started = time.perf_counter()
        metrics = dict(trainer.train_step())
        metrics["wall_time"] = time.perf_counter() - started
        history.append(metrics)
    return history


def series(history: Sequence[Mapping[str, float]], key: str) -> np.ndarray:
    """f64[steps]: one metric over the steps of a run (NaN where a step did not log it)."""
    return np.asarray([row.get(key, math.nan) for row in history], np.float64)


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std", "n"} of per-seed values (population std; 0 for one seed)."""
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "n": int(array.size)}


def format_mean_spread(stats: Mapping[str, float], digits: int = 3) -> str:
    """ "mean ± std" of :func:`mean_spread`."""
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def median_step_time(history: Sequence[Mapping[str, float]]) -> float:
    """Median wall time of the steps after the first (the first one compiles)."""
    times = series(history, "wall_time")
    return float(np.median(times[1:] if times.size > 1 else times))


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` as indented JSON (NaN written as null), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite_or_none(payload), indent=2) + "\n")
    return path


def _finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, recursively (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


FINAL_SCALARS = ("final_average", "final_minimum", "seconds_per_step")


def final_rewards_summary(history: Sequence[Mapping[str, float]], names: Sequence[str], final_steps: int) -> dict:
    """One run's final rewards (batch means over its last `final_steps` steps), their average and minimum, its
    median step time, and the per-step rewards f32[steps, n] (as lists, under ``series.rewards``)."""
    rewards = np.stack([series(history, f"rewards/{name}/mean") for name in names], axis=1)
    final = rewards[-final_steps:].mean(axis=0)
    return {
        "final_rewards": dict(zip(names, final.tolist(), strict=True)),
        "final_average": float(final.mean()),
        "final_minimum": float(final.min()),
        "seconds_per_step": median_step_time(history),
        "series": {"rewards": rewards.tolist()},
    }


def aggregate_final_rewards(runs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict:
    """Mean and spread over seeds of :func:`final_rewards_summary`'s scalars and final rewards."""
    summary = {key: mean_spread([run[key] for run in runs]) for key in FINAL_SCALARS}
    summary["final_rewards"] = {name: mean_spread([run["final_rewards"][name] for run in runs]) for name in names}
    return summary


def final_rewards_table(summaries: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
    """Markdown table of :func:`aggregate_final_rewards` per method, mean ± std over seeds."""
    header = ["method", *(f"final {name}" for name in names), "average", "worst objective", "s / step"]
    rows = [
        [
            method,
            *(format_mean_spread(summary["final_rewards"][name]) for name in names),
            format_mean_spread(summary["final_average"]),
            format_mean_spread(summary["final_minimum"]),
            format_mean_spread(summary["seconds_per_step"], 2),
        ]
        for method, summary in summaries.items()
    ]
    return markdown_table(header, rows)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> Path:
    """Lay out ``figure``, write it to ``path`` (PNG, 110 dpi), close it and return the path."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` entries of the last axis (fewer at the start), NaN-free input."""
    values = np.asarray(values, np.float64)
    cumulative = np.cumsum(values, axis=-1)
    shifted = np.concatenate([np.zeros_like(cumulative[..., :window]), cumulative[..., :-window]], axis=-1)
    counts = np.minimum(np.arange(1, values.shape[-1] + 1), window)
    return (cumulative - shifted[..., : values.shape[-1]]) / counts


def plot_band(ax: Any, per_seed: np.ndarray, label: str, window: int = 1) -> None:
    """Mean over seeds (rows of f[seeds, steps]) as a line, +- one std as a band, after a trailing moving average."""
    smoothed = moving_average(per_seed, window) if window > 1 else np.asarray(per_seed, np.float64)
    steps = np.arange(1, smoothed.shape[-1] + 1)
    mean, std = smoothed.mean(axis=0), smoothed.std(axis=0)
    (line,) = ax.plot(steps, mean, label=label)
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)


class Setup(NamedTuple):
    """What a run.py needs from its command line: the experiment's config, the seeds and steps, the output folder,
    and whether this is the quick mode."""

    config: dict[str, Any]
    seeds: list[int]
    steps: int
    folder: Path
    quick: bool = False


def setup(argv: Sequence[str] | None, description: str, here: Path) -> Setup:
    """Parse the command line, enable the compilation cache and read the config (in quick mode: the first seed,
    ``quick_steps`` steps and, when the config lists them, only the ``quick_methods``).

    Run as the program (``argv`` None), it then makes ``malloc`` keep freed memory for XLA's next call, as the
    ``mojax`` command line does, unless the base config's ``model.path`` is a small model such as the tiny one
    (:func:`mojax.rl.trainer.keep_freed_host_memory_for_policy`; ``MOJAX_RELEASE_HOST_MEMORY=1`` keeps glibc's
    defaults); in-process calls with an argument list leave the process alone.
    """
    args = parse_args(argv, description)
    config = read_config(Path(args.config) if args.config else here / "config.yaml", args.set)
    if argv is None:
        from mojax.rl.trainer import keep_freed_host_memory_for_policy

        keep_freed_host_memory_for_policy(base_model_path(config))
    enable_persistent_cache()
    if args.quick and "quick_methods" in config:
        config["methods"] = {name: config["methods"][name] for name in config["quick_methods"]}
    seeds = list(config["seeds"][:1] if args.quick else config["seeds"])
    steps = config["quick_steps"] if args.quick else config["steps"]
    return Setup(config, seeds, steps, output_folder(args, here), args.quick)


def run_grid(
    setup: Setup, summarize: Callable[[Any, list[dict[str, float]]], dict]
) -> tuple[dict[str, list[dict]], tuple[str, ...]]:
    """Run every method of the config on every seed; ({method: [{"seed", **summarize(trainer, history)}]}, names)."""
    methods: dict[str, list[dict]] = {}
    names: tuple[str, ...] = ()
    for method, overrides in setup.config["methods"].items():
        for seed in setup.seeds:
            trainer = make_trainer(
                [*setup.config["base"], *overrides], seed=seed, steps=setup.steps, output_dir=Path(tempfile.mkdtemp())
            )
            names = trainer.names
            history = run_steps(trainer, setup.steps)
            trainer.close()
            methods.setdefault(method, []).append({"seed": seed, **summarize(trainer, history)})
    return methods, names
