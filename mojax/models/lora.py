"""LoRA adapters on the stacked-layer NNX LLaMA: add, train alone, disable for the reference, merge, save.

How the paper and PEFT were read. A frozen projection ``W`` gains a low-rank update,
``y = x W + (alpha / r) * dropout(x) A B`` (Hu et al.): ``A`` [in, r] starts random and ``B``
[r, out] at zero, so a fresh adapter leaves the model unchanged. ``A`` is drawn as PEFT does for a
torch ``Linear(in, r)`` (``kaiming_uniform_(a=sqrt(5))``: uniform in +-1/sqrt(in)). Dropout acts on
the adapter's input only, with one mask per projection, and only when the caller passes a
``dropout_rng`` (training); without it the adapter path is deterministic.

Layout. The layers are stacked, so each targeted projection ``kernel`` [L, *in, *out] gets
``lora_a`` [L, *in, r] and ``lora_b`` [L, r, *out] next to it (``model.layers.self_attn.q_proj.lora_a``,
...), as ``nnx.LoRAParam`` (a subclass of ``nnx.Param``): select them with ``nnx.LoRAParam``, the
base weights with ``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))``. Their logical axes are the
kernel's, with ``None`` for the rank. The scaling alpha / r and the dropout rate are static
(``model.model.layers.lora``).

* Reference policy: the same model called with ``adapters=False`` (no copy of the weights).
* Training the adapters alone: :func:`adapters_only` (``tx`` behind the :func:`lora_mask`), or split
  the model with ``nnx.LoRAParam`` and differentiate the adapter state only.
* Probe mode: :func:`mojax.models.llama.default_probe_mask` selects the final block's adapters when present.
* Export: :func:`merge_lora` folds them into the kernels; ``mojax.models.hf.save_pretrained``
  writes a merged HF folder (the model itself is left unmerged).
* Checkpoints of the adapters alone: :func:`adapter_state` / :func:`load_adapter_state` (pytrees,
  for orbax) and :func:`save_adapters` / :func:`load_adapters` (a safetensors file + JSON config).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mojax import _checks
from mojax.models.llama import INPUT_DIMS, LlamaDecoderLayers

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters.

    Args:
      rank: r >= 1, the inner dimension of A [in, r] and B [r, out].
      alpha: the update is scaled by alpha / rank.
      dropout: drop probability on the adapters' input, in [0, 1) (used only with a ``dropout_rng``).
      targets: projections that get adapters, among q_proj, k_proj, v_proj, o_proj, gate_proj,
        up_proj, down_proj.

    References:
      Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        where = "LoraConfig"
        object.__setattr__(self, "rank", _checks.integer(where, "rank", self.rank, minimum=1))
        object.__setattr__(self, "alpha", _checks.positive(where, "alpha", self.alpha))
        object.__setattr__(
            self, "dropout", _checks.in_range(where, "dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        )
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise TypeError(_checks.message(where, "targets", f"is {self.targets!r}", "a sequence of projection names"))
        targets = tuple(self.targets)
        for target in targets:
            _checks.choice(where, "targets", target, INPUT_DIMS)
        if not targets or len(set(targets)) != len(targets):
            raise ValueError(
                _checks.message(where, "targets", f"is {targets!r}", "distinct projection names, at least one")
            )
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        """alpha / rank."""
        return self.alpha / self.rank


def _layers(model: nnx.Module, where: str) -> LlamaDecoderLayers:
    """The stacked decoder layers of a mojax Llama model (causal LM or head model)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, LlamaDecoderLayers):
        raise TypeError(
            _checks.message(where, "model", f"is a {type(model).__name__}", "a mojax Llama model (with .model.layers)")
        )
    return layers


def _adapter_params(kernel: nnx.Param, input_dims: int, config: LoraConfig, key: jax.Array) -> tuple[Any, Any]:
    """(A, B) for one stacked kernel [L, *in, *out]: A uniform in +-1/sqrt(prod(in)), B zeros."""
    shape, dtype = kernel.shape, kernel.dtype
    names = kernel.get_metadata().get("out_sharding") or (None,) * len(shape)
    in_shape, out_shape = shape[1 : 1 + input_dims], shape[1 + input_dims :]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(key, (shape[0], *in_shape, config.rank), jnp.float32, -bound, bound).astype(dtype)
    b = jnp.zeros((shape[0], config.rank, *out_shape), dtype)
    a_names = (names[0], *names[1 : 1 + input_dims], None)
    b_names = (names[0], None, *names[1 + input_dims :])
    return (
        nnx.LoRAParam(a, out_sharding=a_names, eager_sharding=False),
        nnx.LoRAParam(b, out_sharding=b_names, eager_sharding=False),
    )


def add_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Add LoRA adapters to ``model`` in place (and return it); a fresh adapter leaves the outputs unchanged.

    Args:
      model: a mojax ``LlamaForCausalLM`` (or value / reward model) without adapters.
      config: rank, alpha, dropout and target projections.
      rngs: draws the A matrices (``rngs.params()``).

    Returns:
      ``model``, with ``lora_a`` / ``lora_b`` ``nnx.LoRAParam`` next to every targeted kernel.

    References:
      Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.

    Example:
      >>> from mojax.models import LlamaForCausalLM, ModelConfig
      >>> config = ModelConfig.tiny(num_hidden_layers=1, vocab_size=16)
      >>> lora = LoraConfig(rank=4, targets=("q_proj", "o_proj"))
      >>> model = nnx.eval_shape(lambda: add_lora(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), lora, rngs=nnx.Rngs(1)))
      >>> model.model.layers.self_attn.o_proj.lora_a.shape, model.model.layers.self_attn.o_proj.lora_b.shape
      ((1, 4, 16, 4), (1, 4, 64))
      >>> sum(x.size for x in jax.tree.leaves(adapter_state(model)))  # q: 64*4 + 4*64, o: 64*4 + 4*64
      1024
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(_checks.message("add_lora", "config", f"is a {type(config).__name__}", "a LoraConfig"))
    layers = _layers(model, "add_lora")
    if layers.lora is not None:
        raise ValueError(_checks.message("add_lora", "model", "already has adapters", "a model without adapters"))
    projections = layers.projections()
    for target in config.targets:
        module = projections[target]
        module.lora_a, module.lora_b = _adapter_params(module.kernel, INPUT_DIMS[target], config, rngs.params())
    layers.lora = config
    return model


def lora_config(model: nnx.Module) -> LoraConfig | None:
    """The adapters' config of ``model``, or None when it has none."""
    return _layers(model, "lora_config").lora


def lora_mask(state: Any) -> Any:
    """Bool pytree with the structure of ``state``: True exactly on ``nnx.LoRAParam`` leaves.

    Args:
      state: an ``nnx.State`` (e.g. the Param part of ``nnx.split(model, nnx.Param)``).

    Returns:
      The mask. To train the adapters alone use :func:`adapters_only` (``optax.masked`` alone
      would pass the other leaves' gradients through unchanged rather than freeze them).

    References:
      Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
    """
    return jax.tree.map(
        lambda v: v.replace(isinstance(v, nnx.LoRAParam)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def adapters_only(tx: optax.GradientTransformation, state: Any) -> optax.GradientTransformation:
    """``tx`` on the adapters of ``state``, zero updates (and no optimizer state) for every other leaf.

    Args:
      tx: the optimizer of the adapters (e.g. ``optax.adamw(1e-4)``).
      state: the parameter state the optimizer will update (e.g. ``nnx.split(model, nnx.Param)[1]``).

    Returns:
      ``optax.transforms.selective_transform(tx, freeze_mask=not lora_mask(state))``.

    References:
      Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
    """
    frozen = jax.tree.map(lambda trainable: not trainable, lora_mask(state))
    return optax.transforms.selective_transform(tx, freeze_mask=frozen)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold the adapters into the kernels in place (``W += alpha / r * A B``, in fp32) and remove them.

    Args:
      model: a mojax Llama model with adapters.

    Returns:
      ``model``, now without adapters, whose outputs equal the adapted model's (to rounding).

    References:
      Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685
      (section 4.1: merged weights, no inference latency).
    """
    layers = _layers(model, "merge_lora")
    config = layers.lora
    if config is None:
        raise ValueError(_checks.message("merge_lora", "model", "has no adapters", "a model with add_lora adapters"))
    for target, module in layers.projections().items():
        if target not in config.targets:
            continue
        kernel = module.kernel[...]
        a, b = module.lora_a[...].astype(jnp.float32), module.lora_b[...].astype(jnp.float32)
        L, r = a.shape[0], a.shape[-1]
        delta = jnp.matmul(a.reshape(L, -1, r), b.reshape(L, r, -1)).reshape(kernel.shape)
        module.kernel[...] = (kernel.astype(jnp.float32) + config.scaling * delta).astype(kernel.dtype)
        del module.lora_a, module.lora_b
    layers.lora = None
    return model


def adapter_state(model: nnx.Module) -> nnx.State:
    """The adapters alone (``nnx.state(model, nnx.LoRAParam)``): what an adapter checkpoint holds."""
    if lora_config(model) is None:
        raise ValueError(_checks.message("adapter_state", "model", "has no adapters", "a model with adapters"))
    return nnx.state(model, nnx.LoRAParam)


def load_adapter_state(model: nnx.Module, state: nnx.State) -> None:
    """Write an :func:`adapter_state` into ``model`` (which has adapters of the same config) in place.

    Raises ValueError when the paths or shapes differ from the model's adapters.
    """
    current = dict(nnx.to_flat_state(adapter_state(model)))
    given = dict(nnx.to_flat_state(state))
    if set(current) != set(given):
        raise ValueError(
            _checks.message(
                "load_adapter_state",
                "state",
                f"has paths {sorted(given)}",
                f"the model's adapter paths {sorted(current)}",
            )
        )
    for path, variable in given.items():
        if tuple(variable.shape) != tuple(current[path].shape):
            raise ValueError(
                _checks.message(
                    "load_adapter_state", "state", f"has {path} of shape {variable.shape}", f"{current[path].shape}"
                )
            )
    nnx.update(model, state)


def save_adapters(model: nnx.Module, path: str | os.PathLike) -> None:
    """Write the adapters alone to ``path``: ``adapter_model.safetensors`` and ``adapter_config.json``."""
    from safetensors.numpy import save_file

    tensors = {
        ".".join(str(k) for k in key): np.asarray(jax.device_get(v.get_value()))
        for key, v in nnx.to_flat_state(adapter_state(model))
    }
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS))
    config = dataclasses.asdict(lora_config(model))
    with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump({**config, "targets": list(config["targets"])}, f, indent=2, sort_keys=True)


def load_adapters(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Load adapters written by :func:`save_adapters` into ``model`` (adding them first if it has none).

    Returns ``model``. Raises ValueError when the model already has adapters of another config.
    """
    from safetensors.numpy import load_file

    path = os.fspath(path)
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
        saved = json.load(f)
    config = LoraConfig(**{**saved, "targets": tuple(saved["targets"])})
    current = lora_config(model)
    if current is None:
        add_lora(model, config, rngs=nnx.Rngs(0))
    elif current != config:
        raise ValueError(_checks.message("load_adapters", "model", f"has adapters {current}", f"{config}"))
    tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    flat = {".".join(str(k) for k in key): (key, v) for key, v in nnx.to_flat_state(adapter_state(model))}
    if set(tensors) != set(flat):
        raise ValueError(
            _checks.message("load_adapters", "path", f"holds tensors {sorted(tensors)}", f"the adapters {sorted(flat)}")
        )
    state = [(key, v.replace(jnp.asarray(tensors[name], v.dtype))) for name, (key, v) in flat.items()]
    load_adapter_state(model, nnx.from_flat_state(state))
    return model
