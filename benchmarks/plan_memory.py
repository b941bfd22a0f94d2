"""Per-device memory of one LLaMA training step on simulated meshes, from abstract arrays only.

For each device count the script re-executes itself with that many simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before jax starts), builds the
model and AdamW state with ``nnx.eval_shape`` (nothing is allocated), lowers and compiles one step
(forward, backward, AdamW update; fp32 master weights and Adam moments, bf16 compute, rematerialised
layers, donated state) and reads ``compiled.memory_analysis()``. The lower bound beside it is the
per-device size of the sharded parameters plus both Adam moments.

    nice python benchmarks/plan_memory.py                   # 7B/13B/70B on 8, 64, 256 devices
    python benchmarks/plan_memory.py --models tiny --devices 8 --seq-len 64   # quick smoke run

``--rl PROMPT_LEN,NEW_TOKENS,OBJECTIVES`` plans the whole RL step instead (:func:`plan_rl`: the rollout and the
probe-mode train step with a vector critic, compiled separately), writing ``plan_memory_rl.{json,md}``:

    nice python benchmarks/plan_memory.py --rl 1024,1024,3 --devices 8 64
    python benchmarks/plan_memory.py --rl 16,8,3 --models tiny --devices 8 --out /tmp/x   # quick smoke run

``--generations G`` samples G completions of each prompt (GRPO's group: one prefill per prompt, its KV cache shared
by the G rows), ``--prompts-per-shard K`` plans K prompts per (data x fsdp) shard: K x G completions per shard.
``--prompts-per-shard 4`` and ``--generations 4`` plan the same update on the same number of completions; their
rollouts differ by the shared prompt cache. ``--microbatches M`` runs the update in M parts (gradient accumulation,
one optimizer step); ``--minibatches M`` splits it into M shuffled minibatches, one optimizer step each (PPO's
minibatches):

    nice python benchmarks/plan_memory.py --rl 1024,1024,3 --generations 4 --microbatches 4 --devices 64
    nice python benchmarks/plan_memory.py --rl 1024,1024,3 --generations 4 --minibatches 4 --devices 64
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
from typing import NamedTuple

MODELS = ("7b", "13b", "70b")
DEVICE_COUNTS = (8, 64, 256)
GIB = 2**30


class RLShape(NamedTuple):
    """The RL step a plan is for: prompts and completions per (data x fsdp) shard, objectives, update splits."""

    prompt_len: int
    new_tokens: int
    objectives: int
    generations: int = 1
    """Completions sampled from each prompt (one prefill, its KV cache shared by them)."""
    prompts_per_shard: int = 1
    microbatches: int = 1
    """``algorithm.num_microbatches``: the update's gradient accumulated over this many parts."""
    minibatches: int = 1
    """``algorithm.num_minibatches``: the update split into this many shuffled minibatches, one optimizer step each."""

    @property
    def completions_per_shard(self) -> int:
        return self.generations * self.prompts_per_shard


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


def compiled_total(compiled) -> tuple[int, dict]:
    """(bytes per device, the memory_analysis fields in GiB) of a compiled program: arguments + outputs - aliased +
    temporaries."""
    memory = compiled.memory_analysis()
    parts = {
        "arguments_gib": memory.argument_size_in_bytes / GIB,
        "outputs_gib": memory.output_size_in_bytes / GIB,
        "aliased_gib": memory.alias_size_in_bytes / GIB,
        "temporaries_gib": memory.temp_size_in_bytes / GIB,
    }
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return total, parts


def abstract_output(fn, *args):
    """The output of ``jax.jit(fn)(*args)`` as ShapeDtypeStructs carrying the shardings XLA propagates to it."""
    import jax

    compiled = jax.jit(fn).lower(*args).compile()
    return jax.tree.map(
        lambda value, sharding: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding),
        jax.eval_shape(fn, *args),
        compiled.output_shardings,
    )


def plan_rl(
    model_name: str,
    preset: str,
    mesh_shape: tuple[int, int, int],
    shape: RLShape,
    pullbacks: str = "sequential",
) -> dict:
    """Compile the RL rollout and the probe-mode RL train step separately and return their per-device memory.

    What the trainer holds for a full fine-tuning GAE run (``mojax.rl.trainer``): the policy (split for probe mode:
    the final block apart), a frozen reference copy, a vector critic with n outputs (its own trunk), AdamW states of
    both, the combiner state (MGDA). The probe's n pullbacks run as ``pullbacks`` says (the trainer's
    ``combiner.pullbacks``): "sequential" (what "auto" picks on a mesh) constrains each objective's gradient to the
    parameters' sharding, "batched" vmaps them, unconstrained. The rollout program samples ``new_tokens`` after
    ``prompt_len``-token prompts with a KV cache, then scores the completions under the policy and the reference
    and runs the critic; the train step is ``mojax.rl.update.make_train_step`` in probe mode with the critic. Each
    program's memory is its compiled arguments + outputs - aliased + temporaries, plus what stays resident on the
    device without being one of its arguments (during the rollout: the optimizer and combiner states; during the
    update: the reference). Each (data x fsdp) shard samples ``shape.generations`` completions of each of its
    ``shape.prompts_per_shard`` prompts, every prompt prefilled once and its cache shared by its completions
    (``generate(..., num_generations=...)``, as the trainer's rollout samples GRPO groups). The update runs them in
    ``shape.minibatches`` shuffled minibatches (one optimizer step each), each in ``shape.microbatches`` parts
    (gradient accumulation): one part's activations at a time.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from mojax.combiners import REGISTRY, make
    from mojax.models import LlamaForCausalLM, LlamaValueModel
    from mojax.models.generate import SamplingConfig, generate
    from mojax.models.llama import default_probe_mask, merge_split, split_last_layer
    from mojax.models.sharding import batch_sharding, make_mesh, state_shardings
    from mojax.rl.trainer import critic_fn, response_fn
    from mojax.rl.update import Batch, TrainState, UpdateSpec, make_train_step

    prompt_len, new_tokens, n, generations = shape.prompt_len, shape.new_tokens, shape.objectives, shape.generations
    config = model_config(model_name)
    mesh = make_mesh(*mesh_shape)
    tx = optax.adamw(1e-5)
    combiner = make("mgda", n)

    def sharded_params(factory):
        graphdef, params, rest = nnx.split(nnx.eval_shape(factory), nnx.Param, ...)
        shardings = state_shardings(params, mesh, preset)
        params = jax.tree.map(
            lambda value, sharding: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding), params, shardings
        )
        return graphdef, params, rest

    with nnx.use_eager_sharding(False):
        graphdef, params, rest = sharded_params(lambda: LlamaForCausalLM(config, remat=True, rngs=nnx.Rngs(0)))
        critic_def, critic_params, critic_rest = sharded_params(
            lambda: LlamaValueModel(config, n, remat=True, rngs=nnx.Rngs(1))
        )
    replicated = NamedSharding(mesh, PartitionSpec())

    def optimizer_state(params):
        """AdamW's state with each moment sharded like its parameter (the step count replicated)."""
        with_sharding = lambda value, sharding: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)  # noqa: E731
        return optax.tree_map_params(
            tx,
            lambda value, param: with_sharding(value, param.sharding),
            jax.eval_shape(tx.init, params),
            params,
            transform_non_params=lambda value: with_sharding(value, replicated),
        )

    with jax.set_mesh(mesh):
        split = abstract_output(split_last_layer, params)
    state = TrainState(
        params=split,
        opt_state=optimizer_state(split),
        combiner_state=jax.tree.map(
            lambda value: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=replicated),
            jax.eval_shape(combiner.init, split),
        ),
        consecutive_skips=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        skipped_updates=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        critic_params=critic_params,
        critic_opt_state=optimizer_state(critic_params),
    )
    prompt_count = mesh_shape[0] * mesh_shape[1] * shape.prompts_per_shard
    batch_size = prompt_count * generations
    rows = batch_sharding(mesh)

    def array(shape, dtype, count=batch_size):
        return jax.ShapeDtypeStruct((count, *shape), dtype, sharding=rows)

    prompts = (array((prompt_len,), jnp.int32, prompt_count), array((prompt_len,), jnp.int32, prompt_count))
    key = jax.eval_shape(lambda: jax.random.key(0))
    policy = response_fn(graphdef, rest, split=True)
    critic = critic_fn(critic_def, critic_rest)
    sampling = SamplingConfig(
        max_new_tokens=new_tokens, temperature=1.0, stop_token_ids=(2,), pad_token_id=0, layer_loop="scan"
    )  # what `generate` picks for the trainer's sharded parameters; inside this jit it cannot see their sharding

    def rollout(params, reference, critic_params, prompt_ids, prompt_mask, key):
        model = merge_split(graphdef, params)
        out = generate(model, prompt_ids, prompt_mask, key, sampling, num_generations=generations)
        prompt_ids, prompt_mask = (jnp.repeat(a, generations, axis=0) for a in (prompt_ids, prompt_mask))
        old_logp, _ = policy(params, prompt_ids, prompt_mask, out.tokens, out.response_mask)
        ref_logp, _ = policy(reference, prompt_ids, prompt_mask, out.tokens, out.response_mask)
        values = critic(critic_params, prompt_ids, prompt_mask, out.tokens, out.response_mask)
        return out.tokens, out.response_mask, old_logp, ref_logp, values

    batch = Batch(
        prompt_ids=prompts[0],
        prompt_mask=prompts[1],
        tokens=array((new_tokens,), jnp.int32),
        mask=array((new_tokens,), jnp.float32),
        old_logp=array((new_tokens,), jnp.float32),
        ref_logp=array((new_tokens,), jnp.float32),
        advantages=array((n, new_tokens), jnp.float32),
        rewards=array((n,), jnp.float32),
        group_ids=array((), jnp.int32),
        values=array((n, new_tokens), jnp.float32),
        returns=array((n, new_tokens), jnp.float32),
    )
    spec = UpdateSpec(
        mode="probe",
        num_objectives=n,
        combiner_name="mgda",
        reads=REGISTRY["mgda"].reads,
        sequential_pullbacks=pullbacks == "sequential",
        num_microbatches=shape.microbatches,
        num_minibatches=shape.minibatches,
    )
    flags = jax.tree.leaves(default_probe_mask(split))
    train_step = make_train_step(
        policy, combiner, tx, spec, flags, critic, tx, param_shardings=jax.tree.map(lambda leaf: leaf.sharding, split)
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        rollout_compiled = jax.jit(rollout).lower(split, split, critic_params, *prompts, key).compile()
        rollout_s = time.perf_counter() - start
        beta = jax.ShapeDtypeStruct((), jnp.float32)
        train_compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch, key, beta, None).compile()
    train_s = time.perf_counter() - start - rollout_s
    rollout_bytes, rollout_parts = compiled_total(rollout_compiled)
    train_bytes, train_parts = compiled_total(train_compiled)
    optimizer_bytes = per_device_bytes((state.opt_state, state.combiner_state, state.critic_opt_state))
    reference_bytes = per_device_bytes(split)
    rollout_gib = (rollout_bytes + optimizer_bytes) / GIB
    train_gib = (train_bytes + reference_bytes) / GIB
    return {
        "model": model_name,
        "params": sum(leaf.size for leaf in jax.tree.leaves(params)),
        "devices": math.prod(mesh_shape),
        "rules": preset,
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh_shape, strict=False)),
        "batch": batch_size,
        "prompts": prompt_count,
        "generations": generations,
        "microbatches": shape.microbatches,
        "minibatches": shape.minibatches,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "objectives": n,
        "pullbacks": pullbacks,
        "rollout": rollout_parts,
        "train": train_parts,
        "resident_in_rollout_gib": optimizer_bytes / GIB,
        "resident_in_update_gib": reference_bytes / GIB,
        "rollout_gib": rollout_gib,
        "update_gib": train_gib,
        "peak_gib": max(rollout_gib, train_gib),
        "fits_80gib": max(rollout_gib, train_gib) <= 80.0,
        "compile_s": round(rollout_s + train_s, 1),
    }


def run_child(devices: int, models: list[str], seq_len: int, rl: RLShape | None, pullbacks: str) -> None:
    """Plan every model and layout for this process's simulated device count, one JSON line each."""
    import jax

    if jax.device_count() != devices:
        raise ValueError(f"expected {devices} simulated devices, jax sees {jax.device_count()}")
    for model_name in models:
        for preset, mesh_shape in layouts(devices):
            row = (
                plan(model_name, preset, mesh_shape, seq_len)
                if rl is None
                else plan_rl(model_name, preset, mesh_shape, rl, pullbacks=pullbacks)
            )
            print(json.dumps(row), flush=True)


def spawn(
    devices: int,
    models: list[str],
    seq_len: int,
    rl: RLShape | None = None,
    pullbacks: str = "sequential",
) -> list[dict]:
    """Re-execute this script with ``devices`` simulated CPU devices and collect its rows."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, __file__, "--child", str(devices), "--models", *models, "--seq-len", str(seq_len)]
    if rl is not None:
        command += ["--rl", f"{rl.prompt_len},{rl.new_tokens},{rl.objectives}", "--pullbacks", pullbacks]
        command += ["--generations", str(rl.generations), "--prompts-per-shard", str(rl.prompts_per_shard)]
        command += ["--microbatches", str(rl.microbatches), "--minibatches", str(rl.minibatches)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def machine() -> str:
    """A one-line description of the machine and software versions."""
    import jax

    from mojax.testing import cpu_model

    cpu = cpu_model()
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
    if key == "fits_80gib":
        return "yes" if value else "no"
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


PULLBACKS = {
    "sequential": "the n pullbacks in sequence, each objective's gradient sharded like its parameters, as the "
    "trainer's `combiner.pullbacks: auto` runs them on a mesh",
    "batched": "the n pullbacks vmapped, their gradients laid out by the partitioner",
}
"""What each --pullbacks choice plans, for the report."""

RL_COLUMNS = (
    ("model", "model"),
    ("devices", "devices"),
    ("rules", "rules"),
    ("mesh", "mesh d×f×t"),
    ("prompts", "prompts"),
    ("batch", "completions"),
    ("rollout_gib", "rollout"),
    ("update_gib", "update"),
    ("peak_gib", "peak"),
    ("fits_80gib", "fits 80 GiB"),
    ("compile_s", "compile s"),
)


def rl_markdown(rows: list[dict], command: str, machine_line: str, rl: RLShape, pullbacks: str) -> str:
    """The RL-step plan as a markdown document: per-device GiB of the rollout and of the update, and the peak."""
    n = rl.objectives
    per_shard = (
        f"{rl.prompts_per_shard} prompt(s) of {rl.prompt_len} tokens per (data × fsdp) shard, {rl.generations} "
        f"completion(s) of {rl.new_tokens} new tokens each (one prefill per prompt, its KV cache shared by its "
        f"completions), the update in {rl.minibatches} minibatch(es) of {rl.microbatches} micro-batch(es) each"
    )
    lines = [
        "# Planned per-device memory of one RL step (probe mode, vector critic)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line}  ",
        f"{per_shard}, n = {n} objectives, MGDA in probe mode (final block; {PULLBACKS[pullbacks]}), full fine-tuning: "
        "policy (fp32 master weights, bf16 compute, rematerialised layers), frozen reference copy, vector critic "
        "(own trunk, n outputs), AdamW for both, combiner state. The rollout (sampling with a bf16 KV cache, then "
        "policy and reference log-probs and critic values) and "
        "the train step are lowered and compiled separately; each figure is the program's arguments + outputs - "
        "aliased + temporaries from `compiled.memory_analysis()`, plus what stays resident without being one of its "
        "arguments (rollout: optimizer and combiner states; update: the reference). GiB per device.",
        "",
        "| " + " | ".join(title for _, title in RL_COLUMNS) + " |",
        "|" + "---|" * len(RL_COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(key, row) for key, _ in RL_COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rl_shape(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RLShape | None:
    """The RL step to plan from ``--rl`` and the options that shape it (None without ``--rl``); bad values exit with
    the parser's error, as the trainer's config checks would reject them."""
    if args.rl is None:
        return None
    try:
        sizes = tuple(int(v) for v in args.rl.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        parser.error(f"--rl must be three positive integers PROMPT_LEN,NEW_TOKENS,OBJECTIVES, got {args.rl!r}")
    shape = RLShape(*sizes, args.generations, args.prompts_per_shard, args.microbatches, args.minibatches)
    splits = shape[3:]
    if min(splits) < 1:
        parser.error(
            f"--generations, --prompts-per-shard, --microbatches and --minibatches must be positive, got {splits}"
        )
    if shape.completions_per_shard % (shape.microbatches * shape.minibatches):
        parser.error(
            f"--minibatches x --microbatches = {shape.minibatches * shape.microbatches} must divide the completions "
            f"per shard (--generations x --prompts-per-shard = {shape.completions_per_shard})"
        )
    return shape


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, RLShape | None]:
    """The command line's options and the RL step they describe (None without ``--rl``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--devices", nargs="+", type=int, default=list(DEVICE_COUNTS))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument(
        "--rl", help="plan the RL step instead: PROMPT_LEN,NEW_TOKENS,OBJECTIVES (e.g. 1024,1024,3)", default=None
    )
    parser.add_argument("--generations", type=int, default=1, help="the RL plan's completions per prompt")
    parser.add_argument("--prompts-per-shard", type=int, default=1, help="the RL plan's prompts per data x fsdp shard")
    parser.add_argument("--microbatches", type=int, default=1, help="the RL plan's algorithm.num_microbatches")
    parser.add_argument("--minibatches", type=int, default=1, help="the RL plan's algorithm.num_minibatches")
    parser.add_argument(
        "--pullbacks", choices=sorted(PULLBACKS), default="sequential", help="the RL plan's combiner.pullbacks"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return args, rl_shape(parser, args)


def main(argv: list[str] | None = None) -> None:
    """Plan every model and layout for each device count (one child process per count); write the JSON and markdown."""
    args, rl = parse_args(argv)
    if args.child is not None:
        run_child(args.child, args.models, args.seq_len, rl, args.pullbacks)
        return
    command = "python benchmarks/plan_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = COLUMNS if rl is None else RL_COLUMNS
    rows = []
    for devices in args.devices:
        for row in spawn(devices, args.models, args.seq_len, rl, args.pullbacks):
            rows.append(row)
            print(" | ".join(f"{title}: {cell(key, row)}" for key, title in columns), flush=True)
    machine_line = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    name = "plan_memory" if rl is None else "plan_memory_rl"
    report = {
        "command": command.strip(),
        "machine": machine_line,
        "seq_len": args.seq_len,
        "rl": None if rl is None else rl._asdict(),
        "rows": rows,
    }
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = (
        markdown(rows, command.strip(), machine_line, args.seq_len)
        if rl is None
        else rl_markdown(rows, command.strip(), machine_line, rl, args.pullbacks)
    )
    (args.out / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
