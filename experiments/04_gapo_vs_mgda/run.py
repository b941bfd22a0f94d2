"""Experiment 4: MGDA vs GAPO (p = 1, p = 2) vs linear scalarisation: final rewards and their average.

Claim (Li, Zhang, Xu, Xue, Ao, He, "Gradient-Adaptive Policy Optimization: Towards Multi-Objective Alignment of
Large Language Models", ACL 2025, arXiv 2507.01915): rescaling each objective's gradient by a power of its norm
before the min-norm (MGDA) step balances the objectives better than MGDA, whose direction is dominated by the
smallest gradient, and than fixed linear weights (MORLHF).

Per run this records every objective's batch-mean reward and the combiner's weights; it reports the final rewards
(mean of the last 10 steps), their average, the worst objective's final reward and the median wall time per step
(the Gram combiners run the trainer's probe mode, one backward per objective on the probe parameters).

    PYTHONPATH=$PWD python experiments/04_gapo_vs_mgda/run.py          # full: 4 methods x 3 seeds x 60 steps
    PYTHONPATH=$PWD python experiments/04_gapo_vs_mgda/run.py --quick  # 1 seed, 2 steps, temp folder
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


def summarize_run(history: Sequence[dict], names: Sequence[str]) -> dict:
    """Final rewards, their average and minimum, step time, and the per-step series (rewards, weights) for the plots."""
    summary = shared.final_rewards_summary(history, names, FINAL_STEPS)
    weights = np.stack([shared.series(history, f"combiner/weight/{name}") for name in names], axis=1)
    summary["series"]["weights"] = weights.tolist()
    return summary


def plot(methods: dict, names: Sequence[str], path: Path, window: int) -> Path:
    """One panel per objective (batch-mean reward over steps, per method) plus the average of the objectives."""
    plt = shared.pyplot()
    figure, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.4))
    for method, runs in methods.items():
        rewards = np.asarray([run["series"]["rewards"] for run in runs])
        for index, ax in enumerate(axes[:-1]):
            shared.plot_band(ax, rewards[:, :, index], method, window)
        shared.plot_band(axes[-1], rewards.mean(axis=2), method, window)
    for ax, title in zip(axes, [*names, "average of the objectives"], strict=True):
        ax.set(title=f"{title} ({window}-step avg.)", xlabel="step")
    axes[0].legend(fontsize=8)
    return shared.save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run every method on every seed; write results/gapo_vs_mgda.json and the plot; print the table."""
    experiment = shared.setup(argv, __doc__, HERE)
    steps, seeds, folder = experiment.steps, experiment.seeds, experiment.folder
    methods, names = shared.run_grid(experiment, lambda trainer, history: summarize_run(history, trainer.names))
    summaries = {method: shared.aggregate_final_rewards(runs, names) for method, runs in methods.items()}
    results = {
        "claim": "GAPO balances the objectives better than MGDA and linear scalarisation",
        "steps": steps,
        "seeds": list(seeds),
        "objectives": list(names),
        "summary": summaries,
        "methods": methods,
    }
    path = shared.write_json(folder / "results" / "gapo_vs_mgda.json", results)
    png = plot(methods, names, folder / "gapo_vs_mgda.png", min(5, steps))
    print(shared.final_rewards_table(summaries, names))
    print(f"wrote {path} and {png}")
    return results


if __name__ == "__main__":
    main()
