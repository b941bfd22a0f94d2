"""Experiment 5: P-GAPO's preference front against linear scalarisation and Rewarded Soups.

Claim (Li, Zhang, Xu, Xue, Ao, He, "Gradient-Adaptive Policy Optimization: Towards Multi-Objective Alignment of
Large Language Models", ACL 2025, arXiv 2507.01915): P-GAPO, d = sum_i lambda_i g_i / ||g_i|| for a user preference
lambda, traces a front that dominates Rewarded Soups (Rame et al., NeurIPS 2023, arXiv 2306.04488: one policy per
objective, interpolated in weight space) and beats linear scalarisation at balanced preferences, for lambda in
{0.2, 0.4, 0.6, 0.8}.

Per seed this trains P-GAPO and linear weights at every lambda (preference (lambda, 1 - lambda) on the two
objectives), and the two single-objective policies (linear weights (1, 0) and (0, 1), from the same initialisation),
whose weight-space interpolations ``mojax.pareto.soup_front`` evaluates. Every policy is evaluated by
``eval_generations`` sampled completions per held-out prompt (the same prompts and key for every policy of a seed;
``Trainer.evaluate``'s greedy evaluation is recorded too, as ``greedy_points``). It reports each method's points,
the hypervolume of its front (``mojax.pareto.hypervolume``, reference point in the config) and, per lambda, whether
P-GAPO's point dominates the others'.

    PYTHONPATH=$PWD python experiments/05_pgapo_front/run.py          # full: 2 x 4 lambdas + 2 soup ends, 3 seeds
    PYTHONPATH=$PWD python experiments/05_pgapo_front/run.py --quick  # 1 seed, 2 steps, lambda = 0.5, temp folder
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

SOUP = "soup"
"""The name of the Rewarded Soups front in the results."""
EVALUATION_SEED = 1234
"""Key of the sampled evaluation (the same for every policy)."""


def preference_overrides(lam: float) -> list[str]:
    """The objectives' weights (lambda, 1 - lambda): linear's weights and P-GAPO's preference."""
    return [f"objectives.0.weight={lam}", f"objectives.1.weight={1.0 - lam}"]


def evaluation(trainer, generations: int) -> dict[str, list[float]]:
    """Held-out mean reward of each objective for the trainer's current policy, greedy and sampled.

    ``greedy``: ``Trainer.evaluate`` (one greedy completion per held-out prompt). ``sampled``: `generations`
    completions per held-out prompt at the training temperature, from the trainer's own ``rollout`` and ``score``
    with a fixed key, so every policy of a seed sees the same prompts and random numbers.
    """
    import jax

    greedy = trainer.evaluate()
    rows = trainer.eval_prompts
    rollout = trainer.rollout(rows, jax.random.key(EVALUATION_SEED), trainer.sampling, generations)
    raw, _ = trainer.score(rows, rollout, generations)
    return {
        "greedy": [greedy[f"eval/rewards/{name}/mean"] for name in trainer.names],
        "sampled": np.nanmean(np.asarray(raw, np.float64), axis=0).tolist(),
    }


def train_policy(setup: shared.Setup, method: str, lam: float, seed: int):
    """A trainer of `method` at preference `lam` after ``setup.steps`` steps, and the median seconds per step."""
    overrides = [*setup.config["base"], *setup.config["methods"][method], *preference_overrides(lam)]
    trainer = shared.make_trainer(overrides, seed=seed, steps=setup.steps, output_dir=Path(tempfile.mkdtemp()))
    history = shared.run_steps(trainer, setup.steps)
    return trainer, shared.median_step_time(history)


def soup_points(setup: shared.Setup, seed: int, num_points: int) -> dict:
    """Rewarded Soups of one seed: the two single-objective policies and ``soup_front`` between them.

    The interpolation weight of the a_rate policy is lambda, so the soup's points line up with the lambdas.
    """
    import jax
    import jax.numpy as jnp

    from mojax.pareto import soup_front

    method = setup.config["soup_method"]
    trainers = [train_policy(setup, method, lam, seed)[0] for lam in (0.0, 1.0)]  # the b_count and a_rate policies
    params = [jax.tree.map(jnp.copy, trainer.state.params) for trainer in trainers]
    evaluator = trainers[0]

    greedy = []

    def evaluate(mixed):
        evaluator.state = evaluator.state._replace(params=mixed)
        values = evaluation(evaluator, setup.config["eval_generations"])
        greedy.append(values["greedy"])
        return values["sampled"]

    front = soup_front(params, evaluate, num_points)
    for trainer in trainers:
        trainer.close()
    return {"lambdas": front.weights[:, 1].tolist(), "points": front.values.tolist(), "greedy_points": greedy}


def front_hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Hypervolume of the points (dominated ones add nothing) with respect to `reference`, larger rewards better."""
    from mojax.pareto import hypervolume

    return hypervolume(np.asarray(points, np.float64).reshape(-1, len(reference)), reference)


def dominates(p: Sequence[float], q: Sequence[float]) -> bool:
    """Whether p >= q everywhere and p > q somewhere (larger is better)."""
    p, q = np.asarray(p), np.asarray(q)
    return bool(np.all(p >= q) and np.any(p > q))


def run_seed(setup: shared.Setup, seed: int, lambdas: Sequence[float], num_points: int) -> tuple[dict, tuple]:
    """(every method's points at every lambda for one seed, the soup's points and the median step times; the
    objectives' names)."""
    runs: dict = {}
    for method in setup.config["methods"]:
        points, greedy, seconds = [], [], []
        for lam in lambdas:
            trainer, step_time = train_policy(setup, method, lam, seed)
            names = trainer.names
            values = evaluation(trainer, setup.config["eval_generations"])
            points.append(values["sampled"])
            greedy.append(values["greedy"])
            seconds.append(step_time)
            trainer.close()
        runs[method] = {
            "lambdas": list(lambdas),
            "points": points,
            "greedy_points": greedy,
            "seconds_per_step": float(np.median(seconds)),
        }
    runs[SOUP] = soup_points(setup, seed, num_points)
    return runs, names


def interior(run: dict, lambdas: Sequence[float]) -> list[list[float]]:
    """The points of a run at the given lambdas (the soup's grid includes the two endpoints)."""
    return [point for lam, point in zip(run["lambdas"], run["points"], strict=True) if np.isclose(lambdas, lam).any()]


def summarize(per_seed: Sequence[dict], lambdas: Sequence[float], reference: Sequence[float], names) -> dict:
    """Per method: mean ± std over seeds of the hypervolume (at the lambdas; the soup also with its endpoints) and of
    each objective at each lambda; per lambda: the share of seeds in which P-GAPO's point dominates the others'."""
    methods = list(per_seed[0])
    summary: dict = {}
    for method in methods:
        at_lambdas = [interior(runs[method], lambdas) for runs in per_seed]
        entry = {
            "hypervolume": shared.mean_spread([front_hypervolume(points, reference) for points in at_lambdas]),
            "points": {
                str(lam): {
                    name: shared.mean_spread([points[index][k] for points in at_lambdas])
                    for k, name in enumerate(names)
                }
                for index, lam in enumerate(lambdas)
            },
        }
        if method == SOUP:
            entry["hypervolume_with_endpoints"] = shared.mean_spread(
                [front_hypervolume(runs[SOUP]["points"], reference) for runs in per_seed]
            )
        summary[method] = entry
    summary["p_gapo_dominates"] = {
        other: {
            str(lam): float(
                np.mean(
                    [
                        dominates(interior(runs["p_gapo"], lambdas)[i], interior(runs[other], lambdas)[i])
                        for runs in per_seed
                    ]
                )
            )
            for i, lam in enumerate(lambdas)
        }
        for other in methods
        if other != "p_gapo"
    }
    return summary


def table(summary: dict, lambdas: Sequence[float], names: Sequence[str]) -> str:
    """Markdown table: per method the held-out rewards at each lambda and the hypervolume, mean ± std over seeds."""
    header = ["method", *(f"lambda={lam}: ({', '.join(names)})" for lam in lambdas), "hypervolume"]
    rows = []
    for method, entry in summary.items():
        if method == "p_gapo_dominates":
            continue
        cells = [
            "(" + ", ".join(shared.format_mean_spread(entry["points"][str(lam)][name], 2) for name in names) + ")"
            for lam in lambdas
        ]
        hypervolume = shared.format_mean_spread(entry["hypervolume"])
        if "hypervolume_with_endpoints" in entry:
            hypervolume += f" (with endpoints {shared.format_mean_spread(entry['hypervolume_with_endpoints'])})"
        rows.append([method, *cells, hypervolume])
    return shared.markdown_table(header, rows)


def plot(per_seed: Sequence[dict], seeds: Sequence[int], names: Sequence[str], path: Path) -> Path:
    """One panel per seed: the points of each method (annotated with lambda), joined in lambda order."""
    plt = shared.pyplot()
    figure, axes = plt.subplots(1, len(per_seed), figsize=(4.2 * len(per_seed), 3.8), squeeze=False)
    for ax, runs, seed in zip(axes[0], per_seed, seeds, strict=True):
        for method, run in runs.items():
            points = np.asarray(run["points"])
            (line,) = ax.plot(points[:, 0], points[:, 1], "o-" if method != SOUP else "s--", label=method)
            for lam, (x, y) in zip(run["lambdas"], points, strict=True):
                ax.annotate(
                    f"{lam:.1f}", (x, y), fontsize=7, color=line.get_color(), xytext=(3, 3), textcoords="offset points"
                )
        ax.set(title=f"seed {seed} (held-out, sampled)", xlabel=names[0], ylabel=names[1])
    axes[0][0].legend(fontsize=8)
    return shared.save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train and evaluate every policy on every seed; write results/pgapo_front.json and the plot; print the table."""
    experiment = shared.setup(argv, __doc__, HERE)
    config, seeds, folder = experiment.config, experiment.seeds, experiment.folder
    lambdas = config["quick_lambdas" if experiment.quick else "lambdas"]
    num_points = config["quick_soup_points" if experiment.quick else "soup_points"]
    reference = config["reference"]
    per_seed, names = [], ()
    for seed in seeds:
        runs, names = run_seed(experiment, seed, lambdas, num_points)
        per_seed.append(runs)
    summary = summarize(per_seed, lambdas, reference, names)
    results = {
        "claim": "P-GAPO's preference front dominates Rewarded Soups and beats linear scalarisation at balanced "
        "preferences",
        "steps": experiment.steps,
        "seeds": list(seeds),
        "objectives": list(names),
        "lambdas": list(lambdas),
        "reference": list(reference),
        "summary": summary,
        "runs": per_seed,
    }
    path = shared.write_json(folder / "results" / "pgapo_front.json", results)
    png = plot(per_seed, seeds, names, folder / "pgapo_front.png")
    print(table(summary, lambdas, names))
    print("share of seeds in which P-GAPO's point dominates:", summary["p_gapo_dominates"])
    print(f"wrote {path} and {png}")
    return results


if __name__ == "__main__":
    main()
