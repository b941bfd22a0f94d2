"""Model throughput: mojax (jax.jit, functional) against HF transformers PyTorch LlamaForCausalLM on CPU.

For each config, one random mojax model is exported to a HF folder (config.json + model.safetensors)
and loaded by ``transformers.LlamaForCausalLM``, so both sides run the same weights; the first
forward doubles as a parity check (max |logits difference|, loss difference, greedy tokens).

Measured in the same rounds, fp32, steady state (``mojax.testing.interleaved_timings``: the first call, which
compiles, and one warm-up call excluded; ``--rounds`` rounds of ``--repeats`` interleaved calls of both sides, each
pass in a random order); ratio = torch's round median / mojax's in the same round, its median over rounds and min-max:
  forward         logits of a [B, T] batch (torch under ``inference_mode``)
  forward+backward  next-token cross-entropy and its gradient w.r.t. every parameter (no optimizer)
  decode          greedy generation of N tokens after [B, P] prompts with a KV cache:
                  ``mojax.models.generate.generate`` against ``model.generate(use_cache=True)``; each step reads
                  every weight, so a jitted sum over as many bytes, timed in the same rounds, gives the memory
                  bandwidth's ceiling on the decode ratio (``weight_reads``)

Run on a quiet machine: ``python benchmarks/model.py`` (writes benchmarks/results/model.{json,md});
``--smoke --rounds 1 --repeats 1 --out /tmp/x`` runs tiny sizes in seconds to check the script.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mojax.models.config import ModelConfig  # noqa: E402
from mojax.models.generate import SamplingConfig, generate  # noqa: E402
from mojax.models.hf import save_pretrained  # noqa: E402
from mojax.models.llama import LlamaForCausalLM  # noqa: E402
from mojax.testing import benchmark_command, cpu_model, interleaved_timings, same_round_ratios, write_report  # noqa: E402

TORCH_THREADS = 2

# name -> (model config, forward/backward batch [B, T], decode batch [B, P, N])
FULL_SIZES = {
    "10M (V 8192, d 256, 8 layers)": (
        ModelConfig(
            vocab_size=8192,
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        (8, 128),
        (4, 32, 32),
    ),
    "56M (V 32000, d 512, 8 layers)": (
        ModelConfig(
            vocab_size=32000,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        (4, 128),
        (4, 32, 32),
    ),
}
SMOKE_SIZES = {"tiny (V 256, d 64, 2 layers)": (ModelConfig.tiny(), (2, 16), (2, 8, 4))}


def load_into_torch(model: LlamaForCausalLM, folder: Path):
    """Save `model` as a HF folder with `mojax.models.hf.save_pretrained` and load it with transformers."""
    import torch
    from transformers import LlamaForCausalLM as TorchLlama

    save_pretrained(model, folder)
    return TorchLlama.from_pretrained(folder, dtype=torch.float32).eval()


def next_token_loss(logits, ids):
    """Mean next-token cross-entropy over a [B, T] batch (HF's `labels=input_ids` loss): logsumexp - <logits, onehot>.

    The one-hot inner product keeps the backward a dense softmax - onehot; picking with
    take_along_axis instead turns it into a scatter, which XLA:CPU runs slowly.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.sum(logits * jax.nn.one_hot(ids[:, 1:], logits.shape[-1], dtype=logits.dtype), axis=-1)
    return (jax.nn.logsumexp(logits, axis=-1) - picked).mean()


def mojax_steps(model: LlamaForCausalLM):
    """Jitted functional forward and forward+backward over the split model state."""
    graphdef, state = nnx.split(model)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)[0]

    def loss(state, ids):
        return next_token_loss(forward(state, ids), ids)

    return state, jax.jit(forward), jax.jit(jax.value_and_grad(loss))


def row(config_name: str, op: str, shape: str, tokens: int, timing: dict) -> dict:
    """One result record from the ``interleaved_timings`` of {"mojax", "torch"}: medians over rounds, tokens/s, the
    same-round ratio torch time / mojax time (> 1: mojax faster; median, min, max) and mojax's compile time."""
    medians, first = timing["round_medians_s"], timing["first_call_s"]
    mojax_s, torch_s = statistics.median(medians["mojax"]), statistics.median(medians["torch"])
    ratio, ratio_min, ratio_max = same_round_ratios(timing, "torch", "mojax")
    return {
        "config": config_name,
        "op": op,
        "shape": shape,
        "tokens": tokens,
        "mojax_median_ms": 1e3 * mojax_s,
        "torch_median_ms": 1e3 * torch_s,
        "mojax_tokens_per_s": tokens / mojax_s,
        "torch_tokens_per_s": tokens / torch_s,
        "ratio_mojax_over_torch": ratio,
        "ratio_min": ratio_min,
        "ratio_max": ratio_max,
        "mojax_compile_s": max(first["mojax"] - mojax_s, 0.0),
        "torch_first_call_extra_s": max(first["torch"] - torch_s, 0.0),
        "mojax_round_medians_ms": [1e3 * t for t in medians["mojax"]],
        "torch_round_medians_ms": [1e3 * t for t in medians["torch"]],
    }


def weight_reads(weight_bytes: int, new_tokens: int, timing: dict) -> dict:
    """Decode against the memory bandwidth: every greedy step reads all the weights once, so N new tokens take at
    least N reads of them. From the decode timings with a ``read`` contender (one jitted sum over as many fp32 bytes
    as the weights, timed in the same rounds): each side's weight-read rate N bytes / decode time (the prefill
    counted in the time, so a lower bound of the rate), the sum's rate, and the highest ratio torch / mojax that
    rate allows, torch's time / (N sum times)."""
    medians = {name: statistics.median(times) for name, times in timing["round_medians_s"].items()}
    rate = lambda seconds: weight_bytes * new_tokens / seconds / 1e9  # noqa: E731
    return {
        "weight_bytes": weight_bytes,
        "read_median_ms": 1e3 * medians["read"],
        "read_gb_per_s": weight_bytes / medians["read"] / 1e9,
        "mojax_weight_gb_per_s": rate(medians["mojax"]),
        "torch_weight_gb_per_s": rate(medians["torch"]),
        "ratio_ceiling": medians["torch"] / (new_tokens * medians["read"]),
    }


def bench_config(name, config, train_shape, decode_shape, rounds, repeats, folder):
    """Forward, forward+backward and decode timings for one model size, and the parity of their outputs."""
    import torch

    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    torch_model = load_into_torch(model, folder)
    batch, length = train_shape
    ids = np.random.default_rng(0).integers(3, config.vocab_size, size=(batch, length)).astype(np.int32)
    ids_jax, ids_torch = jnp.asarray(ids), torch.from_numpy(ids.astype(np.int64))
    state, forward, value_and_grad = mojax_steps(model)

    def torch_forward():
        with torch.inference_mode():
            return torch_model(input_ids=ids_torch).logits

    def torch_forward_backward():
        torch_model.zero_grad(set_to_none=True)
        loss = torch_model(input_ids=ids_torch, labels=ids_torch).loss
        loss.backward()
        return loss.detach()

    shape = f"{batch}x{length}"
    calls = {
        "forward": {
            "mojax": lambda: jax.block_until_ready(forward(state, ids_jax)),
            "torch": torch_forward,
        },
        "forward+backward": {
            "mojax": lambda: jax.block_until_ready(value_and_grad(state, ids_jax)),
            "torch": torch_forward_backward,
        },
    }
    results = [  # timed first: their first calls compile
        row(name, op, shape, batch * length, interleaved_timings(pair, rounds, repeats)) for op, pair in calls.items()
    ]
    mojax_logits, torch_logits = (calls["forward"][side]() for side in ("mojax", "torch"))
    (mojax_loss, _), torch_loss = (calls["forward+backward"][side]() for side in ("mojax", "torch"))

    d_batch, prompt, new = decode_shape
    prompts = np.random.default_rng(1).integers(3, config.vocab_size, size=(d_batch, prompt)).astype(np.int32)
    mask = np.ones_like(prompts)
    sampling = SamplingConfig(max_new_tokens=new, temperature=0.0, pad_token_id=config.pad_token_id, stop_token_ids=())
    prompts_torch, mask_torch = torch.from_numpy(prompts.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def mojax_decode():
        return jax.block_until_ready(generate(model, prompts, mask, jax.random.key(0), sampling).tokens)

    def torch_decode():
        with torch.inference_mode():
            return torch_model.generate(
                input_ids=prompts_torch,
                attention_mask=mask_torch,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                use_cache=True,
                pad_token_id=config.pad_token_id,
            )[:, prompt:]

    weights = jnp.ones((config.num_params(),), jnp.float32)  # as many bytes as the fp32 weights
    read = jax.jit(jnp.sum)
    decode = interleaved_timings(
        {"mojax": mojax_decode, "torch": torch_decode, "read": lambda: jax.block_until_ready(read(weights))},
        rounds,
        repeats,
    )
    results.append(
        row(name, "decode (greedy, KV cache)", f"{d_batch}x({prompt}+{new})", d_batch * new, decode)
        | weight_reads(weights.nbytes, new, decode)
    )
    mojax_tokens, torch_tokens = mojax_decode(), torch_decode()
    parity = {
        "config": name,
        "parameters": config.num_params(),
        "max_abs_logits_diff": float(np.abs(np.asarray(mojax_logits) - torch_logits.numpy()).max()),
        "loss_mojax": float(mojax_loss),
        "loss_torch": float(torch_loss),
        "greedy_tokens_equal_fraction": float((np.asarray(mojax_tokens) == torch_tokens.numpy()).mean()),
    }
    return results, parity


def machine_info() -> dict:
    """nproc, CPU model, platform, Python and library versions."""
    import flax
    import optax
    import torch
    import transformers

    cpu = cpu_model()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "jax_devices": [str(d) for d in jax.devices()],
    }


def markdown(report: dict) -> str:
    """The report as a Markdown page: conditions, throughput table, parity table."""
    m = report["machine"]
    lines = [
        "# Model throughput: mojax (JAX) vs HF transformers (PyTorch), CPU, fp32",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['platform']}; torch threads {m['torch_threads']}  ",
        f"Versions: Python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, optax {m['optax']}, "
        f"torch {m['torch']}, transformers {m['transformers']}  ",
        f"Load average (1/5/15 min) before: {report['load_average_before']}, after: {report['load_average_after']}  ",
        f"{report['rounds']} rounds of {report['repeats']} interleaved steady-state calls of both sides, after one "
        "compile/warm-up call and one more warm-up; ms are medians over rounds; tokens/s counts input tokens for "
        "forward passes and generated tokens for decode (prefill included). ratio = torch median / mojax median in "
        "the same round (> 1: mojax faster), median over rounds and min-max.",
        "",
        "| config | op | shape | mojax ms | torch ms | mojax tok/s | torch tok/s | ratio | spread | mojax compile s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['config']} | {r['op']} | {r['shape']} | {r['mojax_median_ms']:.1f} | {r['torch_median_ms']:.1f} | "
            f"{r['mojax_tokens_per_s']:,.0f} | {r['torch_tokens_per_s']:,.0f} | {r['ratio_mojax_over_torch']:.2f} | "
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['mojax_compile_s']:.2f} |"
        )
    lines += [
        "",
        "Decode against the memory bandwidth: each greedy step reads every weight once; GB/s = weight bytes x new "
        "tokens / decode time (prefill included, so a lower bound of the rate); one read = a jitted sum over as "
        "many fp32 bytes, timed in the same rounds; ceiling = torch's decode time / (new tokens x one read), the "
        "highest ratio reads at that rate allow:",
        "",
        "| config | weights MB | mojax GB/s | torch GB/s | one read GB/s | ratio | ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "weight_bytes" in r:
            lines.append(
                f"| {r['config']} | {r['weight_bytes'] / 1e6:.0f} | {r['mojax_weight_gb_per_s']:.1f} | "
                f"{r['torch_weight_gb_per_s']:.1f} | {r['read_gb_per_s']:.1f} | {r['ratio_mojax_over_torch']:.2f} | "
                f"{r['ratio_ceiling']:.2f} |"
            )
    lines += [
        "",
        "Parity (same weights through safetensors):",
        "",
        "| config | parameters | max abs logits diff | loss mojax | loss torch | greedy tokens equal |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in report["parity"]:
        lines.append(
            f"| {p['config']} | {p['parameters']:,} | {p['max_abs_logits_diff']:.2e} | {p['loss_mojax']:.6f} | "
            f"{p['loss_torch']:.6f} | {p['greedy_tokens_equal_fraction']:.2%} |"
        )
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script quickly")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of interleaved calls (spread over rounds)")
    parser.add_argument("--repeats", type=int, default=3, help="calls of each side per round (median taken)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for model.json/.md")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be >= 1, got {args.rounds} and {args.repeats}")

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(TORCH_THREADS)
    hf_logging.disable_progress_bar()
    report = {
        "command": benchmark_command("benchmarks/model.py", sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "results": [],
        "parity": [],
    }
    sizes = SMOKE_SIZES if args.smoke else FULL_SIZES
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, (config, train_shape, decode_shape)) in enumerate(sizes.items()):
            folder = Path(tmp) / str(index)
            folder.mkdir()
            results, parity = bench_config(name, config, train_shape, decode_shape, args.rounds, args.repeats, folder)
            report["results"] += results
            report["parity"].append(parity)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = markdown(report)
    print(text)
    write_report(args.out, "model", report, text)
    return report


if __name__ == "__main__":
    main()
