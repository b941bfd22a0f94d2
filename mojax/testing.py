"""Synthetic per-objective gradients and per-sample statistics, for tests and benchmarks of combiners, and the
interleaved timing the benchmarks measure peers with.

Public so that users can benchmark or test their own combiners the way mojax does: LLaMA-shaped gradient pytrees
whose objectives conflict, every per-sample extra argument of the combiner contract, and same-run timings of a
contender against its peer.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mojax.combiners._base import GRAM_RESCALING_SCOPE


def graded_weights(n: int) -> np.ndarray:
    """f32[n] proportional to 1..n and summing to 1: a non-uniform point of the simplex."""
    ramp = np.arange(1, n + 1, dtype=np.float32)
    return ramp / ramp.sum()


def per_sample_statistics(n: int, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every per-sample extra argument of the combiner contract for n objectives, B = batch, T = length."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), np.float32)
    mask[::2, length // 2 :] = 0.0  # every other completion ends early
    return {
        "rewards": rng.uniform(0.0, 1.0, (batch, n)).astype(np.float32),
        "signal": rng.standard_normal(batch).astype(np.float32),
        "group_ids": (np.arange(batch) // 2).astype(np.int32),
        "advantages": rng.standard_normal((n, batch, length)).astype(np.float32),
        "losses": rng.uniform(0.5, 2.0, n).astype(np.float32),
        "mask": mask,
        "ratio": np.exp(rng.uniform(-0.3, 0.3, (batch, length))).astype(np.float32),
    }


def llama_like_shapes(hidden: int, ffn: int, vocab: int, layers: int) -> dict[str, Any]:
    """Parameter shapes of a LLaMA-style decoder (GQA with hidden/4 key-value width), as a nested dict."""
    kv = hidden // 4
    block = {
        "attn_norm": (hidden,),
        "q": (hidden, hidden),
        "k": (hidden, kv),
        "v": (hidden, kv),
        "o": (hidden, hidden),
        "mlp_norm": (hidden,),
        "gate": (hidden, ffn),
        "up": (hidden, ffn),
        "down": (ffn, hidden),
    }
    return {
        "embed": (vocab, hidden),
        "layers": [dict(block) for _ in range(layers)],
        "final_norm": (hidden,),
        "lm_head": (hidden, vocab),
    }


def is_shape(node: Any) -> bool:
    """Whether a node of a shapes tree is a leaf shape (a tuple of ints)."""
    return isinstance(node, tuple) and all(isinstance(size, int) for size in node)


def stacked_gradients(shapes: Any, n: int, seed: int = 0, dtype: Any = np.float32) -> Any:
    """Per-objective gradients f[n, *shape] for every leaf shape: a shared direction with signed loadings plus noise, so objectives conflict."""
    rng = np.random.default_rng(seed)
    loadings = np.linspace(1.0, -0.5, n, dtype=np.float32)

    def leaf(shape: tuple[int, ...]) -> np.ndarray:
        shared = rng.standard_normal(shape, np.float32)
        noise = rng.standard_normal((n, *shape), np.float32)
        return (loadings.reshape((n,) + (1,) * len(shape)) * shared + noise).astype(dtype)

    return jax.tree.map(leaf, shapes, is_leaf=is_shape)


def conditionals(program_text: str, gram_rescaling: bool = False) -> list[str]:
    """The ``conditional`` operations of a compiled program's text (``.compile().as_text()``): those of
    :func:`mojax.combiners.tree_gram`'s rescaling if ``gram_rescaling``, else all the others (a train step's skip of
    a non-finite update, for one)."""
    found = [line for line in program_text.splitlines() if " conditional(" in line]
    return [line for line in found if (GRAM_RESCALING_SCOPE in line) is gram_rescaling]


def call_orders(contenders: int, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` orders in which to call ``contenders`` contenders: permutations of ``range(contenders)`` drawn from
    a fixed seed, so the same arguments give the same orders.

    Random rather than rotated orders, because a call's time depends on what ran just before it (caches, the
    allocator's free lists): rotating a list keeps every contender's predecessor, so a contender that always follows
    a large program reads slower than the same program elsewhere in the list (the linear step of
    ``benchmarks/rl_step.py``, always after the peers' step, read slower than the very same compiled program in the
    scalar combiners' trainers: ``benchmarks/RESULTS.md``, "Timings in random orders"). Random orders turn that bias
    into noise that the medians absorb.
    """
    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.permutation(contenders)] for _ in range(count)]


def interleaved_timings(calls: dict[str, Callable[[], Any]], rounds: int, repeats: int) -> dict[str, dict]:
    """Same-run timings of several contenders: each is called once to compile/warm up (that first call is timed),
    then ``rounds`` rounds of ``repeats`` interleaved calls each, every pass over the contenders in a random order
    (:func:`call_orders`) so that no contender always runs after the same one.

    Args:
      calls: name -> a call that blocks until its result is ready.
      rounds: rounds; each gives one median per contender, so the spread over rounds shows the machine's noise.
      repeats: calls of every contender per round.

    Returns:
      ``{"first_call_s": {name: seconds}, "round_medians_s": {name: [median seconds of each round]}}``.
    """
    names = list(calls)
    first = {}
    for name in names:
        started = time.perf_counter()
        calls[name]()
        first[name] = time.perf_counter() - started
        calls[name]()
    medians = {name: [] for name in names}
    for round_index in range(rounds):
        times = {name: [] for name in names}
        for order in call_orders(len(names), repeats, seed=round_index):
            for name in (names[i] for i in order):
                started = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - started)
        for name in names:
            medians[name].append(statistics.median(times[name]))
    return {"first_call_s": first, "round_medians_s": medians}


def same_round_ratios(timing: dict, reference: str, contender: str) -> tuple[float, float, float]:
    """(median, min, max) over the rounds of :func:`interleaved_timings` of the reference's round median over the
    contender's (> 1: the contender is faster): only ratios within a round, where both ran on the same machine state."""
    medians = timing["round_medians_s"]
    ratios = [r / c for r, c in zip(medians[reference], medians[contender], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


@contextlib.contextmanager
def xla_compile_seconds() -> Iterator[list[float]]:
    """Yields a list that collects the seconds of every XLA compilation started inside the block (JAX's backend
    compile event, one entry per program compiled): the part of a first call that is XLA's, apart from tracing,
    lowering and running. A program that JAX's persistent compilation cache holds is read, not compiled: no entry."""
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    collected: list[float] = []

    def listener(event: str, seconds: float, **_: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            collected.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield collected
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def benchmark_command(script: str, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> str:
    """The shell command that reruns a benchmark, as its report states it: ``python script argv``, after
    ``XLA_FLAGS=...`` where that is set (in ``environ``, the process environment by default), since XLA's options change
    the compiled programs a report times."""
    command = shlex.join(["python", script, *argv])
    flags = (os.environ if environ is None else environ).get("XLA_FLAGS", "")
    return f"XLA_FLAGS={shlex.quote(flags)} {command}" if flags else command


def report_heading(title: str, report: Mapping[str, Any]) -> list[str]:
    """The first lines of a benchmark's markdown report: its title, then the ``command``, ``machine`` and ``date`` of
    `report` (markdown line breaks between them)."""
    return [
        f"# {title}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Date: {report['date']}  ",
    ]


def write_report(out: Path, name: str, report: dict, table: str) -> None:
    """A benchmark's results: ``report`` as ``out/<name>.json`` and its markdown ``table`` as ``out/<name>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)


VECTOR_EXTENSIONS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("asimd", "NEON"))
"""``/proc/cpuinfo`` flag -> name of the CPU's vector extensions, widest first. A matmul kernel's peak rate follows the
widest one it uses, so two machines of the same model name can put a benchmark's peers in a different order."""


def cpu_description(cpuinfo: str) -> str | None:
    """``"<model name> (family <F>, <widest vector extension>)"`` from the text of ``/proc/cpuinfo``; None when it
    names no model. The parts in parentheses are left out where the text lacks them (other architectures)."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if not fields.get("model name"):
        return None
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    widest = next((name for flag, name in VECTOR_EXTENSIONS if flag in flags), None)
    family = f"family {fields['cpu family']}" if fields.get("cpu family") else None
    details = ", ".join(part for part in (family, widest) if part)
    return f"{fields['model name']} ({details})" if details else fields["model name"]


def cpu_model() -> str:
    """This machine's CPU for reports: :func:`cpu_description` of ``/proc/cpuinfo``, else the platform's processor or
    machine name."""
    cpuinfo = Path("/proc/cpuinfo")
    described = cpu_description(cpuinfo.read_text()) if cpuinfo.exists() else None
    return described or platform.processor() or platform.machine()


def cpu_summary() -> str:
    """``"<n> CPUs (<cpu_model()>)"``: the machine line of the benchmarks' reports."""
    return f"{os.cpu_count()} CPUs ({cpu_model()})"
