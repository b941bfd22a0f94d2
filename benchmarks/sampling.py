"""Top-p decode speed: this ``mojax.models.generate`` against an earlier version of the file, in the same run.

The earlier version (``--before``, e.g. ``git show a224667:mojax/models/generate.py > /tmp/generate_before.py``)
sorted the whole vocabulary at every top-p step and compiled temperature and top_p into the program. Both decode
the same prompts with the same random model of ``benchmarks/model.py``'s sizes (fp32, KV cache, no early stop),
calls alternating, median of ``--repeats`` per round, ``--rounds`` rounds; the ratio is before / after (> 1: this
version is faster). Two temperatures: at 1.0 the random model's next-token distribution is nearly flat, so the
nucleus holds most of the vocabulary, exceeds the ``top_p_candidates`` and every step takes the full-sort fallback;
at 0.05 it is peaked, as a trained model's usually is, and the nucleus lies among the candidates. Also timed: the
first call after changing the temperature (before: a recompilation; now: none).

    python benchmarks/sampling.py --before /tmp/generate_before.py     # writes benchmarks/results/sampling.{json,md}
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from model import FULL_SIZES, SMOKE_SIZES  # noqa: E402

from mojax.models.llama import LlamaForCausalLM  # noqa: E402
from mojax.testing import benchmark_command, write_report  # noqa: E402

after = importlib.import_module("mojax.models.generate")  # the module (mojax.models.generate is also a function)
TOP_P = 0.9
TEMPERATURES = (1.0, 0.05)


def load_module(path: Path) -> ModuleType:
    """The generate module in the file at `path`, imported under its own name."""
    spec = importlib.util.spec_from_file_location("generate_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def decoder(module: ModuleType, model: Any, prompts: np.ndarray, new: int, pad: int) -> Callable[[float], Any]:
    """temperature -> one top-p decode of `new` tokens with `module`'s generate (blocks until done)."""

    def run(temperature: float) -> Any:
        config = module.SamplingConfig(
            max_new_tokens=new, temperature=temperature, top_p=TOP_P, pad_token_id=pad, stop_token_ids=()
        )
        mask = np.ones_like(prompts)
        return jax.block_until_ready(module.generate(model, prompts, mask, jax.random.key(0), config).tokens)

    return run


def seconds(call: Callable[[float], Any], temperature: float) -> float:
    started = time.perf_counter()
    call(temperature)
    return time.perf_counter() - started


def bench(name: str, config: Any, shape: tuple[int, int, int], before: ModuleType, repeats: int, rounds: int):
    """Rows (one per temperature) of before/after medians per round and the first-call times after a change."""
    batch, prompt, new = shape
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(1).integers(3, config.vocab_size, size=(batch, prompt)).astype(np.int32)
    runs = {"before": decoder(before, model, prompts, new, config.pad_token_id)}
    runs["after"] = decoder(after, model, prompts, new, config.pad_token_id)
    first = {label: seconds(run, TEMPERATURES[0]) for label, run in runs.items()}
    changed = {label: seconds(run, TEMPERATURES[1]) for label, run in runs.items()}
    rows = []
    for temperature in TEMPERATURES:
        ratios, medians = [], []
        for _ in range(rounds):
            times = {label: [] for label in runs}
            for _ in range(repeats):
                for label, run in runs.items():
                    times[label].append(seconds(run, temperature))
            median = {label: statistics.median(values) for label, values in times.items()}
            medians.append({label: 1e3 * value for label, value in median.items()})
            ratios.append(median["before"] / median["after"])
        rows.append(
            {
                "config": name,
                "shape": f"{batch}x({prompt}+{new})",
                "temperature": temperature,
                "top_p": TOP_P,
                "ratio_before_over_after": statistics.median(ratios),
                "ratio_spread": [min(ratios), max(ratios)],
                "median_ms_per_round": medians,
                "first_call_s": first,
                "first_call_after_temperature_change_s": changed,
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Top-p decode: this generate.py against the earlier one (full vocabulary sort per step)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {os.cpu_count()} CPUs, shared with other jobs while this ran; only same-run ratios are reported.  ",
        f"Load before: `{report['load_before']}`  ",
        f"Load after: `{report['load_after']}`  ",
        f"top_p {TOP_P}, top_k 0, fp32, KV cache, no early stop; {report['rounds']} rounds of {report['repeats']} "
        "alternating calls; ratio = before / after of the round medians (> 1: faster now), median and min-max.",
        "",
        "| config | shape | temperature | ratio before/after | spread | first call s (before / after) | "
        "first call after a temperature change s (before / after) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        f, c = r["first_call_s"], r["first_call_after_temperature_change_s"]
        lines.append(
            f"| {r['config']} | {r['shape']} | {r['temperature']} | {r['ratio_before_over_after']:.2f} | "
            f"{r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f} | {f['before']:.1f} / {f['after']:.1f} | "
            f"{c['before']:.1f} / {c['after']:.1f} |"
        )
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="an earlier mojax/models/generate.py")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, to check the script quickly")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    report = {
        "command": benchmark_command("benchmarks/sampling.py", sys.argv[1:] if argv is None else argv),
        "load_before": uptime(),
        "repeats": args.repeats,
        "rounds": args.rounds,
        "rows": [],
    }
    before = load_module(args.before)
    for name, (config, _, shape) in (SMOKE_SIZES if args.smoke else FULL_SIZES).items():
        report["rows"] += bench(name, config, shape, before, args.repeats, args.rounds)
    report["load_after"] = uptime()
    text = markdown(report)
    print(text)
    write_report(args.out, "sampling", report, text)
    return report


if __name__ == "__main__":
    main()
