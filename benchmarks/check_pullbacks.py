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

    MOJAX_CACHE=/tmp/mojax-data-cache python benchmarks/check_pullbacks.py examples/smollm2_reviews.yaml --rows 2,3,4,8
    python benchmarks/check_pullbacks.py tiny --rows 3,4
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mojax.rl.config import load_config  # noqa: E402
from mojax.rl.trainer import Trainer  # noqa: E402
from mojax.testing import cpu_model, write_report  # noqa: E402
from mojax.xla_cpu import batched_pullback_options, broadcast_reduce_error  # noqa: E402


def row_differences(
    trainer: Trainer,
    batch: Any,
    rows: int,
    seed: int = 1,
    vmap: Callable = jax.vmap,
    compiler_options: dict[str, str] | None = None,
) -> tuple[list[float], float]:
    """(per row: max |batched - separate| over every parameter, max |separate gradient|) for `rows` random
    cotangents of the policy's log-probs on the batch's response tokens; `vmap` batches the pullback; both programs
    compile with ``compiler_options``."""
    cotangents = jax.random.normal(jax.random.key(seed), (rows, *batch.tokens.shape)) * batch.mask

    def log_probs(params):
        return trainer.policy(params, batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.mask)[0]

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def batched(params):
        _, pullback = jax.vjp(log_probs, params)
        return vmap(pullback)(cotangents)[0]

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def separate(params, cotangent):
        _, pullback = jax.vjp(log_probs, params)
        return pullback(cotangent)[0]

    together = batched(trainer.state.params)
    differences, scale = [], 0.0
    for row in range(rows):
        alone = separate(trainer.state.params, cotangents[row])
        gaps = jax.tree.map(lambda a, b, row=row: jnp.max(jnp.abs(a[row] - b)), together, alone)
        differences.append(float(max(jax.tree.leaves(gaps))))
        scale = max(scale, float(max(jax.tree.leaves(jax.tree.map(lambda g: jnp.max(jnp.abs(g)), alone)))))
    return differences, scale


def markdown(report: dict[str, Any]) -> str:
    errors = report["broadcast_reduce_error"]
    lines = [
        "# Batched against separate pullbacks of the policy",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['cpu']}; batch of {report['batch']} completions, {report['prompt_tokens']} prompt and "
        f"{report['completion_tokens']} completion tokens.",
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
        overrides = [f"output_dir={workdir}", "logging.tensorboard=false", "eval_steps=0", "export=false", *args.set]
        trainer = Trainer(load_config(args.config, overrides))
        batch = trainer.prepare(1).batch
        options = None if args.xla_defaults else batched_pullback_options()
        rows = []
        for k in counts:
            differences, scale = row_differences(trainer, batch, k, compiler_options=options)
            rows.append({"k": k, "differences": differences, "scale": scale})
            print(f"k={k}: max |batched - separate| per row {[f'{d:.3g}' for d in differences]}, scale {scale:.3g}")
    report = {
        "command": "python " + shlex.join(["benchmarks/check_pullbacks.py", *(sys.argv[1:] if argv is None else argv)]),
        "cpu": cpu_model(),
        "batch": int(batch.tokens.shape[0]),
        "prompt_tokens": int(batch.prompt_ids.shape[1]),
        "completion_tokens": int(batch.tokens.shape[1]),
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
