#!/usr/bin/env bash
# GPU benchmark, one command, under 10 minutes on one accelerator:
#   1. the model in bf16 (fp32 master weights, bf16 compute, rematerialised layers): forward, a training step
#      (forward + backward + AdamW) and greedy decode, with the training step's and forward's model FLOPs
#      utilisation (MFU: the matmul FLOPs of ModelConfig.forward_flops, PaLM's 2 N + 4 L H T per forward token,
#      Chowdhery et al., arXiv 2204.02311, appendix B, and three times that per trained token; XLA's own count,
#      cost_analysis, is not used: it counts the layer scan's body once);
#   2. benchmarks/rl_step.py on the accelerator (n = 3 first, then 8, 2, 5: each n is written when done).
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default benchmarks/results/gpu; writes gpu_model.{json,md}, rl_step.{json,md}
#   bash benchmarks/gpu.sh OUT_DIR --smoke  # tiny sizes on any backend (CPU included), to check the script
#
# Peak bf16 dense FLOP/s comes from the device kind (H200/H100 SXM 989 TFLOP/s, A100 312, L4 121, ...); set
# MOJAX_PEAK_TFLOPS to override it for other parts. Time limits: MOJAX_GPU_MODEL_S (default 240 s) and
# MOJAX_GPU_RL_S (default 300 s); a part cut by its limit keeps what it had written.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
SMOKE="${2:-}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-$([ -n "$SMOKE" ] && echo cpu || echo cuda)}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } > "$OUT/device.txt"

timeout "${MOJAX_GPU_MODEL_S:-240}" "$PYTHON" - "$OUT" "$SMOKE" <<'PY'
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mojax.models.config import ModelConfig
from mojax.models.generate import SamplingConfig, generate
from mojax.models.llama import LlamaForCausalLM

out, smoke = sys.argv[1], sys.argv[2] == "--smoke"
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


def peak_flops() -> float:
    if "MOJAX_PEAK_TFLOPS" in os.environ:
        return float(os.environ["MOJAX_PEAK_TFLOPS"]) * 1e12
    kind = jax.devices()[0].device_kind
    return next((tflops * 1e12 for name, tflops in PEAK_TFLOPS.items() if name in kind), float("nan"))


def llama(vocab, hidden, intermediate, layers, heads, kv_heads):
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=jnp.bfloat16,
    )


# name -> (config, training batch [B, T], decode [B, P, N])
SIZES = (
    {"tiny": (ModelConfig.tiny(dtype=jnp.bfloat16), (2, 32), (2, 8, 8))}
    if smoke
    else {
        "56M (V 32000, d 512, 8 layers)": (llama(32000, 512, 1408, 8, 8, 4), (32, 1024), (16, 128, 128)),
        "1.1B (V 32000, d 2048, 22 layers)": (llama(32000, 2048, 5632, 22, 32, 4), (8, 2048), (16, 128, 128)),
    }
)


def loss_fn(model, ids):
    logits = model(ids)[0][:, :-1].astype(jnp.float32)
    picked = jnp.sum(logits * jax.nn.one_hot(ids[:, 1:], logits.shape[-1], dtype=logits.dtype), axis=-1)
    return (jax.nn.logsumexp(logits, axis=-1) - picked).mean()


def median_s(call, repeats=5):
    jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(name, config, train_shape, decode_shape):
    model = LlamaForCausalLM(config, remat=True, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adamw(1e-4)
    batch, length = train_shape
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (batch, length)), jnp.int32)

    @jax.jit
    def forward(params, ids):
        return nnx.merge(graphdef, params, rest)(ids)[0]

    @jax.jit
    def train_step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), ids))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    started = time.perf_counter()
    compiled = train_step.lower(params, opt_state, ids).compile()
    compile_s = time.perf_counter() - started
    state = {"params": params, "opt": opt_state}

    def one_step():
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"], ids)
        return loss

    train_s = median_s(one_step)
    forward_s = median_s(lambda: forward(state["params"], ids))
    d_batch, prompt, new = decode_shape
    prompts = np.random.default_rng(1).integers(3, config.vocab_size, (d_batch, prompt)).astype(np.int32)
    sampling = SamplingConfig(max_new_tokens=new, temperature=0.0, stop_token_ids=(), pad_token_id=0)
    decode_model = nnx.merge(graphdef, state["params"], rest)
    decode_s = median_s(lambda: generate(decode_model, prompts, None, jax.random.key(0), sampling).tokens)

    forward_flops = config.forward_flops(batch * length, length)
    peak = peak_flops()
    return {
        "config": name,
        "parameters": config.num_params(),
        "train_shape": f"{batch}x{length}",
        "decode_shape": f"{d_batch}x({prompt}+{new})",
        "compile_train_s": compile_s,
        "train_step_ms": 1e3 * train_s,
        "train_tokens_per_s": batch * length / train_s,
        "train_mfu": 3 * forward_flops / train_s / peak,
        "forward_ms": 1e3 * forward_s,
        "forward_mfu": forward_flops / forward_s / peak,
        "decode_ms": 1e3 * decode_s,
        "decode_tokens_per_s": d_batch * new / decode_s,
    }


device = jax.devices()[0]
report = {"device": f"{device.platform} {device.device_kind}", "peak_flops": peak_flops(), "rows": []}
for name, (config, train_shape, decode_shape) in SIZES.items():
    report["rows"].append(bench(name, config, train_shape, decode_shape))
    print(json.dumps(report["rows"][-1]), flush=True)
    with open(os.path.join(out, "gpu_model.json"), "w") as f:
        json.dump(report, f, indent=2)
lines = [
    f"# Model in bf16 on {report['device']} (peak {report['peak_flops'] / 1e12:.0f} TFLOP/s bf16 dense)",
    "",
    "fp32 master weights and AdamW, bf16 compute, rematerialised layers; median of 5 steps after a warm-up. MFU: "
    "matmul FLOPs (ModelConfig.forward_flops: PaLM's 2N + 4LHT per forward token, three times that per trained "
    "token) over the peak.",
    "",
    "| config | params | train BxT | train step ms | tokens/s | MFU | forward ms | forward MFU | "
    "decode (greedy) | decode ms | decode tok/s | compile s |",
    "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
]
for r in report["rows"]:
    lines.append(
        f"| {r['config']} | {r['parameters']:,} | {r['train_shape']} | {r['train_step_ms']:.1f} | "
        f"{r['train_tokens_per_s']:,.0f} | {r['train_mfu']:.1%} | "
        f"{r['forward_ms']:.1f} | {r['forward_mfu']:.1%} | {r['decode_shape']} | {r['decode_ms']:.1f} | "
        f"{r['decode_tokens_per_s']:,.0f} | {r['compile_train_s']:.1f} |"
    )
with open(os.path.join(out, "gpu_model.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "model part exit status: $?"

if [ -n "$SMOKE" ]; then
  RL_ARGS=(--quick --n 2 --combiners linear,pama)
else
  RL_ARGS=(--n 3,8,2,5)
fi
timeout "${MOJAX_GPU_RL_S:-300}" "$PYTHON" benchmarks/rl_step.py "${RL_ARGS[@]}" --out "$OUT"
echo "rl_step part exit status: $? (124: cut by its time limit; finished n are in $OUT/rl_step.md)"
