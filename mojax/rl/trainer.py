"""The multi-objective RL trainer: prompts -> rollout -> per-objective rewards -> advantages -> update, resumable.

Who runs where (models, tokenizers, data, checkpoints, logging) lives here; what the algorithm is lives in
:mod:`mojax.rl.update`, :mod:`mojax.rl.advantages`, :mod:`mojax.rl.losses` and the combiners. One step:

1. draw ``data.prompts_per_step`` prompts (a fresh permutation of the prompts per pass, from ``data.seed``);
2. sample ``num_generations`` completions each and score them under the policy and the reference
   (:mod:`mojax.rl.rollout`);
3. score every objective (:mod:`mojax.rl.rewards`), costs negated, optionally normalised;
4. per-objective advantages (:mod:`mojax.rl.advantages`), Noon-clipped for PAMA;
5. the jitted update (:func:`mojax.rl.update.make_train_step`);
6. metrics (DESIGN's keys), samples, checkpoint.

Every random draw is a function of (``seed``, step), and the checkpoint holds the trained parameters, the optimizer
and combiner state, the reward normalisers, the KL coefficient and the step, so a resumed run reproduces an
uninterrupted one bit for bit on CPU. Rerunning on the same ``output_dir`` resumes; a changed config is an error
except ``steps`` and logging keys. LoRA's frozen base weights are not saved: a resumed run reads them again from
``model.path``, as it does the reference policy, and refuses weight files that changed since the run started; the
reward models (:func:`mojax.rl.rewards.reward_model`) are not saved either, and a resumed run refuses one whose
parameters differ from the first start's.

Response widths: the sampler draws ``rollout.max_completion_length`` tokens; the update runs on the smallest of
``rollout.length_buckets`` that holds the batch's longest completion (the padded tail columns cut, which changes no
loss, gradient or metric), so it compiles once per bucket at most.

Several processes (``jax.distributed`` and a mesh over every process's devices): every process runs the same loop on
the same prompts with the same keys. The rollout is gathered to every host (:func:`mojax.rl.run.fetch`) for decoding,
rewards, advantages and metrics; the batch goes back onto the mesh split by rows (:func:`mojax.rl.run.place`), and
the state lives replicated or sharded on the mesh, so Orbax saves and restores it from every process. Only process 0
writes metrics, samples, TensorBoard, config.yaml and the exported policy.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mojax import _checks as checks
from mojax.combiners import REGISTRY, make, noon
from mojax.diagnostics import CovarianceStatistics, covariance_statistics, ctwa_signal
from mojax.host_memory import keep_freed_host_memory_for
from mojax.models import (
    LoraConfig,
    ModelConfig,
    adapters_only,
    add_lora,
    default_probe_mask,
    lora_mask,
    merge_last_layer,
    merge_split,
    split_last_layer,
)
from mojax.models.generate import SamplingConfig
from mojax.models.llama import check_attention_kernel
from mojax.models.sharding import batch_sharding, make_mesh, state_shardings
from mojax.rl import advantages as rl_advantages
from mojax.rl import config as rl_config
from mojax.rl.logging import SamplesLogger
from mojax.rl.losses import (
    chunked_logprobs_and_entropy,
    head_logprobs_and_entropy,
    head_token_kernel,
    tied_head_token_kernel,
)
from mojax.rl.rewards import (
    Objective,
    init_normalizer,
    normalize,
    resolve,
    reward_model_digests,
    score,
    signed,
    update_normalizer,
)
from mojax.rl.rollout import Rollout, encode_prompts, response_bucket, sample_rollout, without_prompts
from mojax.rl.run import (  # noqa: F401 (CRASH_ENV: the test hook, re-exported)
    CRASH_ENV,
    Run,
    fetch,
    float64_bits,
    float_from_bits,
    is_main_process,
    place,
    place_sharded,
    replicate,
)
from mojax.rl.tiny import tiny_model_config, tiny_prompts, tiny_tokenizer
from mojax.rl.update import (
    Batch,
    HeadKernel,
    TrainState,
    UpdateSpec,
    make_scalar_weights,
    make_train_step,
    shared_term_is_zero,
    train_step_compiler_options,
)

NORMALIZER_EPS = 1e-6


# ------------------------------------------------------------------------------------------------ building blocks
def build_policy(config: rl_config.TrainConfig) -> tuple[Any, Any]:
    """(model, tokenizer) for ``config.model.path``: ``"tiny"`` (the tiny task's model), ``"smollm2"``
    (SmolLM2-135M-Instruct, fetched into the cache by ``mojax fetch smollm2``), or a Hugging Face folder / GGUF file;
    its attention kernel set as ``config.model.attention_kernel`` says, and checked against the model and backend."""
    model, tokenizer = _load_policy(config.model)
    model.set_attributes(attention_kernel=config.model.attention_kernel)
    check_attention_kernel(config.model.attention_kernel, model.config)
    return model, tokenizer


def _load_policy(section: rl_config.ModelSection) -> tuple[Any, Any]:
    """(model, tokenizer) of a model section's ``path`` (:func:`build_policy`)."""
    dtype = jnp.bfloat16 if section.dtype == "bfloat16" else jnp.float32
    if section.path == "tiny":
        from mojax.models import LlamaForCausalLM

        model = LlamaForCausalLM(tiny_model_config(dtype=dtype), remat=section.remat, rngs=nnx.Rngs(section.init_seed))
        return model, tiny_tokenizer()
    from mojax.models import load_causal_lm, load_tokenizer

    path = _policy_source(section.path)
    return load_causal_lm(path, dtype=dtype, remat=section.remat), load_tokenizer(path)


def _policy_source(model_path: str) -> str:
    """The folder or GGUF file behind a config's ``model.path`` other than ``"tiny"``: ``"smollm2"`` is the cached
    SmolLM2-135M-Instruct GGUF (extracted into the cache on first use), anything else the path itself."""
    if model_path == "smollm2":
        from mojax.data import smollm2_gguf

        return str(smollm2_gguf())
    return model_path


def policy_model_config(model_path: str) -> ModelConfig:
    """The architecture a config's ``model.path`` names (:func:`build_policy`'s sources), read without its weights."""
    if model_path == "tiny":
        return tiny_model_config()
    from mojax.models import read_causal_lm_config

    return read_causal_lm_config(_policy_source(model_path))


def policy_weight_digests(model_path: str) -> dict[str, str]:
    """:func:`mojax.models.weight_file_digests` of the weights a config's ``model.path`` names (:func:`build_policy`'s
    sources); empty for ``"tiny"``, whose weights are built from ``model.init_seed``."""
    if model_path == "tiny":
        return {}
    from mojax.models import weight_file_digests

    return weight_file_digests(_policy_source(model_path))


def keep_freed_host_memory_for_policy(model_path: str) -> bool:
    """:func:`mojax.host_memory.keep_freed_host_memory_for` the parameter count of the policy ``model_path`` names
    (read from its config or metadata alone, so nothing is computed before the setting); True when applied."""
    return keep_freed_host_memory_for(policy_model_config(model_path).num_params())


def estimate_advantages(
    scores: jax.Array,
    rollout: Rollout,
    weights: jax.Array,
    kl_coef: jax.Array,
    *,
    estimator: str,
    options: tuple[tuple[str, Any], ...],
    kl_in_reward: bool,
    aggregate_first: bool,
    use_noon: bool,
) -> rl_advantages.Advantages:
    """Per-objective advantages f32[n, B, T] of a rollout's reward-oriented scores f32[B, n], and the critic's returns
    for gae: :func:`mojax.rl.advantages.compute_advantages` of the ``estimator`` with its ``options`` as (name, value)
    pairs.

    With ``kl_in_reward`` each sequence's score loses kl_coef sum_t (log pi_old - log pi_ref) over its response, and
    the token-level rewards (gae's, REINFORCE++'s) carry the per-token KL penalty. ``aggregate_first`` combines the
    scores into one weighted reward before the estimator; ``use_noon`` applies PAMA's Noon transform (arXiv
    2508.07768) to the advantages. Pure, so the trainer compiles it, once per shape for every trainer in a process
    (everything after ``kl_coef`` is static).
    """
    kl_tokens = rollout.old_logp - rollout.ref_logp
    if kl_in_reward:
        scores = scores - kl_coef * jnp.sum(kl_tokens * rollout.response_mask, axis=1, keepdims=True)
    if aggregate_first:
        scores, weights = rl_advantages.combine_rewards(scores, weights), jnp.ones((1,), jnp.float32)
    token_level = rl_advantages.token_rewards(
        scores, rollout.response_mask, kl=kl_tokens if kl_in_reward else None, beta=kl_coef
    )
    inputs = rl_advantages.AdvantageInputs(
        scores=scores,
        mask=rollout.response_mask,
        group_ids=rollout.group_ids,
        values=rollout.values,
        token_rewards=token_level,
        weights=weights,
    )
    result = rl_advantages.compute_advantages(estimator, inputs, **dict(options))
    return result._replace(advantages=noon(result.advantages)) if use_noon else result


def interference_statistics(
    weights: jax.Array, advantages: jax.Array, rollout: Rollout, oriented: jax.Array
) -> CovarianceStatistics:
    """CTWA's within-prompt covariances of each objective's oriented reward f32[B, n] with the training signal of the
    update's combined advantages sum_i w_i A_i (:func:`mojax.diagnostics.covariance_statistics`, arXiv 2602.06869),
    the signal at the rollout policy (ratio 1)."""
    signal = ctwa_signal(
        jnp.einsum("n,nbt->bt", weights, advantages), rollout.response_mask, rollout.old_logp, rollout.old_logp
    )
    return covariance_statistics(oriented, signal, rollout.group_ids)


_estimate_advantages = jax.jit(
    estimate_advantages, static_argnames=("estimator", "options", "kl_in_reward", "aggregate_first", "use_noon")
)
_interference_statistics = jax.jit(interference_statistics)


def attach_lora(model: Any, lora: rl_config.LoraSection, seed: int) -> None:
    """Add the adapters of a config's ``lora`` section to `model` in place (nothing when its rank is 0)."""
    if lora.rank:
        add_lora(model, LoraConfig(lora.rank, lora.alpha, lora.dropout, tuple(lora.targets)), rngs=nnx.Rngs(seed))


def load_prompt_rows(source: Any, config: rl_config.DataSection, tokenizer: Any, seed_offset: int = 0) -> list[dict]:
    """Prompt rows (dicts with a ``prompt`` string and any reward columns) from a data section's source."""
    if source == "tiny":
        return tiny_prompts(config.num_prompts, seed=config.seed + seed_offset)
    from mojax.data import load_prompts

    dataset = load_prompts(
        list(source) if isinstance(source, list | tuple) else source,
        limit=config.num_prompts,
        seed=config.seed + seed_offset,
        tokenizer=tokenizer,
        chat_template=config.chat_template,
        system_prompt=config.system_prompt,
    )
    return [dict(row) for row in dataset]


def combiner_options(name: str, objectives: Sequence[Objective], thresholds: Sequence[float | None]) -> dict[str, Any]:
    """The combiner's options implied by the objectives' weights (and, for the Lagrangian, their thresholds)."""
    weights = np.asarray([objective.weight for objective in objectives], np.float64)
    on_simplex = weights / weights.sum() if weights.sum() > 0 else np.full_like(weights, 1.0 / len(weights))
    if name == "linear":
        return {"weights": weights}
    if name == "ctwa":
        return {"init_weights": on_simplex}
    if name in ("p_gapo", "tchebycheff"):
        return {"preference": on_simplex}
    if name == "lagrangian":
        constrained = [index for index, threshold in enumerate(thresholds) if threshold is not None]
        oriented = [
            0.0 if threshold is None else (threshold if objective.kind == "reward" else -threshold)
            for objective, threshold in zip(objectives, thresholds, strict=True)
        ]
        return {"constraints": constrained or None, "thresholds": oriented, "reward_weights": weights}
    return {}


def build_optimizer(
    config: rl_config.OptimizerSection, *, clip: bool = True
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW or SGD behind global-norm clipping, its learning-rate schedule); ``clip=False`` leaves the clipping to
    the caller (the RL update clips the combined gradient itself: ``UpdateSpec.max_grad_norm``)."""
    peak = config.learning_rate
    if config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, config.schedule_steps)
    else:
        decay = optax.linear_schedule(peak, 0.0, config.schedule_steps)
    schedule = (
        optax.join_schedules([optax.linear_schedule(0.0, peak, config.warmup_steps), decay], [config.warmup_steps])
        if config.warmup_steps
        else decay
    )
    if config.name == "sgd":
        step = optax.sgd(schedule)
    else:
        step = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    chain = (
        [step] if config.max_grad_norm is None or not clip else [optax.clip_by_global_norm(config.max_grad_norm), step]
    )
    return optax.chain(*chain), schedule


def probe_flags(
    params: Any, patterns: Sequence[str], config: Any, *, where: str = "Trainer", key: str = "combiner.probe"
) -> list[bool]:
    """One bool per parameter leaf: in the probe set (leaves whose path contains a pattern).

    The default set is the final norm plus the LM head when it is untied (the tied embedding is vocabulary-sized);
    for a tied model without explicit patterns it is the final norm and the leaves holding the post-attention norms
    and MLP down-projections: stacked, every layer's, unless the final block is split apart
    (:func:`mojax.models.split_last_layer`, as probe mode's parameters are; its default mask is
    :func:`mojax.models.default_probe_mask`).
    """
    if not patterns:
        patterns = (
            ("model.norm", "lm_head")
            if not config.tie_word_embeddings
            else ("model.norm", "post_attention_layernorm", "mlp.down_proj")
        )
    paths = [
        ".".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    flags = [any(pattern in path for pattern in patterns) for path in paths]
    if not any(flags):
        raise ValueError(
            checks.message(
                where,
                key,
                f"is {list(patterns)} and selects no parameter",
                f"substrings of parameter paths such as {paths[:3]}",
            )
        )
    return flags


def probe_set_flags(split_params: Any, config: rl_config.TrainConfig, model_config: ModelConfig) -> list[bool]:
    """One bool per leaf of probe mode's (split) parameters, True in the probe set: ``combiner.probe``'s patterns
    (:func:`probe_flags`), or without patterns the default set (:func:`mojax.models.default_probe_mask`)."""
    if not config.combiner.probe:
        return jax.tree.leaves(default_probe_mask(split_params))
    return probe_flags(split_params, config.combiner.probe, model_config)


def update_mode(spec: UpdateSpec, config: rl_config.TrainConfig, params: Any, model_config: ModelConfig) -> str:
    """The update's mode: ``spec.mode`` (``combiner.mode``, ``"auto"`` resolved), except that probe mode whose probe
    set holds every trained parameter, in an update without a shared term, runs as full mode.

    With such a set (``combiner.probe: [lora_]`` with LoRA, or patterns that match every parameter) the n probe
    gradients are full mode's per-objective gradients g_i, so both modes give the same Gram, weights w and update
    sum_i w_i g_i; probe mode spends one more backward pass, its weighted one, recomputing that sum. Without a shared
    term (:func:`mojax.rl.update.shared_term_is_zero`: no KL in the loss, no entropy bonus) full mode takes n backward
    passes against probe mode's n + 1. With one, both take n + 1, and probe mode stays: its weighted pass carries the
    shared term, where full mode adds a separate gradient (its update took 2-17% longer per step on SmolLM2's LoRA
    example with KL 0.02: benchmarks/RESULTS.md, "LoRA with every adapter in the probe set").
    ``params`` are the unsplit parameters (their shapes alone are read).
    """
    if spec.mode != "probe" or not shared_term_is_zero(spec):
        return spec.mode
    split = jax.eval_shape(split_last_layer, params) if model_config.num_hidden_layers > 1 else params
    probed = probe_set_flags(split, config, model_config)
    trained = jax.tree.leaves(lora_mask(split)) if config.lora.rank else [True] * len(probed)
    return "full" if all(probe or not trains for probe, trains in zip(probed, trained, strict=True)) else "probe"


def head_kernel_obstacles(
    config: rl_config.TrainConfig,
    probe_mode: bool,
    head_per_objective: bool,
    head_trained: bool,
    on_mesh: bool,
    tied: bool,
) -> list[str]:
    """Why probe or full mode cannot take the LM head's share of the Gram from its token kernel
    (``combiner.head_gram``); empty where it can."""
    algorithm = config.algorithm
    reasons = {
        "no LM head is differentiated per objective (a head outside the probe set)": not head_per_objective,
        "the LM head is tied to the embedding, in probe mode (its gradient's input part needs every layer's backward "
        "pass)": tied and probe_mode,
        "the LM head is frozen": head_per_objective and not head_trained,
        "the parameters live on a mesh": on_mesh,
        "algorithm.logits_chunk_size is set": bool(algorithm.logits_chunk_size),
        "algorithm.num_microbatches > 1 (the Gram of a sum over micro-batches has their cross terms)": (
            algorithm.num_microbatches > 1
        ),
    }
    return [reason for reason, applies in reasons.items() if applies]


def build_mesh(config: rl_config.TrainConfig) -> Mesh | None:
    """The device mesh of ``config.mesh`` (None: no mesh), after checking that it divides every micro-batch."""
    if config.mesh.shape is None:
        return None
    mesh = make_mesh(**config.mesh.shape)
    splits = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = config.data.prompts_per_step * config.rollout.num_generations
    micro = batch // (config.algorithm.num_minibatches * config.algorithm.num_microbatches)
    if micro % splits:
        raise ValueError(
            checks.message(
                "Trainer",
                "mesh.shape",
                f"is {dict(config.mesh.shape)}: data * fsdp = {splits} does not divide the micro-batch of {micro} completions",
                "a mesh whose data * fsdp divides batch / (num_minibatches * num_microbatches)",
            )
        )
    return mesh


def lm_head(model: Any) -> jax.Array:
    """The LM head [D, V] of a causal LM (the transposed embedding when tied)."""
    if model.config.tie_word_embeddings:
        return model.model.embed_tokens.embedding[...].T
    return model.lm_head.kernel[...]


def one_update_per_rollout(config: rl_config.TrainConfig) -> bool:
    """Whether each rollout feeds exactly one optimizer update, at the parameters that sampled it, and nothing else
    reads its ``old_logp`` (one PPO epoch, one minibatch, the KL penalty in the loss, not in the reward): then the
    update takes the PPO ratio's denominator from its own forward (``UpdateSpec.on_policy``) and the rollout keeps
    the sampler's log-probabilities instead of recomputing them with a forward pass."""
    algorithm = config.algorithm
    return algorithm.num_iterations == 1 and algorithm.num_minibatches == 1 and config.kl.placement == "loss"


def joined_sequence(prompt_ids, prompt_mask, tokens, response_mask) -> tuple[jax.Array, jax.Array]:
    """The model's input for a batch of responses: the ids [B, P + T] of prompt then response, and the attention mask
    (the prompt's, then 1 on the response's tokens that count)."""
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, (response_mask > 0).astype(prompt_mask.dtype)], axis=1)
    return ids, mask


def merged_policy(graphdef: Any, rest: Any, params: Any, split: bool) -> Any:
    """The policy module from its trained parameters: :func:`mojax.models.merge_split`'s with ``split``, else
    ``nnx.merge`` with the untrained state ``rest``."""
    return merge_split(graphdef, params) if split else nnx.merge(graphdef, params, rest)


def response_fn(
    graphdef: Any,
    rest: Any,
    *,
    split: bool = False,
    adapters: bool = True,
    chunk_size: int | None = None,
    head_kernel: bool = False,
) -> Callable:
    """(params, prompt_ids, prompt_mask, tokens, response_mask) -> (log-probs, entropies) f32[B, T] of the responses.

    With ``split`` the parameters are :func:`mojax.models.split_last_layer`'s (the final block a leaf of its own);
    ``adapters=False`` runs the base model of a LoRA policy (the reference policy); ``chunk_size`` computes the
    log-probs and entropies over vocabulary chunks (:func:`mojax.rl.losses.chunked_logprobs_and_entropy`), else
    :func:`mojax.rl.losses.head_logprobs_and_entropy` computes them from the full logits. Both backward passes let
    the n per-objective pullbacks share the LM head's product for the hidden states. With ``head_kernel`` (full
    logits only) the function returns ((log-probs, entropies), K) with K f32[B T, B T] the head's token kernel
    (:func:`mojax.rl.losses.head_token_kernel`), as :class:`mojax.rl.update.HeadKernel` takes it; for a head tied to
    the embedding it takes a sixth argument, the layers' input (:func:`input_embeddings_fn`'s, differentiated apart
    from the table), and K is :func:`mojax.rl.losses.tied_head_token_kernel`'s parts.
    """

    def policy(params, prompt_ids, prompt_mask, tokens, response_mask, input_embeddings=None):
        width = prompt_ids.shape[1]
        ids, mask = joined_sequence(prompt_ids, prompt_mask, tokens, response_mask)
        window = slice(width - 1, width - 1 + tokens.shape[1])
        model = merged_policy(graphdef, rest, params, split)
        hidden, _ = model.hidden_states(
            ids, attention_mask=mask, adapters=adapters, input_embeddings=input_embeddings, output_rows=window
        )
        hidden = hidden.astype(model.config.dtype)
        if chunk_size:
            return chunked_logprobs_and_entropy(hidden, lm_head(model), tokens, chunk_size)
        outputs = head_logprobs_and_entropy(hidden, lm_head(model), tokens)
        if not head_kernel:
            return outputs
        if model.config.tie_word_embeddings:
            return outputs, tied_head_token_kernel(hidden, lm_head(model), tokens, ids)
        return outputs, head_token_kernel(hidden, lm_head(model), tokens)

    return policy


def input_embeddings_fn(graphdef: Any, rest: Any, *, split: bool = False) -> Callable:
    """(params, prompt_ids, tokens) -> the embedding table's rows [B, P + T, D] at the prompt's and the responses' ids:
    the layers' input, for :func:`response_fn`'s tied head kernel (``split`` as there)."""

    def input_embeddings(params, prompt_ids, tokens):
        model = merged_policy(graphdef, rest, params, split)
        ids = jnp.concatenate([prompt_ids, tokens], axis=1)
        return jnp.take(model.model.embed_tokens.embedding[...], ids, axis=0)

    return input_embeddings


def critic_fn(graphdef: Any, rest: Any) -> Callable:
    """(critic params, prompt_ids, prompt_mask, tokens, response_mask) -> values f32[n, B, T] before each response token."""

    def values(params, prompt_ids, prompt_mask, tokens, response_mask):
        critic = nnx.merge(graphdef, params, rest)
        width = prompt_ids.shape[1]
        ids, mask = joined_sequence(prompt_ids, prompt_mask, tokens, response_mask)
        out, _ = critic(ids, attention_mask=mask)
        return jnp.moveaxis(out[:, width - 1 : width - 1 + tokens.shape[1]], -1, 0) * response_mask

    return values


def build_critic(policy: Any, num_objectives: int, seed: int) -> Any:
    """The vector critic: a ``LlamaValueModel`` with n outputs whose trunk starts as a copy of the policy's (and
    rematerialises its layers and runs attention as the policy does)."""
    from mojax.models import LlamaValueModel

    critic = LlamaValueModel(policy.config, num_objectives, remat=policy.model.remat, rngs=nnx.Rngs(seed))
    critic.set_attributes(attention_kernel=policy.model.attention_kernel)
    nnx.update(critic.model, jax.tree.map(jnp.copy, nnx.state(policy.model, nnx.Param)))
    return critic


RESPONSE_FIELDS = ("tokens", "mask", "old_logp", "ref_logp", "advantages", "values", "returns")
"""The fields of :class:`mojax.rl.update.Batch` whose last axis is the response token axis T."""


def cut_responses(batch: Batch, width: int) -> Batch:
    """The batch with its response arrays cut to their first `width` columns (the caller checks that the rest is
    padding: masked, so no loss, metric or gradient reads it; causal attention keeps the kept columns' log-probs)."""
    return batch._replace(
        **{field: getattr(batch, field)[..., :width] for field in RESPONSE_FIELDS if getattr(batch, field) is not None}
    )


def _nan_stats(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    return (float(finite.mean()), float(finite.std())) if finite.size else (math.nan, math.nan)


class Prepared(NamedTuple):
    """One step's rollout, scores and advantages, before the update."""

    rows: list[dict]
    completions: list[str]
    raw: np.ndarray  # f32[B, n] as scored (costs positive)
    oriented: np.ndarray  # f32[B, n] reward-oriented (costs negated)
    rollout: Rollout
    advantages: jax.Array  # f32[n, B, T]
    batch: Batch
    timings: dict[str, float]


# ------------------------------------------------------------------------------------------------------ the trainer
class Trainer(Run):
    """A multi-objective PPO/GRPO run.

    Args:
      config: the run's :class:`mojax.rl.config.TrainConfig`.
      objectives: objectives to use instead of resolving ``config.objectives`` (e.g. Python reward functions built
        in code); their names, weights and kinds must match the config's entries.
      callbacks: callables ``callback(step, metrics)`` run after every step.

    Example:
      >>> import tempfile
      >>> from mojax.rl.config import load_config
      >>> config = load_config("tiny", [f"output_dir={tempfile.mkdtemp()}", "steps=1", "eval_steps=0",
      ...                               "logging.tensorboard=false", "logging.progress=false", "export=false"])
      >>> metrics = Trainer(config).train()
      >>> sorted(k for k in metrics if k.startswith("rewards/") and k.endswith("/mean"))
      ['rewards/a_rate/mean', 'rewards/b_count/mean', 'rewards/brevity/mean']
    """

    def __init__(
        self,
        config: rl_config.TrainConfig,
        *,
        objectives: Sequence[Objective] | None = None,
        callbacks: Sequence[Callable[[int, Mapping[str, float]], None]] = (),
    ):
        self.config = config
        self.callbacks = tuple(callbacks)
        self.output_dir = Path(config.output_dir)
        self.objectives = (
            tuple(objectives)
            if objectives is not None
            else tuple(
                resolve(
                    {key: rl_config.to_dict(getattr(spec, key)) for key in ("name", "fn", "weight", "kind", "options")}
                )
                for spec in config.objectives
            )
        )
        self.names = tuple(objective.name for objective in self.objectives)
        configured = tuple(spec.name for spec in config.objectives)
        if self.names != configured:
            raise ValueError(
                checks.message(
                    "Trainer",
                    "objectives",
                    f"are named {list(self.names)}",
                    f"the config's objectives {list(configured)}",
                )
            )
        self.model, self.tokenizer = build_policy(config)
        self.weight_digests = {**policy_weight_digests(config.model.path), **reward_model_digests(self.objectives)}
        attach_lora(self.model, config.lora, config.model.init_seed + 2)
        self.graphdef, params, self.rest = nnx.split(self.model, nnx.Param, ...)
        self.mesh = build_mesh(config)
        if self.mesh is not None:
            params = place_sharded(params, state_shardings(params, self.mesh, config.mesh.rules))
        self.train_prompts = load_prompt_rows(config.data.prompts, config.data, self.tokenizer)
        self.eval_prompts = (
            None
            if config.data.eval_prompts is None
            else load_prompt_rows(config.data.eval_prompts, config.data, self.tokenizer, 1)
        )
        self.aggregate_first = config.algorithm.objective_aggregation == "sum_then_normalize"
        if self.aggregate_first and config.combiner.name != "linear":
            raise ValueError(
                checks.message(
                    "Trainer",
                    "algorithm.objective_aggregation",
                    "is 'sum_then_normalize' with a non-linear combiner",
                    "combiner.name=linear",
                )
            )
        self.num_trained = 1 if self.aggregate_first else len(self.objectives)
        spec = REGISTRY[config.combiner.name]
        options = (
            {}
            if self.aggregate_first
            else combiner_options(spec.name, self.objectives, [o.threshold for o in config.objectives])
        )
        self.constrained = tuple(options.get("constraints") or range(1, len(self.objectives)))
        self.combiner = make(
            spec.name if not self.aggregate_first else "linear",
            self.num_trained,
            **{**options, **config.combiner.options},
        )
        # The update clips the combined gradient itself (UpdateSpec.max_grad_norm), but with adapters the optimizer
        # clips: it sees the adapters' gradient alone, whose norm leaves the frozen weights' gradients out.
        self.optimizer, self.schedule = build_optimizer(config.optimizer, clip=bool(config.lora.rank))
        algorithm = config.algorithm
        self.update_spec = UpdateSpec(
            mode=spec.mode if config.combiner.mode == "auto" else config.combiner.mode,
            num_objectives=self.num_trained,
            combiner_name=spec.name,
            reads=spec.reads + (("losses",) if spec.uses_gram else ()),
            num_iterations=algorithm.num_iterations,
            num_minibatches=algorithm.num_minibatches,
            num_microbatches=algorithm.num_microbatches,
            epsilon=algorithm.epsilon,
            epsilon_high=algorithm.epsilon_high,
            dual_clip=algorithm.dual_clip,
            loss_agg_mode=algorithm.loss_agg_mode,
            loss_scale_factor=algorithm.loss_scale_factor or float(config.rollout.max_completion_length),
            importance_sampling_level=algorithm.importance_sampling_level,
            kl_estimator=config.kl.kl_estimator,
            kl_clamp=config.kl.clamp,
            # beta stays 0 when it starts there (the adaptive controller multiplies it): then the KL is only logged
            kl_in_loss=config.kl.placement == "loss" and config.kl.beta > 0,
            max_grad_norm=None if config.lora.rank else config.optimizer.max_grad_norm,
            entropy_coef=algorithm.entropy_coef,
            vf_coef=algorithm.vf_coef,
            value_clip=algorithm.value_clip,
            sequential_pullbacks=config.combiner.pullbacks != "batched",
            on_policy=one_update_per_rollout(config),
        )
        mode = update_mode(self.update_spec, config, params, self.model.config)
        self.update_spec = self.update_spec._replace(mode=mode)
        # Probe mode splits the final block from the stacked layers: the default set is that block (or its adapters),
        # and patterns can name it alone (``last_layer``).
        self.split = mode == "probe" and self.model.config.num_hidden_layers > 1
        if self.split:
            params = split_last_layer(params)
        flags = probe_set_flags(params, config, self.model.config) if mode == "probe" else None
        # probe mode: a bool per (split) parameter leaf, True for the leaves differentiated per objective
        self.probe_mask = None if flags is None else jax.tree.unflatten(jax.tree.structure(params), flags)
        chunk = algorithm.logits_chunk_size
        self.policy = response_fn(self.graphdef, self.rest, split=self.split, chunk_size=chunk)
        if config.lora.rank:
            self.optimizer = adapters_only(self.optimizer, params)
        # a bool per (split) parameter leaf, False for LoRA's frozen weights (None: every leaf trains)
        self.trainable_flags = jax.tree.leaves(lora_mask(params)) if config.lora.rank else None
        self.head_kernel = (
            None
            if mode == "scalar"
            else self._head_kernel(config, params, flags or [True] * len(jax.tree.leaves(params)))
        )
        critic_params = critic_opt_state = critic = critic_optimizer = self._values = None
        if rl_advantages.ESTIMATORS[algorithm.advantage_estimator].needs_values:
            critic_graphdef, critic_params, critic_rest = nnx.split(
                build_critic(self.model, self.num_trained, config.model.init_seed + 1), nnx.Param, ...
            )
            if self.mesh is not None:
                critic_params = place_sharded(
                    critic_params, state_shardings(critic_params, self.mesh, config.mesh.rules)
                )
            critic = critic_fn(critic_graphdef, critic_rest)
            self._values = jax.jit(critic)
            critic_optimizer = build_optimizer(config.optimizer)[0]
            critic_opt_state = critic_optimizer.init(critic_params)
        self._train_step = jax.jit(
            make_train_step(
                self.policy,
                self.combiner,
                self.optimizer,
                self.update_spec,
                flags,
                critic,
                critic_optimizer,
                None if self.mesh is None else jax.tree.map(lambda leaf: leaf.sharding, params),
                self.trainable_flags,
                head_kernel=self.head_kernel,
            ),
            donate_argnums=0,
            compiler_options=train_step_compiler_options(self.update_spec),
        )
        scalar = self.update_spec.mode == "scalar"
        self._scalar_weights = jax.jit(make_scalar_weights(self.combiner, self.update_spec)) if scalar else None
        self.uses_reference = config.kl.beta > 0 or config.kl.log_kl
        # LoRA: the reference is the base model (adapters off) of the current parameters, no copy; else a frozen copy.
        self.reference_params = jax.tree.map(jnp.copy, params) if self.uses_reference and not config.lora.rank else None
        self._logp = jax.jit(
            lambda p, ids, mask, tokens: self.policy(p, ids, mask, tokens, jnp.ones(tokens.shape, jnp.float32))[0]
        )
        base = response_fn(
            self.graphdef, self.rest, split=self.split, adapters=False, chunk_size=algorithm.logits_chunk_size
        )
        self._base_logp = jax.jit(
            lambda p, ids, mask, tokens: base(p, ids, mask, tokens, jnp.ones(tokens.shape, jnp.float32))[0]
        )
        # Every leaf its own buffer: the train step donates the state, and an init may share one array twice.
        self.state = jax.tree.map(
            jnp.copy,
            TrainState(
                params=params,
                opt_state=self.optimizer.init(params),
                combiner_state=self.combiner.init(params),
                consecutive_skips=jnp.zeros((), jnp.int32),
                skipped_updates=jnp.zeros((), jnp.int32),
                critic_params=critic_params,
                critic_opt_state=critic_opt_state,
            ),
        )
        self.normalizer = init_normalizer(len(self.objectives))
        self.kl_coef = float(config.kl.beta)
        if self.mesh is not None:
            self.state = replicate(self.state, self.mesh)
        self.step = 0
        self.sampling = SamplingConfig(
            max_new_tokens=config.rollout.max_completion_length,
            temperature=config.rollout.temperature,
            top_k=config.rollout.top_k,
            top_p=config.rollout.top_p,
            stop_token_ids=self._stop_ids(),
            pad_token_id=self.tokenizer.pad_token_id or 0,
            prompt_bucket_multiple=config.rollout.prompt_bucket_multiple,
        )

    # ---------------------------------------------------------------------------------------------- pieces
    def _head_kernel(self, config: rl_config.TrainConfig, params: Any, flags: list[bool]) -> HeadKernel | None:
        """The :class:`HeadKernel` of probe or full mode for ``combiner.head_gram`` (None: the head's n gradients, or
        no head), ``flags`` marking the leaves differentiated per objective.

        ValueError for ``kernel`` where the kernel cannot stand in for the head's gradients
        (:func:`head_kernel_obstacles`).
        """
        setting = config.combiner.head_gram
        tied = self.model.config.tie_word_embeddings
        weight = ("model", "embed_tokens", "embedding") if tied else ("lm_head", "kernel")
        head = [  # the head's weight matrix alone (an adapter's or a bias's gradient has no such kernel)
            tuple(str(getattr(key, "key", key)) for key in path[: len(weight)]) == weight
            for path, _ in jax.tree_util.tree_leaves_with_path(params)
        ]
        trained = self.trainable_flags or [True] * len(head)
        obstacles = head_kernel_obstacles(
            config,
            probe_mode=self.update_spec.mode == "probe",
            head_per_objective=any(h and f for h, f in zip(head, flags, strict=True)),
            head_trained=all(t for h, t in zip(head, trained, strict=True) if h),
            on_mesh=self.mesh is not None,
            tied=tied,
        )
        if setting == "gradients" or (obstacles and setting == "auto"):
            return None
        if obstacles:
            raise ValueError(
                checks.message(
                    "Trainer",
                    "combiner.head_gram",
                    f"is 'kernel', but {'; '.join(obstacles)}",
                    "'auto' or 'gradients' here, or a trained head differentiated per objective (untied in probe "
                    "mode), one device, full logits and one micro-batch",
                )
            )
        policy = response_fn(self.graphdef, self.rest, split=self.split, head_kernel=True)
        embed = input_embeddings_fn(self.graphdef, self.rest, split=self.split) if tied else None
        return HeadKernel(policy, head, always=setting == "kernel", input_embeddings=embed)

    def _stop_ids(self) -> tuple[int, ...]:
        eos = self.model.config.eos_token_id
        ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return ids or ((self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ())

    def policy_model(self) -> Any:
        """The current policy as an NNX model (its final block merged back when the training state is split)."""
        params = merge_last_layer(self.state.params) if self.split else self.state.params
        return nnx.merge(self.graphdef, params, self.rest)

    def sampling_model(self) -> Any:
        """The current policy for the rollout, as :func:`mojax.models.generate` takes it: with split training
        parameters, :func:`mojax.models.merge_split`'s model, which samples from them in place (:meth:`policy_model`
        concatenates a copy of every layer weight); else the ``(graphdef, state)`` pair of the parameters and the
        rest, which ``generate`` would otherwise split from a merged model at every rollout."""
        if self.split:
            return merge_split(self.graphdef, self.state.params)
        return self.graphdef, nnx.merge_state(self.state.params, self.rest)

    def place_batch(self, batch: Batch) -> Batch:
        """The batch split over the mesh's batch axes (unchanged without a mesh)."""
        return batch if self.mesh is None else place(batch, batch_sharding(self.mesh))

    def _step_key(self, step: int, stream: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), step), stream)

    def prompts_for_step(self, step: int) -> list[dict]:
        """The prompt rows of (1-based) `step`: consecutive slices of per-pass permutations seeded by data.seed."""
        count, size = len(self.train_prompts), self.config.data.prompts_per_step
        start = (step - 1) * size
        rows = []
        for position in range(start, start + size):
            epoch, offset = divmod(position, count)
            order = np.random.default_rng([self.config.data.seed, epoch]).permutation(count)
            rows.append(self.train_prompts[order[offset]])
        return rows

    def rollout(self, rows: Sequence[dict], key: jax.Array, sampling: SamplingConfig, generations: int) -> Rollout:
        """Sample `generations` completions for each prompt row; the fields come back as host arrays (numpy), gathered
        from every process when the mesh spans several."""
        settings = self.config.rollout
        ids, mask = encode_prompts(
            self.tokenizer,
            [row["prompt"] for row in rows],
            max_length=settings.max_prompt_length,
            truncate=settings.truncate_prompts,
            bucket_multiple=settings.prompt_bucket_multiple,
        )
        model = self.sampling_model()
        if not self.uses_reference:
            reference = None
        elif self.config.lora.rank:
            reference = functools.partial(self._base_logp, self.state.params)
        else:
            reference = functools.partial(self._logp, self.reference_params)
        rollout = sample_rollout(
            model,
            ids,
            mask,
            generations,
            key,
            sampling,
            policy_logp=None
            if settings.use_sampler_logps or self.update_spec.on_policy
            else functools.partial(self._logp, self.state.params),
            reference_logp=reference,
            mask_truncated_completions=settings.mask_truncated_completions,
        )
        if self._values is not None:
            values = self._values(
                self.state.critic_params, rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.response_mask
            )
            rollout = rollout._replace(values=values)
        return fetch(rollout)

    def decode(self, rollout: Rollout) -> tuple[list[str], list[list[int]]]:
        """(completion strings, completion id lists) of a rollout, cut at the response mask."""
        tokens = np.asarray(rollout.tokens)
        lengths = np.asarray(rollout.response_mask).sum(axis=1).astype(int)
        ids = [row[:length].tolist() for row, length in zip(tokens, lengths, strict=True)]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True), ids

    def score(self, rows: Sequence[dict], rollout: Rollout, generations: int) -> tuple[np.ndarray, list[str]]:
        """(raw scores f32[B, n], completions) of the objectives on a rollout."""
        completions, ids = self.decode(rollout)
        prompts = [row["prompt"] for row in rows for _ in range(generations)]
        columns = {key: [row[key] for row in rows for _ in range(generations)] for key in rows[0] if key != "prompt"}
        raw = score(
            self.objectives,
            prompts,
            completions,
            completion_ids=ids,
            columns=columns or None,
            prompt_ids=np.asarray(rollout.prompt_ids),
            prompt_mask=np.asarray(rollout.prompt_mask),
            completion_mask=np.asarray(rollout.response_mask),
        )
        return raw, completions

    def advantages(self, scores: np.ndarray, rollout: Rollout) -> rl_advantages.Advantages:
        """Per-objective advantages f32[n, B, T] of reward-oriented scores (KL in the reward when so placed), with the
        critic's returns for gae: :func:`estimate_advantages`, compiled once per response shape (whatever the prompts'
        width)."""
        algorithm = self.config.algorithm
        return _estimate_advantages(
            jnp.asarray(scores, jnp.float32),
            without_prompts(rollout),
            jnp.asarray([objective.weight for objective in self.objectives], jnp.float32),
            jnp.float32(self.kl_coef),
            estimator=algorithm.advantage_estimator,
            options=tuple(sorted(algorithm.estimator_options.items())),
            kl_in_reward=self.config.kl.placement == "reward" and self.kl_coef > 0,
            aggregate_first=self.aggregate_first,
            use_noon=algorithm.noon if algorithm.noon is not None else self.config.combiner.name == "pama",
        )

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_tree(self) -> dict[str, Any]:
        """The training state, the reward normalisers and the KL coefficient (its 64 bits: the adaptive controller
        updates it in float64 on the host), host values replicated on the mesh, so that every process saves and
        restores the same global arrays."""
        host = {"normalizer": self.normalizer, "kl_coef": jnp.asarray(float64_bits(self.kl_coef))}
        return {**super().checkpoint_tree(), **(host if self.mesh is None else replicate(host, self.mesh))}

    def load_checkpoint_tree(self, restored: Mapping[str, Any]) -> None:
        super().load_checkpoint_tree(restored)
        self.normalizer = type(self.normalizer)(*(jnp.asarray(x) for x in fetch(tuple(restored["normalizer"]))))
        self.kl_coef = float_from_bits(fetch(restored["kl_coef"]))

    def open_logs(self, resumed_at: int | None) -> None:
        """samples.jsonl: a few decoded completions per step (process 0 only)."""
        self._samples = None
        if not is_main_process():
            return
        self._samples = SamplesLogger(
            self.output_dir / "samples.jsonl",
            max_samples=self.config.logging.samples_per_step,
            resume_from_step=resumed_at,
        )

    def log_step(self, metrics: Mapping[str, float]) -> None:
        if self._samples is None:
            return
        rows, completions, raw = self._last_samples
        prompts = [row["prompt"] for row in rows for _ in range(self.config.rollout.num_generations)]
        self._samples.log(
            self.step, prompts, completions, {name: raw[:, i].tolist() for i, name in enumerate(self.names)}
        )

    def close_logs(self) -> None:
        if self._samples is not None:
            self._samples.close()

    # ------------------------------------------------------------------------------------------------ metrics
    def _metrics(
        self, raw: np.ndarray, oriented: np.ndarray, rollout: Rollout, advantages: jax.Array, update: Mapping[str, Any]
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        weights_of = np.asarray([objective.weight for objective in self.objectives])
        combined = np.nansum(oriented * weights_of, axis=1)
        metrics["reward"], metrics["reward_std"] = _nan_stats(combined)
        groups = np.asarray(rollout.group_ids)
        stds = [np.std(combined[groups == g]) for g in np.unique(groups)]
        metrics["frac_reward_zero_std"] = float(np.mean(np.asarray(stds) == 0))
        for index, name in enumerate(self.names):
            metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = _nan_stats(raw[:, index])
        mask = np.asarray(rollout.response_mask)
        adv = np.asarray(advantages)
        for index, name in enumerate(self.names if not self.aggregate_first else ("combined",)):
            metrics[f"advantages/{name}/abs_mean"] = float(np.abs(adv[index]).sum() / max(mask.sum(), 1.0))
        weights = np.asarray(update["weights"])
        for index, name in enumerate(self.names if not self.aggregate_first else ("combined",)):
            metrics[f"combiner/weight/{name}"] = float(weights[index])
        cosines = np.asarray(update["cosines"])
        if np.all(np.isfinite(cosines)) and not self.aggregate_first:
            for a in range(len(self.names)):
                for b in range(a + 1, len(self.names)):
                    metrics[f"combiner/cos/{self.names[a]}/{self.names[b]}"] = float(cosines[a, b])
        if not self.aggregate_first:
            statistics = fetch(
                _interference_statistics(
                    jnp.asarray(weights), advantages, without_prompts(rollout), jnp.asarray(oriented)
                )
            )
            for index, name in enumerate(self.names):
                metrics[f"interference/cov/{name}"] = float(statistics.cov[index])
                metrics[f"interference/frac_neg/{name}"] = float(statistics.frac_neg[index])
            metrics["interference/index"] = float(statistics.interference_index)
        if self.config.combiner.name == "lagrangian" and not self.aggregate_first:
            log_lambda = fetch(self.state.combiner_state.log_lambda)
            for index in self.constrained:
                metrics[f"lagrangian/lambda/{self.names[index]}"] = float(np.exp(log_lambda[index]))
        lengths = mask.sum(axis=1)
        metrics["completions/mean_length"] = float(lengths.mean())
        metrics["completions/clipped_ratio"] = float(np.mean(np.asarray(rollout.truncated)))
        for key in ("loss", "grad_norm", "kl", "entropy", "clip_ratio"):
            metrics[key] = float(update[key])
        if self._values is not None:
            metrics["critic/vf_loss"] = float(update["value_loss"])
        metrics["kl_coef"] = self.kl_coef
        metrics["skipped_updates"] = float(fetch(self.state.skipped_updates))
        return metrics

    # -------------------------------------------------------------------------------------------- the loop
    def prepare(self, step: int) -> Prepared:
        """Rollout, rewards and advantages of (1-based) `step`: everything its update needs, and the timings."""
        generations = self.config.rollout.num_generations
        rows = self.prompts_for_step(step)
        started = time.perf_counter()
        with self.on_mesh():
            rollout = self.rollout(rows, self._step_key(step, 0), self.sampling, generations)
        sampled = time.perf_counter()
        raw, completions = self.score(rows, rollout, generations)
        oriented = np.asarray(signed(raw, self.objectives), np.float32)
        trained_on = self._normalized(oriented)
        estimated = self.advantages(trained_on, rollout)
        advantages = estimated.advantages
        batch = Batch(
            prompt_ids=rollout.prompt_ids,
            prompt_mask=rollout.prompt_mask,
            tokens=rollout.tokens,
            mask=rollout.response_mask,
            old_logp=rollout.old_logp,
            ref_logp=rollout.ref_logp,
            advantages=jnp.moveaxis(advantages, 0, 1),
            rewards=jnp.asarray(trained_on if not self.aggregate_first else trained_on[:, :1]),
            group_ids=rollout.group_ids,
            values=None if rollout.values is None else jnp.moveaxis(rollout.values, 0, 1),
            returns=None if estimated.returns is None else jnp.moveaxis(estimated.returns, 0, 1),
        )
        rollout_config = self.config.rollout
        width = response_bucket(
            rollout.response_mask, rollout_config.length_buckets, rollout_config.max_completion_length
        )
        batch = jax.tree.map(jnp.asarray, cut_responses(batch, width))  # on the device, as the update reads it
        timings = {"timing/rollout": sampled - started, "timing/rewards": time.perf_counter() - sampled}
        return Prepared(rows, completions, raw, oriented, rollout, advantages, batch, timings)

    def _normalized(self, oriented: np.ndarray) -> np.ndarray:
        """The scores with the running normalisation applied to the objectives configured with ``normalize``."""
        flags = np.asarray([spec.normalize for spec in self.config.objectives])
        if not flags.any():
            return oriented
        self.normalizer = update_normalizer(self.normalizer, jnp.asarray(oriented))
        normalized = np.asarray(normalize(self.normalizer, jnp.asarray(oriented), NORMALIZER_EPS))
        return np.where(flags[None, :], normalized, oriented)

    def update(self, batch: Batch, step: int) -> dict[str, Any]:
        """The jitted update of one rollout (on the mesh); returns its metrics on the host."""
        with self.on_mesh():
            arguments, combiner_state = self.update_arguments(batch, step)
            state, update = self._train_step(*arguments)
            self.state = state if combiner_state is None else state._replace(combiner_state=combiner_state)
        return fetch(update)

    def update_arguments(self, batch: Batch, step: int) -> tuple[tuple[Any, ...], Any]:
        """(the train step's arguments for one rollout's update, the combiner state to keep after it or None); call it
        on the mesh. In scalar mode the weights come first from their own program and go to the train step as data,
        so the train step is the same program for every scalar-mode combiner."""
        batch, key, beta = self.place_batch(batch), self._step_key(step, 1), jnp.float32(self.kl_coef)
        if self._scalar_weights is None:
            return (self.state, batch, key, beta, None), None
        weights, combiner_state = self._scalar_weights(self.state.combiner_state, batch)
        return (self.state._replace(combiner_state=None), batch, key, beta, weights), combiner_state

    def update_temporaries(self, batch: Batch) -> int:
        """Bytes of temporaries that the compiled update of ``batch`` plans (``memory_analysis()``; compiles it again
        unless the compilation cache holds it)."""
        with self.on_mesh():
            arguments, _ = self.update_arguments(batch, 1)
            return self._train_step.lower(*arguments).compile().memory_analysis().temp_size_in_bytes

    def train_step(self) -> dict[str, float]:
        """Run one step (rollout, rewards, advantages, update) and return its metrics."""
        step = self.step + 1
        prepared = self.prepare(step)
        started = time.perf_counter()
        update = self.update(prepared.batch, step)
        self.step = step
        metrics = self._metrics(prepared.raw, prepared.oriented, prepared.rollout, prepared.advantages, update)
        updates_so_far = step * self.config.algorithm.num_iterations * self.config.algorithm.num_minibatches
        metrics["learning_rate"] = float(self.schedule(updates_so_far - 1))
        metrics["completions/update_width"] = float(prepared.batch.tokens.shape[1])
        metrics.update(prepared.timings)
        metrics["timing/update"] = time.perf_counter() - started
        self._adapt_kl(metrics["kl"])
        self._last_samples = (prepared.rows, prepared.completions, prepared.raw)
        if self.config.eval_steps and step % self.config.eval_steps == 0:
            metrics.update(self.evaluate())
        return metrics

    def _adapt_kl(self, observed: float) -> None:
        """The adaptive KL controller: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) B / horizon)."""
        kl = self.config.kl
        if kl.controller == "adaptive" and math.isfinite(observed):
            batch = self.config.data.prompts_per_step * self.config.rollout.num_generations
            error = float(np.clip(observed / kl.target - 1.0, -0.2, 0.2))
            self.kl_coef *= 1.0 + error * batch / kl.horizon

    def evaluate(self) -> dict[str, float]:
        """Per-objective rewards of completions of the held-out prompts.

        Greedy (``eval_temperature`` 0, the default): one completion per prompt, ``eval/rewards/{name}/mean``.
        Sampled: ``eval_num_generations`` completions per prompt at ``eval_temperature`` and ``eval_top_p``, drawn with
        the same fixed key at every evaluation; ``eval/rewards/{name}/mean`` and ``eval/rewards/{name}/std`` over all
        of them (NaN scores excluded per objective).
        """
        if self.eval_prompts is None:
            return {}
        config = self.config
        sampling = SamplingConfig(
            max_new_tokens=self.sampling.max_new_tokens,
            temperature=config.eval_temperature,
            top_p=config.eval_top_p,
            stop_token_ids=self.sampling.stop_token_ids,
            pad_token_id=self.sampling.pad_token_id,
            prompt_bucket_multiple=self.sampling.prompt_bucket_multiple,
        )
        rows, generations = self.eval_prompts, config.eval_num_generations
        with self.on_mesh():
            rollout = self.rollout(rows, self._step_key(0, 2), sampling, generations)
        raw, _ = self.score(rows, rollout, generations)
        metrics = {}
        for index, name in enumerate(self.names):
            mean, std = _nan_stats(raw[:, index])
            metrics[f"eval/rewards/{name}/mean"] = mean
            if config.eval_temperature > 0:
                metrics[f"eval/rewards/{name}/std"] = std
        return metrics
