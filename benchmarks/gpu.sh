#!/usr/bin/env bash
# GPU benchmark, one command, under 10 minutes on one accelerator:
#   1. benchmarks/gpu_model.py: the model in bf16 (fp32 master weights, bf16 compute, rematerialised layers):
#      forward, a training step (forward + backward + AdamW) and greedy decode, with the training step's and
#      forward's model FLOPs utilisation (MFU, from ModelConfig.forward_flops; its docstring says how), against
#      transformers + PyTorch eager in the same process; the training step and forward once with mojax's attention
#      and once with cuDNN's fused attention (--attention mojax,cudnn, the default on a GPU);
#   2. benchmarks/rl_step.py on the accelerator at SmolLM2-135M's size (benchmarks/smollm2_shaped.py: its
#      architecture with random weights, written on the spot: no download), bf16 compute, 64 completions of 16 + 64
#      tokens per update, n = 3 objectives: the linear step, MGDA in probe and full mode, the bound, the peers'
#      way and the optimizer step alone, which the bound leaves out (on an H200 the probe-mode update alone took
#      129 s to compile, so more combiners do not fit the 10 minutes).
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default benchmarks/results/gpu; writes gpu_model.{json,md},
#                                           # rl_step.{json,md} and device.txt
#   bash benchmarks/gpu.sh OUT_DIR --smoke  # tiny sizes on any backend (CPU included), to check the script
#
# Peak bf16 dense FLOP/s comes from the device kind (H200/H100 SXM 989 TFLOP/s, A100 312, L4 121, ...); set
# MOJAX_PEAK_TFLOPS to override it for other parts. Time limits: MOJAX_GPU_MODEL_S (default 270 s) and
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

timeout "${MOJAX_GPU_MODEL_S:-270}" "$PYTHON" benchmarks/gpu_model.py --out "$OUT" ${SMOKE:+"$SMOKE"}
echo "model part exit status: $?"

MODEL_DIR="$(mktemp -d)"
trap 'rm -rf "$MODEL_DIR"' EXIT
if [ -n "$SMOKE" ]; then
  SHAPE_ARGS=(--layers 2 --vocab 512)
  RL_ARGS=(--quick --n 2 --combiners linear,mgda --references peers,peers-step,optimizer)
else
  SHAPE_ARGS=()
  RL_ARGS=(--n 3 --combiners linear,mgda --references peers,peers-step,optimizer --rounds 2 --repeats 3)
fi
"$PYTHON" benchmarks/smollm2_shaped.py "$MODEL_DIR" "${SHAPE_ARGS[@]}" &&
  timeout "${MOJAX_GPU_RL_S:-300}" "$PYTHON" benchmarks/rl_step.py "${RL_ARGS[@]}" --out "$OUT" \
    --set model.path="$MODEL_DIR" --set model.dtype=bfloat16 \
    --set data.prompts_per_step=16 --set rollout.max_completion_length=64
echo "rl_step part exit status: $? (124: cut by its time limit; finished n are in $OUT/rl_step.md)"
