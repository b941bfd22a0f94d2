"""Cost of one RL update per combiner and mode, against the linear scalarisation step on the same batch.

For each n the tiny task (``mojax/rl/configs/tiny.yaml``: the tiny random LLaMA, its character tokenizer) gets n
``char_fraction`` objectives, one letter each. One rollout of a linear-scalarisation trainer (``Trainer.prepare(1)``)
is the fixed batch; every other contender runs on that same batch:

* ``linear/scalar``: ``Trainer.update(batch, 1)`` with the linear combiner: the baseline (ratio 1 by definition);
* ``<combiner>/<mode>``: ``Trainer.update(batch, 1)`` of a trainer with that combiner, for every combiner of
  ``mojax.combiners.REGISTRY`` and every mode it supports (scalar without a Gram; probe and full with one). All
  trainers start from the same random model (same seed) and have the same update settings. A probe set that holds
  every trained parameter (``--set 'combiner.probe=[lora_]'`` with LoRA) makes the trainer run full mode when the
  loss has no shared term (the benchmark's default: no KL in the loss, no entropy bonus); its probe contender is then
  labelled ``<combiner>/probe, run as full`` and judged as full mode;
* ``bound: fwd + n bwd``: one forward pass and the pullbacks of the n objective losses (unit cotangents, batched or
  sequential as the trainers' ``combiner.pullbacks``), with no combiner and no optimizer: the least a full-mode
  update can cost;
* ``peers: n x (fwd + bwd)``: n separate jitted forward+backward passes, one per objective loss, as multi-objective
  PPO code that calls ``loss_i.backward()`` per objective does (e.g. the MGDA baseline of the CTWA authors' code);
* ``peers' MGDA step``: those peers' whole update: the n passes, then MGDA's weights on their Gram, the combination,
  the clip and the trainer's optimizer (mojax's own MGDA and optimizer; the peers' solvers differ). MGDA's full mode
  does the same work with one forward pass: the verdict gives how much faster it is. With LoRA every reference
  differentiates the adapters only, as the trainers do;
* ``<combiner>/full, select skip`` (``--references other-skip``): a full-mode update whose non-finite skip is a
  select of the stepped state against the old one where the trainer's is a ``lax.cond`` (pullbacks in sequence), or
  a conditional where the trainer's is a select (batched pullbacks): the two measured each way round;
* ``<combiner>/<mode>, head's n gradients`` (``--references head-gradients``): each probe- and full-mode contender
  again with ``combiner.head_gram=gradients``, the LM head's n gradients in its Gram instead of its token kernel
  (where ``auto`` takes the kernel the two differ; where it does not, they are the same program);
* ``<combiner>/<mode>, batched pullbacks`` (``--references other-pullbacks``): each probe- and full-mode contender
  again with its n pullbacks the other way (``combiner.pullbacks``): one pullback vmapped over the n cotangents,
  compiled with :func:`mojax.xla_cpu.batched_pullback_options` as the trainer does, where the trainer's runs them in
  sequence; in sequence where the trainer's are batched;
* ``optimizer alone: clip, optimizer step`` (``--references optimizer``): the clip and the trainer's optimizer step
  (AdamW by default) on one gradient, with nothing before them: what every update runs after its gradients and the
  bound leaves out. The verdict then also gives each full mode's ratio to the bound plus this step;
* ``one read of the n gradients`` (``--references gradient-read``): a pass that reads the bound's n gradients once
  (the sum of their squares, the trace of their Gram), held from one call of the bound: the least reading of them
  that a Gram takes, since on XLA:CPU a pullback writes its gradients out before any other operation reads them.
  With the optimizer step, the verdict gives each full mode's ratio to the bound plus both, and what both take of
  the bound: where that is above the 1.1x target's allowance, no full mode that pulls back as the bound does can
  meet the target on that machine (the LM head's token kernel, ``combiner.head_gram``, pulls back less).

Timing: every contender is compiled and warmed up first (its first call's time is reported, and the part of it that
XLA spent compiling: the rest is tracing, lowering and one run), then
each round calls all contenders once in turn, in a random order drawn afresh for every pass, ``--repeats`` times
(a call's time depends on the program that ran before it, so no contender always follows the same one); a
contender's ratio in a round is its median time over the linear step's median time in that round. The table reports
the median ratio over ``--rounds`` rounds and its spread (min-max). Scalar-mode combiners share the linear step's
train step, so their weight programs are also timed alone, against the linear update. Run as a script, it first
makes ``malloc`` keep freed memory for XLA's next call (``mojax.host_memory``; ``MOJAX_RELEASE_HOST_MEMORY=1``:
glibc's defaults, every large scratch buffer mapped and faulted in afresh at every call), for every model: the
``mojax`` command line leaves models of fewer than 1.5M parameters alone, whose updates the setting slows down,
though hardly their ratios (``benchmarks/RESULTS.md``, "The host-memory setting on the tiny model" and "The
host-memory setting by model size"). Only ratios measured in the same run are reported: the machine these numbers
come from is shared and loaded, so absolute times move by tens of percent between minutes.

    python benchmarks/rl_step.py                      # n in {2, 3, 5, 8}, every combiner and mode
    python benchmarks/rl_step.py --quick --n 2 --combiners pama,ctwa --out /tmp/x   # seconds-long smoke run
    MOJAX_CACHE=/tmp/mojax-data-cache python benchmarks/rl_step.py --n 3 --combiners linear,ctwa,mgda,upgrad \
        --set model.path=smollm2 [--set lora.rank=8]                                 # on SmolLM2-135M
    python benchmarks/rl_step.py --n 8 --combiners linear,mgda --modes full          # full mode only (and the baseline)
    python benchmarks/rl_step.py ... --references peers         # the bound and the peers' passes, not their MGDA step

With ``--profile C`` every contender's ``C`` further calls are traced with ``jax.profiler`` after the timing, and the
report adds each one's XLA operation time per call by kind and its largest operations
(``profile_step.xla_operation_times``): where a combiner's time goes beyond the bound's.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import ms_by_kind, xla_operation_times  # noqa: E402

from mojax.combiners import REGISTRY, make  # noqa: E402
from mojax.combiners.grads import separate_pullbacks, stacked_pullbacks  # noqa: E402
from mojax.host_memory import keep_freed_host_memory  # noqa: E402
from mojax.rl.config import load_config  # noqa: E402
from mojax.rl.trainer import Trainer  # noqa: E402
from mojax.rl.update import (  # noqa: E402
    Batch,
    clip_to_norm,
    denominators,
    make_scalar_weights,
    make_train_step,
    masked_nodes,
    minibatch_losses,
    skips_by_conditional,
    train_step_compiler_options,
    zeros_where_masked,
)
from mojax.testing import benchmark_command, call_orders, cpu_model, write_report, xla_compile_seconds  # noqa: E402
from mojax.xla_cpu import batched_pullback_options  # noqa: E402

LETTERS = "abcdefghijklmnop"
BASELINE = "linear/scalar"
BOUND = "bound: fwd + n bwd"
PEERS = "peers: n x (fwd + bwd)"
PEERS_STEP = "peers' MGDA step: n x (fwd + bwd), MGDA, optimizer"
TARGETS = {"scalar": 1.02, "probe": 1.15}  # ratio to linear (probe: at n = 3)
FULL_TARGET = 1.1  # ratio of full mode to the bound
ALL_MODES = ("scalar", "probe", "full")
OTHER_SKIP = "other skip"
HEAD_GRADIENTS = "head's n gradients"
OTHER_PULLBACKS = "other pullbacks"
OPTIMIZER = "optimizer alone: clip, optimizer step"
GRADIENT_READ = "one read of the n gradients"
REFERENCES = {
    "peers": PEERS,
    "peers-step": PEERS_STEP,
    "other-skip": OTHER_SKIP,
    "head-gradients": HEAD_GRADIENTS,
    "other-pullbacks": OTHER_PULLBACKS,
    "optimizer": OPTIMIZER,
    "gradient-read": GRADIENT_READ,
}


class FirstCall(NamedTuple):
    """A contender's first call: its wall seconds (trace, lower, compile, run) and the seconds XLA spent compiling
    its programs (:func:`mojax.testing.xla_compile_seconds`)."""

    seconds: float
    xla_compile_s: float


class Contender(NamedTuple):
    """One timed callable: its label, the combiner mode ("" for the reference passes) and its first call; in scalar
    mode also its trainer's weight program alone (:func:`weights_call`); and what its compiled program's temporaries
    take in bytes (``--memory``)."""

    label: str
    mode: str
    call: Callable[[], Any]
    first_call: FirstCall
    weights: Callable[[], Any] | None = None
    temporaries: Callable[[], int] | None = None


# ------------------------------------------------------------------------------------------------ building
def objectives_override(n: int) -> str:
    """The ``objectives=[...]`` override: n ``char_fraction`` objectives, each rewarding one letter and one digit.

    The tiny model writes letters only; the digit is for models whose completions decode to no letters, such as
    the SmolLM2-shaped test folders (``benchmarks/smollm2_shaped.py``: placeholder tokens ``<t123>``), where
    letters alone scored every completion 0 and left the update with zero advantages and zero gradients.
    """
    entries = ", ".join(
        f"{{name: {c}_rate, fn: char_fraction, options: {{chars: '{c}{i % 10}'}}}}" for i, c in enumerate(LETTERS[:n])
    )
    return f"objectives=[{entries}]"


def nonzero_share(batch: Batch) -> float:
    """The share of the batch's response-token advantages (every objective) that are non-zero: at 0 every gradient
    is zero, and iterative combiners may stop early."""
    advantages, mask = np.asarray(batch.advantages), np.asarray(batch.mask)
    response = np.broadcast_to(mask[:, None, :], advantages.shape) > 0
    return float(np.sum((advantages != 0) & response) / max(np.sum(response), 1))


def trainer_for(n: int, combiner: str, mode: str, output_dir: str, extra: Sequence[str] = ()) -> Trainer:
    """A tiny-task trainer with n objectives, the given combiner and mode, no logging and no checkpoints; `extra`
    overrides come last (e.g. ``model.path=smollm2``, ``lora.rank=8``)."""
    overrides = [
        f"output_dir={output_dir}",
        objectives_override(n),
        f"combiner.name={combiner}",
        f"combiner.mode={mode}",
        "logging.tensorboard=false",
        "logging.progress=false",
        "eval_steps=0",
        "export=false",
        *extra,
    ]
    return Trainer(load_config("tiny", overrides))


def modes(name: str) -> tuple[str, ...]:
    """The modes a registered combiner supports."""
    return ("probe", "full") if REGISTRY[name].uses_gram else ("scalar",)


def timed_first(call: Callable[[], Any]) -> FirstCall:
    """The first call (trace, compile, run) timed, with its XLA compilations apart; then one more warm-up call."""
    with xla_compile_seconds() as compiles:
        started = time.perf_counter()
        jax.block_until_ready(call())
        elapsed = time.perf_counter() - started
    jax.block_until_ready(call())
    return FirstCall(elapsed, sum(compiles))


def update_call(trainer: Trainer, batch: Batch) -> Callable[[], Any]:
    """One ``Trainer.update`` on the fixed batch (the state it donates is replaced by the new one)."""
    return lambda: trainer.update(batch, 1)


def weights_call(trainer: Trainer, batch: Batch) -> Callable[[], Any]:
    """A scalar-mode trainer's weight program alone (``make_scalar_weights``, jitted as the trainer jits it) on its
    current combiner state and the batch, compiled and warm: all that its update runs besides the train step that
    every scalar-mode combiner shares."""
    program = jax.jit(make_scalar_weights(trainer.combiner, trainer.update_spec))
    call = lambda: program(trainer.state.combiner_state, batch)  # noqa: E731
    timed_first(call)
    return call


def reference_passes(
    trainer: Trainer, batch: Batch, wanted: Sequence[str] = (PEERS, PEERS_STEP)
) -> dict[str, Callable[[], Any]]:
    """The bound (one forward, n pullbacks) and those of the other references that are `wanted`: the peers' n separate
    forward+backward passes, their whole MGDA step (:func:`peers_mgda_step`), the optimizer step alone
    (:func:`optimizer_alone`) and one read of the bound's n gradients (:func:`gradient_read`), jitted; the bound's
    pullbacks run as the trainer's full mode runs them (in sequence without a mesh: n separate gradient trees;
    batched ones with :func:`mojax.xla_cpu.batched_pullback_options`).

    The passes use a copy of the trainer's initial parameters (its own are donated by every update). With LoRA they
    return the adapters' gradients only, as the trainer differentiates them (PEFT's peers: ``requires_grad`` off on the
    frozen weights).
    """
    params = jax.tree.map(jnp.copy, trainer.state.params)
    spec, n = trainer.update_spec, trainer.update_spec.num_objectives
    beta = jnp.float32(trainer.kl_coef)
    trained = trained_only(trainer)

    def vector_loss(p, b):
        return minibatch_losses(trainer.policy, p, b, denominators(b.mask, spec), beta, spec)[0]

    @functools.partial(jax.jit, compiler_options=None if spec.sequential_pullbacks else batched_pullback_options())
    def forward_n_backward(p, b):
        _, pullback = jax.vjp(lambda q: vector_loss(q, b), p)
        cotangents = jnp.eye(n + 1, dtype=jnp.float32)[:n]
        if spec.sequential_pullbacks and trainer.mesh is None:  # as the trainer's full mode: n separate trees
            return separate_pullbacks(pullback, cotangents, trained)
        return trained(stacked_pullbacks(pullback, cotangents, spec.sequential_pullbacks))

    @jax.jit
    def one_objective_grad(p, b, index):
        return trained(jax.grad(lambda q: vector_loss(q, b)[index])(p))

    calls = {BOUND: functools.partial(forward_n_backward, params, batch)}
    if PEERS in wanted:
        calls[PEERS] = lambda: [one_objective_grad(params, batch, jnp.int32(i)) for i in range(n)]
    if PEERS_STEP in wanted:
        calls[PEERS_STEP] = peers_mgda_step(
            trainer, lambda p: [one_objective_grad(p, batch, jnp.int32(i)) for i in range(n)]
        )
    if OPTIMIZER in wanted:
        calls[OPTIMIZER] = optimizer_alone(trainer, one_objective_grad(params, batch, jnp.int32(0)))
    if GRADIENT_READ in wanted:
        calls[GRADIENT_READ] = gradient_read(forward_n_backward(params, batch))
    return calls


def trained_only(trainer: Trainer) -> Callable[[Any], Any]:
    """A parameter-shaped tree without its frozen leaves (``optax.MaskedNode()`` there) for a LoRA trainer, else as is."""
    flags = trainer.trainable_flags
    return (lambda tree: tree) if flags is None else (lambda tree: masked_nodes(tree, flags))


def clipped_optimizer_step(trainer: Trainer, params: Any, opt_state: Any, combined: Any) -> tuple[Any, Any]:
    """(params, optimizer state) after the trainer's clip to ``max_grad_norm`` and its optimizer step on `combined`
    (the trainable leaves' gradient; the frozen ones get the zeros the trainer gives its optimizer)."""
    combined = clip_to_norm(combined, optax.tree.norm(combined), trainer.update_spec.max_grad_norm)
    updates, opt_state = trainer.optimizer.update(zeros_where_masked(combined, params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def peers_mgda_step(trainer: Trainer, separate_grads: Callable[[Any], list[Any]]) -> Callable[[], Any]:
    """The peers' whole MGDA update: the n gradients of `separate_grads` (separate passes), then MGDA's weights,
    the combination, the clip and the trainer's optimizer, on its own copy of the parameters and optimizer state
    (stepped, as an update steps them); each call returns [params, optimizer state, MGDA state]."""
    mgda = make("mgda", trainer.update_spec.num_objectives)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def mgda_and_optimizer(p, opt_state, mgda_state, grads):
        stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)
        combined, mgda_state = mgda.update(stacked, mgda_state, p)
        return *clipped_optimizer_step(trainer, p, opt_state, combined), mgda_state

    params = jax.tree.map(jnp.copy, trainer.state.params)
    state = [params, trainer.optimizer.init(params), mgda.init(params)]

    def step():
        state[:] = mgda_and_optimizer(*state, separate_grads(state[0]))
        return state

    return step


def optimizer_alone(trainer: Trainer, gradient: Any) -> Callable[[], Any]:
    """What every update runs after its combined gradient and the bound leaves out: the clip and the trainer's
    optimizer step (``optimizer.name``, AdamW by default) on `gradient`, jitted with its parameters and optimizer
    state donated as the trainer's update donates them, on its own copy of both (stepped at every call); each call
    returns [params, optimizer state]."""
    step = jax.jit(functools.partial(clipped_optimizer_step, trainer), donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, trainer.state.params)
    state = [params, trainer.optimizer.init(params)]

    def call():
        state[:] = step(*state, gradient)
        return state

    return call


def contenders(
    n: int,
    combiners: Sequence[str],
    workdir: str,
    extra: Sequence[str] = (),
    wanted_modes: Sequence[str] = ALL_MODES,
    references: Sequence[str] = (PEERS, PEERS_STEP),
) -> tuple[list[Contender], Batch]:
    """(contenders, the fixed batch): the baseline first, then every combiner x mode (of `wanted_modes`; each full
    mode followed by its other skip when `references` ask for it), then the bound and the peers' `references`; all
    compiled and warm."""
    linear = trainer_for(n, "linear", "scalar", workdir, extra)
    batch = linear.prepare(1).batch
    jax.block_until_ready(batch)
    passes = reference_passes(linear, batch, references)
    found = [
        Contender(
            BASELINE,
            "scalar",
            update_call(linear, batch),
            FirstCall(0.0, 0.0),  # timed after the other trainers are built, below
            weights_call(linear, batch),
            update_temporaries(linear, batch),
        )
    ]
    for name in combiners:
        for mode in modes(name):
            if (name, mode) == ("linear", "scalar") or mode not in wanted_modes:
                continue
            trainer = trainer_for(n, name, mode, workdir, extra)
            call, weights = update_call(trainer, batch), weights_call(trainer, batch) if mode == "scalar" else None
            ran = trainer.update_spec.mode  # probe mode runs as full mode when its set holds every trained parameter
            label = f"{name}/{mode}" if ran == mode else f"{name}/{mode}, run as {ran}"
            found.append(Contender(label, ran, call, timed_first(call), weights, update_temporaries(trainer, batch)))
            if mode == "full" and OTHER_SKIP in references:
                found.append(other_skip_contender(trainer_for(n, name, mode, workdir, extra), batch))
            if HEAD_GRADIENTS in references:
                variant = "combiner.head_gram=gradients", HEAD_GRADIENTS
                found.append(variant_contender(n, name, mode, workdir, extra, variant, batch))
            if OTHER_PULLBACKS in references:
                other = "batched" if trainer.update_spec.sequential_pullbacks else "sequential"
                variant = f"combiner.pullbacks={other}", f"{other} pullbacks"
                found.append(variant_contender(n, name, mode, workdir, extra, variant, batch))
    found[0] = found[0]._replace(first_call=timed_first(found[0].call))
    found += [
        Contender(label, "", call, timed_first(call), None, pass_temporaries(call)) for label, call in passes.items()
    ]
    return found, batch


def variant_contender(
    n: int, name: str, mode: str, workdir: str, extra: Sequence[str], variant: tuple[str, str], batch: Batch
) -> Contender:
    """The update of the combiner's trainer with one more override, ``variant = (override, label)`` (e.g.
    ``("combiner.pullbacks=batched", "batched pullbacks")``), labelled ``<name>/<mode>, <label>``; compiled and
    warm."""
    override, label = variant
    trainer = trainer_for(n, name, mode, workdir, [*extra, override])
    call = update_call(trainer, batch)
    return Contender(f"{name}/{mode}, {label}", "", call, timed_first(call), None, update_temporaries(trainer, batch))


def update_temporaries(trainer: Trainer, batch: Batch) -> Callable[[], int]:
    """The bytes of temporaries of the trainer's compiled update of the batch, when called."""
    return lambda: trainer.update_temporaries(batch)


def pass_temporaries(call: Callable[[], Any]) -> Callable[[], int] | None:
    """For a reference pass that is a jitted function bound to its arguments (``functools.partial``), the bytes of
    temporaries of its compiled program, when called; None for the others."""
    if not (isinstance(call, functools.partial) and hasattr(call.func, "lower")):
        return None
    return lambda: call.func.lower(*call.args).compile().memory_analysis().temp_size_in_bytes


def other_skip_contender(trainer: Trainer, batch: Batch) -> Contender:
    """A full-mode trainer's update with its non-finite skip done the other way round (``make_train_step``'s
    ``skip_by_conditional``): a select of the stepped state where the trainer branches (pullbacks in sequence), a
    ``lax.cond`` where it selects (batched pullbacks); compiled and warm. Timed like the trainer's own update."""
    spec = trainer.update_spec
    if trainer.state.critic_params is not None:
        raise ValueError("the other-skip reference supports trainers without a critic (the tiny task's GRPO)")
    conditional = not skips_by_conditional(spec)
    trainer._train_step = jax.jit(
        make_train_step(
            trainer.policy,
            trainer.combiner,
            trainer.optimizer,
            spec,
            trainable_flags=trainer.trainable_flags,
            skip_by_conditional=conditional,
        ),
        donate_argnums=0,
        compiler_options=train_step_compiler_options(spec),
    )
    call = update_call(trainer, batch)
    label = f"{spec.combiner_name}/full, {'conditional' if conditional else 'select'} skip"
    return Contender(label, "", call, timed_first(call))


# ------------------------------------------------------------------------------------------------ timing
@jax.jit
def squared_norm_sum(gradients: Any) -> jax.Array:
    """sum_i |g_i|^2 over every leaf of `gradients` (n separate trees or stacked ones; the trace of their Gram): a
    reduction that reads each gradient once."""
    return sum(jnp.vdot(leaf, leaf) for leaf in jax.tree.leaves(gradients))


def gradient_read(gradients: Any) -> Callable[[], jax.Array]:
    """One read of the n per-objective `gradients` (the bound's, held), compiled and warm: the least a full-mode
    update that pulls back as the bound does reads them beyond the bound, which writes them and stops."""
    call = functools.partial(squared_norm_sum, gradients)
    jax.block_until_ready(call())
    return call


class Usage(NamedTuple):
    """One call's wall seconds, the process's user and system CPU seconds and its minor page faults."""

    wall: float
    user: float
    system: float
    faults: int


def timed_call(call: Callable[[], Any]) -> Usage:
    """The Usage of one call (to completion). System time is mostly page faults on fresh memory: with glibc's
    defaults (``MOJAX_RELEASE_HOST_MEMORY=1``) every large temporary of an XLA:CPU call is mapped anew, so every page
    of them faults once per call."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    jax.block_until_ready(call())
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(
        wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt
    )


def one_round(entries: list[Contender], repeats: int, round_index: int) -> dict[str, list[Usage]]:
    """Each contender's `repeats` calls: `repeats` passes over the contenders, each in a random order
    (``mojax.testing.call_orders``, seeded by the round) so that no contender always follows the same one."""
    usages: dict[str, list[Usage]] = {entry.label: [] for entry in entries}
    for order in call_orders(len(entries), repeats, seed=round_index):
        for entry in (entries[i] for i in order):
            usages[entry.label].append(timed_call(entry.call))
    return usages


def measure(n: int, entries: list[Contender], repeats: int, rounds: int, memory: bool = False) -> list[dict[str, Any]]:
    """One row per contender: its ratio to the linear step (and to the bound), median and spread; the median CPU
    user and system seconds and page faults of its calls; with ``memory`` its compiled program's temporaries (after
    the timing: compiling again would perturb it)."""
    rounds_usage = [one_round(entries, repeats, r) for r in range(rounds)]
    medians = [{label: statistics.median(u.wall for u in calls) for label, calls in r.items()} for r in rounds_usage]
    weights_ms = weight_program_times(entries, repeats * rounds)
    rows = []
    for entry in entries:
        calls = [u for r in rounds_usage for u in r[entry.label]]
        to_linear = [m[entry.label] / m[BASELINE] for m in medians]
        to_bound = [m[entry.label] / m[BOUND] for m in medians]
        to_bound_and_optimizer = [m[entry.label] / (m[BOUND] + m[OPTIMIZER]) for m in medians if OPTIMIZER in m]
        to_bound_optimizer_and_read = [
            m[entry.label] / (m[BOUND] + m[OPTIMIZER] + m[GRADIENT_READ])
            for m in medians
            if OPTIMIZER in m and GRADIENT_READ in m
        ]
        rows.append(
            {
                "n": n,
                "contender": entry.label,
                "mode": entry.mode,
                "ratio_to_linear": statistics.median(to_linear),
                "ratio_to_linear_spread": [min(to_linear), max(to_linear)],
                "ratio_to_bound": statistics.median(to_bound),
                "ratio_to_bound_spread": [min(to_bound), max(to_bound)],
                "median_ms_per_round": [1e3 * m[entry.label] for m in medians],
                "median_user_s": statistics.median(u.user for u in calls),
                "median_system_s": statistics.median(u.system for u in calls),
                "median_page_faults": statistics.median(u.faults for u in calls),
                "first_call_s": entry.first_call.seconds,
                "xla_compile_s": entry.first_call.xla_compile_s,
                **weights_ms.get(entry.label, {}),
            }
        )
        if to_bound_and_optimizer:
            rows[-1]["ratio_to_bound_and_optimizer"] = statistics.median(to_bound_and_optimizer)
        if to_bound_optimizer_and_read:
            rows[-1]["ratio_to_bound_optimizer_and_read"] = statistics.median(to_bound_optimizer_and_read)
        if memory and entry.temporaries is not None:
            rows[-1]["temporaries_gb"] = entry.temporaries() / 1e9
    return rows


def weight_program_times(entries: list[Contender], calls: int) -> dict[str, dict[str, float]]:
    """Per scalar-mode contender: its weight program's median ms per call and that over the linear update's median
    ms, both timed in the same passes (``calls`` passes over the weight programs and the linear update, each in a
    random order). The train step is one and the same program for every scalar combiner (a test checks it), so this
    is what a scalar combiner can add to the linear step."""
    scalar = [entry for entry in entries if entry.weights is not None]
    timed = [entry.weights for entry in scalar] + [entries[0].call]  # the last: the linear update
    seconds: list[list[float]] = [[] for _ in timed]
    for order in call_orders(len(timed), calls, seed=len(timed)):
        for i in order:
            seconds[i].append(timed_call(timed[i]).wall)
    ms = [1e3 * statistics.median(values) for values in seconds]
    return {
        entry.label: {"weights_ms": ms[i], "weights_to_linear_update": ms[i] / ms[-1]} for i, entry in enumerate(scalar)
    }


def operation_profiles(n: int, entries: list[Contender], calls: int, top: int = 8) -> list[dict[str, Any]]:
    """Per contender: wall ms per call under ``jax.profiler``, XLA operation ms per call summed by kind, and its
    ``top`` largest operations as [name, ms per call, executions per call]."""
    profiles = []
    for entry in entries:
        wall, operations = xla_operation_times(lambda call=entry.call: jax.block_until_ready(call()), calls)
        largest = sorted(operations.items(), key=lambda item: -item[1][0])[:top]
        profiles.append(
            {
                "n": n,
                "contender": entry.label,
                "wall_ms": wall * 1e3,
                "ms_by_kind": ms_by_kind(operations),
                "largest_operations": [[name, ms, count] for name, (ms, count) in largest],
            }
        )
    return profiles


def profile_markdown(profiles: list[dict[str, Any]]) -> list[str]:
    """The ``--profile`` section: one row per n x contender (ms per call by kind), then each one's largest operations."""
    kinds = sorted({kind for p in profiles for kind in p["ms_by_kind"]})
    lines = [
        "## XLA operation time per call (jax.profiler)",
        "",
        "ms per call, summed over XLA's threads (so the kinds can add up to more than the wall time); the kinds as "
        "`benchmarks/profile_step.py` names them.",
        "",
        "| n | contender | wall ms | " + " | ".join(kinds) + " |",
        "|---:|---|---:|" + "---:|" * len(kinds),
    ]
    for p in profiles:
        cells = " | ".join(f"{p['ms_by_kind'].get(kind, 0.0):.0f}" for kind in kinds)
        lines.append(f"| {p['n']} | {p['contender']} | {p['wall_ms']:.0f} | {cells} |")
    lines.append("")
    for p in profiles:
        largest = ", ".join(f"`{name}` {ms:.0f} ms x{count:.0f}" for name, ms, count in p["largest_operations"])
        lines.append(f"- n = {p['n']}, {p['contender']}: {largest}")
    return lines + [""]


# ------------------------------------------------------------------------------------------------ verdict
def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """The targets: scalar <= 1.02x linear, probe <= 1.15x linear at n = 3, full <= 1.1x the bound."""

    def check(label: str, selected: list[dict[str, Any]], key: str, limit: float) -> str:
        if not selected:
            return f"- {label}: not measured in this run."
        failing = [f"{r['contender']} at n={r['n']} ({r[key]:.2f}x)" for r in selected if r[key] > limit]
        status = "met" if not failing else f"NOT met for {len(failing)} of {len(selected)}: " + ", ".join(failing)
        return f"- {label}: {status}."

    scalar = [r for r in rows if r["mode"] == "scalar" and r["contender"] != BASELINE]
    peers_step = {r["n"]: r["ratio_to_linear"] for r in rows if r["contender"] == PEERS_STEP}
    against_peers = [
        f"n = {r['n']}: {peers_step[r['n']] / r['ratio_to_linear']:.2f}x"
        for r in rows
        if r["contender"] == "mgda/full" and r["n"] in peers_step
    ]
    probe = [r for r in rows if r["mode"] == "probe" and r["n"] == 3]
    full = [r for r in rows if r["mode"] == "full"]
    with_optimizer = [
        f"{r['contender']} at n={r['n']} {r['ratio_to_bound_and_optimizer']:.2f}x"
        for r in full
        if "ratio_to_bound_and_optimizer" in r
    ]
    lines = [
        check(f"scalar mode <= {TARGETS['scalar']}x linear", scalar, "ratio_to_linear", TARGETS["scalar"]),
        check(f"probe mode <= {TARGETS['probe']}x linear at n = 3", probe, "ratio_to_linear", TARGETS["probe"]),
        check(f"full mode <= {FULL_TARGET}x (forward + n backward)", full, "ratio_to_bound", FULL_TARGET),
        f"- MGDA's full mode against the peers' MGDA step (how much faster): {', '.join(against_peers)}."
        if against_peers
        else "- MGDA's full mode against the peers' MGDA step: not measured in this run.",
    ]
    if with_optimizer:
        lines.append(
            f"- full mode against the bound plus the optimizer step alone (which the bound leaves out): "
            f"{', '.join(with_optimizer)}."
        )
    shares = optimizer_and_read_share(rows)
    if shares:
        lines.append(
            "- the optimizer step and one read of the bound's n gradients, timed alone, against the "
            f"{FULL_TARGET - 1:.2f} of the bound that the target allows: "
            + ", ".join(f"n = {n}: {share:.2f}x the bound" for n, share in shares.items())
            + "; full mode against the bound plus both: "
            + ", ".join(
                f"{r['contender']} at n={r['n']} {r['ratio_to_bound_optimizer_and_read']:.2f}x"
                for r in full
                if "ratio_to_bound_optimizer_and_read" in r
            )
            + "."
        )
    return lines


def optimizer_and_read_share(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Per n with both references timed: (optimizer step + one read of the n gradients) / bound, each the median over
    rounds of its ratio to the bound."""
    parts: dict[int, list[float]] = {}
    for r in rows:
        if r["contender"] in (OPTIMIZER, GRADIENT_READ):
            parts.setdefault(r["n"], []).append(r["ratio_to_bound"])
    return {n: sum(ratios) for n, ratios in parts.items() if len(ratios) == 2}


# ------------------------------------------------------------------------------------------------ report
def machine() -> dict[str, Any]:
    """CPU model, core count, memory, library versions and devices."""
    cpu = cpu_model()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "versions": {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")},
        "jax_devices": [str(device) for device in jax.devices()],
    }


def load() -> str:
    """The `uptime` line (load averages over 1, 5, 15 min)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def spread(pair: Sequence[float]) -> str:
    return f"{pair[0]:.2f}-{pair[1]:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: conditions, verdict, one table row per n x contender."""
    m = report["machine"]
    lines = [
        "# One RL update per combiner and mode, relative to the linear scalarisation step",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; devices {len(m['jax_devices'])} x {m['jax_devices'][0].split(':')[0]}  ",
        "The machine was shared with other jobs while this ran (load before/after below), so only ratios measured "
        "in the same run are reported, never absolute speeds.  ",
        f"Load before: `{report['load_before']}`  ",
        f"Load after: `{report['load_after']}`  ",
        f"Rounds: {report['rounds']}, calls per contender per round: {report['repeats']} (each pass over the "
        "contenders in a random order); ratio = median over rounds of (contender median / linear median in the same "
        "round); spread = min-max over rounds; CPU user / system seconds and minor page faults: medians per call of the whole "
        "process (2 threads: CPU seconds can exceed the wall time). The tiny task: batch of "
        f"{report['batch']} completions; trainer overrides: {' '.join(report['overrides']) or 'none'}; share of "
        "non-zero advantages on its response tokens: "
        + ", ".join(f"{share:.2f} (n = {n})" for n, share in report["nonzero_advantages"].items())
        + ".",
        "",
        "## Targets",
        "",
        *report["verdict"],
        "",
        "## Ratios",
        "",
        "| n | contender | ratio to linear | spread | ratio to bound | spread | CPU user s | system s | "
        "page faults (k) | first call s | XLA compile s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['n']} | {r['contender']} | {r['ratio_to_linear']:.2f} | {spread(r['ratio_to_linear_spread'])} | "
            f"{r['ratio_to_bound']:.2f} | {spread(r['ratio_to_bound_spread'])} | {r['median_user_s']:.2f} | "
            f"{r['median_system_s']:.2f} | {r['median_page_faults'] / 1e3:.0f} | {r['first_call_s']:.1f} | "
            f"{r['xla_compile_s']:.1f} |"
        )
    weights = [r for r in report["rows"] if "weights_ms" in r]
    if weights:
        lines += table_section(
            "Scalar mode's weight programs",
            "Every scalar-mode combiner runs the linear step's train step (the same compiled program) after its own "
            "weight program; that program alone, timed in passes of random order with the linear update (median ms "
            "per call):",
            ["n", "combiner", "weight program ms", "share of the linear update"],
            [
                [r["n"], r["contender"], f"{r['weights_ms']:.3f}", f"{r['weights_to_linear_update']:.2%}"]
                for r in weights
            ],
        )
    memory = [r for r in report["rows"] if "temporaries_gb" in r]
    if memory:
        lines += table_section(
            "Compiled temporaries",
            "What each contender's compiled program plans for its temporaries (`memory_analysis().temp_size_in_bytes`; "
            "parameters, optimizer state and outputs not included):",
            ["n", "contender", "temporaries GB"],
            [[r["n"], r["contender"], f"{r['temporaries_gb']:.3f}"] for r in memory],
        )
    if report.get("profiles"):
        lines += ["", *profile_markdown(report["profiles"])]
    return "\n".join(lines + [""])


def table_section(title: str, intro: str, header: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown lines of a section: its title, an introduction and a table (the second column left-aligned, the
    others right-aligned)."""
    align = ["---:", "---"] + ["---:"] * (len(header) - 2)
    table = [header, align, *rows]
    return ["", f"## {title}", "", intro, "", *("| " + " | ".join(map(str, row)) + " |" for row in table)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="2,3,5,8", help="comma-separated numbers of objectives")
    parser.add_argument("--combiners", default=",".join(REGISTRY), help="comma-separated registry names")
    parser.add_argument(
        "--modes", default="scalar,probe,full", help="comma-separated modes to time (the baseline always runs)"
    )
    parser.add_argument(
        "--references",
        default="peers,peers-step",
        help="comma-separated references to time besides the bound: peers (their n passes), peers-step (their "
        "whole MGDA step), other-skip (every full-mode update with its non-finite skip done the other way: a select "
        "where it branches, a conditional where it selects), head-gradients (every probe- and full-mode update with "
        "the LM head's n gradients instead of its token kernel), other-pullbacks (every probe- and full-mode update with "
        "its n pullbacks batched where the trainer runs them in sequence, or the other way), optimizer (the clip and "
        "optimizer step alone, which the bound leaves out and every update runs), gradient-read (one read of the "
        "bound's n gradients, the least a Gram reads); fewer for less memory (n = 8 on SmolLM2)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="calls per contender per round (median taken)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the spread is over rounds)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 calls per round, 1 round")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a trainer override for every contender (repeatable), e.g. --set model.path=smollm2 --set lora.rank=8",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="CALLS",
        help="after timing, trace CALLS calls of every contender (XLA:CPU's operations)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="after timing, compile every update and the bound again and report their temporaries",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for rl_step.*")
    args = parser.parse_args(argv)
    args.n = [int(v) for v in args.n.split(",")]
    args.combiners = [c for c in args.combiners.split(",") if c]
    args.modes = [m for m in args.modes.split(",") if m]
    references = [r for r in args.references.split(",") if r]
    unknown = [c for c in args.combiners if c not in REGISTRY] + [m for m in args.modes if m not in ALL_MODES]
    unknown += [r for r in references if r not in REFERENCES]
    args.references = [REFERENCES[r] for r in references if r in REFERENCES]
    if unknown or not args.modes or not all(1 < n <= len(LETTERS) for n in args.n) or args.profile < 0:
        parser.error(
            f"--combiners must be in {sorted(REGISTRY)}, --modes in {ALL_MODES}, --references in {list(REFERENCES)}, "
            f"--n in 2..{len(LETTERS)} and --profile >= 0; got {args}"
        )
    if args.quick:
        args.repeats, args.rounds = 2, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report: dict[str, Any] = {
        "command": benchmark_command("benchmarks/rl_step.py", sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "load_before": load(),
        "repeats": args.repeats,
        "rounds": args.rounds,
        "overrides": list(args.set),
        "modes": list(args.modes),
        "references": list(args.references),
        "rows": [],
        "profiles": [],
        "nonzero_advantages": {},
    }
    tiny = load_config("tiny", list(args.set))
    report["batch"] = tiny.data.prompts_per_step * tiny.rollout.num_generations
    with tempfile.TemporaryDirectory() as workdir:
        for n in args.n:
            entries, batch = contenders(n, args.combiners, workdir, args.set, args.modes, args.references)
            report["nonzero_advantages"][str(n)] = nonzero_share(batch)
            rows = measure(n, entries, args.repeats, args.rounds, args.memory)
            report["rows"] += rows
            if args.profile:
                report["profiles"] += operation_profiles(n, entries, args.profile)
            for r in rows:
                print(
                    f"n={n} {r['contender']:<28} {r['ratio_to_linear']:.2f}x linear  {r['ratio_to_bound']:.2f}x bound"
                )
            sys.stdout.flush()
            write(report, args.out)
    print(markdown(report))
    return report


def write(report: dict[str, Any], out: Path) -> None:
    """Write rl_step.json and rl_step.md (after every n, so a long run leaves its finished part)."""
    report["load_after"] = load()
    report["verdict"] = verdict(report["rows"])
    write_report(out, "rl_step", report, markdown(report))


if __name__ == "__main__":
    keep_freed_host_memory()
    main()
