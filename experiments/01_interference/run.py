"""Experiment 1: how often static (linear) weights let an objective degrade, and whether CTWA lowers interference.

Claim (Lu & Jiang, "Uncovering Cross-Objective Interference in Multi-Objective Alignment", arXiv 2602.06869, 2026):
under static scalarisation at least one objective degrades in a large share of steps, and CTWA reduces the
Interference Index II = mean_j E_x[max(0, -Cov_{y|x}(r_j, w))].

Per run this records, every step, each objective's batch-mean reward and the trainer's ``interference/index``; it
reports the fraction of steps in which some objective's mean reward fell below the previous step's (raw), the same
on block means of ``smoothing_window`` steps (smoothed: a batch of 16 completions is noisy, so a raw drop is often
sampling noise), the share of steps in which some mean fell by more than 2 standard errors of the difference
(significant), the mean Interference Index (also divided by sum_j lambda_j, since the signal w scales with the
weights), the mean share of prompts with a negative covariance, the final
rewards (mean of the last 10 steps) and the median wall time per step.

    PYTHONPATH=$PWD python experiments/01_interference/run.py          # full: 3 methods x 3 seeds x 60 steps
    PYTHONPATH=$PWD python experiments/01_interference/run.py --quick  # 1 seed, 2 steps, temp folder
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

from experiments import shared  # noqa: E402

FINAL_STEPS = 10
"""The final rewards are the mean batch rewards of this many last steps."""
SIGNIFICANCE_Z = 2.0
"""A significant drop: the batch mean fell by more than this many standard errors of the difference."""


def any_drop_fraction(means: np.ndarray) -> float:
    """Share of consecutive pairs (t-1, t) of rows of f[T, n] in which some column decreased (NaN when T < 2)."""
    if means.shape[0] < 2:
        return float("nan")
    return float(np.mean(np.any(np.diff(means, axis=0) < 0, axis=1)))


def significant_drop_fraction(means: np.ndarray, stds: np.ndarray, batch: int, z: float) -> float:
    """Share of consecutive steps in which some objective's mean fell by more than `z` standard errors.

    The standard error of the difference of two batch means is sqrt((s_{t-1}^2 + s_t^2) / batch), s the per-step
    standard deviation of the rewards (f[T, n] like `means`).
    """
    if means.shape[0] < 2:
        return float("nan")
    error = np.sqrt((stds[1:] ** 2 + stds[:-1] ** 2) / batch)
    return float(np.mean(np.any(np.diff(means, axis=0) < -z * error, axis=1)))


def block_means(means: np.ndarray, block: int) -> np.ndarray:
    """f[T // block, n]: means over consecutive blocks of `block` rows (a trailing partial block is dropped)."""
    count = means.shape[0] // block
    return means[: count * block].reshape(count, block, means.shape[1]).mean(axis=1)


def summarize_run(history: Sequence[dict], names: Sequence[str], block: int, batch: int) -> dict:
    """The per-run statistics described in the module docstring, plus the per-step series for the plots."""
    rewards = np.stack([shared.series(history, f"rewards/{name}/mean") for name in names], axis=1)
    stds = np.stack([shared.series(history, f"rewards/{name}/std") for name in names], axis=1)
    index = shared.series(history, "interference/index")
    frac_neg = np.stack([shared.series(history, f"interference/frac_neg/{name}") for name in names], axis=1)
    weights = np.stack([shared.series(history, f"combiner/weight/{name}") for name in names], axis=1)
    return {
        "drop_fraction_raw": any_drop_fraction(rewards),
        "drop_fraction_smoothed": any_drop_fraction(block_means(rewards, block)),
        "drop_fraction_significant": significant_drop_fraction(rewards, stds, batch, SIGNIFICANCE_Z),
        "noise_baseline": 1.0 - 0.5 ** len(names),
        "interference_index": float(np.mean(index)),
        "interference_index_per_weight": float(np.mean(index / weights.sum(axis=1))),
        "frac_neg": float(np.mean(frac_neg)),
        "final_rewards": dict(zip(names, rewards[-FINAL_STEPS:].mean(axis=0).tolist(), strict=True)),
        "seconds_per_step": shared.median_step_time(history),
        "series": {
            "rewards": rewards.tolist(),
            "interference_index": index.tolist(),
            "weights": weights.tolist(),
        },
    }


SCALARS = (
    "drop_fraction_raw",
    "drop_fraction_smoothed",
    "drop_fraction_significant",
    "interference_index",
    "interference_index_per_weight",
    "frac_neg",
    "seconds_per_step",
)


def aggregate(runs: Sequence[dict], names: Sequence[str]) -> dict:
    """Mean and spread over seeds of every scalar and of each final reward."""
    summary = {key: shared.mean_spread([run[key] for run in runs]) for key in SCALARS}
    summary["final_rewards"] = {
        name: shared.mean_spread([run["final_rewards"][name] for run in runs]) for name in names
    }
    summary["final_reward_average"] = shared.mean_spread(
        [np.mean([run["final_rewards"][name] for name in names]) for run in runs]
    )
    return summary


def table(summaries: dict, names: Sequence[str]) -> str:
    """Markdown table, one row per method, mean ± std over seeds."""
    header = [
        "method",
        "steps with a drop (raw)",
        "blocks with a drop (smoothed)",
        f"steps with a drop > {SIGNIFICANCE_Z:g} s.e.",
        "II",
        "II / sum(lambda)",
        "frac. neg. cov",
        *(f"final {name}" for name in names),
        "s / step",
    ]
    rows = []
    for method, summary in summaries.items():
        rows.append(
            [
                method,
                *(
                    shared.format_mean_spread(summary[key], 4 if key.startswith("interference") else 3)
                    for key in SCALARS[:6]
                ),
                *(shared.format_mean_spread(summary["final_rewards"][name]) for name in names),
                shared.format_mean_spread(summary["seconds_per_step"], 2),
            ]
        )
    return shared.markdown_table(header, rows)


def plot(results: dict, names: Sequence[str], folder: Path, window: int) -> list[Path]:
    """rewards.png (each objective over steps, per method) and interference.png (II and CTWA's weights)."""
    plt = shared.pyplot()
    methods = results["methods"]
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4))
    for index, (ax, name) in enumerate(zip(np.atleast_1d(axes), names, strict=True)):
        for method, runs in methods.items():
            per_seed = np.asarray([run["series"]["rewards"] for run in runs])[:, :, index]
            shared.plot_band(ax, per_seed, method, window)
        ax.set(title=f"{name} (batch mean, {window}-step avg.)", xlabel="step")
    np.atleast_1d(axes)[0].legend()
    figure.tight_layout()
    rewards_png = folder / "rewards.png"
    figure.savefig(rewards_png, dpi=110)
    plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, runs in methods.items():
        shared.plot_band(left, np.asarray([run["series"]["interference_index"] for run in runs]), method, window)
        weights = np.asarray([run["series"]["weights"] for run in runs])
        if method != "linear":
            for index, name in enumerate(names):
                right.plot(
                    np.arange(1, weights.shape[1] + 1), weights[:, :, index].mean(axis=0), label=f"{method}: {name}"
                )
    left.set(title=f"Interference Index ({window}-step avg.)", xlabel="step")
    right.set(title="CTWA weights lambda_j (mean over seeds)", xlabel="step", yscale="log")
    left.legend()
    right.legend(fontsize=7)
    figure.tight_layout()
    interference_png = folder / "interference.png"
    figure.savefig(interference_png, dpi=110)
    plt.close(figure)
    return [rewards_png, interference_png]


def main(argv: Sequence[str] | None = None) -> dict:
    """Run every method on every seed; write results/interference.json and the plots; print the table."""
    experiment = shared.setup(argv, __doc__, HERE)
    steps, seeds, folder = experiment.steps, experiment.seeds, experiment.folder
    block = min(experiment.config["smoothing_window"], steps)

    def summarize(trainer, history):
        batch = trainer.config.data.prompts_per_step * trainer.config.rollout.num_generations
        return summarize_run(history, trainer.names, block, batch)

    methods, names = shared.run_grid(experiment, summarize)
    summaries = {method: aggregate(runs, names) for method, runs in methods.items()}
    results = {
        "claim": "static weights: some objective degrades in > 30% of steps; CTWA lowers the Interference Index",
        "steps": steps,
        "seeds": list(seeds),
        "smoothing_window": block,
        "noise_baseline": "1 - 2^-n: the share of steps with some drop if the n batch means were i.i.d. noise",
        "objectives": list(names),
        "summary": summaries,
        "methods": methods,
    }
    path = shared.write_json(folder / "results" / "interference.json", results)
    plots = plot(results, names, folder, min(5, steps))
    print(table(summaries, names))
    print(f"wrote {path} and {', '.join(str(p) for p in plots)}")
    return results


if __name__ == "__main__":
    main()
