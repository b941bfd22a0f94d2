"""XLA:CPU without YNNPACK's reduction fusions against XLA's defaults: one update compiled both ways, same run.

mojax compiles the programs that vmap a pullback without XLA:CPU's YNNPACK reduction fusions
(``mojax.xla_cpu.batched_pullback_options``: with them a fused reduction comes out wrong, and batched per-objective
pullbacks with it). This measures what those options cost, which is why the other programs keep XLA's defaults. For
each n x combiner x mode it builds the tiny-task trainer of ``benchmarks/rl_step.py`` (``--set model.path=...`` for a
bigger model, ``--set combiner.pullbacks=batched`` for batched pullbacks), draws its first rollout, and jits the
trainer's train step twice: without the reduction fusions and with XLA's defaults. Both run on the same state and
batch, interleaved in random orders (``mojax.testing.interleaved_timings``). With ``--dpo CONFIG`` it does the same
for the step of a DPO trainer on that preference config (the first step's pairs), which always vmaps pullbacks:
the per-objective gradients and the per-pair entanglement. The table gives each one's median, the ratio without /
defaults (median over rounds, min-max spread), both first calls (compile and run), the largest difference between
the parameters after one update, and the largest relative difference between the two programs' metrics
(``COMPARED_METRICS``: the objective losses, the weights, the combined gradient's norm, and the DPO step's per-pair
gradient norms). The defaults can be wrong there: with batched pullbacks of four or more objectives on SmolLM2-135M
they are (``benchmarks/check_pullbacks.py --xla-defaults``, and ``--dpo`` for the DPO step's pairs).

    python benchmarks/xla_cpu_options.py --n 3,5 --combiners linear,mgda
    python benchmarks/xla_cpu_options.py --n 3 --combiners linear,mgda --set model.path=/tmp/shaped_56m
    MOJAX_CACHE=/tmp/mojax-data-cache python benchmarks/xla_cpu_options.py --dpo dpo_sentiment \
        --set model.path=smollm2 --set data.max_completion_length=64 --rounds 3 --repeats 2
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from check_pullbacks import dpo_first_step  # noqa: E402
from rl_step import load, machine, modes, trainer_for  # noqa: E402

from mojax.combiners import REGISTRY  # noqa: E402
from mojax.host_memory import keep_freed_host_memory  # noqa: E402
from mojax.testing import benchmark_command, interleaved_timings, same_round_ratios, write_report  # noqa: E402
from mojax.xla_cpu import batched_pullback_options, broadcast_reduce_error  # noqa: E402

OPTIONS, DEFAULTS = "no YNN reduction fusions", "XLA defaults"
COMPARED_METRICS = (
    "objective_losses",
    "weights",
    "grad_norm",
    "entanglement/norm_chosen",
    "entanglement/norm_rejected",
)
"""The metrics compared between the two programs: what wrong per-objective or per-pair gradients change (not the
near-zero ones, such as the first step's log-ratios to a reference equal to the policy, whose rounding differs)."""


def compiled_both_ways(step: Callable, args: tuple) -> dict[str, Any]:
    """``step`` jitted without YNNPACK's reduction fusions and with XLA's defaults, each as a call on ``args`` (not
    donated); each one's first call (compile and run) in seconds; the largest difference between the two programs'
    parameters after one update, and the largest relative difference between their metrics."""
    programs = {OPTIONS: jax.jit(step, compiler_options=batched_pullback_options()), DEFAULTS: jax.jit(step)}
    calls = {
        name: (lambda program=program: jax.block_until_ready(program(*args))) for name, program in programs.items()
    }
    outputs, first_call_s = {}, {}
    for name, call in calls.items():
        started = time.perf_counter()
        outputs[name] = jax.device_get(call())
        first_call_s[name] = time.perf_counter() - started
    (state, metrics), (other_state, other_metrics) = outputs[OPTIONS], outputs[DEFAULTS]
    gaps = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state.params, other_state.params)
    differences = {
        key: relative_difference(metrics[key], other_metrics[key]) for key in COMPARED_METRICS if key in metrics
    }
    return {
        "calls": calls,
        "first_call_s": first_call_s,
        "param_difference": max(jax.tree.leaves(gaps)),
        "metric_difference": max(differences.values()),
        "metric_differences": differences,
    }


def relative_difference(a: Any, b: Any) -> float:
    """max |a - b| / max(|a|, |b|) over the entries (0 where both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.maximum(np.abs(a), np.abs(b))
    return float(np.max(np.where(scale > 0, np.abs(a - b) / np.where(scale > 0, scale, 1.0), 0.0), initial=0.0))


def rl_step_program(n: int, combiner: str, mode: str, workdir: str, extra: list[str]) -> tuple[Callable, tuple]:
    """The tiny-task trainer's train step (unjitted) and its arguments: the first state and rollout."""
    trainer = trainer_for(n, combiner, mode, workdir, extra)
    batch = trainer.prepare(1).batch
    state, weights = trainer.state, None
    if trainer.update_spec.mode == "scalar":
        state, weights = state._replace(combiner_state=None), jnp.full((n,), 1.0 / n, jnp.float32)
    return trainer._train_step.__wrapped__, (state, batch, jax.random.key(0), jnp.float32(trainer.kl_coef), weights)


def dpo_step_program(config: str, workdir: str, extra: list[str]) -> tuple[Callable, tuple, int]:
    """The DPO trainer's step (unjitted) of the preference config, its arguments (the first state, the first
    step's pairs, the reference parameters) and its number of objectives."""
    trainer, batch = dpo_first_step(config, workdir, extra)
    return trainer._step_fn.__wrapped__, (trainer.state, batch, trainer.reference_params), trainer.spec.num_objectives


def measure(label: str, n: int, program: tuple[Callable, tuple], rounds: int, repeats: int) -> dict:
    both = compiled_both_ways(*program)
    timing = interleaved_timings(both["calls"], rounds, repeats)
    ratio, low, high = same_round_ratios(timing, OPTIONS, DEFAULTS)
    return {
        "n": n,
        "contender": label,
        "options_ms": statistics.median(timing["round_medians_s"][OPTIONS]) * 1e3,
        "defaults_ms": statistics.median(timing["round_medians_s"][DEFAULTS]) * 1e3,
        "ratio": ratio,
        "spread": [low, high],
        "first_call_s": both["first_call_s"],
        "param_difference": both["param_difference"],
        "metric_difference": both["metric_difference"],
        "metric_differences": both["metric_differences"],
    }


def markdown(report: dict[str, Any]) -> str:
    m, errors = report["machine"], report["broadcast_reduce_error"]
    lines = [
        "# One update compiled without XLA:CPU's YNNPACK reduction fusions against XLA's defaults",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, jax {m['versions']['jax']}, jaxlib "
        f"{m['versions']['jaxlib']}; trainer overrides: {' '.join(report['overrides']) or 'none'}  ",
        f"Load before: `{report['load_before']}`  ",
        f"Load after: `{report['load_after']}`  ",
        f"Options without the reduction fusions: `{report['compiler_options']}`. XLA:CPU's fused broadcast reduction "
        f"(`mojax.xla_cpu.broadcast_reduce_error`, values of order 100): {errors[DEFAULTS]:.3g} with XLA's defaults, "
        f"{errors[OPTIONS]:.3g} without the reduction fusions.  ",
        f"Rounds: {report['rounds']}, calls per program per round: {report['repeats']} (random orders); ratio = median "
        "over rounds of (median without the fusions / defaults median in the same round); spread = min-max over "
        "rounds.",
        "",
        "| n | contender | without ms | defaults ms | ratio without / defaults | spread | first call s (without, "
        "defaults) | max parameter difference after one update | max relative metric difference (the metric) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        first = r["first_call_s"]
        lines.append(
            f"| {r['n']} | {r['contender']} | {r['options_ms']:.1f} | {r['defaults_ms']:.1f} | {r['ratio']:.2f} | "
            f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f} | {first[OPTIONS]:.1f}, {first[DEFAULTS]:.1f} | "
            f"{r['param_difference']:.3g} | {r['metric_difference']:.3g} "
            f"({max(r['metric_differences'], key=r['metric_differences'].get)}) |"
        )
    return "\n".join(lines + [""])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="3", help="comma-separated numbers of objectives")
    parser.add_argument("--combiners", default="linear,mgda", help="comma-separated registry names (every mode each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a trainer override")
    parser.add_argument(
        "--dpo",
        metavar="CONFIG",
        help="time the DPO step of this preference config (e.g. dpo_sentiment) instead of the RL grid; --set "
        "overrides apply to it",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for the report")
    args = parser.parse_args(argv)
    args.n = [int(v) for v in args.n.split(",")]
    args.combiners = [c for c in args.combiners.split(",") if c]
    if not args.combiners or any(c not in REGISTRY for c in args.combiners) or min(args.n) < 2:
        parser.error(f"--combiners must name combiners of {sorted(REGISTRY)} and --n be >= 2; got {args}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report: dict[str, Any] = {
        "command": benchmark_command("benchmarks/xla_cpu_options.py", sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "overrides": args.set,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "compiler_options": batched_pullback_options(),
        "broadcast_reduce_error": {
            DEFAULTS: broadcast_reduce_error(),
            OPTIONS: broadcast_reduce_error(batched_pullback_options()),
        },
        "load_before": load(),
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as workdir:
        if args.dpo:
            step, step_args, n = dpo_step_program(args.dpo, workdir, args.set)
            grid = [(f"dpo step ({args.dpo})", n, lambda: (step, step_args))]
        else:
            grid = [
                (f"{combiner}/{mode}", n, functools.partial(rl_step_program, n, combiner, mode, workdir, args.set))
                for n in args.n
                for combiner in args.combiners
                for mode in modes(combiner)
            ]
        for label, n, program in grid:
            row = measure(label, n, program(), args.rounds, args.repeats)
            report["rows"].append(row)
            print(f"n={n} {row['contender']}: without / defaults {row['ratio']:.2f}", flush=True)
    report["load_after"] = load()
    write_report(args.out, "xla_cpu_options", report, markdown(report))
    return report


if __name__ == "__main__":
    keep_freed_host_memory()  # before the first computation, as the mojax command line: no page faults per call
    main()
