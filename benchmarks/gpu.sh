#!/usr/bin/env bash
# GPU benchmark, one command, under 10 minutes on one accelerator:
#   1. benchmarks/gpu_model.py: the model in bf16 (fp32 master weights, bf16 compute, rematerialised layers):
#      forward, a training step (forward + backward + AdamW) and greedy decode, with the training step's and
#      forward's model FLOPs utilisation (MFU, from ModelConfig.forward_flops; its docstring says how);
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

timeout "${MOJAX_GPU_MODEL_S:-240}" "$PYTHON" benchmarks/gpu_model.py --out "$OUT" ${SMOKE:+"$SMOKE"}
echo "model part exit status: $?"

if [ -n "$SMOKE" ]; then
  RL_ARGS=(--quick --n 2 --combiners linear,pama)
else
  RL_ARGS=(--n 3,8,2,5)
fi
timeout "${MOJAX_GPU_RL_S:-300}" "$PYTHON" benchmarks/rl_step.py "${RL_ARGS[@]}" --out "$OUT"
echo "rl_step part exit status: $? (124: cut by its time limit; finished n are in $OUT/rl_step.md)"
