"""Where a sampling call's time goes: the prefill and each decode step of ``generate``, by kind of XLA operation.

One greedy ``generate`` call with a shared prefill (``num_generations`` completions per prompt, the trainer's
rollout) on SmolLM2-135M's shapes (random weights, nothing downloaded), fp32, XLA:CPU. ``jax.profiler`` traces
``--calls`` calls; every XLA operation's time is summed per kind, the kinds read from the operation's source in the
compiled program (its ``op_name`` metadata): the projections' matmuls, the attention's two contractions, the LM
head's matmul, the KV cache's writes (``dynamic_update_slice``), the slices XLA copies out of stacked arrays
(``slice``, ``squeeze``: a layer's cache, re-laid out for the attention, or its weights), the rest elementwise work.
Operations that run ``new_tokens - 1`` times per call are the decode loop's; the others are the prefill's and the
setup's. Times are summed over XLA's threads, so a column can exceed the wall time. Outside the profiler, the wall
time of one decode step is the difference between the call and a one-token call (the prefill alone) over the
``new_tokens - 1`` steps, medians of interleaved calls, and its rate the step's matmul FLOPs
(``ModelConfig.forward_flops``) over that time.

    python benchmarks/profile_decode.py
    python benchmarks/profile_decode.py --layers 1 --vocab 2048 --prompts 2 --new-tokens 3 --calls 1 --out /tmp/x
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import smollm2_shapes, xla_operation_times  # noqa: E402

from mojax.host_memory import keep_freed_host_memory  # noqa: E402
from mojax.models import LlamaForCausalLM  # noqa: E402
from mojax.models.generate import SamplingConfig, generate  # noqa: E402
from mojax.testing import benchmark_command, cpu_summary, interleaved_timings, write_report  # noqa: E402

ATTENTION_EINSUMS = ("bkgts", "btkgd", "bksd", "bskd", "pksd")
"""Index letters of :func:`mojax.models.llama.attention`'s contractions, as they appear in their ``op_name`` (``pksd``:
those with a shared prefix's keys and values)."""


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (result shape, ``op_name`` metadata or "")} of a compiled program's text."""
    found = {}
    for line in hlo_text.splitlines():
        head = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if head:
            source = re.search(r'op_name="([^"]*)"', line)
            found.setdefault(head.group(1), (head.group(2), source.group(1) if source else ""))
    return found


def operation_kind(op_name: str, vocab_size: int, shape: str) -> str:
    """The kind of a decode operation from its source ``op_name`` (and result ``shape``, for the LM head)."""
    if "dot_general" in op_name:
        if any(letters in op_name for letters in ATTENTION_EINSUMS):
            return "matmul: attention"
        if "vd->" in op_name or re.search(rf"[\[,]{vocab_size}[,\]]", shape):  # [rows, V] or, by columns, [V, rows]
            return "matmul: LM head"
        return "matmul: projections"
    if "dynamic_update_slice" in op_name:
        return "KV cache writes (dynamic-update-slice)"
    if re.search(r"/(dynamic_)?slice$|/squeeze$", op_name):
        return "slices copied out (a layer's cache or weights)"
    return "elementwise and other"


def profile(model, prompt_ids: np.ndarray, generations: int, new_tokens: int, calls: int) -> dict:
    """Wall time per call and ms per kind of the prefill (and setup) and of one decode step."""
    graphdef, state = nnx.split(model)
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=(), pad_token_id=0)
    call = jax.jit(
        lambda s, ids, key: generate((graphdef, s), ids, None, key, config, num_generations=generations).tokens
    )
    ids, key = jnp.asarray(prompt_ids), jax.random.key(0)
    step_ms = decode_step_wall_ms(call, (graphdef, state), ids, key, config, generations, calls)
    hlo = call.lower(state, ids, key).compile().as_text()
    known = instructions(hlo)
    for _ in range(2):
        jax.block_until_ready(call(state, ids, key))
    wall, operations = xla_operation_times(lambda: jax.block_until_ready(call(state, ids, key)), calls)
    steps = new_tokens - 1
    rows, prompt_tokens = prompt_ids.shape[0] * generations, prompt_ids.shape[1]
    step_flops = sum(model.config.forward_flops(rows, prompt_tokens + i) for i in range(1, new_tokens)) / steps
    decode, prefill = collections.Counter(), collections.Counter()
    for name, (ms, count) in operations.items():
        shape, source = known.get(name, ("", ""))
        kind = operation_kind(source, model.config.vocab_size, shape)
        if steps and round(count) == steps:
            decode[kind] += ms / steps
        else:
            prefill[kind] += ms
    return {
        "wall_ms": wall * 1e3,
        "decode_step_wall_ms": step_ms,
        "decode_step_gflops": step_flops / step_ms / 1e6,
        "decode_step_ms": dict(decode.most_common()),
        "prefill_and_setup_ms": dict(prefill.most_common()),
    }


def decode_step_wall_ms(call, model, ids, key, config: SamplingConfig, generations: int, calls: int) -> float:
    """Wall ms of one decode step: (median call - median one-token call) / (new tokens - 1), over ``calls + 2``
    interleaved calls of each."""
    first_token = dataclasses.replace(config, max_new_tokens=1)
    graphdef, state = model
    prefill = jax.jit(
        lambda s, ids, key: generate((graphdef, s), ids, None, key, first_token, num_generations=generations).tokens
    )
    timings = interleaved_timings(
        {
            "whole": lambda: jax.block_until_ready(call(state, ids, key)),
            "prefill": lambda: jax.block_until_ready(prefill(state, ids, key)),
        },
        rounds=1,
        repeats=calls + 2,
    )["round_medians_s"]
    return 1e3 * (timings["whole"][0] - timings["prefill"][0]) / (config.max_new_tokens - 1)


def markdown(report: dict) -> str:
    row = report["profile"]
    kinds = list(dict.fromkeys([*row["decode_step_ms"], *row["prefill_and_setup_ms"]]))
    lines = [
        "# One generate call by kind of operation (SmolLM2-135M shapes, fp32, XLA:CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; load average before {report['load_before']}, after {report['load_after']}  ",
        f"{report['prompts']} prompts x {report['generations']} generations (shared prefill), prompt "
        f"{report['prompt_tokens']} tokens, {report['new_tokens']} new tokens, greedy; {report['calls']} profiled "
        f"calls. Wall time per call: **{row['wall_ms']:.0f} ms**. ms summed over XLA's threads.  ",
        f"One decode step, wall time (call minus one-token call, over the steps): **{row['decode_step_wall_ms']:.1f} "
        f"ms**, {row['decode_step_gflops']:.0f} GFLOP/s of matmul FLOPs (`ModelConfig.forward_flops`).",
        "",
        "| kind | one decode step, ms | prefill and setup, ms |",
        "|---|---:|---:|",
    ]
    for kind in kinds:
        step, prefill = row["decode_step_ms"].get(kind, 0.0), row["prefill_and_setup_ms"].get(kind, 0.0)
        lines.append(f"| {kind} | {step:.1f} | {prefill:.0f} |")
    total_step, total_prefill = sum(row["decode_step_ms"].values()), sum(row["prefill_and_setup_ms"].values())
    lines.append(f"| **all** | **{total_step:.1f}** | **{total_prefill:.0f}** |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (smaller for smoke runs)")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (rows: prompts x this)")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--calls", type=int, default=2, help="profiled calls")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    sizes = (args.layers, args.vocab, args.prompts, args.generations, args.prompt_tokens, args.calls)
    if min(sizes) < 1 or args.new_tokens < 2:
        parser.error(f"every size must be >= 1 and --new-tokens >= 2 (a decode step to profile); got {args}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = {
        "command": benchmark_command("benchmarks/profile_decode.py", sys.argv[1:] if argv is None else argv),
        "machine": cpu_summary() + f", jax {jax.__version__}",
        "load_before": [round(x, 2) for x in os.getloadavg()],
        **{key: getattr(args, key) for key in ("prompts", "generations", "prompt_tokens", "new_tokens", "calls")},
    }
    model = LlamaForCausalLM(smollm2_shapes(args.layers, args.vocab), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(3, model.config.vocab_size, size=(args.prompts, args.prompt_tokens)).astype(np.int32)
    report["profile"] = profile(model, prompt_ids, args.generations, args.new_tokens, args.calls)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = markdown(report)
    print(text)
    write_report(args.out, "profile_decode", report, text)
    return report


if __name__ == "__main__":
    keep_freed_host_memory()  # as the mojax command line and the other benchmarks: no page faults per call
    main()
