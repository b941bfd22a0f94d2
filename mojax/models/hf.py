"""HF interop: load LLaMA weights from a local HF folder (safetensors only) or a GGUF file, and export back.

* :func:`load_causal_lm` / :func:`load_reward_model` / :func:`load_value_model` read
  ``config.json`` (through the :class:`~mojax.models.config.ModelConfig` allow-list) and
  ``model.safetensors`` or a sharded ``model.safetensors.index.json``, with no torch: tensors are
  read with ``safetensors`` (numpy), per-layer weights are stacked onto the ``layers`` axis and
  torch ``Linear`` weights ``(out, in)`` are transposed into mojax kernels.
* ``shardings`` (optional): a pytree of ``jax.sharding.Sharding`` with the structure of
  ``nnx.state(model)`` (what :mod:`mojax.models.sharding` produces; ``nnx.Variable`` wrappers are
  fine), or one ``Sharding`` for every leaf. Each array is then built with
  ``jax.make_array_from_callback``, every device shard reading only its own slice of the
  safetensors files (``safe_open(...).get_slice``), so no full weight is materialised on one device.
* :func:`load_causal_lm` also reads a llama GGUF file (:class:`~mojax.models.gguf.GGUFFile`:
  config from its metadata, tensors dequantized to float under their HF names), through the
  same name mapping and sharded reads.
* :func:`save_pretrained` writes ``config.json`` + ``model.safetensors`` (or shards + index)
  that ``transformers`` loads (``LlamaForCausalLM`` / ``LlamaForSequenceClassification``), with
  the tokenizer, its chat template and ``generation_config.json``, so a folder round-trips whole.
* :func:`weight_file_digests` (sha256 of the weight files a load reads) and :func:`parameter_digest` (sha256 of a
  module's arrays): what a resumed training run checks its initial weights against.

Safety: never unpickles and never runs remote code. A folder with only ``pytorch_model.bin``
gets a ``ValueError`` asking for a safetensors conversion; a missing or unexpected tensor name
gets a ``ValueError`` listing them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from flax import nnx

from mojax._checks import message
from mojax.models.config import ModelConfig
from mojax.models.gguf import GGUFFile, gguf_file_in, read_gguf_config

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
_PICKLE_PATTERNS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.bin", "*.pt", "*.pth", "*.ckpt")
# Non-parameter buffers that old checkpoints carry; ignored when present.
_IGNORED_TENSORS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

Index = tuple[slice, ...]


# --------------------------------------------------------------------------- reading
class _SafetensorsReader:
    """Name -> lazily sliced numpy tensor over one or several safetensors files."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        files = _weight_files(path)
        self._stack = contextlib.ExitStack()
        self._handles = {}
        self.name_to_file: dict[str, str] = {}
        for f in files:
            h = self._stack.enter_context(safe_open(os.path.join(path, f), framework="numpy"))
            self._handles[f] = h
            for k in h.keys():
                self.name_to_file[k] = f

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def names(self) -> set[str]:
        return set(self.name_to_file)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.name_to_file[name]].get_slice(name).get_shape())

    def read(self, name: str, index: Index) -> np.ndarray:
        sl = self._handles[self.name_to_file[name]].get_slice(name)
        return np.asarray(sl[index])


def _weight_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory")
    index = os.path.join(path, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{SAFE_INDEX} in {path!r} lists missing shard files: {missing}")
        return files
    if os.path.isfile(os.path.join(path, SAFE_WEIGHTS)):
        return [SAFE_WEIGHTS]
    present = sorted(os.listdir(path))
    pickled = [
        f for f in present if f.endswith((".bin", ".pt", ".pth", ".ckpt")) or f == "pytorch_model.bin.index.json"
    ]
    if pickled:
        raise ValueError(
            f"{path!r} has only pickle-based weights ({', '.join(pickled)}); mojax never unpickles. "
            "Convert them to safetensors first, e.g. in a trusted environment: "
            "`transformers.AutoModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)`"
        )
    shards = sorted(f for f in present if f.endswith(".safetensors"))
    if shards:
        return shards
    raise FileNotFoundError(f"no {SAFE_WEIGHTS} or {SAFE_INDEX} in {path!r} (found: {present})")


def _open_tensors(source: str | GGUFFile) -> contextlib.AbstractContextManager:
    """The tensor reader of a safetensors folder, or an open GGUF file (left open)."""
    return contextlib.nullcontext(source) if isinstance(source, GGUFFile) else _SafetensorsReader(source)


def _norm_index(index: Index, shape: Sequence[int]) -> list[tuple[int, int]]:
    out = []
    for i, n in enumerate(shape):
        s = index[i] if i < len(index) else slice(None)
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    return out


# --------------------------------------------------------------------------- name mapping
# A "rule" turns mojax-layout shard bounds into a read of the HF tensor(s).
#   kind "same":   mojax [A, B]        <- hf [A, B]            (embedding, norm)
#   kind "linear": mojax [in, out]     <- hf [out, in].T       (gate/up/down, lm_head, score)
#   kind "heads":  mojax [D, N, hd]    <- hf [N*hd, D]         (q/k/v)
#   kind "o":      mojax [N, hd, D]    <- hf [D, N*hd]         (o_proj)
#   kind "head_bias": mojax [N, hd]    <- hf [N*hd]            (q/k/v biases)
# stacked=True: a leading layers axis; the HF name contains "{i}".


def _rules(config: ModelConfig, head: str | None) -> dict[tuple[str, ...], tuple[str, str, bool]]:
    L = "model.layers.{i}."
    r: dict[tuple[str, ...], tuple[str, str, bool]] = {
        ("model", "embed_tokens", "embedding"): ("model.embed_tokens.weight", "same", False),
        ("model", "norm", "scale"): ("model.norm.weight", "same", False),
        ("model", "layers", "input_layernorm", "scale"): (L + "input_layernorm.weight", "same", True),
        ("model", "layers", "post_attention_layernorm", "scale"): (L + "post_attention_layernorm.weight", "same", True),
        ("model", "layers", "self_attn", "q_proj", "kernel"): (L + "self_attn.q_proj.weight", "heads", True),
        ("model", "layers", "self_attn", "k_proj", "kernel"): (L + "self_attn.k_proj.weight", "heads", True),
        ("model", "layers", "self_attn", "v_proj", "kernel"): (L + "self_attn.v_proj.weight", "heads", True),
        ("model", "layers", "self_attn", "o_proj", "kernel"): (L + "self_attn.o_proj.weight", "o", True),
        ("model", "layers", "mlp", "gate_proj", "kernel"): (L + "mlp.gate_proj.weight", "linear", True),
        ("model", "layers", "mlp", "up_proj", "kernel"): (L + "mlp.up_proj.weight", "linear", True),
        ("model", "layers", "mlp", "down_proj", "kernel"): (L + "mlp.down_proj.weight", "linear", True),
    }
    if config.qkv_bias:
        for proj in ("q_proj", "k_proj", "v_proj"):
            r[("model", "layers", "self_attn", proj, "bias")] = (L + f"self_attn.{proj}.bias", "head_bias", True)
    if config.o_bias:
        r[("model", "layers", "self_attn", "o_proj", "bias")] = (L + "self_attn.o_proj.bias", "same", True)
    if head == "lm_head" and not config.tie_word_embeddings:
        r[("lm_head", "kernel")] = ("lm_head.weight", "linear", False)
    if head == "score":
        r[("score", "kernel")] = ("score.weight", "linear", False)
    return r


def _hf_shape(kind: str, mojax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "same":
        return mojax_shape
    if kind == "linear":
        return (mojax_shape[1], mojax_shape[0])
    if kind == "heads":
        d, n, hd = mojax_shape
        return (n * hd, d)
    if kind == "o":
        n, hd, d = mojax_shape
        return (d, n * hd)
    if kind == "head_bias":
        n, hd = mojax_shape
        return (n * hd,)
    raise AssertionError(kind)


def _read_one(
    reader: _SafetensorsReader, name: str, kind: str, bounds: list[tuple[int, int]], mojax_shape: tuple[int, ...]
) -> np.ndarray:
    """Read the mojax-layout block ``bounds`` of a single (unstacked) tensor."""
    if kind == "same":
        return reader.read(name, tuple(slice(a, b) for a, b in bounds))
    if kind == "linear":
        (i0, i1), (o0, o1) = bounds
        return reader.read(name, (slice(o0, o1), slice(i0, i1))).T
    if kind == "heads":
        (d0, d1), (n0, n1), (h0, h1) = bounds
        hd = mojax_shape[2]
        x = reader.read(name, (slice(n0 * hd, n1 * hd), slice(d0, d1)))
        x = x.reshape(n1 - n0, hd, d1 - d0)[:, h0:h1, :]
        return x.transpose(2, 0, 1)
    if kind == "o":
        (n0, n1), (h0, h1), (d0, d1) = bounds
        hd = mojax_shape[1]
        x = reader.read(name, (slice(d0, d1), slice(n0 * hd, n1 * hd)))
        x = x.reshape(d1 - d0, n1 - n0, hd)[:, :, h0:h1]
        return x.transpose(1, 2, 0)
    if kind == "head_bias":
        (n0, n1), (h0, h1) = bounds
        hd = mojax_shape[1]
        return reader.read(name, (slice(n0 * hd, n1 * hd),)).reshape(n1 - n0, hd)[:, h0:h1]
    raise AssertionError(kind)


def _path_key(path) -> tuple[str, ...]:
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        out.append(str(name))
    while out and out[-1] in ("value", "raw_value", "_raw_value"):
        out.pop()
    return tuple(out)


def _flat_shardings(shardings: Any) -> dict[tuple[str, ...], jax.sharding.Sharding] | jax.sharding.Sharding | None:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    leaves = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    out = {}
    for path, leaf in leaves:
        if isinstance(leaf, nnx.Variable):
            leaf = leaf.get_value()
        if not isinstance(leaf, jax.sharding.Sharding):
            raise TypeError(
                f"shardings leaf at {jax.tree_util.keystr(path)} is {type(leaf).__name__}, "
                "expected a jax.sharding.Sharding"
            )
        out[_path_key(path)] = leaf
    return out


def _load_state(
    path: str | GGUFFile,
    graphdef: nnx.GraphDef,
    abstract_state: Any,
    config: ModelConfig,
    head: str | None,
    shardings: Any,
    optional: Callable[[tuple[str, ...]], bool] = lambda k: False,
    ignore: Callable[[str], bool] = lambda n: False,
) -> Any:
    """Fill ``abstract_state`` from the safetensors in ``path``; returns the concrete state.

    Leaves without an HF rule for which ``optional(key)`` is true are taken from the
    ``abstract_state`` itself (they must then be concrete, e.g. a freshly initialised head);
    checkpoint tensors for which ``ignore(name)`` is true are not reported as unexpected.
    """
    rules = _rules(config, head)
    flat_sh = _flat_shardings(shardings)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    L = config.num_hidden_layers
    with _open_tensors(path) as reader:
        available = reader.names()
        expected: set[str] = set()
        for _, (name, _, stacked) in rules.items():
            expected.update(name.format(i=i) for i in range(L)) if stacked else expected.add(name)
        missing = sorted(expected - available)
        unexpected = sorted(
            n
            for n in available - expected
            if not _IGNORED_TENSORS.match(n)
            and not ignore(n)
            and not (n == "lm_head.weight" and config.tie_word_embeddings)
        )
        if missing or unexpected:
            raise ValueError(
                f"tensor names in {path!r} do not match a mojax "
                f"{'LlamaForCausalLM' if head == 'lm_head' else 'LlamaForSequenceClassification' if head == 'score' else 'Llama trunk'}"
                f" with this config: missing {missing or 'none'}; unexpected {unexpected or 'none'}"
            )

        new_leaves = []
        for p, leaf in leaves:
            key = _path_key(p)
            if key not in rules:
                if optional(key):
                    new_leaves.append(leaf)
                    continue
                raise ValueError(f"no HF tensor for mojax parameter {'.'.join(key)}")
            name, kind, stacked = rules[key]
            shape, dtype = tuple(leaf.shape), leaf.dtype
            per_layer_shape = shape[1:] if stacked else shape
            first = name.format(i=0) if stacked else name
            got = reader.shape(first)
            want = _hf_shape(kind, per_layer_shape)
            if got != want:
                raise ValueError(f"{first}: shape {got} in the checkpoint, config expects {want}")

            def read(
                index: Index,
                name=name,
                kind=kind,
                stacked=stacked,
                shape=shape,
                per_layer_shape=per_layer_shape,
                dtype=dtype,
            ) -> np.ndarray:
                bounds = _norm_index(index, shape)
                if stacked:
                    (l0, l1), rest = bounds[0], bounds[1:]
                    blocks = [_read_one(reader, name.format(i=i), kind, rest, per_layer_shape) for i in range(l0, l1)]
                    x = np.stack(blocks, axis=0)
                else:
                    x = _read_one(reader, name, kind, bounds, per_layer_shape)
                return np.ascontiguousarray(x.astype(dtype, copy=False))

            if flat_sh is None:
                arr = jnp.asarray(read(()))
            else:
                sh = flat_sh if isinstance(flat_sh, jax.sharding.Sharding) else flat_sh.get(key)
                if sh is None:
                    raise ValueError(f"shardings has no entry for {'.'.join(key)}")
                arr = jax.make_array_from_callback(shape, sh, read)
            new_leaves.append(arr)
    return jax.tree_util.tree_unflatten(treedef, new_leaves)


HF_FOLDER = "an HF folder (config.json and safetensors)"
CAUSAL_LM_SOURCES = f"{HF_FOLDER}, a .gguf file, or a folder holding one .gguf file"


def _read_config(
    path: str | os.PathLike, dtype: Any, param_dtype: Any, expected: str = HF_FOLDER
) -> tuple[ModelConfig, dict]:
    """(config, raw config.json) of the HF folder ``path``; FileNotFoundError naming what ``path`` is and the
    ``expected`` kinds of model source otherwise."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        if not os.path.exists(path):
            found = "the path does not exist"
        else:
            found = (
                "the folder holds no config.json" if os.path.isdir(path) else "it is a file of no known model format"
            )
        raise FileNotFoundError(f"no model at {path!r}: {found}; expected {expected}")
    with open(cfg_file, encoding="utf-8") as f:
        raw = json.load(f)
    return ModelConfig.from_hf(raw, dtype=dtype, param_dtype=param_dtype), raw


def _num_labels(raw: dict) -> int:
    if "num_labels" in raw:
        return int(raw["num_labels"])
    if raw.get("id2label"):
        return len(raw["id2label"])
    return 2  # transformers' PreTrainedConfig default


def read_causal_lm_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a model source that :func:`load_causal_lm` reads, from its metadata alone.

    Args:
      path: an HF folder, a ``.gguf`` file, or a folder holding one ``.gguf`` file (as :func:`load_causal_lm`).

    Returns:
      The config (fp32 dtypes); no weight is read.
    """
    gguf_path = gguf_file_in(path)
    if gguf_path is None:
        return _read_config(path, jnp.float32, jnp.float32, CAUSAL_LM_SOURCES)[0]
    return read_gguf_config(gguf_path)


def weight_file_digests(path: str | os.PathLike) -> dict[str, str]:
    """``{file name: sha256 hex digest}`` of the files that :func:`load_causal_lm` reads the weights of ``path`` from:
    an HF folder's safetensors (every shard), or the GGUF file. Reads every byte once, as loading them does.

    Args:
      path: an HF folder, a ``.gguf`` file, or a folder holding one ``.gguf`` file (as :func:`load_causal_lm`).

    Returns:
      The digests, by file name.
    """
    gguf_path = gguf_file_in(path)
    files = (
        [gguf_path] if gguf_path is not None else [os.path.join(path, name) for name in _weight_files(os.fspath(path))]
    )
    digests = {}
    for file in files:
        with open(file, "rb") as handle:
            digests[os.path.basename(file)] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def parameter_digest(module: nnx.Module) -> str:
    """sha256 hex digest of a module's state: every leaf's path, dtype, shape and bytes, in the state's order.

    Two modules digest alike iff their states hold the same arrays under the same names (to the bit)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]:
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}\n".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def load_causal_lm(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    shardings: Any = None,
    remat: bool | str = "dots",
):
    """A mojax ``LlamaForCausalLM`` with the weights of a local HF folder or a llama GGUF file.

    Args:
      path: an HF folder (``config.json`` and safetensors), a ``.gguf`` file, or a folder holding
        exactly one ``.gguf`` file and no safetensors (safetensors win when a folder has both).
        GGUF weights are dequantized to float (:mod:`mojax.models.gguf`).
      dtype: compute dtype of the activations.
      param_dtype: storage dtype of the parameters.
      shardings: None, one ``jax.sharding.Sharding`` for every parameter, or a pytree of them shaped
        like ``nnx.state(model)``; each device shard then reads only its own slice.
      remat: what each decoder layer keeps for the backward pass (``mojax.models.llama.checkpointed``).

    Returns:
      The model; its ``config`` carries the special token ids.

    References:
      Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", arXiv 2302.13971, 2023.
    """
    gguf_path = gguf_file_in(path)
    if gguf_path is None:
        config, _ = _read_config(path, dtype, param_dtype, CAUSAL_LM_SOURCES)
        return _causal_lm_from(os.fspath(path), config, shardings, remat)
    with GGUFFile(gguf_path) as file:
        config = file.config.replace(dtype=dtype, param_dtype=param_dtype)
        return _causal_lm_from(file, config, shardings, remat)


def _causal_lm_from(source: str | GGUFFile, config: ModelConfig, shardings: Any, remat: bool | str):
    """A ``LlamaForCausalLM`` of `config` filled from a safetensors folder or an open GGUF file."""
    from mojax.models.llama import LlamaForCausalLM

    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, remat=remat, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, _load_state(source, graphdef, state, config, "lm_head", shardings))


def load_reward_model(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    shardings: Any = None,
    remat: bool | str = "dots",
):
    """A mojax ``LlamaRewardModel`` from a HF ``LlamaForSequenceClassification`` folder."""
    from mojax.models.heads import LlamaRewardModel

    config, raw = _read_config(path, dtype, param_dtype)
    n = _num_labels(raw)
    abstract = nnx.eval_shape(lambda: LlamaRewardModel(config, n, remat=remat, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, _load_state(os.fspath(path), graphdef, state, config, "score", shardings))


def load_value_model(
    path: str | os.PathLike,
    num_objectives: int,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    shardings: Any = None,
    remat: bool | str = "dots",
    seed: int = 0,
):
    """A mojax ``LlamaValueModel`` whose trunk comes from a HF causal-LM or reward-model folder.

    If the folder is a ``LlamaForSequenceClassification`` with ``num_labels == num_objectives``,
    the value head's kernel is initialised from ``score.weight`` (critic-from-reward-model) and its
    bias is zero; otherwise the head is freshly initialised from ``seed`` and the extra tensors
    (``lm_head.weight``, a ``score.weight`` of another size) are ignored.
    """
    from mojax.models.heads import LlamaValueModel

    path = os.fspath(path)
    config, raw = _read_config(path, dtype, param_dtype)
    make = lambda: LlamaValueModel(config, num_objectives, remat=remat, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    from mojax.models.heads import ValueHead

    head = nnx.state(
        ValueHead(config.hidden_size, num_objectives, param_dtype=config.param_dtype, rngs=nnx.Rngs(seed))
    )  # small: D x n
    with _SafetensorsReader(path) as reader:
        names = reader.names()
        score = reader.read("score.weight", ()) if "score.weight" in names else None
    if score is not None and score.shape == (num_objectives, config.hidden_size):
        head["kernel"].set_value(jnp.asarray(score.T, config.param_dtype))
    abstract["value_head"] = head
    state = _load_state(
        path,
        graphdef,
        abstract,
        config,
        None,
        shardings,
        optional=lambda k: k[:1] == ("value_head",),
        ignore=lambda n: n in ("lm_head.weight", "score.weight"),
    )
    if shardings is not None:
        flat = _flat_shardings(shardings)

        def place(p, x):
            key = _path_key(p)
            if key[:1] != ("value_head",):
                return x
            sh = flat if isinstance(flat, jax.sharding.Sharding) else flat[key]
            return jax.device_put(x, sh)

        state = jax.tree_util.tree_map_with_path(place, state)
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------- writing
def _hf_tensors(model: Any) -> tuple[dict[str, np.ndarray], str, ModelConfig, int | None]:
    from mojax.models.config import architecture_prefix
    from mojax.models.heads import LlamaRewardModel
    from mojax.models.llama import LlamaForCausalLM
    from mojax.models.lora import lora_config, merge_lora

    config: ModelConfig = model.config
    prefix = architecture_prefix(config.model_type)
    if isinstance(model, LlamaForCausalLM):
        head, arch, n = "lm_head", f"{prefix}ForCausalLM", None
    elif isinstance(model, LlamaRewardModel):
        head, arch, n = "score", f"{prefix}ForSequenceClassification", model.num_labels
    else:
        raise TypeError(f"save_pretrained supports LlamaForCausalLM and LlamaRewardModel, got {type(model).__name__}")
    if lora_config(model) is not None:  # LoRA: export the merged weights, leave the model as it is
        model = merge_lora(nnx.clone(model))
    rules = _rules(config, head)
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = tuple(str(k) for k in path)
        name, kind, stacked = rules[key]
        x = np.asarray(jax.device_get(var.get_value()))
        layers = [x[i] for i in range(x.shape[0])] if stacked else [x]
        for i, w in enumerate(layers):
            if kind == "linear":
                w = w.T
            elif kind == "heads":
                d, nh, hd = w.shape
                w = w.transpose(1, 2, 0).reshape(nh * hd, d)
            elif kind == "o":
                nh, hd, d = w.shape
                w = w.transpose(2, 0, 1).reshape(d, nh * hd)
            elif kind == "head_bias":
                w = w.reshape(-1)
            out[name.format(i=i) if stacked else name] = np.ascontiguousarray(w)
    return out, arch, config, n


def _write_generation_config(path: str, hf_config: dict[str, Any], overrides: Any) -> None:
    """``generation_config.json``: the special token ids of `hf_config`, then the fields of `overrides`."""
    if overrides is not None and not isinstance(overrides, Mapping):
        if not hasattr(overrides, "to_diff_dict"):
            raise TypeError(
                message(
                    "save_pretrained",
                    "generation_config",
                    f"is a {type(overrides).__name__}",
                    "a dict or a transformers.GenerationConfig",
                )
            )
        overrides = overrides.to_diff_dict()
    fields = {key: hf_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    fields.update(overrides or {})
    with open(os.path.join(path, GENERATION_CONFIG), "w", encoding="utf-8") as f:
        json.dump(fields, f, indent=2, sort_keys=True)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse max_shard_size {size!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def save_pretrained(
    model: Any,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    generation_config: Any = None,
    max_shard_size: int | str | None = None,
) -> None:
    """Write a whole HF folder that ``transformers`` and :func:`load_causal_lm` / :func:`load_reward_model` load.

    ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json`` when
    ``max_shard_size`` is exceeded), parameters in their stored dtype (``param_dtype``); the
    tokenizer files with its chat template; for a causal LM, ``generation_config.json``.

    Args:
      model: a ``LlamaForCausalLM`` or ``LlamaRewardModel``.
      path: the folder (created if needed).
      tokenizer: a ``transformers`` tokenizer (e.g. from :func:`mojax.models.load_tokenizer`), saved
        with ``save_pretrained`` beside the weights so the folder round-trips whole.
      generation_config: a dict or a ``transformers.GenerationConfig`` whose fields are written into
        ``generation_config.json`` over the model config's ``bos_token_id``, ``eos_token_id`` and
        ``pad_token_id``.
      max_shard_size: bytes (int) or a size such as ``"2GB"``; None writes one file.

    References:
      Wolf et al., "Transformers: State-of-the-Art Natural Language Processing", EMNLP (System
      Demonstrations), 2020, arXiv 1910.03771 (the folder layout).
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors, arch, config, num_labels = _hf_tensors(model)
    cfg = config.to_hf_dict()
    cfg["architectures"] = [arch]
    if num_labels is not None:
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if arch == "LlamaForCausalLM":
        _write_generation_config(path, cfg, generation_config)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    for stale in (SAFE_WEIGHTS, SAFE_INDEX):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    meta = {"format": "pt"}
    total = sum(t.nbytes for t in tensors.values())
    limit = None if max_shard_size is None else _parse_size(max_shard_size)
    if limit is None or total <= limit:
        save_file(tensors, os.path.join(path, SAFE_WEIGHTS), metadata=meta)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        if shards[-1] and size + t.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata=meta)
        weight_map.update({n: fname for n in shard})
    with open(os.path.join(path, SAFE_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
