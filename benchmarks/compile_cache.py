"""What mojax's caches save a ``mojax train`` run: the same run without them, with empty ones and with the caches the
previous run filled, each in a fresh process. The caches: JAX's persistent compilation cache (the compiled programs)
and, for a GGUF model, the tokenizer converted from the file (:func:`mojax.models.load_tokenizer`).

Each round gives the runs a new temporary directory (``TMPDIR``), where ``mojax train`` keeps its compilation cache by
default (:mod:`mojax.compilation_cache`), with the converted tokenizers in its ``tokenizers`` folder
(``MOJAX_TOKENIZER_CACHE``), and runs, in a fresh process each and a new ``output_dir``:

- ``off``: ``JAX_ENABLE_COMPILATION_CACHE=false`` and ``MOJAX_TOKENIZER_CACHE=off``: every program compiled, the
  tokenizer converted (odd rounds first, even rounds last);
- ``cold``: empty caches, every program compiled and the slower ones written, the tokenizer converted and kept;
- ``warm``: the same run again on the caches ``cold`` filled: a rerun, or a resumed run, of the same config.

Reported per kind, median and range over the rounds: the process's wall time (imports, model load, compiles, the steps,
the export unless ``--set export=false``), the first step's time (rollout + rewards + update from its ``timing/*``
metrics: where the first compiles happen), the median of the later steps (which compile nothing unless a new length
bucket or the evaluation's sampler comes up), and the cache's size after the run; and whether every run of a round
logged the same last metrics (rewards, losses, weights; timings left out). Results go to ``OUT/NAME.{json,md}``.

    python benchmarks/compile_cache.py                                    # the tiny example, 20 steps, 3 rounds
    MOJAX_CACHE=/tmp/mojax-data-cache python benchmarks/compile_cache.py --config examples/smollm2_reviews.yaml \\
        --steps 2 --rounds 2 --set eval_steps=0 --set export=false
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mojax.testing import benchmark_command, cpu_summary, report_heading, write_report

REPO = Path(__file__).resolve().parents[1]
KINDS = ("off", "cold", "warm")
STEP_PARTS = ("timing/rollout", "timing/rewards", "timing/update")


def run_environment(kind: str, temporary: Path) -> dict[str, str]:
    """The process environment of one run: this one's without JAX cache settings, ``TMPDIR`` the round's folder, the
    converted tokenizers kept in its ``tokenizers`` folder, and both caches turned off for ``off``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAX_ENABLE_COMPILATION_CACHE"))
    }
    env["TMPDIR"] = str(temporary)
    env["MOJAX_TOKENIZER_CACHE"] = str(temporary / "tokenizers")
    if kind == "off":
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        env["MOJAX_TOKENIZER_CACHE"] = "off"
    return env


def train_command(config: str, steps: int, output_dir: Path, overrides: Sequence[str]) -> list[str]:
    """``python -m mojax train`` of the config for `steps` steps into `output_dir`, without TensorBoard and the
    progress bar."""
    return [
        sys.executable,
        "-m",
        "mojax",
        "train",
        config,
        f"steps={steps}",
        f"output_dir={output_dir}",
        "logging.tensorboard=false",
        "logging.progress=false",
        *overrides,
    ]


def run_train(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds of the command in a fresh process; a failed run raises with its output's tail."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds


def step_records(output_dir: Path) -> list[dict]:
    """The training steps' records of a run's ``metrics.jsonl`` (those with a ``timing/update``)."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "timing/update" in record]


def step_seconds(record: dict) -> float:
    """Rollout + rewards + update of one step."""
    return sum(record[part] for part in STEP_PARTS)


def without_timing(record: dict) -> dict:
    """A metrics record less its timings (what must not depend on the cache)."""
    return {key: value for key, value in record.items() if not key.startswith("timing/")}


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under `folder` (0 when it does not exist)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0


def round_order(round_index: int) -> tuple[str, ...]:
    """The kinds in the order a round runs them: ``off`` first in odd rounds (1, 3, ...), last in even ones."""
    return KINDS if round_index % 2 == 1 else ("cold", "warm", "off")


def measure_round(
    round_index: int,
    config: str,
    steps: int,
    overrides: Sequence[str],
    run: Callable[[list[str], dict[str, str]], float] = run_train,
) -> dict[str, dict]:
    """Kind -> {wall_s, first_step_s, later_step_median_s, cache_bytes, last_metrics} for one round."""
    measured = {}
    with tempfile.TemporaryDirectory(prefix="compile-cache-round-") as folder:
        temporary = Path(folder)
        cache = temporary / f"mojax-xla-cache-{os.getuid()}"
        for kind in round_order(round_index):
            output_dir = temporary / f"run-{kind}"
            wall = run(train_command(config, steps, output_dir, overrides), run_environment(kind, temporary))
            records = step_records(output_dir)
            later = [step_seconds(record) for record in records[1:]]
            measured[kind] = {
                "wall_s": wall,
                "first_step_s": step_seconds(records[0]),
                "later_step_median_s": statistics.median(later) if later else None,
                "cache_bytes": folder_bytes(cache) if kind != "off" else 0,
                "last_metrics": without_timing(records[-1]),
            }
    return measured


def summary(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Kind -> (median, min, max) over the rounds of each timing, the largest cache size, and whether every round's
    runs logged the same last metrics."""
    summarised = {}
    for kind in KINDS:
        entry = {}
        for field in ("wall_s", "first_step_s", "later_step_median_s"):
            values = [measured[kind][field] for measured in rounds if measured[kind][field] is not None]
            entry[field] = (statistics.median(values), min(values), max(values)) if values else None
        entry["cache_bytes"] = max(measured[kind]["cache_bytes"] for measured in rounds)
        summarised[kind] = entry
    same = all(len({json.dumps(m[kind]["last_metrics"], sort_keys=True) for kind in KINDS}) == 1 for m in rounds)
    return {"kinds": summarised, "same_last_metrics": same}


def seconds_text(seconds: float) -> str:
    """Seconds to a tenth from 10 s on, else to three significant digits (7.38, 0.0135)."""
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:#.3g}"


def seconds_cell(value: tuple[float, float, float] | None, rounds: int) -> str:
    """``median (min-max)`` in :func:`seconds_text`, the range only with more than one round; a dash for no value."""
    if value is None:
        return "-"
    median, low, high = (seconds_text(seconds) for seconds in value)
    return median if rounds == 1 else f"{median} ({low}-{high})"


def markdown(report: dict) -> str:
    """The report's table."""
    count = len(report["rounds"])
    kinds = report["summary"]["kinds"]
    lines = [
        *report_heading(
            "`mojax train` with and without its caches (compiled programs; a GGUF model's converted tokenizer)", report
        ),
        f"Config: `{report['config']}`, {report['steps']} steps, overrides: {' '.join(report['overrides']) or 'none'}; "
        f"{count} round(s), each in a new temporary directory; median (min-max) over the rounds.",
        "",
        "| run | wall s | first step s | later steps' median s | compilation cache MB | wall / off |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    off_wall = kinds["off"]["wall_s"][0]
    for kind in KINDS:
        entry = kinds[kind]
        lines.append(
            f"| {kind} | {seconds_cell(entry['wall_s'], count)} | {seconds_cell(entry['first_step_s'], count)} | "
            f"{seconds_cell(entry['later_step_median_s'], count)} | {entry['cache_bytes'] / 2**20:.1f} | "
            f"{entry['wall_s'][0] / off_wall:.2f} |"
        )
    same = "yes" if report["summary"]["same_last_metrics"] else "NO"
    lines += ["", f"Same last metrics (timings left out) in every run of every round: {same}.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/tiny.yaml", help="the run's config (default examples/tiny.yaml)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three runs (default 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="the reports' folder")
    parser.add_argument("--name", default=None, help="the reports' name (default compile_cache_<config's stem>)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error(f"--steps and --rounds must be at least 1, got {args.steps} and {args.rounds}")
    return args


def main(argv: Sequence[str] | None = None, run: Callable[[list[str], dict[str, str]], float] = run_train) -> dict:
    args = parse_args(argv)
    rounds = []
    for index in range(1, args.rounds + 1):
        rounds.append(measure_round(index, args.config, args.steps, args.set, run))
        print(f"round {index}: " + ", ".join(f"{kind} {rounds[-1][kind]['wall_s']:.1f} s" for kind in KINDS))
    report = {
        "command": benchmark_command("benchmarks/compile_cache.py", sys.argv[1:] if argv is None else argv),
        "machine": cpu_summary(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": args.config,
        "steps": args.steps,
        "overrides": args.set,
        "rounds": rounds,
        "summary": summary(rounds),
    }
    table = markdown(report)
    write_report(args.out, args.name or f"compile_cache_{Path(args.config).stem}", report, table)
    print(table)
    return report


if __name__ == "__main__":
    main()
