"""Combiner overhead vs n and d: every mojax combiner against its torchjd / torch / numpy peer and a memory floor.

For each n (objectives) and d (parameters) the same fp32 stacked gradients are laid out two ways:
`flat`, one [n, d] array, and `tree`, a LLaMA-like pytree of ~200 leaves with the same total d.
Each mojax combiner runs jitted (the first call, trace + compile + run, is reported separately); its
peer runs in the same process on the same numbers. Steady-state times are medians over repeats,
each ended by `block_until_ready` (jax) or by the call returning (torch, numpy).

Memory floor: twice the jitted time of `w @ J` alone (the faster of `mojax.combiners._base.combine`
and a per-leaf `[n, size]` matmul), i.e. two streaming reads of the stacked gradients: the least a
Gram-based combiner can do (one read for the Gram, one for the combine). Gram-free combiners
(linear, PAMA, CTWA) need one.

    python benchmarks/combiners.py            # full grid, writes benchmarks/results/combiners.{json,md}
    python benchmarks/combiners.py --quick    # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchjd.aggregation as tja

REPO = Path(__file__).resolve().parents[1]

from mojax.combiners import REGISTRY, make  # noqa: E402
from mojax.combiners._base import combine, raw_tree_gram, tree_gram  # noqa: E402
from mojax.testing import (  # noqa: E402
    benchmark_command,
    cpu_model,
    graded_weights,
    is_shape,
    llama_like_shapes,
    per_sample_statistics,
    stacked_gradients,
)

TREE_LAYERS = 22  # 9 leaves per block + embed, final norm, LM head = 201 leaves
BATCH, LENGTH = 32, 256  # rollout size of the per-sample statistics (PAMA, CTWA)
CTWA_TARGETS, CTWA_LR = 0.1, 0.02  # the registry's CTWA target and ctwa_reweight's default rate


# ---------------------------------------------------------------- timing


def median_ms(call: Callable[[], Any], repeats: int, budget_s: float) -> float:
    """Median wall time of call() in ms after one warm-up; stops early (>= 3 runs) once budget_s is spent."""
    call()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (len(times) < 3 or spent < budget_s):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return 1e3 * statistics.median(times)


def jax_call(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """A zero-argument call of fn(*args) that waits for the device."""
    return lambda: jax.block_until_ready(fn(*args))


# ---------------------------------------------------------------- data


def llama_like_for_total(total: int, layers: int = TREE_LAYERS) -> dict[str, Any]:
    """LLaMA-like shapes with `layers` blocks whose total size is within 2 * hidden of `total` (vocab absorbs the rest)."""

    def size(hidden: int, vocab: int) -> int:
        return sum(
            int(np.prod(s))
            for s in jax.tree.leaves(llama_like_shapes(hidden, 8 * hidden // 3, vocab, layers), is_leaf=is_shape)
        )

    hidden = 4
    while size(hidden + 4, 4 * (hidden + 4)) <= total:
        hidden += 4
    vocab = max(1, (total - size(hidden, 0)) // (2 * hidden))
    return llama_like_shapes(hidden, 8 * hidden // 3, vocab, layers)


def split_into_tree(flat: np.ndarray, shapes: Any) -> Any:
    """The columns of flat f32[n, d] cut into contiguous leaves f32[n, *shape] following `shapes`."""
    n, offset = flat.shape[0], 0

    def cut(shape: tuple[int, ...]) -> np.ndarray:
        nonlocal offset
        width = int(np.prod(shape))
        leaf = np.ascontiguousarray(flat[:, offset : offset + width]).reshape(n, *shape)
        offset += width
        return leaf

    return jax.tree.map(cut, shapes, is_leaf=is_shape)


def rows(tree: Any) -> np.ndarray:
    """The stacked pytree (or array) as one f32[n, d] matrix, leaves in tree order."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(leaf, np.float32).reshape(leaves[0].shape[0], -1) for leaf in leaves], axis=1)


# ---------------------------------------------------------------- peers


def pama_numpy_weights(advantages: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PAMA Theorem 1 in numpy: a_i = masked mean of max(A_i, 0); c* is the vertex / mix projecting 0 onto [min a, max a]."""
    a = np.tensordot(np.maximum(advantages, 0.0), mask, axes=((1, 2), (0, 1))) / mask.sum()
    low, high = a.min(), a.max()
    at_low, at_high = (a == low) / np.sum(a == low), (a == high) / np.sum(a == high)
    if low > 0:
        return at_low
    if high < 0:
        return at_high
    if high == low:
        return np.full_like(a, 1.0 / a.size)
    share_high = -low / (high - low)
    return share_high * at_high + (1.0 - share_high) * at_low


def ctwa_numpy_step(
    rewards: np.ndarray, signal: np.ndarray, group_ids: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """CTWA's first step in numpy: (applied uniform weights, next weights from the within-group covariances)."""
    n = rewards.shape[1]
    applied = np.full(n, 1.0 / n, np.float32)
    keep = np.isfinite(signal) & (mask.sum(axis=1) > 0)
    scale = np.median(np.abs(signal[keep]))
    if scale > 0:
        keep &= np.abs(signal) <= 100.0 * scale
    covariances = []
    for group in np.unique(group_ids[keep]):
        members = keep & (group_ids == group)
        if members.sum() >= 2:
            r, w = rewards[members], signal[members]
            covariances.append(((r - r.mean(0)) * (w - w.mean())[:, None]).mean(0))
    cov = np.mean(covariances, axis=0) if covariances else np.zeros(n)
    next_log_weights = np.log(applied) + CTWA_LR * np.maximum(CTWA_TARGETS - cov, 0.0)
    return applied, np.exp(next_log_weights)


def torch_rows(tree: Any) -> list[torch.Tensor]:
    """Torch views f32[n, leaf size] of every leaf (no copy)."""
    return [torch.from_numpy(leaf).reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(tree)]


def matrix_peer(aggregate: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """A torchjd-style peer: concatenate the leaves into the Jacobian matrix (as torchjd.autojac does), then aggregate."""
    return lambda parts: aggregate(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))


def weighted_rows_peer(
    weights_of: Callable[[list[torch.Tensor]], torch.Tensor],
) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """A Gram-free peer: w = weights_of(leaves), then w @ J leaf by leaf (no concatenation needed)."""

    def run(parts: list[torch.Tensor]) -> torch.Tensor:
        w = weights_of(parts)
        return torch.cat([w @ part for part in parts])

    return run


def normalised_mgda(matrix: torch.Tensor) -> torch.Tensor:
    """GAPO (p = 1) peer: torchjd MGDA on the rows of J scaled to unit norm."""
    return tja.MGDA()(matrix / matrix.norm(dim=1, keepdim=True))


def row_norms(parts: list[torch.Tensor]) -> torch.Tensor:
    """||g_i|| over all leaves."""
    return torch.sqrt(sum((part * part).sum(dim=1) for part in parts))


def nash_mtl_peer(n: int) -> tuple[str, Callable[[list[torch.Tensor]], torch.Tensor] | None]:
    """torchjd NashMTL, or no peer when its solver dependency `ecos` is not installed."""
    if importlib.util.find_spec("ecos") is None:
        return "torchjd NashMTL (needs ecos: not installed)", None
    return "torchjd NashMTL", matrix_peer(tja.NashMTL(n_tasks=n))


def peers(
    n: int, stats: dict[str, np.ndarray]
) -> dict[str, tuple[str, Callable[[list[torch.Tensor]], torch.Tensor] | None]]:
    """combiner name -> (peer label, peer on the list of torch leaf rows, or None if unavailable) for n objectives."""
    linear_w = torch.from_numpy(graded_weights(n))
    return {
        "linear": ("torch w @ J", weighted_rows_peer(lambda parts: linear_w)),
        "mgda": ("torchjd MGDA", matrix_peer(tja.MGDA())),
        "gapo": ("torchjd MGDA(J/|g|)", matrix_peer(normalised_mgda)),
        "p_gapo": ("torch (l/|g|) @ J", weighted_rows_peer(lambda parts: linear_w / row_norms(parts))),
        "pcgrad": ("torchjd PCGrad", matrix_peer(tja.PCGrad())),
        "cagrad": ("torchjd CAGrad", matrix_peer(tja.CAGrad(c=0.5))),
        "upgrad": ("torchjd UPGrad", matrix_peer(tja.UPGrad())),
        "nash_mtl": nash_mtl_peer(n),
        "pama": (
            "numpy Thm 1 + torch w @ J",
            weighted_rows_peer(
                lambda parts: torch.from_numpy(
                    pama_numpy_weights(stats["advantages"], stats["mask"]).astype(np.float32)
                )
            ),
        ),
        "ctwa": (
            "numpy cov + torch w @ J",
            weighted_rows_peer(
                lambda parts: torch.from_numpy(
                    ctwa_numpy_step(stats["rewards"], stats["signal"], stats["group_ids"], stats["mask"])[0]
                )
            ),
        ),
    }


# ---------------------------------------------------------------- floor and profile


def matrix_rows(leaf: jax.Array) -> jax.Array:
    """A stacked leaf f[n, *shape] viewed as the matrix f[n, size] (a free reshape of a row-major array)."""
    return leaf.reshape(leaf.shape[0], -1)


def combine_as_matrices(weights: jax.Array, grads: Any) -> Any:
    """Candidate combine: w @ J per leaf on the [n, size] view, reshaped back."""
    return jax.tree.map(lambda leaf: (weights.astype(leaf.dtype) @ matrix_rows(leaf)).reshape(leaf.shape[1:]), grads)


def gram_as_matrices(grads: Any) -> jax.Array:
    """Candidate Gram: sum over leaves of m m^T on the [n, size] view, fp32 accumulation."""
    dot = lambda m: jax.lax.dot_general(m, m, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return sum(dot(matrix_rows(leaf)) for leaf in jax.tree.leaves(grads))


def profile_cell(grads: Any, n: int, repeats: int, budget_s: float) -> dict[str, float]:
    """Gram and combine timed alone, as mojax does them (_base) and on [n, size] views; floor = 2 x the faster combine, in ms."""
    weights = jnp.asarray(graded_weights(n))
    timed = lambda fn, *args: median_ms(jax_call(jax.jit(fn), *args), repeats, budget_s)
    profile = {
        "combine_ms": timed(combine, weights, grads),
        "combine_2d_ms": timed(combine_as_matrices, weights, grads),
        "gram_ms": timed(tree_gram, grads),
        "raw_gram_ms": timed(lambda g: raw_tree_gram(g, 1.0), grads),
        "gram_2d_ms": timed(gram_as_matrices, grads),
    }
    return {**profile, "floor_ms": 2.0 * min(profile["combine_ms"], profile["combine_2d_ms"])}


# ---------------------------------------------------------------- one combiner


@dataclasses.dataclass
class Row:
    """One measurement: a combiner on one (n, d, layout), with its peer and the floor."""

    combiner: str
    n: int
    d: int
    layout: str
    mojax_ms: float
    first_call_s: float
    peer: str
    peer_ms: float
    floor_ms: float
    gram_ms: float
    combine_ms: float
    rel_diff: float

    @property
    def speedup(self) -> float:
        """Peer time / mojax time (> 1: mojax is faster)."""
        return self.peer_ms / self.mojax_ms

    @property
    def rest_ms(self) -> float:
        """mojax time not spent in the Gram (if used) or the combine: solver, statistics, checks and dispatch."""
        return self.mojax_ms - self.gram_ms - self.combine_ms

    @property
    def over_floor(self) -> float:
        """mojax time / floor time."""
        return self.mojax_ms / self.floor_ms


def build(name: str, n: int) -> Any:
    """The registry combiner `name` for n objectives, with graded (non-uniform) weights where it takes weights, as its peer."""
    graded = {"linear": {"weights": graded_weights(n)}, "p_gapo": {"preference": graded_weights(n)}}
    return make(name, n, **graded.get(name, {}))


def time_mojax(
    name: str, n: int, grads: Any, extras: dict[str, jax.Array], repeats: int, budget_s: float
) -> tuple[float, float, np.ndarray]:
    """(steady ms, first call s, the combined update flattened to f32[d]) of one jitted mojax update."""
    tx = build(name, n)
    state = tx.init(jax.tree.map(lambda g: g[0], grads))
    update = jax.jit(lambda g, s, e: tx.update(g, s, None, **e)[0])
    start = time.perf_counter()
    out = jax.block_until_ready(update(grads, state, extras))
    first_call_s = time.perf_counter() - start
    steady_ms = median_ms(jax_call(update, grads, state, extras), repeats, budget_s)
    return steady_ms, first_call_s, rows(jax.tree.map(lambda x: x[None], out))[0]


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def run_cell(
    n: int, d: int, names: list[str], layouts: list[str], repeats: int, budget_s: float, log: Callable[[str], None]
) -> tuple[list[Row], list[dict[str, Any]]]:
    """Every combiner and its peer on one (n, d), in each layout; returns rows and the floor/profile records."""
    shapes = llama_like_for_total(d)
    d_tree = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=is_shape))
    flat = stacked_gradients({"J": (d_tree,)}, n, seed=n)["J"]
    stats = per_sample_statistics(n, BATCH, LENGTH)
    peer_of = peers(n, stats)
    results, profiles = [], []
    for layout in layouts:
        host = flat if layout == "flat" else split_into_tree(flat, shapes)
        grads = jax.device_put(host)
        profile = profile_cell(grads, n, repeats, budget_s)
        profiles.append({"n": n, "d": d_tree, "layout": layout, "leaves": len(jax.tree.leaves(grads)), **profile})
        parts = torch_rows(host if layout == "tree" else {"J": host})
        for name in names:
            spec = REGISTRY[name]
            extras = {key: jnp.asarray(stats[key]) for key in spec.reads}
            mojax_ms, first_s, mojax_out = time_mojax(name, n, grads, extras, repeats, budget_s)
            label, peer = peer_of.get(name, ("no peer", None))
            peer_ms = math.nan if peer is None else median_ms(functools.partial(peer, parts), repeats, budget_s)
            diff = math.nan if peer is None else relative_difference(mojax_out, peer(parts).numpy())
            gram_ms = profile["gram_ms"] if spec.uses_gram else 0.0
            row = Row(
                name,
                n,
                d_tree,
                layout,
                mojax_ms,
                first_s,
                label,
                peer_ms,
                profile["floor_ms"],
                gram_ms,
                profile["combine_ms"],
                diff,
            )
            results.append(row)
            log(format_row(row))
        del grads, host, parts
    return results, profiles


# ---------------------------------------------------------------- reporting


def format_row(row: Row) -> str:
    """One table line."""
    return (
        f"| {row.combiner} | {row.n} | {row.d:.1e} | {row.layout} | {row.mojax_ms:.3f} | {row.peer} | {row.peer_ms:.3f} | "
        f"{row.speedup:.2f}x | {row.floor_ms:.3f} | {row.over_floor:.2f}x | {row.gram_ms:.3f} | {row.combine_ms:.3f} | {row.rest_ms:.3f} | "
        f"{row.first_call_s:.2f} | {row.rel_diff:.1e} |"
    )


TABLE_HEADER = (
    "| combiner | n | d | layout | mojax ms | peer | peer ms | peer/mojax | floor ms | mojax/floor | Gram ms | combine ms | rest ms | first call s | rel diff |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
PROFILE_HEADER = (
    "| n | d | layout | leaves | combine ms (_base) | combine ms ([n, size] views) | floor ms | tree_gram ms (_base) | raw_tree_gram ms (no overflow guard) | Gram ms ([n, size] views) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def machine() -> dict[str, Any]:
    """CPU model, core count, memory and library versions."""
    cpu = cpu_model()
    packages = ["jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchjd", "quadprog", "cvxpy"]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "versions": {name: importlib.metadata.version(name) for name in packages},
        "torch_threads": torch.get_num_threads(),
        "jax_devices": [str(device) for device in jax.devices()],
    }


def load() -> str:
    """The `uptime` line (load averages over 1, 5, 15 min)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def verdict(results: list[Row], min_floor_d: int) -> list[str]:
    """The issue's targets (faster than the peer everywhere; within 2x of the floor for d >= min_floor_d) as counts and a per-combiner table."""
    compared = [r for r in results if not math.isnan(r.peer_ms)]
    slower = [r for r in compared if r.speedup < 1.0]
    big = [r for r in results if r.d >= min_floor_d]
    far = [r for r in big if r.over_floor > 2.0]
    lines = [f"- faster than the peer in {len(compared) - len(slower)}/{len(compared)} measurements with a peer."]
    lines += [f"  - no peer: {label}" for label in sorted({r.peer for r in results if math.isnan(r.peer_ms)})]
    lines += [f"- within 2x of the floor at d >= {min_floor_d:.0e}: {len(big) - len(far)}/{len(big)} measurements.", ""]
    return lines + ranges_table(results)


def span(values: list[float]) -> str:
    """'min-max' of the values, or '-' if there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return f"{min(finite):.2f}-{max(finite):.2f}" if finite else "-"


def ranges_table(results: list[Row]) -> list[str]:
    """Per combiner and layout: range over n of peer/mojax and of mojax/floor at each d."""
    sizes = sorted({r.d for r in results})
    header = (
        " | ".join(f"peer/mojax d={d:.0e}" for d in sizes) + " | " + " | ".join(f"mojax/floor d={d:.0e}" for d in sizes)
    )
    lines = [f"| combiner | layout | {header} |", "|---|---|" + "---|" * (2 * len(sizes))]
    for layout in sorted({r.layout for r in results}):
        for name in dict.fromkeys(r.combiner for r in results):
            cell = lambda d, key, name=name, layout=layout: span(
                [getattr(r, key) for r in results if (r.combiner, r.layout, r.d) == (name, layout, d)]
            )
            lines.append(
                f"| {name} | {layout} | "
                + " | ".join(cell(d, "speedup") for d in sizes)
                + " | "
                + " | ".join(cell(d, "over_floor") for d in sizes)
                + " |"
            )
    return lines


def write_results(
    path: Path, meta: dict[str, Any], results: list[Row], profiles: list[dict[str, Any]], summary: list[str]
) -> None:
    """benchmarks/results/<stem>.json and .md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [
        dict(dataclasses.asdict(r), speedup=r.speedup, over_floor=r.over_floor, rest_ms=r.rest_ms) for r in results
    ]
    path.with_suffix(".json").write_text(
        json.dumps({**meta, "profile": profiles, "results": records, "summary": summary}, indent=1)
    )
    lines = [
        "# Combiner overhead: mojax vs peers and the memory floor",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {meta['machine']['nproc']} cores, {meta['machine']['cpu']}, {meta['machine']['memory_gib']} GiB; torch threads {meta['machine']['torch_threads']}  ",
        f"Versions: python {meta['machine']['python']}, "
        + ", ".join(f"{k} {v}" for k, v in meta["machine"]["versions"].items())
        + "  ",
        f"Load before: `{meta['load_before']}`  ",
        f"Load after: `{meta['load_after']}`  ",
        f"Cells (n, d) done: {meta['cells_done']}",
        "",
        "Times are steady-state medians (ms) of jitted calls ended by `block_until_ready`; `first call` is trace + compile + run.",
        "`floor` = 2 x the jitted `w @ J` alone (the faster of `_base.combine` and a per-leaf matmul on `[n, size]` views): two streaming reads of the fp32 stacked gradients, the least a Gram-based combiner needs; Gram-free ones (linear, PAMA, CTWA) need half.",
        "`Gram ms` and `combine ms` are the tree Gram and `w @ J` timed alone on the same data; `rest` = mojax - Gram - combine: solver, statistics, checks and dispatch.",
        "`rel diff` = max |mojax - peer| / max |peer| over the combined update (PCGrad's random order and NashMTL's solver differ by design).",
        f"`tree` = LLaMA-like pytree ({TREE_LAYERS} blocks, ~200 leaves) with the same total d; torchjd peers pay the concatenation into one matrix, as `torchjd.autojac` does.",
        f"PAMA/CTWA statistics: B = {BATCH}, T = {LENGTH}.",
        "",
        "## Summary (ranges are over n in the table below)",
        "",
        *summary,
        "",
        "## Floor and profile (same data, no combiner logic; `[n, size] views` = each leaf reshaped to a matrix first, a candidate for `_base`)",
        "",
        PROFILE_HEADER,
        *[
            f"| {p['n']} | {p['d']:.1e} | {p['layout']} | {p['leaves']} | {p['combine_ms']:.3f} | {p['combine_2d_ms']:.3f} | {p['floor_ms']:.3f} | "
            f"{p['gram_ms']:.3f} | {p['raw_gram_ms']:.3f} | {p['gram_2d_ms']:.3f} |"
            for p in profiles
        ],
        "",
        "## All measurements",
        "",
        TABLE_HEADER,
        *[format_row(r) for r in results],
        "",
    ]
    path.with_suffix(".md").write_text("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="2,3,5,8", help="comma-separated numbers of objectives")
    parser.add_argument("--d", default="1e5,1e6,1e7", help="comma-separated parameter counts")
    parser.add_argument(
        "--combiners",
        default=",".join(REGISTRY),
        help="comma-separated registry names (the mgda_ variants are tested, not benchmarked, by default)",
    )
    parser.add_argument("--layouts", default="flat,tree", help="flat, tree or both")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement (after one warm-up)")
    parser.add_argument(
        "--budget-s", type=float, default=2.0, help="stop repeating a measurement after this many seconds (min 3 runs)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: n=3, d=1e5, 3 repeats")
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "combiners"), help="output path stem (.json and .md)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.d, args.repeats = "3", "1e5", 3
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the grid, print the table, write the results."""
    args = parse_args(argv)
    torch.set_num_threads(2)
    names = args.combiners.split(",")
    meta = {
        "command": benchmark_command("benchmarks/combiners.py", sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine(),
        "load_before": load(),
    }
    print(f"{meta['load_before']}\n{TABLE_HEADER}", flush=True)
    cells = [(int(float(d)), int(n)) for d in args.d.split(",") for n in args.n.split(",")]
    results, profiles = [], []
    for done, (d, n) in enumerate(cells, start=1):
        cell_rows, cell_profiles = run_cell(
            n, d, names, args.layouts.split(","), args.repeats, args.budget_s, lambda line: print(line, flush=True)
        )
        results += cell_rows
        profiles += cell_profiles
        meta.update(load_after=load(), cells_done=f"{done}/{len(cells)}")
        write_results(Path(args.out), meta, results, profiles, verdict(results, min_floor_d=10**6))
    print("\n".join(["", *verdict(results, min_floor_d=10**6), meta["load_after"]]))


if __name__ == "__main__":
    main()
