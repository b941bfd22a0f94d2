"""Experiment 3: the Lagrange multiplier of PPO-Lagrangian (Safe RLHF) collapses when its constraint already holds,
and the constrained objective is then left to the other rewards' pull; GAPO keeps weighting it.

Claims: Li et al., "Gradient-Adaptive Policy Optimization: Towards Multi-Objective Alignment of Large Language
Models", ACL 2025, arXiv 2507.01915, argue that Safe RLHF's PPO-Lagrangian (Dai et al., "Safe RLHF: Safe
Reinforcement Learning from Human Feedback", ICLR 2024, arXiv 2310.12773) is unstable and can drive a constrained
objective's multiplier to zero. In mojax's Lagrangian (Safe RLHF's update on log lambda) the multiplier follows
log lambda += lambda_lr * (threshold - J) * lambda, so with J above the threshold it can only shrink.

The config constrains one objective (``constrained``) with a threshold it already meets at step 1. Per run this
records ``lagrangian/lambda/{constrained}``, every objective's batch-mean reward and the combiner's weight of the
constrained objective; it reports the final and smallest multiplier, the constrained objective's start (mean of
the first 5 steps) and final value (mean of the last 10), the share of steps below the threshold, the weight the
combiner gives it at the end, and the other objectives' final rewards.

    PYTHONPATH=$PWD python experiments/03_lagrangian_collapse/run.py          # full: 3 methods x 3 seeds x 60 steps
    PYTHONPATH=$PWD python experiments/03_lagrangian_collapse/run.py --quick  # 1 seed, 2 steps, temp folder
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

START_STEPS = 5
FINAL_STEPS = 10


def summarize_run(history: Sequence[dict], names: Sequence[str], constrained: str, threshold: float) -> dict:
    """Per-run statistics of the module docstring, plus the per-step series for the plots."""
    rewards = {name: shared.series(history, f"rewards/{name}/mean") for name in names}
    multiplier = shared.series(history, f"lagrangian/lambda/{constrained}")
    weights = np.stack([shared.series(history, f"combiner/weight/{name}") for name in names], axis=1)
    share = weights[:, names.index(constrained)] / weights.sum(axis=1)
    target = rewards[constrained]
    has_multiplier = bool(np.isfinite(multiplier).any())
    return {
        "lambda_final": float(multiplier[-1]) if has_multiplier else None,
        "lambda_min": float(np.nanmin(multiplier)) if has_multiplier else None,
        "constrained_start": float(target[:START_STEPS].mean()),
        "constrained_final": float(target[-FINAL_STEPS:].mean()),
        "steps_below_threshold": float(np.mean(target < threshold)),
        "constrained_weight_share_final": float(share[-1]),
        "final_rewards": {name: float(values[-FINAL_STEPS:].mean()) for name, values in rewards.items()},
        "seconds_per_step": shared.median_step_time(history),
        "series": {
            "lambda": multiplier.tolist(),
            "rewards": {name: values.tolist() for name, values in rewards.items()},
            "constrained_weight_share": share.tolist(),
        },
    }


SCALARS = (
    "lambda_final",
    "lambda_min",
    "constrained_start",
    "constrained_final",
    "steps_below_threshold",
    "constrained_weight_share_final",
    "seconds_per_step",
)


def aggregate(runs: Sequence[dict], names: Sequence[str]) -> dict:
    """Mean and spread over seeds (None for the multiplier of methods without one)."""
    summary = {
        key: (None if runs[0][key] is None else shared.mean_spread([run[key] for run in runs])) for key in SCALARS
    }
    summary["final_rewards"] = {
        name: shared.mean_spread([run["final_rewards"][name] for run in runs]) for name in names
    }
    return summary


def table(summaries: dict, names: Sequence[str], constrained: str) -> str:
    """Markdown table, one row per method, mean ± std over seeds."""
    others = [name for name in names if name != constrained]
    header = [
        "method",
        "final lambda",
        "min lambda",
        f"{constrained} start",
        f"{constrained} final",
        "steps below threshold",
        f"final weight share of {constrained}",
        *(f"final {name}" for name in others),
    ]
    rows = [
        [
            method,
            *("—" if summary[key] is None else shared.format_mean_spread(summary[key]) for key in SCALARS[:6]),
            *(shared.format_mean_spread(summary["final_rewards"][name]) for name in others),
        ]
        for method, summary in summaries.items()
    ]
    return shared.markdown_table(header, rows)


def plot(methods: dict, names: Sequence[str], constrained: str, threshold: float, path: Path, window: int) -> Path:
    """Three panels: the multiplier, the constrained objective (with its threshold), the weight share it receives."""
    plt = shared.pyplot()
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.6))
    for method, runs in methods.items():
        if runs[0]["lambda_final"] is not None:
            shared.plot_band(left, np.asarray([run["series"]["lambda"] for run in runs]), method)
        shared.plot_band(middle, np.asarray([run["series"]["rewards"][constrained] for run in runs]), method, window)
        shared.plot_band(right, np.asarray([run["series"]["constrained_weight_share"] for run in runs]), method)
    middle.axhline(threshold, color="k", linestyle="--", linewidth=0.8, label="threshold")
    left.set(title=f"lagrangian/lambda/{constrained}", xlabel="step")
    middle.set(title=f"{constrained} (batch mean, {window}-step avg.)", xlabel="step")
    right.set(title=f"combiner weight share of {constrained}", xlabel="step")
    for ax in (left, middle, right):
        ax.legend(fontsize=8)
    return shared.save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run every method on every seed; write results/lagrangian_collapse.json and the plot; print the table."""
    experiment = shared.setup(argv, __doc__, HERE)
    steps, seeds, folder = experiment.steps, experiment.seeds, experiment.folder
    constrained = experiment.config["constrained"]
    thresholds: list[float] = []

    def summarize(trainer, history):
        threshold = next(spec.threshold for spec in trainer.config.objectives if spec.name == constrained)
        thresholds.append(threshold)
        return summarize_run(history, trainer.names, constrained, threshold)

    methods, names = shared.run_grid(experiment, summarize)
    threshold = thresholds[-1]
    summaries = {method: aggregate(runs, names) for method, runs in methods.items()}
    results = {
        "claim": "the Lagrangian multiplier collapses when the constraint already holds; GAPO keeps the objective",
        "steps": steps,
        "seeds": list(seeds),
        "constrained": constrained,
        "threshold": threshold,
        "objectives": list(names),
        "summary": summaries,
        "methods": methods,
    }
    path = shared.write_json(folder / "results" / "lagrangian_collapse.json", results)
    png = plot(methods, names, constrained, threshold, folder / "lagrangian_collapse.png", min(5, steps))
    print(table(summaries, names, constrained))
    print(f"wrote {path} and {png}")
    return results


if __name__ == "__main__":
    main()
