"""Experiment 2: the covariance law. Under plain SGD with step size eta, does each objective's mean reward change by
about eta * Cov(r_j, w), w the per-completion training signal?

Claim (Lu & Jiang, "Uncovering Cross-Objective Interference in Multi-Objective Alignment", arXiv 2602.06869, 2026):
to first order an objective's expected reward changes by the step size times the within-prompt covariance of its
reward with the training signal (logged by the trainer as ``interference/cov/{name}``). The paper derives the law
for a softmax policy; for a network the change is <grad J_j, update>, which the law approximates up to the
network's kernel, so a clear positive correlation with a slope other than 1 is what a neural policy can show.

Measured change: the step's prompts are sampled ``measure_rollouts`` times with fixed keys just before the update and
again with the same keys just after it (common random numbers), and the per-objective mean rewards of the two
samples are subtracted. Predicted change: eta * ``interference/cov/{name}`` of the training batch. Reported, per
objective and pooled: Pearson correlation, least-squares slope (with intercept) and the share of steps where the
two have the same sign; mean and spread over seeds.

    PYTHONPATH=$PWD python experiments/02_covariance_law/run.py          # full: 3 seeds x 40 steps
    PYTHONPATH=$PWD python experiments/02_covariance_law/run.py --quick  # 1 seed, 2 steps, temp folder
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

from experiments import shared  # noqa: E402

MEASURE_KEY_OFFSET = 10_000
"""The measurement keys derive from ``seed + MEASURE_KEY_OFFSET``, apart from the training keys."""


def mean_rewards(trainer, rows: Sequence[dict], step: int, rollouts: int) -> np.ndarray:
    """f64[n]: reward-oriented mean scores of `rollouts` samplings of `rows` under the current policy.

    The keys depend on (seed, step, k) only, so calling this before and after an update couples the two samples.
    """
    import jax

    from mojax.rl.rewards import signed

    generations = trainer.config.rollout.num_generations
    base = jax.random.fold_in(jax.random.key(trainer.config.seed + MEASURE_KEY_OFFSET), step)
    means = []
    for k in range(rollouts):
        rollout = trainer.rollout(rows, jax.random.fold_in(base, k), trainer.sampling, generations)
        raw, _ = trainer.score(rows, rollout, generations)
        means.append(np.asarray(signed(raw, trainer.objectives), np.float64).mean(axis=0))
    return np.mean(means, axis=0)


def run_with_measurements(trainer, steps: int, rollouts: int) -> tuple[np.ndarray, np.ndarray]:
    """(predicted f64[steps, n], measured f64[steps, n]) reward changes of `steps` SGD steps."""
    eta = trainer.config.optimizer.learning_rate
    predicted, measured = [], []
    for _ in range(steps):
        step = trainer.step + 1
        rows = trainer.prompts_for_step(step)
        before = mean_rewards(trainer, rows, step, rollouts)
        metrics = trainer.train_step()
        after = mean_rewards(trainer, rows, step, rollouts)
        predicted.append([eta * metrics[f"interference/cov/{name}"] for name in trainer.names])
        measured.append(after - before)
    return np.asarray(predicted), np.asarray(measured)


def fit(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Pearson correlation, least-squares slope and intercept, and sign agreement of two f64[m] vectors."""
    if predicted.size < 3 or np.std(predicted) == 0 or np.std(measured) == 0:
        return {
            "correlation": float("nan"),
            "slope": float("nan"),
            "intercept": float("nan"),
            "sign_agreement": float("nan"),
        }
    slope, intercept = np.polyfit(predicted, measured, 1)
    informative = (predicted != 0) & (measured != 0)
    return {
        "correlation": float(np.corrcoef(predicted, measured)[0, 1]),
        "slope": float(slope),
        "intercept": float(intercept),
        "sign_agreement": float(np.mean(np.sign(predicted[informative]) == np.sign(measured[informative]))),
    }


def fits_by_objective(predicted: np.ndarray, measured: np.ndarray, names: Sequence[str]) -> dict[str, dict]:
    """:func:`fit` per objective (columns) and pooled over all of them (``"all"``)."""
    fits = {name: fit(predicted[:, j], measured[:, j]) for j, name in enumerate(names)}
    fits["all"] = fit(predicted.ravel(), measured.ravel())
    return fits


def table(summary: dict) -> str:
    """Markdown table: one row per objective (and all objectives together); per-seed fits as mean ± std over seeds,
    then the correlation and slope of one fit to every seed's points."""
    keys = ("correlation", "slope", "intercept", "sign_agreement")
    rows = [
        [
            name,
            *(shared.format_mean_spread(per_seed[key]) for key in keys),
            f"{summary['pooled'][name]['correlation']:.3f}",
            f"{summary['pooled'][name]['slope']:.3f}",
        ]
        for name, per_seed in summary["per_seed"].items()
    ]
    header = ["objective", "correlation", "slope", "intercept", "same sign", "pooled corr.", "pooled slope"]
    return shared.markdown_table(header, rows)


def plot(predicted: np.ndarray, measured: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """Scatter of measured vs predicted changes (all seeds), one colour per objective, with y = x."""
    plt = shared.pyplot()
    figure, ax = plt.subplots(figsize=(5.2, 4.4))
    for j, name in enumerate(names):
        ax.scatter(predicted[:, j], measured[:, j], s=10, alpha=0.6, label=name)
    span = np.linspace(float(predicted.min()), float(predicted.max()), 2)
    slope, intercept = np.polyfit(predicted.ravel(), measured.ravel(), 1)
    ax.plot(span, span, "k--", linewidth=0.8, label="y = x (the law with slope 1)")
    ax.plot(span, slope * span + intercept, "r-", linewidth=1.0, label=f"pooled fit: slope {slope:.2f}")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.set(xlabel="predicted: eta * Cov(r_j, w)", ylabel="measured change of mean r_j", title="Covariance law, SGD")
    ax.legend(fontsize=8)
    return shared.save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run every seed; write results/covariance_law.json and covariance_law.png; print the table."""
    experiment = shared.setup(argv, __doc__, HERE)
    config, steps, seeds, folder = experiment.config, experiment.steps, experiment.seeds, experiment.folder
    rollouts = config["measure_rollouts"]
    ((method, overrides),) = config["methods"].items()
    runs, names = [], ()
    for seed in seeds:
        trainer = shared.make_trainer(
            [*config["base"], *overrides], seed=seed, steps=steps, output_dir=Path(tempfile.mkdtemp())
        )
        names = trainer.names
        predicted, measured = run_with_measurements(trainer, steps, rollouts)
        trainer.close()
        runs.append(
            {
                "seed": seed,
                "fits": fits_by_objective(predicted, measured, names),
                "predicted": predicted.tolist(),
                "measured": measured.tolist(),
            }
        )
    all_predicted = np.concatenate([np.asarray(run["predicted"]) for run in runs])
    all_measured = np.concatenate([np.asarray(run["measured"]) for run in runs])
    keys = [*names, "all"]
    summary = {
        "per_seed": {
            key: {stat: shared.mean_spread([run["fits"][key][stat] for run in runs]) for stat in runs[0]["fits"][key]}
            for key in keys
        },
        "pooled": fits_by_objective(all_predicted, all_measured, names),
    }
    results = {
        "claim": "under SGD, the change of each objective's mean reward is about eta * Cov(r_j, w)",
        "method": method,
        "steps": steps,
        "seeds": list(seeds),
        "measure_rollouts": rollouts,
        "objectives": list(names),
        "summary": summary,
        "runs": runs,
    }
    path = shared.write_json(folder / "results" / "covariance_law.json", results)
    png = plot(all_predicted, all_measured, names, folder / "covariance_law.png")
    print(table(summary))
    print(f"wrote {path} and {png}")
    return results


if __name__ == "__main__":
    main()
