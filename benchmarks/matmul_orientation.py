"""Matmul operand orders on XLA:CPU: why decode steps multiply the weights by columns, and why the heads' weight
gradients contract a written-out transpose.

SmolLM2-135M's projections (``--layers`` layers of q, k, v, o, gate, up and down, random fp32 weights, each layer's
output fed to the next) and its tied LM head ([V, D]) applied to R token rows, one jitted program per form:

* ``rows``: x [R, in] @ W [in, out], the kernels as stored (the training layout); the head as x @ E^T;
* ``columns``: :func:`mojax._numerics.columns_matmul` on the transposed kernels, W^T @ x^T with its optimization
  barriers (what ``generate``'s decode steps run); the head as E @ x^T;
* ``columns, no barriers``: (W^T @ x.T).T, the same expression without the barriers, which XLA's algebraic
  simplifier folds back into one dot with the weights on the right.

The weight gradients x^T dy of a training step over R token rows (``--gradient-rows``), in two forms:

* ``einsum``: contracted over both operands' leading (token) axis, as autodiff writes it; XLA:CPU compiles it to an
  Eigen dot with a transposed operand;
* ``rows_contraction``: :func:`mojax._numerics.rows_contraction`, a GEMM on x^T written out behind a barrier (what
  the trainers' LM-head op runs);

for every layer's seven projections, an untied LM head ([D, V] gradient) and a tied one ([V, D], the transpose of
the product, which XLA folds into the dot in both forms).

Every form of a size is timed in the same rounds (``mojax.testing.interleaved_timings``: random orders, median of
``--repeats`` calls per round, ``--rounds`` rounds); the table gives the median over rounds and its min-max, in ms.

    python benchmarks/matmul_orientation.py          # writes benchmarks/results/matmul_orientation.{md,json}
    python benchmarks/matmul_orientation.py --rows 2 --gradient-rows 3 --layers 1 --vocab 512 --rounds 1 \
        --repeats 1 --out /tmp/x
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import smollm2_shapes  # noqa: E402

from mojax._numerics import COLUMNS_MAX_ROWS, columns_matmul, rows_contraction  # noqa: E402
from mojax.testing import benchmark_command, cpu_summary, interleaved_timings, write_report  # noqa: E402


def folded_columns(rows: jax.Array, kernel_t: jax.Array) -> jax.Array:
    """``columns_matmul`` without its barriers: XLA compiles it as rows @ kernel_t^T."""
    return (kernel_t @ rows.T).T


COLUMN_FORMS = {"columns": columns_matmul, "columns, no barriers": folded_columns}
"""Form -> (x [R, in], kernel [out, in]) -> x @ kernel^T [R, out]; the ``rows`` form multiplies x by the [in, out]
kernels as stored, and the [V, D] head as ``x @ E^T`` (the einsum of ``LlamaForCausalLM.logits``)."""
FORMS = ("rows", *COLUMN_FORMS)


def weights(config, seed: int = 0) -> list[list[np.ndarray]]:
    """Each layer's seven projection matrices as [out, in], scaled by 1/sqrt(in)."""
    rng = np.random.default_rng(seed)
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]
    return [
        [(rng.normal(size=s) / np.sqrt(s[1])).astype(np.float32) for s in shapes]
        for _ in range(config.num_hidden_layers)
    ]


def layer_chain(product: Callable) -> Callable:
    """x -> the projections of every layer in turn: q, k, v from x, o from q (plus k and v tiled to q's width, so
    that nothing is dead code), the SwiGLU MLP from o's output."""

    def chain(x, layers):
        for q, k, v, o, gate, up, down in layers:
            qx, kx, vx = product(x, q), product(x, k), product(x, v)
            heads = qx.shape[1] // kx.shape[1]
            attended = product(qx + jnp.tile(kx + vx, (1, heads)), o)
            x = product(jax.nn.silu(product(attended, gate)) * product(attended, up), down)
        return x

    return jax.jit(chain)


def contenders(config, rows: int, seed: int = 0) -> dict[str, Callable[[], object]]:
    """{"<piece>, <form>": blocking call} for the layers' projections and the LM head at ``rows`` token rows."""
    layers = weights(config, seed)
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(rng.normal(size=(rows, config.hidden_size)) / np.sqrt(config.hidden_size), jnp.float32)
    embedding = jnp.asarray(rng.normal(size=(config.vocab_size, config.hidden_size)), jnp.float32)
    stored = [[jnp.asarray(w.T.copy()) for w in layer] for layer in layers]  # [in, out]
    transposed = [[jnp.asarray(w) for w in layer] for layer in layers]  # [out, in]
    programs = {"rows": (layer_chain(jnp.matmul), stored, jax.jit(lambda x, e: x @ e.T))}
    for form, product in COLUMN_FORMS.items():
        programs[form] = (layer_chain(product), transposed, jax.jit(product))
    calls = {}
    for form, (chain, kernels, head) in programs.items():
        calls[f"projections, {form}"] = lambda c=chain, k=kernels: jax.block_until_ready(c(x, k))
        calls[f"LM head, {form}"] = lambda h=head: jax.block_until_ready(h(x, embedding))
    return calls


def plain_contraction(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T b as autodiff writes a weight gradient: contracted over both operands' leading axis."""
    return jnp.einsum("nk,nm->km", a, b)


GRADIENT_FORMS = {"einsum": plain_contraction, "rows_contraction": rows_contraction}
"""Form -> (x [R, in], dy [R, out]) -> x^T dy [in, out]."""
GRADIENT_PIECES = ("projections' weight gradients", "LM head weight gradient [D, V]", "LM head weight gradient [V, D]")


def gradient_contenders(config, rows: int, seed: int = 0) -> dict[str, Callable[[], object]]:
    """{"<piece>, <form>": blocking call} for the weight gradients of the layers' projections and of the LM head over
    ``rows`` token rows: random inputs x and output cotangents dy, each layer's its own."""
    keys = iter(jax.random.split(jax.random.key(seed), 2 + 14 * config.num_hidden_layers))
    normal = lambda shape: jax.random.normal(next(keys), shape)  # noqa: E731
    shapes = [w.T.shape for w in weights(config, seed)[0]]  # [in, out] of q, k, v, o, gate, up, down
    layers = [[(normal((rows, i)), normal((rows, o))) for i, o in shapes] for _ in range(config.num_hidden_layers)]
    hidden, logits_cotangent = normal((rows, config.hidden_size)), normal((rows, config.vocab_size))
    calls = {}
    for form, product in GRADIENT_FORMS.items():
        chain = jax.jit(lambda layers, p=product: [[p(x, dy) for x, dy in layer] for layer in layers])
        untied, tied = jax.jit(product), jax.jit(lambda x, dy, p=product: p(x, dy).T)
        calls[f"{GRADIENT_PIECES[0]}, {form}"] = lambda c=chain: jax.block_until_ready(c(layers))
        calls[f"{GRADIENT_PIECES[1]}, {form}"] = lambda f=untied: jax.block_until_ready(f(hidden, logits_cotangent))
        calls[f"{GRADIENT_PIECES[2]}, {form}"] = lambda f=tied: jax.block_until_ready(f(hidden, logits_cotangent))
    return calls


def summary(timings: dict) -> dict[str, dict[str, float]]:
    """{contender: {"ms": median over rounds, "min_ms", "max_ms"}} from ``interleaved_timings``' round medians."""
    return {
        name: {
            "ms": 1e3 * statistics.median(medians),
            "min_ms": 1e3 * min(medians),
            "max_ms": 1e3 * max(medians),
        }
        for name, medians in timings["round_medians_s"].items()
    }


def markdown(report: dict) -> str:
    lines = [
        "# Matmuls by operand order (SmolLM2-135M shapes, fp32, XLA:CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; jax {report['jax']}; {report['layers']} layers, vocabulary {report['vocab']}; "
        f"`COLUMNS_MAX_ROWS` = {COLUMNS_MAX_ROWS}; load average before {report['load_before']}, after "
        f"{report['load_after']}  ",
        "ms, median over rounds (min-max)",
        "",
        "| token rows | piece | " + " | ".join(FORMS) + " |",
        "|---:|---|" + "---:|" * len(FORMS),
    ]
    for rows, pieces in report["rows"].items():
        for piece in ("projections", "LM head"):
            cells = [pieces[f"{piece}, {form}"] for form in FORMS]
            text = [f"{c['ms']:.1f} ({c['min_ms']:.1f}-{c['max_ms']:.1f})" for c in cells]
            lines.append(f"| {rows} | {piece} | " + " | ".join(text) + " |")
    lines += ["", "| token rows | weight gradient | " + " | ".join(GRADIENT_FORMS) + " |", "|---:|---|---:|---:|"]
    for rows, pieces in report["gradient_rows"].items():
        for piece in GRADIENT_PIECES:
            cells = [pieces[f"{piece}, {form}"] for form in GRADIENT_FORMS]
            text = [f"{c['ms']:.1f} ({c['min_ms']:.1f}-{c['max_ms']:.1f})" for c in cells]
            lines.append(f"| {rows} | {piece} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="4,8,16,32,48,64,128,256", help="comma-separated token rows")
    parser.add_argument("--gradient-rows", default="320,512", help="comma-separated token rows of the gradients")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",")]
    args.gradient_rows = [int(r) for r in args.gradient_rows.split(",")]
    if min(args.rows + args.gradient_rows) < 1 or args.layers < 1 or args.vocab < 1:
        parser.error(
            "--rows, --gradient-rows, --layers and --vocab must be positive; got "
            f"{args.rows}, {args.gradient_rows}, {args.layers}, {args.vocab}"
        )
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = smollm2_shapes(args.layers, args.vocab)
    report = {
        "command": benchmark_command("benchmarks/matmul_orientation.py", sys.argv[1:] if argv is None else argv),
        "machine": cpu_summary(),
        "load_before": [round(v, 2) for v in os.getloadavg()],
        "jax": jax.__version__,
        "layers": args.layers,
        "vocab": args.vocab,
        "rows": {},
        "gradient_rows": {},
    }
    for rows in args.rows:
        timings = interleaved_timings(contenders(config, rows), args.rounds, args.repeats)
        report["rows"][str(rows)] = summary(timings)
    for rows in args.gradient_rows:
        timings = interleaved_timings(gradient_contenders(config, rows), args.rounds, args.repeats)
        report["gradient_rows"][str(rows)] = summary(timings)
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    text = markdown(report)
    print(text)
    write_report(args.out, "matmul_orientation", report, text)
    return report


if __name__ == "__main__":
    main()
