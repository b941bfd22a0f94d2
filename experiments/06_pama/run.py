"""Experiment 6: PAMA vs linear scalarisation (MORLHF) vs MGDA: final rewards, and the time of the weight solve.

Claim (He & Maghsudi, "PAMA: Pareto Multi-Objective Alignment", ECML-PKDD 2025, arXiv 2508.07768): PAMA's
closed-form weights (Noon PPO advantages, c* from the per-objective mean clipped advantages, O(n)) beat MORLHF
(fixed linear weights) and MGDA on every objective, and the solve takes milliseconds where MGDA needs the n x n
Gram of the per-objective gradients and a quadratic program.

Part 1 trains the three combiners on the tiny task (same seeds) and reports the final rewards (mean of the last 10
steps), their average and the median wall time per step. Part 2 times, for n objectives, PAMA's weight solve
(``pama_statistics`` + ``pama_closed_form`` on advantages f32[n, B, T]) against MGDA's (``tree_gram`` of the
per-objective gradients + ``min_norm_weights``), and each combiner's whole update (weights and d = sum_i c_i g_i)
on the same synthetic gradients of ``mojax.testing``: jitted, median of repeats after a warm-up call, with the
slope of log(time) against log(n).

    PYTHONPATH=$PWD python experiments/06_pama/run.py          # full: 3 methods x 3 seeds x 60 steps + timing
    PYTHONPATH=$PWD python experiments/06_pama/run.py --quick  # 1 seed, 2 steps, n in {2, 4}, temp folder
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

from experiments import shared  # noqa: E402

FINAL_STEPS = 10
"""The final rewards are the mean batch rewards of this many last steps."""
TIMED = ("pama_solve", "mgda_solve", "mgda_gram", "pama_update", "mgda_update")
"""The timed functions: the two weight solves (MGDA's with its Gram), MGDA's Gram alone, and the two whole updates."""


# ---------------------------------------------------------------------------------------------- part 1: training
# ------------------------------------------------------------------------------------------------ part 2: timing
def median_seconds(fn: Callable, args: tuple, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` (blocked until ready) over `repeats` calls after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def timed_functions(n: int) -> dict[str, Callable]:
    """The jitted functions of :data:`TIMED` for n objectives."""
    import jax

    from mojax.combiners import mgda, pama_solve
    from mojax.combiners._base import tree_gram
    from mojax.combiners.minnorm import min_norm_weights
    from mojax.combiners.pama import pama_closed_form, pama_statistics

    mgda_tx, pama_tx = mgda(num_objectives=n), pama_solve(num_objectives=n)
    return {
        "pama_solve": jax.jit(
            lambda advantages, mask, ratio: pama_closed_form(pama_statistics(advantages, mask, ratio))
        ),
        "mgda_solve": jax.jit(lambda grads: min_norm_weights(tree_gram(grads)[0])),
        "mgda_gram": jax.jit(lambda grads: tree_gram(grads)[0]),
        "pama_update": jax.jit(
            lambda grads, state, advantages, mask, ratio: pama_tx.update(
                grads, state, advantages=advantages, mask=mask, ratio=ratio
            )
        ),
        "mgda_update": jax.jit(lambda grads, state: mgda_tx.update(grads, state)),
        "init": lambda params: (pama_tx.init(params), mgda_tx.init(params)),
    }


def time_solves(counts: Sequence[int], repeats: int, shapes: dict, batch: int, length: int) -> dict[str, list[float]]:
    """{function of :data:`TIMED`: median seconds per n in `counts`} on ``mojax.testing``'s synthetic inputs."""
    import jax
    import jax.numpy as jnp

    from mojax.testing import llama_like_shapes, per_sample_statistics, stacked_gradients

    tree = llama_like_shapes(**shapes)
    params = jax.tree.map(
        lambda shape: jnp.zeros(shape, jnp.float32), tree, is_leaf=lambda node: isinstance(node, tuple)
    )
    seconds: dict[str, list[float]] = {name: [] for name in TIMED}
    for n in counts:
        grads = jax.tree.map(jnp.asarray, stacked_gradients(tree, n, seed=n))
        statistics = per_sample_statistics(n, batch, length, seed=n)
        per_sample = tuple(jnp.asarray(statistics[key]) for key in ("advantages", "mask", "ratio"))
        functions = timed_functions(n)
        pama_state, mgda_state = functions["init"](params)
        arguments = {
            "pama_solve": per_sample,
            "mgda_solve": (grads,),
            "mgda_gram": (grads,),
            "pama_update": (grads, pama_state, *per_sample),
            "mgda_update": (grads, mgda_state),
        }
        for name in TIMED:
            seconds[name].append(median_seconds(functions[name], arguments[name], repeats))
    return seconds


def log_log_slope(counts: Sequence[int], seconds: Sequence[float]) -> float:
    """Least-squares slope of log(seconds) against log(n): about 1 for O(n), 2 for O(n^2) (NaN for < 2 points)."""
    if len(counts) < 2:
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(counts, np.float64)), np.log(np.asarray(seconds, np.float64)), 1)[0])


def timing_table(counts: Sequence[int], seconds: dict[str, list[float]], slopes: dict[str, float]) -> str:
    """Markdown table of milliseconds per call, one row per n, plus the log-log slopes."""
    header = ["n", *(f"{name} (ms)" for name in TIMED)]
    rows = [[str(n), *(f"{1e3 * seconds[name][i]:.3f}" for name in TIMED)] for i, n in enumerate(counts)]
    rows.append(["log-log slope", *(f"{slopes[name]:.2f}" for name in TIMED)])
    return shared.markdown_table(header, rows)


# -------------------------------------------------------------------------------------------------------- plots
def plot(methods: dict, names: Sequence[str], timing: dict, path: Path, window: int) -> Path:
    """Per-objective rewards over steps per method, and the solve times against n on log-log axes."""
    plt = shared.pyplot()
    figure, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.4))
    for method, runs in methods.items():
        rewards = np.asarray([run["series"]["rewards"] for run in runs])
        for index, ax in enumerate(axes[:-1]):
            shared.plot_band(ax, rewards[:, :, index], method, window)
    for ax, name in zip(axes[:-1], names, strict=True):
        ax.set(title=f"{name} ({window}-step avg.)", xlabel="step")
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    for name in TIMED:
        ax.loglog(timing["objectives"], np.asarray(timing["seconds"][name]) * 1e3, "o-", label=name)
    ax.set(title="time per call (median)", xlabel="n objectives", ylabel="ms")
    ax.set_xticks(timing["objectives"], [str(n) for n in timing["objectives"]])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    return shared.save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train the three methods on every seed, time the solves; write results/pama.json and the plot; print tables."""
    experiment = shared.setup(argv, __doc__, HERE)
    steps, seeds, folder, config = experiment.steps, experiment.seeds, experiment.folder, experiment.config
    quick = experiment.quick
    methods, names = shared.run_grid(
        experiment, lambda trainer, history: shared.final_rewards_summary(history, trainer.names, FINAL_STEPS)
    )
    summaries = {method: shared.aggregate_final_rewards(runs, names) for method, runs in methods.items()}
    timing_config = config["timing"]
    counts = timing_config["quick_objectives" if quick else "objectives"]
    seconds = time_solves(
        counts,
        timing_config["quick_repeats" if quick else "repeats"],
        timing_config["shapes"],
        timing_config["batch"],
        timing_config["length"],
    )
    slopes = {name: log_log_slope(counts, seconds[name]) for name in TIMED}
    timing = {
        "objectives": list(counts),
        "seconds": seconds,
        "log_log_slope": slopes,
        **{key: timing_config[key] for key in ("shapes", "batch", "length")},
    }
    results = {
        "claim": "PAMA beats linear scalarisation and MGDA on every objective; its weight solve is O(n) in milliseconds",
        "steps": steps,
        "seeds": list(seeds),
        "objectives": list(names),
        "summary": summaries,
        "timing": timing,
        "methods": methods,
    }
    path = shared.write_json(folder / "results" / "pama.json", results)
    png = plot(methods, names, timing, folder / "pama.png", min(5, steps))
    print(shared.final_rewards_table(summaries, names))
    print()
    print(timing_table(counts, seconds, slopes))
    print(f"wrote {path} and {png}")
    return results


if __name__ == "__main__":
    main()
