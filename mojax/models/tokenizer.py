"""Tokenizers of local checkpoints (HF folders, GGUF files) and the tokens that end a chat turn.

:func:`load_tokenizer` reads an HF folder's tokenizer files, or the tokenizer that a GGUF file
carries in its ``tokenizer.ggml.*`` metadata (vocabulary, merges, special token ids) through
``transformers``' own GGUF conversion, which keeps the file's ``tokenizer.chat_template``. The
conversion reads the whole vocabulary through the ``gguf`` package (about 3 s for SmolLM2's 49k
tokens), so its result is kept as an HF tokenizer folder in ``$MOJAX_TOKENIZER_CACHE`` (default
``<mojax cache>/tokenizers``; ``off`` keeps nothing) and read from there (0.1 s) while the file,
``transformers`` and ``tokenizers`` stay the same (:func:`converted_tokenizer_folder`).

:func:`end_of_turn_token_id` reads the end-of-turn token off the chat template itself: it renders
a user turn and an assistant turn whose content is a marker, and takes the token that the template
writes right after the marker when that token is a special one (``<|im_end|>`` for ChatML,
``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma, ``</s>`` for Llama 2).

transformers is imported only when :func:`load_tokenizer` loads a tokenizer, and its ``AutoTokenizer`` (whose
import takes transformers' model configuration, and torch where installed) only for a folder of another class than
``PreTrainedTokenizerFast`` or a conversion; the other functions call methods of the tokenizer they are given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mojax._cache_dir import cache_dir
from mojax._checks import message
from mojax.models.gguf import array_view_reader, gguf_file_in

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
"""Files whose presence makes a folder an HF tokenizer folder."""

_TURN_MARKER = "mojaxturnmarker"

TOKENIZER_CACHE_ENV = "MOJAX_TOKENIZER_CACHE"
"""The environment variable naming the folder of converted GGUF tokenizers (``off``: keep none)."""


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The fast tokenizer of an HF folder or of a GGUF file, offline.

    Args:
      path: an HF folder with tokenizer files (``tokenizer.json``, ...), a ``.gguf`` file, or a
        folder holding exactly one ``.gguf`` file.

    Returns:
      A ``transformers.PreTrainedTokenizerFast`` with the checkpoint's special tokens and chat
      template.

    Raises:
      FileNotFoundError: `path` holds no tokenizer.
      ValueError: the GGUF file carries no tokenizer (no ``tokenizer.ggml.model`` metadata).

    References:
      Wolf et al., "Transformers: State-of-the-Art Natural Language Processing", EMNLP (System
      Demonstrations), 2020, arXiv 1910.03771.

    Example:
      >>> import os, tempfile
      >>> from tokenizers import Tokenizer, models, pre_tokenizers
      >>> from transformers import PreTrainedTokenizerFast
      >>> folder = tempfile.mkdtemp()
      >>> words = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
      >>> words.pre_tokenizer = pre_tokenizers.Whitespace()
      >>> PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(folder)[0][-21:]
      'tokenizer_config.json'
      >>> load_tokenizer(folder)("hello world")["input_ids"]
      [1, 2]
    """
    path = os.fspath(path)
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name)) for name in HF_TOKENIZER_FILES):
        return _from_folder(path)
    gguf_path = gguf_file_in(path)
    if gguf_path is None:
        raise FileNotFoundError(
            message(
                "load_tokenizer", "path", f"{path!r} holds no tokenizer", f"one of {HF_TOKENIZER_FILES} or a .gguf file"
            )
        )
    kept = converted_tokenizer_folder(gguf_path)
    if kept is not None and (kept / "tokenizer.json").is_file():
        return _from_folder(kept)
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except KeyError as error:  # transformers' GGUF conversion looks the tokenizer fields up by name
        _require_gguf_tokenizer(gguf_path, error)
        raise
    if kept is not None:
        _keep(tokenizer, kept)
    return tokenizer


def _from_folder(folder: str | os.PathLike) -> Any:
    """The tokenizer of an HF folder: through ``PreTrainedTokenizerFast`` itself when that is the class its
    ``tokenizer_config.json`` names (as for every tokenizer converted from a GGUF file), else ``AutoTokenizer``,
    whose import also imports transformers' model configuration and, through it, torch where torch is installed
    (1.2 s)."""
    from transformers import PreTrainedTokenizerFast

    config = Path(folder) / "tokenizer_config.json"
    named = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if named == PreTrainedTokenizerFast.__name__:
        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def converted_tokenizer_folder(gguf_path: str | os.PathLike) -> Path | None:
    """Where :func:`load_tokenizer` keeps the HF tokenizer converted from the GGUF file `gguf_path`; None when
    ``$MOJAX_TOKENIZER_CACHE`` is ``off``.

    The folder is named after the file's absolute path, size and modification time and the versions of
    ``transformers`` (the conversion) and ``tokenizers`` (the saved format), so a rewritten file or another
    version converts afresh.
    """
    import tokenizers
    import transformers

    root = os.environ.get(TOKENIZER_CACHE_ENV) or str(cache_dir() / "tokenizers")
    if root == "off":
        return None
    path = os.path.abspath(gguf_path)
    stat = os.stat(path)
    identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{tokenizers.__version__}"
    return Path(root).expanduser() / hashlib.sha256(identity.encode()).hexdigest()[:32]


def _keep(tokenizer: Any, folder: Path) -> None:
    """Save `tokenizer` as an HF folder at `folder`, whole or not at all (written beside it, then renamed); a
    folder that cannot be written, or that another process wrote first, is left as it is."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent)
    except OSError:
        return
    try:
        tokenizer.save_pretrained(scratch)
        os.rename(scratch, folder)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)


def _require_gguf_tokenizer(path: str, error: Exception) -> None:
    """ValueError from `error` when the GGUF file carries no tokenizer (``tokenizer.ggml.model`` and its tokens)."""
    fields = array_view_reader()(path).fields
    missing = [key for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if key not in fields]
    if missing:
        raise ValueError(
            message(
                "load_tokenizer",
                "path",
                f"{path!r} is a GGUF file without a tokenizer (no {', '.join(missing)})",
                "a GGUF file with tokenizer.ggml.* metadata, or an HF folder with tokenizer files",
            )
        ) from error


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The special token that the chat template writes at the end of an assistant turn, or None.

    Args:
      tokenizer: a ``transformers`` tokenizer.

    Returns:
      Its id; None when the tokenizer has no chat template, the template refuses a user turn
      followed by an assistant turn, or the text after the assistant's content does not start
      with a special token.

    References:
      Wolf et al., "Transformers: State-of-the-Art Natural Language Processing", EMNLP (System
      Demonstrations), 2020, arXiv 1910.03771 (chat templates).
    """
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_MARKER}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except (TemplateError, ValueError):
        return None
    after = text.split(_TURN_MARKER, 1)[-1].lstrip() if _TURN_MARKER in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return int(ids[0]) if ids and ids[0] in special else None


def chat_stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a chat reply: the tokenizer's eos token and the chat template's end of turn.

    Args:
      tokenizer: a ``transformers`` tokenizer.

    Returns:
      Distinct ids, eos first; empty when the tokenizer has neither.

    References:
      Wolf et al., "Transformers: State-of-the-Art Natural Language Processing", EMNLP (System
      Demonstrations), 2020, arXiv 1910.03771 (chat templates).
    """
    found = (getattr(tokenizer, "eos_token_id", None), end_of_turn_token_id(tokenizer))
    return tuple(dict.fromkeys(int(i) for i in found if i is not None))
