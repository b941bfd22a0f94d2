"""Per-device memory of one LLaMA training step on simulated meshes, from abstract arrays only.

For each device count the script re-executes itself with that many simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before jax starts), builds the
model and AdamW state with ``nnx.eval_shape`` (nothing is allocated), lowers and compiles one step
(forward, backward, AdamW update; fp32 master weights and Adam moments, bf16 compute, rematerialised
layers, donated state) and reads ``compiled.memory_analysis()``. The lower bound beside it is the
per-device size of the sharded parameters plus both Adam moments.

    nice python benchmarks/plan_memory.py                   # 7B/13B/70B on 8, 64, 256 devices
    python benchmarks/plan_memory.py --models tiny --devices 8 --seq-len 64   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("7b", "13b", "70b")
DEVICE_COUNTS = (8, 64, 256)
GIB = 2**30


def layouts(devices: int) -> list[tuple[str, tuple[int, int, int]]]:
    """(rules preset, (data, fsdp, tensor)) pairs to plan for ``devices`` devices."""
    tensor = min(8, devices // 4)
    return [("fsdp", (1, devices, 1)), ("fsdp_tp", (1, devices // tensor, tensor))]


def model_config(name: str):
    """The ModelConfig preset for ``name``, fp32 parameters and bf16 compute."""
    import jax.numpy as jnp

    from mojax.models import ModelConfig

    presets = {
        "tiny": ModelConfig.tiny,
        "7b": ModelConfig.llama_7b,
        "13b": ModelConfig.llama_13b,
        "70b": ModelConfig.llama_70b,
    }
    if name not in presets:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(presets)}")
    return presets[name](dtype=jnp.bfloat16, param_dtype=jnp.float32)


def per_device_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax

    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(abstract_tree)
    )


def plan(model_name: str, preset: str, mesh_shape: tuple[int, int, int], seq_len: int) -> dict:
    """Compile one abstract training step and return its per-device memory figures."""
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from mojax.models import LlamaForCausalLM
    from mojax.models.sharding import abstract_sharded, batch_sharding, make_mesh

    config = model_config(model_name)
    mesh = make_mesh(*mesh_shape)
    tx = optax.adamw(1e-5)

    def new_model():
        return LlamaForCausalLM(config, remat=True, rngs=nnx.Rngs(0))

    model_def, model_state = abstract_sharded(new_model, mesh, preset)
    optimizer_def, optimizer_state = abstract_sharded(
        lambda: nnx.Optimizer(new_model(), tx, wrt=nnx.Param), mesh, preset
    )
    batch = mesh_shape[0] * mesh_shape[1]
    ids = jax.ShapeDtypeStruct((batch, seq_len + 1), "int32", sharding=batch_sharding(mesh))

    def loss_fn(model, ids):
        logits, _ = model(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    def train_step(model_state, optimizer_state, ids):
        model = nnx.merge(model_def, model_state)
        optimizer = nnx.merge(optimizer_def, optimizer_state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, ids)
        optimizer.update(model, grads)
        return nnx.state(model), nnx.state(optimizer), loss

    shardings = jax.tree.map(lambda leaf: leaf.sharding, (model_state, optimizer_state))
    step = jax.jit(train_step, out_shardings=(*shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0, 1))
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(model_state, optimizer_state, ids).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    params = sum(leaf.size for leaf in jax.tree.leaves(model_state))
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return {
        "model": model_name,
        "params": params,
        "devices": math.prod(mesh_shape),
        "rules": preset,
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh_shape, strict=False)),
        "batch": batch,
        "seq_len": seq_len,
        "arguments_gib": memory.argument_size_in_bytes / GIB,
        "outputs_gib": memory.output_size_in_bytes / GIB,
        "aliased_gib": memory.alias_size_in_bytes / GIB,
        "temporaries_gib": memory.temp_size_in_bytes / GIB,
        "total_gib": total / GIB,
        "state_lower_bound_gib": (per_device_bytes(model_state) + per_device_bytes(optimizer_state)) / GIB,
        "compile_s": round(compile_s, 1),
    }


def run_child(devices: int, models: list[str], seq_len: int) -> None:
    """Plan every model and layout for this process's simulated device count, one JSON line each."""
    import jax

    if jax.device_count() != devices:
        raise ValueError(f"expected {devices} simulated devices, jax sees {jax.device_count()}")
    for model_name in models:
        for preset, mesh_shape in layouts(devices):
            print(json.dumps(plan(model_name, preset, mesh_shape, seq_len)), flush=True)


def spawn(devices: int, models: list[str], seq_len: int) -> list[dict]:
    """Re-execute this script with ``devices`` simulated CPU devices and collect its rows."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, __file__, "--child", str(devices), "--models", *models, "--seq-len", str(seq_len)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def machine() -> str:
    """A one-line description of the machine and software versions."""
    import jax

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line for line in lines if line.startswith("model name")]
    cpu = names[0].split(":", 1)[1].strip() if names else platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, jax {jax.__version__} (CPU backend, simulated devices)"
    )


COLUMNS = (
    ("model", "model"),
    ("params", "params (B)"),
    ("devices", "devices"),
    ("rules", "rules"),
    ("mesh", "mesh d×f×t"),
    ("batch", "batch"),
    ("arguments_gib", "arguments"),
    ("outputs_gib", "outputs"),
    ("temporaries_gib", "temporaries"),
    ("total_gib", "total"),
    ("state_lower_bound_gib", "params+Adam bound"),
    ("compile_s", "compile s"),
)


def cell(key: str, row: dict) -> str:
    """One table cell, formatted for reading."""
    value = row[key]
    if key == "params":
        return f"{value / 1e9:.2f}"
    if key == "mesh":
        return "×".join(str(value[a]) for a in ("data", "fsdp", "tensor"))
    if key.endswith("_gib"):
        return f"{value:.2f}"
    return str(value)


def markdown(rows: list[dict], command: str, machine_line: str, seq_len: int) -> str:
    """The results as a markdown document with the command and the machine."""
    lines = [
        "# Planned per-device memory of one training step",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line}  ",
        f"Step: forward + backward + AdamW update, fp32 master weights and Adam moments, bf16 compute, "
        f"rematerialised layers, state donated. Batch: one {seq_len}-token sequence per (data × fsdp) shard. "
        "Sizes in GiB per device from `compiled.memory_analysis()`; total = arguments + outputs - aliased + "
        "temporaries. The bound is the per-device size of the sharded fp32 parameters plus both Adam moments.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(key, row) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--devices", nargs="+", type=int, default=list(DEVICE_COUNTS))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_child(args.child, args.models, args.seq_len)
        return
    command = "python benchmarks/plan_memory.py " + " ".join(sys.argv[1:])
    rows = []
    for devices in args.devices:
        for row in spawn(devices, args.models, args.seq_len):
            rows.append(row)
            print(" | ".join(f"{title}: {cell(key, row)}" for key, title in COLUMNS), flush=True)
    machine_line = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": command.strip(), "machine": machine_line, "seq_len": args.seq_len, "rows": rows}
    (args.out / "plan_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(rows, command.strip(), machine_line, args.seq_len)
    (args.out / "plan_memory.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
