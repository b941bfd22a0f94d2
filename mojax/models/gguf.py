"""GGUF import: a llama-architecture GGUF file (llama.cpp's format) read as a config and float tensors.

How the format was read (the GGUF specification in the ggml repository, and the tensors and
metadata that llama.cpp's ``convert_hf_to_gguf.py`` writes for ``LlamaForCausalLM``):

* metadata: ``general.architecture`` must be ``llama``; the maths comes from the ``llama.*`` keys
  (``block_count``, ``embedding_length``, ``feed_forward_length``, ``attention.head_count``,
  ``attention.head_count_kv``, ``attention.key_length``, ``rope.dimension_count``,
  ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``, ``context_length``, ``vocab_size``,
  else the length of ``tokenizer.ggml.tokens``) and the special tokens from
  ``tokenizer.ggml.{bos,eos,padding,unknown}_token_id`` (the end-of-turn ids ``eot_token_id`` and
  ``eom_token_id`` join the eos ids). Floats are stored as float32; their shortest float32
  decimal is kept (``1e-05``, not ``9.99999974737875e-06``). RoPE scaling (``rope.scaling.type``
  other than ``none``, or llama3 factors in a ``rope_freqs.weight`` tensor), partial rotary
  dimensions and mixtures of experts change the maths and are rejected by name.
* tensor names: ``token_embd``, ``output_norm``, ``output`` and ``blk.{i}.{attn_norm, attn_q,
  attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`` are renamed to their HF
  names; without ``output.weight`` the embeddings are tied.
* layout: GGUF lists dimensions innermost first, so a tensor in numpy order is HF's
  ``[out, in]``. The converter reorders the rows of each q and k head from HF's rotate-half layout
  (first half, second half) to interleaved pairs, for llama.cpp's RoPE on adjacent elements:
  :func:`unpermute_rotary_rows` puts them back.
* values: dequantized to float32 by ``gguf.quants.dequantize``, whole rows at a time, so a device
  shard reads only its own rows. Each row of a block format holds whole blocks (32 values for
  Q8_0, Q4_0, Q4_1; 256 for the K-quants).

The ``gguf`` package (the optional ``[gguf]`` extra, pure Python) is imported when a file is opened.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import numpy as np

from mojax._checks import message
from mojax.models.config import ModelConfig

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
"""GGML tensor types that :class:`GGUFFile` dequantizes."""

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROTARY_PROJECTIONS = re.compile(r"model\.layers\.\d+\.self_attn\.(q|k)_proj\.(weight|bias)")
_REQUIRED_KEYS = tuple(
    f"llama.{name}"
    for name in (
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.layer_norm_rms_epsilon",
    )
)


def hf_tensor_name(gguf_name: str) -> str:
    """The HF name of a llama GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``).

    Names without an HF counterpart are returned unchanged, so that a loader can report them.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    return gguf_name


def unpermute_rotary_rows(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order of q/k weights: interleaved pairs back to HF's two halves.

    Args:
      rows: f32[N * head_dim, ...], the rows of N whole heads, each in llama.cpp's order
        ``(x0, y0, x1, y1, ...)``.
      head_dim: rows per head (even).

    Returns:
      The same rows in HF's order ``(x0, x1, ..., y0, y1, ...)`` per head.

    References:
      Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", Neurocomputing,
      2024, arXiv 2104.09864 (rotation of pairs); HF LLaMA rotates the two halves of each head.
    """
    heads = rows.shape[0] // head_dim
    paired = rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:])
    return paired.swapaxes(1, 2).reshape(rows.shape)


def gguf_file_in(path: str | os.PathLike) -> str | None:
    """The GGUF file that `path` names: the file itself, or the only ``*.gguf`` of a folder.

    A folder that holds safetensors weights is an HF folder: its safetensors win over any GGUF
    file beside them, and None is returned, as for a folder without GGUF files.

    Args:
      path: a ``.gguf`` file or a folder.

    Returns:
      The path of the GGUF file, or None when `path` is not one and holds none.

    Raises:
      ValueError: the folder holds several GGUF files and no safetensors (names them).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    if any(name.endswith(".safetensors") or name == "model.safetensors.index.json" for name in names):
        return None
    found = [name for name in names if name.endswith(".gguf")]
    if len(found) > 1:
        raise ValueError(
            message(
                "gguf_file_in", "path", f"{path!r} holds several GGUF files {found}", "one, or the path of the file"
            )
        )
    return os.path.join(path, found[0]) if found else None


@functools.cache
def array_view_reader() -> type:
    """``gguf.GGUFReader`` over a plain ``ndarray`` view of its memory map.

    The reader slices its ``data`` once per header value while it parses the file, hundreds of thousands of times for
    a vocabulary of 49k tokens and merges; a slice of an ``np.memmap`` runs Python code (``__array_finalize__``) that
    a slice of an ``ndarray`` does not (SmolLM2's file: 2.2 s against 0.7 s). The view reads the same mapped pages,
    and the memory map stays open as its base.
    """
    import gguf

    class ArrayViewReader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._array

        @data.setter
        def data(self, mapped: np.memmap) -> None:
            self._array = mapped.view(np.ndarray)

    return ArrayViewReader


class GGUFFile:
    """A memory-mapped llama GGUF file: its :class:`ModelConfig` and its tensors as float32, under HF names.

    Opening reads the header only; :meth:`read` dequantizes the requested rows of one tensor.
    Use as a context manager or call :meth:`close`.

    Args:
      path: the ``.gguf`` file.

    Raises:
      ValueError: another architecture than llama, a tensor type outside
        :data:`SUPPORTED_TENSOR_TYPES`, or metadata that changes the maths (each named).

    References:
      G. Gerganov et al., GGUF, the file format of ggml and llama.cpp (ggml repository,
      ``docs/gguf.md``), 2023.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._reader = array_view_reader()(self.path)
        self._tensors = {hf_tensor_name(t.name): t for t in self._reader.tensors}
        self._check_architecture()
        self._check_tensor_types()
        self._check_required_metadata()
        self.config = self._config()

    # ------------------------------------------------------------------ metadata
    def metadata(self, key: str, default: Any = None) -> Any:
        """The value of one metadata key (strings, numbers, lists), or `default` when absent."""
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def has(self, key: str) -> bool:
        """Whether the file holds the metadata key."""
        return key in self._reader.fields

    def _check_architecture(self) -> None:
        architecture = self.metadata("general.architecture")
        if architecture != "llama":
            raise ValueError(
                message("GGUFFile", "path", f"{self.path!r} has general.architecture={architecture!r}", "'llama'")
            )

    def _check_tensor_types(self) -> None:
        unsupported: dict[str, str] = {}
        for tensor in self._reader.tensors:
            if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
                unsupported.setdefault(tensor.tensor_type.name, tensor.name)
        if unsupported:
            seen = ", ".join(f"{kind} (e.g. {name})" for kind, name in sorted(unsupported.items()))
            raise ValueError(
                message(
                    "GGUFFile",
                    "path",
                    f"{self.path!r} holds tensors of unsupported type {seen}",
                    f"tensor types among {', '.join(SUPPORTED_TENSOR_TYPES)}",
                )
            )

    def _check_required_metadata(self) -> None:
        missing = [key for key in _REQUIRED_KEYS if not self.has(key)]
        if missing:
            raise ValueError(message("GGUFFile", "path", f"{self.path!r} lacks {missing}", "every llama.* shape key"))

    def _config(self) -> ModelConfig:
        key = lambda name: f"llama.{name}"  # noqa: E731
        unsupported = _unsupported_maths(self)
        if unsupported:
            raise ValueError(
                message(
                    "GGUFFile",
                    "path",
                    f"{self.path!r} has metadata that changes the maths: {'; '.join(unsupported)}",
                    "plain RoPE on the whole head, one MLP per block",
                )
            )
        heads = int(self.metadata(key("attention.head_count")))
        hidden = int(self.metadata(key("embedding_length")))
        eos = [self.metadata(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
        return ModelConfig(
            vocab_size=self._vocab_size(),
            hidden_size=hidden,
            intermediate_size=int(self.metadata(key("feed_forward_length"))),
            num_hidden_layers=int(self.metadata(key("block_count"))),
            num_attention_heads=heads,
            num_key_value_heads=int(self.metadata(key("attention.head_count_kv"), heads)),
            head_dim=int(self.metadata(key("attention.key_length"), hidden // heads)),
            rms_norm_eps=_float32_decimal(self.metadata(key("attention.layer_norm_rms_epsilon"))),
            rope_theta=_float32_decimal(self.metadata(key("rope.freq_base"), 10000.0)),
            max_position_embeddings=int(self.metadata(key("context_length"))),
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            bos_token_id=self.metadata("tokenizer.ggml.bos_token_id"),
            eos_token_id=_eos_ids(eos),
            pad_token_id=self.metadata("tokenizer.ggml.padding_token_id"),
            unk_token_id=self.metadata("tokenizer.ggml.unknown_token_id"),
        )

    def _vocab_size(self) -> int:
        if self.has("llama.vocab_size"):
            return int(self.metadata("llama.vocab_size"))
        if self.has("tokenizer.ggml.tokens"):
            return len(self._reader.fields["tokenizer.ggml.tokens"].data)
        return int(self.shape("model.embed_tokens.weight")[0])

    # ------------------------------------------------------------------ tensors
    def names(self) -> set[str]:
        """HF names of every tensor in the file."""
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape in numpy (HF) order: ``[out, in]`` for a linear weight."""
        return tuple(int(n) for n in reversed(self._tensors[name].shape))

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """f32 block ``index`` (unit-stride slices, HF layout) of tensor `name`, dequantized, q/k rows unpermuted."""
        import gguf

        tensor, shape = self._tensors[name], self.shape(name)
        start, stop, _ = (index[0] if index else slice(None)).indices(shape[0])
        period = self.config.head_dim if _ROTARY_PROJECTIONS.fullmatch(name) else 1
        low, high = start // period * period, -(-stop // period) * period
        if len(shape) == 1:
            rows = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)[low:high]
        else:
            rows = gguf.quants.dequantize(tensor.data[low:high], tensor.tensor_type)
            rows = rows.reshape((high - low, *shape[1:]))
        if period > 1:
            rows = unpermute_rotary_rows(rows, period)
        return np.asarray(rows[(slice(start - low, stop - low), *index[1:])], np.float32)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r})"

    def close(self) -> None:
        """Release the memory map."""
        self._tensors = {}
        self._reader = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _unsupported_maths(file: GGUFFile) -> list[str]:
    """Descriptions of the llama.* metadata and tensors that would change the maths mojax implements."""
    out = []
    scaling = file.metadata("llama.rope.scaling.type", "none")
    if scaling != "none":
        out.append(f"llama.rope.scaling.type={scaling!r}")
    if "rope_freqs.weight" in file.names():
        out.append("rope_freqs.weight (llama3 RoPE factors)")
    if file.metadata("llama.expert_count", 0):
        out.append(f"llama.expert_count={file.metadata('llama.expert_count')} (mixture of experts)")
    heads = file.metadata("llama.attention.head_count")
    hidden = file.metadata("llama.embedding_length")
    if isinstance(heads, list):
        out.append("llama.attention.head_count varies per layer")
        return out
    head_dim = file.metadata("llama.attention.key_length", hidden // heads)
    value_dim = file.metadata("llama.attention.value_length", head_dim)
    rotary = file.metadata("llama.rope.dimension_count", head_dim)
    if value_dim != head_dim:
        out.append(f"llama.attention.value_length={value_dim} != key_length={head_dim}")
    if rotary != head_dim:
        out.append(f"llama.rope.dimension_count={rotary} rotates part of a head of {head_dim}")
    return out


def _float32_decimal(value: float) -> float:
    """The shortest decimal of a float32 (the value the converter wrote, e.g. 1e-05)."""
    return float(str(np.float32(value)))


def _eos_ids(ids: list[Any]) -> int | tuple[int, ...] | None:
    """One id, a tuple of distinct ids in order, or None."""
    distinct = tuple(dict.fromkeys(int(i) for i in ids if i is not None))
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else distinct


def read_gguf_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a llama GGUF file, from its metadata.

    Args:
      path: a ``.gguf`` file.
      **overrides: fields to replace, e.g. ``dtype`` and ``param_dtype``.

    Returns:
      The config; ``tie_word_embeddings`` is true when the file has no ``output.weight``.

    References:
      G. Gerganov et al., GGUF, the file format of ggml and llama.cpp (ggml repository,
      ``docs/gguf.md``), 2023.
    """
    with GGUFFile(path) as file:
        return file.config.replace(**overrides) if overrides else file.config
