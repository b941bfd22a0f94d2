"""`mojax plot`: PNG figures of one or several runs, read from their metrics.jsonl.

Each figure needs some metric keys (the names the trainer logs); a figure whose keys no run logged is
skipped and the skip is reported through the ``mojax.plots`` logger at INFO level:

    rewards.png            rewards/{name}/mean (eval/rewards/{name}/mean dashed): one panel per objective, one line per run
    combiner_weights.png   combiner/weight/{name}: one panel per run, one line per objective
    interference.png       interference/cov/{name} and interference/frac_neg/{name} as objectives x steps
                           heatmaps, and the interference/index curve: one row per run
    gradient_cosine.png    combiner/cos/{a}/{b}: the objectives' gradient-cosine matrix averaged over the last
                           `last_steps` logged steps, one panel per run
    kl.png                 kl: one line per run
    pareto.png             (two runs or more) each run's final per-objective rewards: a scatter with the
                           non-dominated front for two objectives, a pairwise grid for more

The final reward of an objective is its last finite ``eval/rewards/{name}/mean`` when every run has
one for every objective, else its last finite ``rewards/{name}/mean``. Figures are drawn with
matplotlib's object API and the Agg canvas, so no global backend is set and no window opens.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mojax import _checks
from mojax.pareto import non_dominated
from mojax.rl.logging import read_metrics

logger = logging.getLogger(__name__)

_NAME = r"([A-Za-z0-9_-]+)"
REWARD_KEY = re.compile(rf"rewards/{_NAME}/mean")
EVAL_REWARD_KEY = re.compile(rf"eval/rewards/{_NAME}/mean")
WEIGHT_KEY = re.compile(rf"combiner/weight/{_NAME}")
COSINE_KEY = re.compile(rf"combiner/cos/{_NAME}/{_NAME}")
COV_KEY = re.compile(rf"interference/cov/{_NAME}")
FRAC_NEG_KEY = re.compile(rf"interference/frac_neg/{_NAME}")


class Run(NamedTuple):
    """A run's label and its metrics records (one dict per logged step)."""

    name: str
    records: list[dict[str, float]]


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Each run directory's name, or its full path when two runs share a name."""
    names = [path.resolve().name for path in run_dirs]
    return names if len(set(names)) == len(names) else [str(path) for path in run_dirs]


def _matches(runs: Sequence[Run], pattern: re.Pattern[str]) -> list[tuple[str, ...]]:
    """The capture groups of every key matching `pattern` in any run, in order of first appearance."""
    found: dict[tuple[str, ...], None] = {}
    for run in runs:
        for record in run.records:
            for key in record:
                if match := pattern.fullmatch(key):
                    found.setdefault(match.groups())
    return list(found)


def _names(runs: Sequence[Run], pattern: re.Pattern[str]) -> list[str]:
    """The objective names captured by the one-group `pattern`, in order of first appearance."""
    return [groups[0] for groups in _matches(runs, pattern)]


def _series(records: Sequence[dict[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps f64[s], values f64[s]) of the records that hold `key` (NaN where it was logged as null)."""
    rows = [(record["step"], record[key]) for record in records if key in record]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*rows, strict=True)
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def _has(run: Run, pattern: re.Pattern[str] | str) -> bool:
    """Whether any record of the run holds a key equal to (str) or matching (pattern) `pattern`."""
    if isinstance(pattern, str):
        return any(pattern in record for record in run.records)
    return any(pattern.fullmatch(key) for record in run.records for key in record)


def _last_finite(records: Sequence[dict[str, float]], key: str) -> float:
    """The last finite value logged under `key`, NaN when there is none."""
    _, values = _series(records, key)
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else float("nan")


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """f64[s + 1] cell edges around the logged steps (midpoints inside, half a gap outside)."""
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def _grid(count: int, max_columns: int = 3) -> tuple[int, int]:
    """(rows, columns) of a grid holding `count` panels."""
    columns = min(count, max_columns)
    return -(-count // columns), columns


def _figure(rows: int, columns: int, panel_size: tuple[float, float] = (4.0, 3.0)) -> tuple[Any, np.ndarray]:
    """A constrained-layout matplotlib Figure and its axes as an object array of shape (rows, columns)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError('mojax plots need matplotlib; install it with `pip install "mojax[plot]"`.') from error
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def _hide_unused(axes: np.ndarray, used: int) -> None:
    """Turns off the panels after the first `used` (row-major)."""
    for ax in axes.flat[used:]:
        ax.set_axis_off()


def plot_rewards(runs: Sequence[Run]) -> Any | None:
    """One panel per objective, one line per run (training mean solid, evaluation mean dashed)."""
    objectives = list(dict.fromkeys(_names(runs, REWARD_KEY) + _names(runs, EVAL_REWARD_KEY)))
    if not objectives:
        return None
    figure, axes = _figure(*_grid(len(objectives)))
    for ax, objective in zip(axes.flat, objectives, strict=False):
        for color, run in enumerate(runs):
            for key, style, suffix in (
                (f"rewards/{objective}/mean", "-", ""),
                (f"eval/rewards/{objective}/mean", "--", " (eval)"),
            ):
                steps, values = _series(run.records, key)
                if steps.size:
                    ax.plot(steps, values, style, color=f"C{color}", label=run.name + suffix)
        ax.set(title=objective, xlabel="step", ylabel="mean reward")
        ax.legend(fontsize="small")
    _hide_unused(axes, len(objectives))
    return figure


def plot_combiner_weights(runs: Sequence[Run]) -> Any | None:
    """One panel per run that logged combiner weights, one line per objective."""
    weighted = [run for run in runs if _has(run, WEIGHT_KEY)]
    if not weighted:
        return None
    figure, axes = _figure(*_grid(len(weighted)))
    for ax, run in zip(axes.flat, weighted, strict=False):
        for objective in _names([run], WEIGHT_KEY):
            ax.plot(*_series(run.records, f"combiner/weight/{objective}"), label=objective)
        ax.set(title=run.name, xlabel="step", ylabel="combiner weight")
        ax.legend(fontsize="small")
    _hide_unused(axes, len(weighted))
    return figure


def _heatmap(figure: Any, ax: Any, run: Run, *, family: str, objectives: Sequence[str], diverging: bool) -> None:
    """Objectives x steps colour map of the keys ``{family}/{name}``, NaN cells blank; diverging maps centre on 0."""
    keys = [f"{family}/{name}" for name in objectives]
    steps = np.asarray(sorted({record["step"] for record in run.records if any(key in record for key in keys)}), float)
    if not steps.size:
        ax.set_axis_off()
        ax.set_title(f"{run.name}: no {family}")
        return
    column = {step: i for i, step in enumerate(steps)}
    matrix = np.full((len(keys), steps.size), np.nan)
    for row, key in enumerate(keys):
        for step, value in zip(*_series(run.records, key), strict=True):
            matrix[row, column[step]] = value
    if diverging:
        largest = np.nanmax(np.abs(matrix), initial=0.0)
        bound = float(largest) if largest > 0 else 1.0
        style = {"cmap": "RdBu", "vmin": -bound, "vmax": bound}
    else:
        style = {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0}
    mesh = ax.pcolormesh(_step_edges(steps), np.arange(len(keys) + 1), np.ma.masked_invalid(matrix), **style)
    ax.set_yticks(np.arange(len(keys)) + 0.5, objectives)
    ax.set(title=f"{run.name}: {family}", xlabel="step")
    figure.colorbar(mesh, ax=ax)


def plot_interference(runs: Sequence[Run]) -> Any | None:
    """Per run: heatmaps of interference/cov and interference/frac_neg (objectives x steps) and the index curve."""
    panels: list[Callable[[Any, Any, Run], None]] = []
    if cov_names := _names(runs, COV_KEY):
        panels.append(functools.partial(_heatmap, family="interference/cov", objectives=cov_names, diverging=True))
    if frac_names := _names(runs, FRAC_NEG_KEY):
        panels.append(
            functools.partial(_heatmap, family="interference/frac_neg", objectives=frac_names, diverging=False)
        )
    if any(_has(run, "interference/index") for run in runs):
        panels.append(_index_curve)
    shown = [run for run in runs if _has(run, re.compile(r"interference/.+"))]
    if not panels:
        return None
    figure, axes = _figure(len(shown), len(panels))
    for row, run in zip(axes, shown, strict=True):
        for ax, draw in zip(row, panels, strict=True):
            draw(figure, ax, run)
    return figure


def _index_curve(figure: Any, ax: Any, run: Run) -> None:
    """The interference/index curve of one run."""
    del figure
    ax.plot(*_series(run.records, "interference/index"), color="C3")
    ax.set(title=f"{run.name}: interference index", xlabel="step")


def cosine_matrix(records: Sequence[dict[str, float]], last_steps: int) -> tuple[list[str], np.ndarray]:
    """The objectives and their gradient-cosine matrix f64[n, n], each entry the mean over the last `last_steps` records.

    Args:
      records: a run's metrics records.
      last_steps: how many of the last records holding ``combiner/cos/{a}/{b}`` keys to average (NaN ignored).

    Returns:
      (objective names in order of first appearance, symmetric matrix with ones on the diagonal; NaN where a
      pair was never logged).
    """
    pairs = _matches([Run("", list(records))], COSINE_KEY)
    objectives = list(dict.fromkeys(name for pair in pairs for name in pair))
    index = {name: i for i, name in enumerate(objectives)}
    recent = [record for record in records if any(f"combiner/cos/{a}/{b}" in record for a, b in pairs)][-last_steps:]
    matrix = np.full((len(objectives), len(objectives)), np.nan)
    np.fill_diagonal(matrix, 1.0)
    for a, b in pairs:
        values = np.asarray([record[f"combiner/cos/{a}/{b}"] for record in recent if f"combiner/cos/{a}/{b}" in record])
        finite = values[np.isfinite(values)]
        if finite.size:
            matrix[index[a], index[b]] = matrix[index[b], index[a]] = finite.mean()
    return objectives, matrix


def plot_gradient_cosine(runs: Sequence[Run], last_steps: int) -> Any | None:
    """One panel per run that logged gradient cosines: the cosine matrix averaged over its last steps."""
    logged = [run for run in runs if _has(run, COSINE_KEY)]
    if not logged:
        return None
    figure, axes = _figure(*_grid(len(logged)), panel_size=(4.0, 3.6))
    for ax, run in zip(axes.flat, logged, strict=False):
        objectives, matrix = cosine_matrix(run.records, last_steps)
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdBu", vmin=-1.0, vmax=1.0)
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                color = "white" if abs(value) > 0.6 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small", color=color)
        ticks = np.arange(len(objectives))
        ax.set_xticks(ticks, objectives, rotation=45, ha="right")
        ax.set_yticks(ticks, objectives)
        ax.set_title(run.name)
        figure.colorbar(image, ax=ax)
    _hide_unused(axes, len(logged))
    figure.suptitle(f"cosine of the objectives' gradients, mean of the last {last_steps} logged steps")
    return figure


def plot_kl(runs: Sequence[Run]) -> Any | None:
    """The KL to the reference policy over steps, one line per run."""
    logged = [run for run in runs if _has(run, "kl")]
    if not logged:
        return None
    figure, axes = _figure(1, 1, panel_size=(5.0, 3.5))
    ax = axes[0, 0]
    for run in logged:
        ax.plot(*_series(run.records, "kl"), label=run.name)
    ax.set(title="KL to the reference", xlabel="step", ylabel="kl")
    ax.legend(fontsize="small")
    return figure


_TRAIN_REWARD = "rewards/{}/mean"
_EVAL_REWARD = "eval/rewards/{}/mean"


def _common_objectives(runs: Sequence[Run], pattern: re.Pattern[str], template: str) -> list[str]:
    """The objectives matched by `pattern` that every run logged under `template`."""
    return [name for name in _names(runs, pattern) if all(_has(run, template.format(name)) for run in runs)]


def _final_table(runs: Sequence[Run], objectives: Sequence[str], template: str) -> np.ndarray:
    """f64[runs, objectives] of the last finite values of the keys `template`.format(objective)."""
    rows = [[_last_finite(run.records, template.format(name)) for name in objectives] for run in runs]
    return np.asarray(rows, np.float64).reshape(len(runs), len(objectives))


def final_rewards(runs: Sequence[Run]) -> tuple[list[str], np.ndarray]:
    """The objectives every run logged and each run's final reward on each (see the module docstring).

    Args:
      runs: the runs to compare.

    Returns:
      (objective names, f64[runs, objectives]): the last finite evaluation means when every run has all of
      them, else the last finite training means; NaN where a run never logged a finite value.
    """
    objectives = _common_objectives(runs, REWARD_KEY, _TRAIN_REWARD) or _common_objectives(
        runs, EVAL_REWARD_KEY, _EVAL_REWARD
    )
    evaluation = _final_table(runs, objectives, _EVAL_REWARD)
    if objectives and np.all(np.isfinite(evaluation)):
        return objectives, evaluation
    return objectives, _final_table(runs, objectives, _TRAIN_REWARD)


def _label_points(ax: Any, x: np.ndarray, y: np.ndarray, names: Sequence[str]) -> None:
    """Writes each run's name next to its point."""
    for xi, yi, name in zip(x, y, names, strict=True):
        ax.annotate(name, (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize="small")


def plot_pareto(runs: Sequence[Run]) -> Any | None:
    """Final per-objective rewards of two runs or more: scatter and front (2 objectives) or a pairwise grid."""
    if len(runs) < 2:
        return None
    objectives, values = final_rewards(runs)
    keep = np.all(np.isfinite(values), axis=1)
    if len(objectives) < 2 or keep.sum() < 2:
        return None
    values, names = values[keep], [run.name for run, kept in zip(runs, keep, strict=True) if kept]
    front = non_dominated(values)
    pairs = [(i, j) for j in range(len(objectives)) for i in range(j)]
    size = len(objectives) - 1
    figure, axes = _figure(size, size, panel_size=(4.0, 3.5))
    for i, j in pairs:
        ax = axes[j - 1, i]
        ax.scatter(values[front, i], values[front, j], color="C0", label="non-dominated")
        ax.scatter(values[~front, i], values[~front, j], facecolors="none", edgecolors="C0", label="dominated")
        if len(objectives) == 2:
            order = np.argsort(-values[front, i])
            ax.step(values[front, i][order], values[front, j][order], where="post", color="C1", label="front")
        _label_points(ax, values[:, i], values[:, j], names)
        ax.set(xlabel=objectives[i], ylabel=objectives[j])
    axes[0, 0].legend(fontsize="small")
    for row in range(size):
        for column in range(row + 1, size):
            axes[row, column].set_axis_off()
    figure.suptitle("final rewards (larger is better)")
    return figure


def default_out_dir(run_dirs: Sequence[str | os.PathLike[str]]) -> Path:
    """``RUN/plots`` for one run; ``<parent of the first run>/plots`` for several."""
    first = Path(run_dirs[0])
    return first / "plots" if len(run_dirs) == 1 else first.resolve().parent / "plots"


def plot_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    last_steps: int = 10,
) -> list[Path]:
    """Draws the figures of the module docstring for the runs in `run_dirs` and returns the PNG files written.

    Args:
      run_dirs: output directories of one or more runs, each holding a metrics.jsonl.
      out_dir: where the PNG files go (created if missing); default ``default_out_dir(run_dirs)``.
      last_steps: how many of the last logged steps the gradient-cosine matrix averages.

    Returns:
      The paths of the PNG files written, in the order of the module docstring; figures whose metric keys
      no run logged are skipped and named in an INFO message of the ``mojax.plots`` logger.

    Example:
      >>> import json, tempfile
      >>> from pathlib import Path
      >>> from mojax.plots import plot_runs
      >>> run = Path(tempfile.mkdtemp())
      >>> lines = [{"step": s, "rewards/helpful/mean": 0.1 * s, "kl": 0.01 * s} for s in (1, 2, 3)]
      >>> _ = (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\\n" for line in lines))
      >>> [path.name for path in plot_runs([run])]
      ['rewards.png', 'kl.png']
    """
    where = "plot_runs"
    if isinstance(run_dirs, str | os.PathLike):
        run_dirs = [run_dirs]
    run_dirs = [Path(path) for path in run_dirs]
    if not run_dirs:
        raise ValueError(_checks.message(where, "run_dirs", "is empty", "at least one run directory"))
    last_steps = _checks.integer(where, "last_steps", last_steps, minimum=1)
    runs = [Run(name, read_metrics(path)) for name, path in zip(_run_names(run_dirs), run_dirs, strict=True)]
    out_dir = default_out_dir(run_dirs) if out_dir is None else Path(out_dir)
    figures = {
        "rewards.png": (lambda: plot_rewards(runs), "rewards/{name}/mean"),
        "combiner_weights.png": (lambda: plot_combiner_weights(runs), "combiner/weight/{name}"),
        "interference.png": (lambda: plot_interference(runs), "interference/cov|frac_neg/{name} or interference/index"),
        "gradient_cosine.png": (lambda: plot_gradient_cosine(runs, last_steps), "combiner/cos/{a}/{b}"),
        "kl.png": (lambda: plot_kl(runs), "kl"),
        "pareto.png": (lambda: plot_pareto(runs), "two runs with final rewards/{name}/mean for two objectives or more"),
    }
    written = []
    for filename, (draw, needs) in figures.items():
        figure = draw()
        if figure is None:
            logger.info("plot_runs: skipped %s; it needs %s.", filename, needs)
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        figure.savefig(out_dir / filename, dpi=100)
        written.append(out_dir / filename)
    return written
