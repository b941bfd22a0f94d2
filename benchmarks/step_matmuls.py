"""The matmuls of one training step, each alone: XLA:CPU as mojax's step runs them against torch as ``nn.Linear``
runs them, at SmolLM2-135M's shapes (fp32, random values; a matmul's time does not depend on them).

A step multiplies every weight matrix three times: the forward product, the input gradient and the weight gradient.
Each side lays them out its own way:

* mojax stores a projection kernel [in, out]: forward ``x @ W``, input gradient ``dy @ W^T``, weight gradient
  ``x^T @ dy``; the tied LM head is the [V, D] embedding: ``x @ E^T``, ``dy @ E`` and ``dy^T @ x``. The two gradient
  products are what ``jax.linear_transpose`` derives from the forward, as autodiff does in the step.
* torch stores every weight [out, in] (``nn.Linear``): forward ``F.linear(x, W)`` = ``x @ W^T``, input gradient
  ``dy @ W``, weight gradient ``dy^T @ x``, as its autograd computes them.

Attention's two contractions (under 3% of the step's FLOPs at 128 positions) are left out. A call runs one product
for every layer in turn, each layer with its own random operands (so the weights stream from memory, as in the
step): on mojax's side one jitted program whose products wait for each other (XLA would otherwise run independent
ones side by side), on torch's a loop. Both are timed in the same rounds (``mojax.testing.interleaved_timings``:
``--rounds`` rounds of ``--repeats`` interleaved calls, median per round). The table gives ms per product (a call
over the layer count), the torch/mojax ratio (median over rounds, min-max), and the step's sum over every product.
That sum against the whole step's time (``benchmarks/model_real.py``) says how much of the step is its matmul
kernels on each side, and how much of the gap between the sides the kernels alone explain.

    python benchmarks/step_matmuls.py               # writes benchmarks/results/step_matmuls.{md,json}
    python benchmarks/step_matmuls.py --layers 1 --vocab 512 --tokens 8 --rounds 1 --repeats 1 --out /tmp/x
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import smollm2_shapes  # noqa: E402

from mojax.host_memory import keep_freed_host_memory  # noqa: E402
from mojax.testing import benchmark_command, interleaved_timings, same_round_ratios, write_report  # noqa: E402

TORCH_THREADS = 2
PASSES = ("forward", "input gradient", "weight gradient")


class Weight(NamedTuple):
    """A weight matrix of the step: ``inputs`` -> ``outputs`` features, in ``count`` layers; ``head``: the tied LM
    head, which mojax stores output-major ([V, D], the embedding) rather than as an [in, out] kernel."""

    name: str
    inputs: int
    outputs: int
    count: int
    head: bool = False


def step_weights(config) -> list[Weight]:
    """Every weight matrix a training step of ``config``'s model multiplies (a tied head once, as the head)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    projections = [("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d)]
    projections += [("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)]
    return [Weight(name, i, o, layers) for name, i, o in projections] + [
        Weight("lm_head", d, config.vocab_size, 1, head=True)
    ]


def layer_operands(weight: Weight, tokens: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(x [tokens, in], dy [tokens, out], weight [out, in]), standard normal, for each of the ``count`` layers:
    random, and distinct per layer, so a chain of products streams its weights from memory as the step does."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    return [
        (normal(tokens, weight.inputs), normal(tokens, weight.outputs), normal(weight.outputs, weight.inputs))
        for _ in range(weight.count)
    ]


def mojax_chain(weight: Weight, pass_name: str, operands: list[tuple]) -> Callable[[], object]:
    """A blocking call of one jitted program that runs the ``pass_name`` product of every layer in turn, in mojax's
    layout (kernel [in, out], the tied head [out, in]); each product waits for the previous one (an optimization
    barrier ties its operands to the previous output), so XLA runs them one at a time, as torch does; every product
    is an output, so none is left out."""

    def forward(x, w):
        return x @ w.T if weight.head else x @ w

    def product(x, dy, w):
        if pass_name == "forward":
            return forward(x, w)
        if pass_name == "input gradient":
            return jax.linear_transpose(lambda x_: forward(x_, w), x)(dy)[0]
        return jax.linear_transpose(lambda w_: forward(x, w_), w)(dy)[0]

    @jax.jit
    def chain(layers):
        outs = []
        for x, dy, w in layers:
            if outs:
                (x, dy, w), outs[-1] = jax.lax.optimization_barrier(((x, dy, w), outs[-1]))
            outs.append(product(x, dy, w))
        return outs

    layers = [(jnp.asarray(x), jnp.asarray(dy), jnp.asarray(w if weight.head else w.T)) for x, dy, w in operands]
    return lambda: jax.block_until_ready(chain(layers))


def torch_chain(pass_name: str, operands: list[tuple]) -> Callable[[], object]:
    """A call running the ``pass_name`` product of every layer in turn as ``nn.Linear`` and its autograd compute
    them (weight [out, in]): ``F.linear(x, W)``, ``dy @ W``, ``dy^T @ x``."""
    import torch

    layers = [tuple(torch.from_numpy(a) for a in layer) for layer in operands]
    product = {
        "forward": lambda x, dy, w: torch.nn.functional.linear(x, w),
        "input gradient": lambda x, dy, w: dy @ w,
        "weight gradient": lambda x, dy, w: dy.t() @ x,
    }[pass_name]
    return lambda: [product(*layer) for layer in layers]


def measure(config, tokens: int, rounds: int, repeats: int, names: list[str] | None = None) -> list[dict]:
    """One row per (weight, pass): ms per product on each side (the median over rounds of a call over ``count``
    products), the torch/mojax ratio's median and min-max; only the weights ``names`` when given."""
    rows = []
    for weight in step_weights(config):
        if names and weight.name not in names:
            continue
        operands = layer_operands(weight, tokens)
        for name in PASSES:
            calls = {"mojax": mojax_chain(weight, name, operands), "torch": torch_chain(name, operands)}
            timing = interleaved_timings(calls, rounds, repeats)
            medians = timing["round_medians_s"]
            ratio, ratio_min, ratio_max = same_round_ratios(timing, "torch", "mojax")
            rows.append(
                {
                    "weight": weight.name,
                    "pass": name,
                    "count": weight.count,
                    "flops": 2 * tokens * weight.inputs * weight.outputs,
                    "mojax_ms": 1e3 * statistics.median(medians["mojax"]) / weight.count,
                    "torch_ms": 1e3 * statistics.median(medians["torch"]) / weight.count,
                    "ratio": ratio,
                    "ratio_min": ratio_min,
                    "ratio_max": ratio_max,
                }
            )
    return rows


def step_sums(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Group ("all" and each pass) -> the step's summed ms on each side (every product times its count) and the
    torch/mojax ratio of the sums."""
    sums = {}
    for group in ("all", *PASSES):
        chosen = [r for r in rows if group in ("all", r["pass"])]
        ours = sum(r["count"] * r["mojax_ms"] for r in chosen)
        theirs = sum(r["count"] * r["torch_ms"] for r in chosen)
        sums[group] = {"mojax_ms": ours, "torch_ms": theirs, "ratio": theirs / ours}
    return sums


def markdown(report: dict) -> str:
    lines = [
        "# The matmuls of one training step, each alone: XLA:CPU (mojax's layouts) against torch (nn.Linear's)",
        "",
        f"Command: `{report['command']}`  ",
        f"{report['tokens']} token rows; {report['layers']} layers; vocabulary {report['vocab']}; torch threads "
        f"{TORCH_THREADS}; jax {jax.__version__}; load average before {report['load_before']}, after "
        f"{report['load_after']}  ",
        f"{report['rounds']} rounds of {report['repeats']} interleaved calls; ratio = torch median / mojax median in "
        "the same round (> 1: mojax faster), median over rounds and min-max.",
        "",
        "| weight | pass | count | mojax ms | torch ms | ratio torch/mojax | spread | mojax GFLOP/s | torch GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['weight']} | {r['pass']} | {r['count']} | {r['mojax_ms']:.2f} | {r['torch_ms']:.2f} | "
            f"{r['ratio']:.2f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['flops'] / r['mojax_ms'] / 1e6:.0f} | "
            f"{r['flops'] / r['torch_ms'] / 1e6:.0f} |"
        )
    lines += ["", "The step's sum (each product times its count):", "", "| products | mojax ms | torch ms | ratio |"]
    lines.append("|---|---:|---:|---:|")
    for group, s in report["sums"].items():
        lines.append(f"| {group} | {s['mojax_ms']:.0f} | {s['torch_ms']:.0f} | {s['ratio']:.2f} |")
    return "\n".join(lines + [""])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tokens", type=int, default=512, help="token rows (4 x 128 in the training-step benchmarks)")
    parser.add_argument("--weights", help="comma-separated subset of the weight names (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if min(args.layers, args.vocab, args.tokens, args.rounds, args.repeats) < 1:
        parser.error(f"--layers, --vocab, --tokens, --rounds and --repeats must be >= 1; got {vars(args)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(TORCH_THREADS)
    config = smollm2_shapes(args.layers, args.vocab)
    report = {
        "command": benchmark_command("benchmarks/step_matmuls.py", sys.argv[1:] if argv is None else argv),
        "tokens": args.tokens,
        "layers": args.layers,
        "vocab": args.vocab,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    names = args.weights.split(",") if args.weights else None
    known = [w.name for w in step_weights(config)]
    if names and set(names) - set(known):
        raise SystemExit(f"--weights: unknown {sorted(set(names) - set(known))}; expected names from {known}")
    rows = measure(config, args.tokens, args.rounds, args.repeats, names)
    report.update(rows=rows, sums=step_sums(rows), load_after=[round(x, 2) for x in os.getloadavg()])
    print(markdown(report), flush=True)
    write_report(args.out, "step_matmuls", report, markdown(report))
    return report


if __name__ == "__main__":
    keep_freed_host_memory()
    main()
