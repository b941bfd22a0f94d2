"""The main job of ``make demo``: the tiny task trained with five combiners from the same start.

Linear scalarisation, MGDA and GAPO (probe mode), CTWA and PAMA each train the tiny random LLaMA of
:mod:`mojax.rl.tiny` on the three conflicting rewards of ``mojax/rl/configs/tiny.yaml`` for the same number of
steps from the same initialisation and prompts. The demo prints the final per-objective rewards (mean of the last
``--window`` steps), the mean Interference Index and the median time per step, and writes every run's
metrics.jsonl and the plots of ``mojax plot`` under ``--output-dir``. No download, CPU only. JAX's persistent
compilation cache (:mod:`mojax.compilation_cache`) lets the methods share the programs they have in common (the rollout,
the reference log-probs) and makes a second demo start warm.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mojax.compilation_cache import enable_persistent_cache
from mojax.rl.config import load_config
from mojax.rl.logging import read_metrics
from mojax.rl.trainer import Trainer, keep_freed_host_memory_for_policy

METHODS = {
    "linear": ["combiner.name=linear"],
    "mgda": ["combiner.name=mgda", "combiner.mode=probe"],
    "gapo": ["combiner.name=gapo", "combiner.mode=probe"],
    "ctwa": ["combiner.name=ctwa", "combiner.options.lr=2.0"],
    "pama": ["combiner.name=pama"],
}
"""Demo run name -> config overrides."""


def run_method(name: str, output_dir: Path, steps: int, extra: Sequence[str]) -> list[dict[str, float]]:
    """Train one method on the tiny task (resuming if its folder already holds a run) and return its metrics."""
    overrides = [
        f"output_dir={output_dir / name}",
        f"steps={steps}",
        "eval_steps=0",
        "logging.progress=false",
        "logging.tensorboard=false",
        "export=false",
        *METHODS[name],
        *extra,
    ]
    trainer = Trainer(load_config("tiny", overrides))
    trainer.train()
    trainer.close()
    return read_metrics(output_dir / name)


def summarise(records: list[dict[str, float]], objectives: Sequence[str], window: int) -> dict[str, float]:
    """Final rewards (mean over the last `window` steps), mean Interference Index and median ms per step."""
    tail = records[-window:]
    summary = {name: float(np.nanmean([r[f"rewards/{name}/mean"] for r in tail])) for name in objectives}
    summary["interference_index"] = float(np.nanmean([r.get("interference/index", math.nan) for r in records]))
    per_step = [sum(r[f"timing/{part}"] for part in ("rollout", "rewards", "update")) for r in records[1:]]
    summary["ms_per_step"] = 1000.0 * float(np.median(per_step)) if per_step else math.nan
    return summary


def table(summaries: dict[str, dict[str, float]], objectives: Sequence[str]) -> str:
    """A markdown table of the summaries."""
    header = ["method", *objectives, "interference index", "ms/step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, summary in summaries.items():
        cells = [f"{summary[name]:.3f}" for name in objectives]
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {summary['interference_index']:.4f} | {summary['ms_per_step']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, keep_host_memory: bool = False) -> dict[str, dict[str, float]]:
    """Train every method of ``--methods`` on the tiny task, print the table and draw the plots.

    ``keep_host_memory`` (the ``mojax`` command line run as the program) first applies
    :func:`mojax.rl.trainer.keep_freed_host_memory_for_policy` to the runs' ``model.path``: nothing for the tiny
    model.
    """
    parser = argparse.ArgumentParser(prog="mojax demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="out/demo", help="where the runs and plots go (default out/demo)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per method (default 30)")
    parser.add_argument("--window", type=int, default=5, help="steps averaged for the final rewards (default 5)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    config = load_config("tiny", [*args.overrides, "output_dir=unused"])
    if keep_host_memory:
        keep_freed_host_memory_for_policy(config.model.path)
    enable_persistent_cache()
    objectives = [objective.name for objective in config.objectives]
    summaries = {}
    for name in args.methods.split(","):
        print(f"training {name} ...", flush=True)
        summaries[name] = summarise(run_method(name, output_dir, args.steps, args.overrides), objectives, args.window)
    print(table(summaries, objectives))
    from mojax.plots import plot_runs

    written = plot_runs([output_dir / name for name in summaries], output_dir / "plots")
    print("plots:", ", ".join(str(path) for path in written))
    return summaries


if __name__ == "__main__":
    main()
