"""The model in bf16 on an accelerator: forward, training step and greedy decode, with model FLOPs utilisation.

Part 1 of ``benchmarks/gpu.sh``. fp32 master weights and AdamW, bf16 compute, rematerialised layers; each time is
the median of ``--repeats`` calls after a warm-up. MFU is the matmul FLOPs over the device's peak bf16 dense FLOP/s:
``ModelConfig.forward_flops`` (PaLM's 2N + 4LHT per forward token, Chowdhery et al., arXiv 2204.02311, appendix B)
per forward, three times that per trained token. XLA's own count (``cost_analysis``) is not used: it counts the
layer scan's body once. The peak comes from the device kind (:data:`PEAK_TFLOPS`), or from ``--peak-tflops`` /
``MOJAX_PEAK_TFLOPS`` for other parts; without one the MFU columns read nan.

    python benchmarks/gpu_model.py --out benchmarks/results/gpu   # 56M and 1.1B LLaMA shapes; gpu_model.{json,md}
    python benchmarks/gpu_model.py --smoke --out /tmp/x            # the tiny config on any backend (CPU included)

``--attention mojax,cudnn`` (the default on a GPU) times mojax's training step and forward once per attention
kernel (``mojax.models.llama.ATTENTION_KERNELS``: mojax's query blocks, XLA's or cuDNN's fused attention through
``jax.nn.dot_product_attention``), each against the same peer, every config with one kernel before the next kernel;
greedy decode, which attends through the KV cache whatever the kernel, is timed with the first kernel only.

The peer, measured in the same process after mojax on the same device (``--no-torch`` skips it): transformers'
``LlamaForCausalLM`` of the same config and random weights in PyTorch eager, fp32 master weights and
``torch.optim.AdamW`` (fused on CUDA), bf16 compute under ``torch.autocast``, gradient checkpointing per layer, the
same fp32 cross-entropy, and ``generate`` with greedy decoding and a KV cache for exactly as many new tokens
(skipped too where torch is not installed). The ratio columns are the peer's time over mojax's (> 1: mojax faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mojax.models.config import ModelConfig
from mojax.models.generate import SamplingConfig, generate
from mojax.models.llama import ATTENTION_KERNELS, LlamaForCausalLM
from mojax.testing import benchmark_command, write_report

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}
"""Peak dense bf16 TFLOP/s by a name the device kind contains (SXM parts; the first match wins)."""


def peak_flops(device_kind: str, tflops: float | None = None) -> float:
    """Peak FLOP/s: ``tflops`` when given, else :data:`PEAK_TFLOPS`' entry whose name ``device_kind`` contains, else
    nan (an unknown part: MFU is then not reported)."""
    if tflops is not None:
        return tflops * 1e12
    return next((peak * 1e12 for name, peak in PEAK_TFLOPS.items() if name in device_kind), math.nan)


def llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> ModelConfig:
    """A LLaMA config computing in bf16."""
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype=jnp.bfloat16,
    )


def sizes(smoke: bool) -> dict[str, tuple[ModelConfig, tuple[int, int], tuple[int, int, int]]]:
    """name -> (config, training batch (B, T), decode (B, prompt length, new tokens))."""
    if smoke:
        return {"tiny": (ModelConfig.tiny(dtype=jnp.bfloat16), (2, 32), (2, 8, 8))}
    return {
        "56M (V 32000, d 512, 8 layers)": (llama(32000, 512, 1408, 8, 8, 4), (32, 1024), (16, 128, 128)),
        "1.1B (V 32000, d 2048, 22 layers)": (llama(32000, 2048, 5632, 22, 32, 4), (8, 2048), (16, 128, 128)),
    }


def next_token_loss(model: LlamaForCausalLM, ids: jax.Array) -> jax.Array:
    """Mean cross-entropy of each next token, from fp32 logits."""
    logits = model(ids)[0][:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return (jax.nn.logsumexp(logits, axis=-1) - picked).mean()


def median_s(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` blocking calls of ``call`` after one warm-up call."""
    jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(
    name: str, config: ModelConfig, train_shape, decode_shape, peak: float, repeats: int, kernel: str, decode: bool
) -> dict:
    """One config's row with attention ``kernel``: training step (AdamW), forward and (if ``decode``) greedy decode
    times, tokens/s and MFU, and the training loss at the first step and at the last timed one (the same batch every
    step, so it falls; the same initial weights for every kernel)."""
    model = LlamaForCausalLM(config, remat=True, rngs=nnx.Rngs(0))
    model.set_attributes(attention_kernel=kernel)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adamw(1e-4)
    batch, length = train_shape
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (batch, length)), jnp.int32)

    @jax.jit
    def forward(params):
        return nnx.merge(graphdef, params, rest)(ids)[0]

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p, rest), ids))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    started = time.perf_counter()
    compiled = train_step.lower(params, opt_state).compile()
    compile_s = time.perf_counter() - started
    state = {"params": params, "opt": opt_state}

    def one_step():
        state["params"], state["opt"], state["loss"] = compiled(state["params"], state["opt"])
        return state["loss"]

    first_loss = float(one_step())
    train_s = median_s(one_step, repeats)
    last_loss = float(state["loss"])  # the loss the last timed step saw, after 1 + repeats updates
    forward_s = median_s(lambda: forward(state["params"]), repeats)
    forward_flops = config.forward_flops(batch * length, length)
    row = {
        "config": name,
        "attention": kernel,
        "parameters": config.num_params(),
        "train_shape": f"{batch}x{length}",
        "compile_train_s": compile_s,
        "train_step_ms": 1e3 * train_s,
        "train_tokens_per_s": batch * length / train_s,
        "train_mfu": 3 * forward_flops / train_s / peak,
        "forward_ms": 1e3 * forward_s,
        "forward_mfu": forward_flops / forward_s / peak,
        "loss_first_step": first_loss,
        "loss_last_step": last_loss,
    }
    if not decode:
        return row
    d_batch, prompt, new = decode_shape
    prompts = np.random.default_rng(1).integers(3, config.vocab_size, (d_batch, prompt)).astype(np.int32)
    sampling = SamplingConfig(max_new_tokens=new, temperature=0.0, stop_token_ids=(), pad_token_id=0)
    decode_model = nnx.merge(graphdef, state["params"], rest)
    decode_s = median_s(lambda: generate(decode_model, prompts, None, jax.random.key(0), sampling).tokens, repeats)
    return {
        **row,
        "decode_shape": f"{d_batch}x({prompt}+{new})",
        "decode_ms": 1e3 * decode_s,
        "decode_tokens_per_s": d_batch * new / decode_s,
    }


def timed_torch(call: Callable[[], object], repeats: int) -> float:
    """:func:`median_s` for PyTorch: every call waits for the device (``torch.cuda.synchronize``) before it ends."""
    import torch

    def synchronised():
        result = call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return result

    return median_s(synchronised, repeats)


def torch_peer(config: ModelConfig, train_shape, decode_shape, repeats: int) -> dict:
    """The same training step, forward and greedy decode in transformers + PyTorch eager (see the module docstring)."""
    import torch
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as TorchLlama

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = TorchLlama(LlamaConfig(**config.to_hf_dict()))
    # transformers 5.25 renamed gradient_checkpointing_enable (still there, deprecated); older 5.x lack the new name
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    batch, length = train_shape
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, config.vocab_size, (batch, length)), device=device)
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16)  # noqa: E731

    def train_step():
        model.train()
        with autocast():
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def forward():
        model.eval()
        with torch.inference_mode(), autocast():
            return model(input_ids=ids, use_cache=False).logits

    d_batch, prompt, new = decode_shape
    prompts = torch.as_tensor(np.random.default_rng(1).integers(3, config.vocab_size, (d_batch, prompt)), device=device)

    def decode():
        model.eval()
        with torch.inference_mode(), autocast():
            return model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                use_cache=True,
                pad_token_id=config.pad_token_id,
            )

    first_loss = float(train_step())
    losses = []
    train_s = timed_torch(lambda: losses.append(train_step()), repeats)
    return {
        "torch_train_step_ms": 1e3 * train_s,
        "torch_forward_ms": 1e3 * timed_torch(forward, repeats),
        "torch_decode_ms": 1e3 * timed_torch(decode, repeats),
        "torch_loss_first_step": first_loss,
        "torch_loss_last_step": float(losses[-1]),
    }


def with_peer(row: dict, peer: dict) -> dict:
    """``row`` with the peer's times and the ratios peer time / mojax time (> 1: mojax faster) of the ops it timed."""
    ops = [op for op in ("train_step", "forward", "decode") if f"{op}_ms" in row]
    return {**row, **peer, **{f"torch_over_mojax_{op}": peer[f"torch_{op}_ms"] / row[f"{op}_ms"] for op in ops}}


def cell(row: dict, key: str, spec: str, suffix: str = "") -> str:
    """``row[key]`` formatted by ``spec``, or "-" where the row did not time it."""
    return format(row[key], spec) + suffix if key in row else "-"


def markdown(report: dict) -> str:
    lines = [
        f"# Model in bf16 on {report['device']} (peak {report['peak_flops'] / 1e12:.0f} TFLOP/s bf16 dense)",
        "",
        f"Command: `{report['command']}`",
        "",
        "fp32 master weights and AdamW, bf16 compute, rematerialised layers; median of "
        f"{report['repeats']} calls after a warm-up. MFU: matmul FLOPs (ModelConfig.forward_flops: PaLM's 2N + 4LHT "
        "per forward token, three times that per trained token) over the peak.",
        "",
        "| config | attention | params | train BxT | train step ms | tokens/s | MFU | forward ms | forward MFU | "
        "decode (greedy) | decode ms | decode tok/s | compile s | loss first / last step |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['config']} | {r['attention']} | {r['parameters']:,} | {r['train_shape']} | "
            f"{r['train_step_ms']:.1f} | {r['train_tokens_per_s']:,.0f} | {r['train_mfu']:.1%} | "
            f"{r['forward_ms']:.1f} | {r['forward_mfu']:.1%} | {r.get('decode_shape', '-')} | "
            f"{cell(r, 'decode_ms', '.1f')} | {cell(r, 'decode_tokens_per_s', ',.0f')} | {r['compile_train_s']:.1f} | "
            f"{r['loss_first_step']:.3f} / {r['loss_last_step']:.3f} |"
        )
    peers = [r for r in report["rows"] if "torch_train_step_ms" in r]
    if peers:
        lines += [
            "",
            "The peer in the same process: transformers + PyTorch eager (fp32 master weights, fused AdamW, autocast "
            "bf16, gradient checkpointing, `generate` greedy with a KV cache). Ratio: peer time / mojax time "
            "(> 1: mojax faster).",
            "",
            "| config | mojax attention | torch train step ms | ratio | torch forward ms | ratio | torch decode ms | "
            "ratio | torch loss first / last step |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r['config']} | {r['attention']} | {r['torch_train_step_ms']:.1f} | "
            f"{r['torch_over_mojax_train_step']:.2f}x | {r['torch_forward_ms']:.1f} | "
            f"{r['torch_over_mojax_forward']:.2f}x | "
            f"{r['torch_decode_ms']:.1f} | {cell(r, 'torch_over_mojax_decode', '.2f', 'x')} | "
            f"{r['torch_loss_first_step']:.3f} / {r['torch_loss_last_step']:.3f} |"
            for r in peers
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny config only, on any backend")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, after a warm-up")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument(
        "--attention",
        help="comma-separated attention kernels of mojax's rows (default: mojax,cudnn on a GPU, mojax,xla elsewhere)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's peak bf16 dense TFLOP/s (default: by kind)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu")
    args = parser.parse_args(argv)
    if args.peak_tflops is None and os.environ.get("MOJAX_PEAK_TFLOPS"):
        args.peak_tflops = float(os.environ["MOJAX_PEAK_TFLOPS"])
    if args.repeats < 1 or (args.peak_tflops is not None and args.peak_tflops <= 0):
        parser.error(f"--repeats must be >= 1 and --peak-tflops > 0; got {args.repeats} and {args.peak_tflops}")
    default = "mojax,cudnn" if jax.default_backend() == "gpu" else "mojax,xla"
    args.attention = (args.attention or default).split(",")
    unknown = sorted(set(args.attention) - set(ATTENTION_KERNELS))
    if unknown:
        parser.error(f"--attention has {', '.join(unknown)}; expected names from {', '.join(ATTENTION_KERNELS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = jax.devices()[0]
    report = {
        "command": benchmark_command("benchmarks/gpu_model.py", sys.argv[1:] if argv is None else argv),
        "device": f"{device.platform} {device.device_kind}",
        "peak_flops": peak_flops(device.device_kind, args.peak_tflops),
        "repeats": args.repeats,
        "rows": [],
    }
    torch_ok = not args.no_torch and importlib.util.find_spec("torch") is not None
    peers = {}
    # every config with one kernel before the next kernel: a kernel that fails on this device loses only its own rows
    for i, kernel in enumerate(args.attention):
        for name, (config, train_shape, decode_shape) in sizes(args.smoke).items():
            row = bench(name, config, train_shape, decode_shape, report["peak_flops"], args.repeats, kernel, i == 0)
            if torch_ok:
                if name not in peers:
                    peers[name] = torch_peer(config, train_shape, decode_shape, args.repeats)
                row = with_peer(row, peers[name])
            report["rows"].append(row)
            write_report(args.out, "gpu_model", report, markdown(report))  # each row as soon as it is done
            print(markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
