"""Rollout throughput on SmolLM2-135M-Instruct: the trainer's rollout against transformers ``generate``.

The trainer is built from ``examples/smollm2_reviews.yaml`` (the real GGUF weights through ``MOJAX_CACHE``, its
chat-templated movie-review prompts, temperature 0.8, 24 new tokens; LoRA off here so that both sides run the same
dense weights). A batch of B completions is B / 4 prompts times 4 generations, exactly as ``Trainer.prepare`` builds
it. Contenders, all on the same left-padded prompt ids and the same sampling settings (temperature, no top-k, no
top-p unless ``--top-p`` / ``--temperature 0`` (greedy) say otherwise, every row runs the full ``max_new_tokens``:
no early stop, so every side produces the same number of tokens):

* ``mojax generate``: ``mojax.models.generate.generate`` (jit, KV cache) on the B repeated prompt rows, the same
  work as torch's;
* ``mojax generate, shared prefill``: the same call with the B / 4 distinct prompts and ``num_generations=4``: each
  prompt is prefilled once and its KV cache shared by its 4 rows (the sampling part of the trainer's rollout);
* ``mojax trainer rollout``: ``Trainer.rollout`` (``mojax.rl.rollout.sample_rollout``): the shared-prefill sampling
  plus the policy's log-probabilities of the sampled tokens (one training forward, or the sampler's own with
  ``--use-sampler-logps``; the reference model is off here);
* ``torch generate``: HF ``LlamaForCausalLM.generate(do_sample=True, min_new_tokens=max_new_tokens)`` (eager fp32,
  KV cache) on the same weights (exported with ``mojax.models.hf.save_pretrained``).

Timing: compile and warm-up first, then ``--rounds`` rounds of ``--repeats`` calls of each contender in turn (each
pass in a random order); a ratio is mojax's completions/s over torch's in the same round; the table gives the median ratio over rounds
and its min-max spread. The machine is a shared 2-core CPU: only the same-run ratios mean anything. Both sides run
with freed host memory kept for the next call (``mojax.host_memory``, as ``benchmarks/rl_step.py``;
``MOJAX_RELEASE_HOST_MEMORY=1``: glibc's defaults).

    MOJAX_CACHE=/tmp/mojax-data-cache python benchmarks/rollout.py --batch 16,64
    python benchmarks/rollout.py --batch 4 --max-new-tokens 4 --rounds 1 --repeats 1 --out /tmp/x   # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mojax.host_memory import keep_freed_host_memory  # noqa: E402
from mojax.models.generate import SamplingConfig, generate  # noqa: E402
from mojax.models.hf import save_pretrained  # noqa: E402
from mojax.rl.config import load_config  # noqa: E402
from mojax.rl.rollout import encode_prompts, repeat_prompts  # noqa: E402
from mojax.rl.trainer import Trainer  # noqa: E402
from mojax.testing import benchmark_command, cpu_summary, interleaved_timings, same_round_ratios, write_report  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2_reviews.yaml"
GENERATIONS = 4
TORCH_THREADS = 2


def trainer_for(max_new_tokens: int, output_dir: str, use_sampler_logps: bool = False) -> Trainer:
    """The SmolLM2 example's trainer without LoRA, reference model, logging or checkpoints."""
    overrides = [
        f"output_dir={output_dir}",
        f"rollout.use_sampler_logps={str(use_sampler_logps).lower()}",
        "lora.rank=0",
        "combiner.probe=[]",  # the example's probe set is its adapters
        "kl.beta=0.0",
        "kl.log_kl=false",
        f"rollout.max_completion_length={max_new_tokens}",
        "logging.tensorboard=false",
        "logging.progress=false",
        "eval_steps=0",
        "export=false",
    ]
    return Trainer(load_config(str(EXAMPLE), overrides))


def prompt_batch(trainer: Trainer, batch: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(prompt rows, ids i32[batch / GENERATIONS, P], mask): distinct prompts of the training data, encoded as the
    trainer encodes them."""
    rows = [trainer.train_prompts[i % len(trainer.train_prompts)] for i in range(batch // GENERATIONS)]
    rollout = trainer.config.rollout
    ids, mask = encode_prompts(
        trainer.tokenizer,
        [row["prompt"] for row in rows],
        max_length=rollout.max_prompt_length,
        truncate=rollout.truncate_prompts,
        bucket_multiple=rollout.prompt_bucket_multiple,
    )
    return rows, ids, mask


def contenders(trainer: Trainer, torch_model, batch: int, sampling: SamplingConfig) -> dict[str, Callable[[], None]]:
    """The three timed callables on one prompt batch (fresh PRNG keys and torch seeds per call)."""
    import torch

    rows, distinct_ids, distinct_mask = prompt_batch(trainer, batch)
    ids, mask, _ = repeat_prompts(distinct_ids, distinct_mask, GENERATIONS)
    ids_torch, mask_torch = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    model = trainer.policy_model()
    calls = {"count": 0}

    def key() -> jax.Array:
        calls["count"] += 1
        return jax.random.key(calls["count"])

    def mojax_generate():
        jax.block_until_ready(generate(model, ids, mask, key(), sampling).tokens)

    def mojax_shared_prefill():
        result = generate(model, distinct_ids, distinct_mask, key(), sampling, num_generations=GENERATIONS)
        jax.block_until_ready(result.tokens)

    def mojax_rollout():
        jax.block_until_ready(trainer.rollout(rows, key(), sampling, GENERATIONS).old_logp)

    def torch_generate():
        torch.manual_seed(calls["count"])
        greedy = sampling.temperature == 0
        with torch.inference_mode():
            torch_model.generate(
                input_ids=ids_torch,
                attention_mask=mask_torch,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_k=None if greedy else 0,
                top_p=None if greedy else sampling.top_p,
                max_new_tokens=sampling.max_new_tokens,
                min_new_tokens=sampling.max_new_tokens,
                pad_token_id=sampling.pad_token_id,
                use_cache=True,
            )

    return {
        "mojax generate": mojax_generate,
        "mojax generate, shared prefill": mojax_shared_prefill,
        "mojax trainer rollout": mojax_rollout,
        "torch generate": torch_generate,
    }


def summary_rows(batch: int, timing: dict) -> list[dict]:
    """One row per mojax contender: completions/s and the same-round ratio to torch (median, min, max)."""
    medians = timing["round_medians_s"]
    rows = []
    for name in timing["round_medians_s"]:
        ratio, ratio_min, ratio_max = same_round_ratios(timing, "torch generate", name)
        rows.append(
            {
                "batch": batch,
                "contender": name,
                "completions_per_s": batch / statistics.median(medians[name]),
                "ratio_to_torch": ratio,
                "ratio_min": ratio_min,
                "ratio_max": ratio_max,
                "first_call_s": timing["first_call_s"][name],
                "round_medians_s": medians[name],
            }
        )
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# Rollout throughput: SmolLM2-135M-Instruct, mojax against transformers generate (CPU, fp32)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Settings: {report['settings']}  ",
        f"Load average (1/5/15 min) before: {report['load_average_before']}, after: {report['load_average_after']} "
        "(shared 2-core machine: only same-run ratios are meaningful)  ",
        f"{report['rounds']} rounds of {report['repeats']} interleaved calls; ratio = mojax completions/s over torch's "
        "in the same round (median over rounds, min-max).",
        "",
        "| batch | contender | completions/s | ratio to torch generate | spread | first call s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['batch']} | {r['contender']} | {r['completions_per_s']:.2f} | {r['ratio_to_torch']:.2f} | "
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['first_call_s']:.1f} |"
        )
    return "\n".join(lines + [""])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="16,64", help="comma-separated completions per rollout (multiples of 4)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, help="default: the example's 0.8; 0 is greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling on both sides (1: off)")
    parser.add_argument(
        "--use-sampler-logps",
        action="store_true",
        help="the trainer's rollout takes old_logp from the sampler (rollout.use_sampler_logps) instead of a forward",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    if any(b < GENERATIONS or b % GENERATIONS for b in args.batch):
        parser.error(f"--batch sizes must be positive multiples of {GENERATIONS}, got {args.batch}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import LlamaForCausalLM as TorchLlama
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(TORCH_THREADS)
    hf_logging.disable_progress_bar()
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(args.max_new_tokens, f"{tmp}/run", args.use_sampler_logps)
        save_pretrained(trainer.policy_model(), f"{tmp}/hf")
        torch_model = TorchLlama.from_pretrained(f"{tmp}/hf", dtype=torch.float32).eval()
        sampler_logps = args.use_sampler_logps or trainer.update_spec.on_policy
        old_logp = "the sampler" if sampler_logps else "a training forward"
        if trainer.update_spec.on_policy:
            old_logp += " (one update per rollout: the update takes the ratio's denominator from its own forward)"
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=trainer.config.rollout.temperature if args.temperature is None else args.temperature,
            top_p=args.top_p,
            stop_token_ids=(),
            pad_token_id=trainer.sampling.pad_token_id,
            prompt_bucket_multiple=trainer.sampling.prompt_bucket_multiple,
        )
        rows = []
        for batch in args.batch:
            timing = interleaved_timings(contenders(trainer, torch_model, batch, sampling), args.rounds, args.repeats)
            rows += summary_rows(batch, timing)
            print(markdown({**_header(args, argv, sampling, load_before, old_logp), "rows": rows}), flush=True)
        trainer.close()
    report = {**_header(args, argv, sampling, load_before, old_logp), "rows": rows}
    text = markdown(report)
    write_report(args.out, "rollout", report, text)
    return report


def _header(args, argv, sampling: SamplingConfig, load_before, old_logp: str) -> dict:
    return {
        "command": benchmark_command("benchmarks/rollout.py", sys.argv[1:] if argv is None else argv),
        "machine": cpu_summary(),
        "settings": (
            f"{GENERATIONS} generations per prompt, temperature {sampling.temperature} (0: greedy), top-p "
            f"{sampling.top_p}, {sampling.max_new_tokens} new tokens (no early stop), no top-k, fp32, torch threads 2; "
            f"trainer rollout old_logp from {old_logp}"
        ),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


if __name__ == "__main__":
    keep_freed_host_memory()
    main()
