"""Throughput of the built-in rewards of mojax.rl.rewards, in texts per second, in one process.

Each built-in (default options; ``exact_match`` gets an ``answer`` column) scores two generated sets:
1,000 short texts of about 8 words and 200 texts of about 50 words, drawn from a fixed word list mixing
neutral, positive, negative and offensive words, answer tags and numbers. The time is the best of
`--repeats` calls of the batched function on the whole set (the first call, which loads lexicons and
the profanity arrays, is excluded). Results go to benchmarks/results/rewards.{json,md}.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/rewards.py
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from mojax.rl.rewards import BUILTIN_REWARDS
from mojax.testing import benchmark_command, cpu_model

WORDS = (
    "the a movie film story plot actor scene was is and but not very really quite so too it this that "
    "great good wonderful lovely enjoyable boring terrible awful bad dull slow long short funny sad "
    "stupid idiot hell damn garbage crap extraordinary circumstances unconventional methodology "
    "i cannot sorry help answer <answer>42</answer> 7 1,000 3.5 {} [] ."
).split()


def texts(count: int, words: int, seed: int) -> list[str]:
    """`count` texts of about `words` words each (uniform in [words/2, 3 words/2]), with sentence breaks."""
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        chosen = [rng.choice(WORDS) for _ in range(rng.randint(words // 2, 3 * words // 2))]
        made.append(" ".join(word + ("." if rng.random() < 0.1 else "") for word in chosen).capitalize())
    return made


def best_texts_per_second(fn, completions: list[str], repeats: int) -> float:
    """Texts per second of the fastest of `repeats` batched calls."""
    batch = len(completions)
    arguments = ([""] * batch, completions)
    keywords = {"completion_ids": [[]] * batch, "answer": ["42"] * batch}
    fn(*arguments, **keywords)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*arguments, **keywords)
        best = min(best, time.perf_counter() - start)
    return batch / best


def machine() -> dict:
    """CPU model, cores, Python and the reward packages' versions."""
    cpu = cpu_model()
    packages = ["numpy", "vaderSentiment", "pyphen"]
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "versions": {name: importlib.metadata.version(name) for name in packages},
    }


def load() -> str:
    """The `uptime` line (load averages: the machine may be shared)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def write_results(path: Path, meta: dict, rows: list[dict]) -> None:
    """benchmarks/results/rewards.json and .md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=1) + "\n")
    info = meta["machine"]
    lines = [
        "# Built-in reward throughput",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {info['cpu']}, {info['nproc']} cores ({info['affinity']} usable), OMP_NUM_THREADS={info['omp_num_threads']}, "
        f"{info['system']}; Python {info['python']}, "
        + ", ".join(f"{name} {version}" for name, version in info["versions"].items())
        + "  ",
        f"Load before: `{meta['load_before']}`  ",
        f"Load after: `{meta['load_after']}`  ",
        f"Inputs: {meta['short']['count']} texts of ~{meta['short']['words']} words and {meta['long']['count']} of "
        f"~{meta['long']['words']} words; best of {meta['repeats']} batched calls, one process.",
        "",
        "| reward | short texts/s | ~50-word texts/s |",
        "|---|---|---|",
    ]
    lines += [f"| {row['reward']} | {row['short_texts_per_s']:,.0f} | {row['long_texts_per_s']:,.0f} |" for row in rows]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rewards")
    args = parser.parse_args()
    short, long = texts(1000, 8, seed=0), texts(200, 50, seed=1)
    meta = {
        "command": benchmark_command("benchmarks/rewards.py", sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "load_before": load(),
        "repeats": args.repeats,
        "short": {"count": len(short), "words": 8},
        "long": {"count": len(long), "words": 50},
    }
    rows = []
    print(f"{'reward':<14} {'short texts/s':>14} {'~50-word texts/s':>17}")
    for name, factory in BUILTIN_REWARDS.items():
        fn = factory()
        row = {
            "reward": name,
            "short_texts_per_s": best_texts_per_second(fn, short, args.repeats),
            "long_texts_per_s": best_texts_per_second(fn, long, args.repeats),
        }
        rows.append(row)
        print(f"{name:<14} {row['short_texts_per_s']:>14,.0f} {row['long_texts_per_s']:>17,.0f}")
    meta["load_after"] = load()
    write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
