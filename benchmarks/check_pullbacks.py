"""Batched against separate pullbacks of a trainer's policy: do the k gradients of one batched pullback agree?

Probe and full mode take the n per-objective gradients from one forward pass, either batched (``jax.vmap`` of the
pullback over the n cotangents: ``combiner.pullbacks: batched``) or one pullback after another (sequential, the
default). This check builds the trainer of a config, draws its first rollout, and for each k compares the k
gradients of the batched pullback of the policy's response log-probs with k separate pullbacks (random cotangents
on the response tokens, fixed seed). It prints, per k, the largest absolute difference of every row over all
parameters and the largest gradient entry for scale, and writes ``check_pullbacks.{md,json}``.

Both programs compile as the trainer compiles a step with batched pullbacks
(``mojax.xla_cpu.batched_pullback_options``: on the CPU, without XLA:CPU's YNNPACK reduction fusions);
``--xla-defaults`` compiles them with XLA's defaults instead, which brings back the miscompile those options avoid.
The report also gives ``mojax.xla_cpu.broadcast_reduce_error`` both ways: whether this jaxlib still gets the fused
reduction wrong.

With ``--dpo`` the config is a preference config and the outputs are the sequence log-probs of its first step's
pairs (chosen, then rejected), pulled back with unit cotangents: the DPO step batches those pullbacks for its
per-pair entanglement (and the per-objective gradients), and compiles with the same options.

    MOJAX_CACHE=/tmp/mojax-data-cache python benchmarks/check_pullbacks.py examples/smollm2_reviews.yaml --rows 2,3,4,8
    python benchmarks/check_pullbacks.py tiny --rows 3,4
    MOJAX_CACHE=/tmp/mojax-data-cache python benchmarks/check_pullbacks.py dpo_sentiment --dpo --rows 2,4,8 \
        --set model.path=smollm2 --set data.max_completion_length=64
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mojax.rl.config import load_config  # noqa: E402
from mojax.rl.dpo import DPOTrainer, load_dpo_config, pair_logps  # noqa: E402
from mojax.rl.trainer import Trainer  # noqa: E402
from mojax.testing import benchmark_command, cpu_model, write_report  # noqa: E402
from mojax.xla_cpu import batched_pullback_options, broadcast_reduce_error  # noqa: E402


def row_differences(
    outputs: Callable[[Any], jax.Array],
    params: Any,
    cotangents: jax.Array,
    vmap: Callable = jax.vmap,
    compiler_options: dict[str, str] | None = None,
) -> tuple[list[float], float]:
    """(per row: max |batched - separate| over every parameter, max |separate gradient|) of the pullbacks of
    ``outputs`` at ``params`` for the rows of ``cotangents``; `vmap` batches the pullback; both programs compile with
    ``compiler_options``."""

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def batched(params):
        _, pullback = jax.vjp(outputs, params)
        return vmap(pullback)(cotangents)[0]

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def separate(params, cotangent):
        _, pullback = jax.vjp(outputs, params)
        return pullback(cotangent)[0]

    together = batched(params)
    differences, scale = [], 0.0
    for row in range(cotangents.shape[0]):
        alone = separate(params, cotangents[row])
        gaps = jax.tree.map(lambda a, b, row=row: jnp.max(jnp.abs(a[row] - b)), together, alone)
        differences.append(float(max(jax.tree.leaves(gaps))))
        scale = max(scale, float(max(jax.tree.leaves(jax.tree.map(lambda g: jnp.max(jnp.abs(g)), alone)))))
    return differences, scale


class Pullbacks(NamedTuple):
    """What the check pulls back: ``outputs(params)``, the cotangents of ``rows(k)`` for each k, and the report's
    description of the batch."""

    outputs: Callable[[Any], jax.Array]
    params: Any
    rows: Callable[[int], jax.Array]
    batch: dict[str, Any]


def policy_pullbacks(config: str, workdir: str, extra: list[str], seed: int = 1) -> Pullbacks:
    """An RL trainer's response log-probs on its first rollout; k random cotangents on the response tokens (fixed
    seed), as probe and full mode pull back k objectives' cotangents."""
    overrides = [f"output_dir={workdir}", "logging.tensorboard=false", "eval_steps=0", "export=false", *extra]
    trainer = Trainer(load_config(config, overrides))
    batch = trainer.prepare(1).batch

    def log_probs(params):
        return trainer.policy(params, batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.mask)[0]

    def rows(k):
        return jax.random.normal(jax.random.key(seed), (k, *batch.tokens.shape)) * batch.mask

    shape = {"completions": batch.tokens.shape[0], "prompt tokens": batch.prompt_ids.shape[1]}
    return Pullbacks(log_probs, trainer.state.params, rows, {**shape, "completion tokens": batch.tokens.shape[1]})


def dpo_first_step(config: str, workdir: str, extra: list[str]) -> tuple[DPOTrainer, Any]:
    """A DPO trainer on the preference config (``extra`` overrides last, no logging) and its first step's pairs, placed
    as its step reads them."""
    overrides = [f"output_dir={workdir}", "logging.tensorboard=false", "logging.progress=false", *extra]
    trainer = DPOTrainer(load_dpo_config(config, overrides))
    return trainer, trainer._place(trainer.pairs_for_step(1))


def pair_pullbacks(config: str, workdir: str, extra: list[str]) -> Pullbacks:
    """A DPO trainer's sequence log-probs of its first step's pairs, [chosen..., rejected...]; the first k unit
    cotangents, as the DPO step's per-pair entanglement pulls back every pair's two log-probs."""
    trainer, batch = dpo_first_step(config, workdir, extra)

    def log_probs(params):
        chosen, rejected = pair_logps(trainer.policy, params, batch, average=trainer.config.length_average)
        return jnp.concatenate([chosen, rejected]).astype(jnp.float32)

    pairs = batch.chosen_ids.shape[0]
    shape = {"pairs": pairs, "prompt tokens": batch.prompt_ids.shape[1], "response tokens": batch.chosen_ids.shape[1]}
    return Pullbacks(log_probs, trainer.state.params, lambda k: jnp.eye(2 * pairs, dtype=jnp.float32)[:k], shape)


def markdown(report: dict[str, Any]) -> str:
    errors = report["broadcast_reduce_error"]
    lines = [
        "# Batched against separate pullbacks of the policy",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['cpu']}; batch: " + ", ".join(f"{v} {k}" for k, v in report["batch"].items()) + ".",
        f"Compiler options: {report['compiler_options'] or 'XLA defaults'}. XLA:CPU's fused broadcast reduction "
        f"(`mojax.xla_cpu.broadcast_reduce_error`, values of order 100): {errors['defaults']:.3g} with XLA's defaults, "
        f"{errors['options']:.3g} without the reduction fusions.",
        "",
        "| k | max abs difference per row | largest gradient entry |",
        "|---:|---|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['k']} | {', '.join(f'{d:.3g}' for d in r['differences'])} | {r['scale']:.3g} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config name (tiny) or YAML path")
    parser.add_argument(
        "--dpo",
        action="store_true",
        help="config is a preference config (dpo_sentiment): check its pairs' sequence log-probs, whose pullbacks "
        "the DPO step batches for the per-pair entanglement (k <= twice the pairs of a step)",
    )
    parser.add_argument("--rows", default="2,3,4,8", help="comma-separated numbers of cotangents k")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument(
        "--xla-defaults",
        action="store_true",
        help="compile with XLA's default options, not those of a step with batched pullbacks",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for the report")
    args = parser.parse_args(argv)
    counts = [int(k) for k in args.rows.split(",")]
    if not counts or min(counts) < 1:
        parser.error(f"--rows must be positive integers; got {args.rows!r}")
    with tempfile.TemporaryDirectory() as workdir:
        checked = (pair_pullbacks if args.dpo else policy_pullbacks)(args.config, workdir, args.set)
        options = None if args.xla_defaults else batched_pullback_options()
        rows = []
        for k in counts:
            differences, scale = row_differences(
                checked.outputs, checked.params, checked.rows(k), compiler_options=options
            )
            rows.append({"k": k, "differences": differences, "scale": scale})
            print(f"k={k}: max |batched - separate| per row {[f'{d:.3g}' for d in differences]}, scale {scale:.3g}")
    report = {
        "command": benchmark_command("benchmarks/check_pullbacks.py", sys.argv[1:] if argv is None else argv),
        "cpu": cpu_model(),
        "batch": {key: int(value) for key, value in checked.batch.items()},
        "compiler_options": options,
        "broadcast_reduce_error": {
            "defaults": broadcast_reduce_error(),
            "options": broadcast_reduce_error(batched_pullback_options()),
        },
        "rows": rows,
    }
    write_report(args.out, "check_pullbacks", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
