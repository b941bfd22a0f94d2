"""Prompt and preference datasets through the ``datasets`` library, offline.

A source is a built-in name (``mojax.data.SOURCES``), a local ``.jsonl`` / ``.json`` / ``.parquet``
file (read with ``datasets.load_dataset("json" | "parquet", data_files=...)``, which needs no hub), an
in-memory list of dicts, or a ``datasets.Dataset``. Rows then go through the same steps:

1. the prompt column (or the pair columns) is renamed to ``prompt`` (``chosen``, ``rejected``) and
   checked; every other column is kept, since the trainer hands dataset columns to reward functions
   as keyword arguments;
2. with an integer ``seed`` the rows are shuffled, then ``split`` slices them with the ``datasets``
   split syntax over the single split ``train`` (``"train[:90%]"``, ``"train[-100:]"``), then the
   first ``limit`` rows are kept. Slices taken with the same seed are disjoint;
3. with ``chat_template=True`` each prompt becomes
   ``tokenizer.apply_chat_template([system?, user], add_generation_prompt=True, tokenize=False)``;
   chosen and rejected stay plain completions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from mojax._checks import integer, message
from mojax.data.sources import SOURCES, review_openings, source_rows

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

DataSource = str | os.PathLike | Sequence[Mapping[str, Any]] | datasets.Dataset


def _builtin_prompts(name: str, cache_dir: str | os.PathLike | None) -> list[dict[str, Any]]:
    """A built-in source's rows with a prompt column (movie reviews become continuation prompts)."""
    rows = source_rows(name, cache_dir=cache_dir)
    return review_openings(rows) if name == "movie_reviews" else rows


def _as_dataset(
    where: str, source: DataSource, *, builtins: bool, cache_dir: str | os.PathLike | None
) -> datasets.Dataset:
    """The source's rows as one `datasets.Dataset` (its only split, 'train')."""
    if isinstance(source, datasets.Dataset):
        return source
    if builtins and isinstance(source, str) and source in SOURCES:
        return datasets.Dataset.from_list(_builtin_prompts(source, cache_dir))
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        kind = _FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            names = f"a built-in name ({', '.join(SOURCES)}), " if builtins else ""
            expected = f"{names}a .jsonl, .json or .parquet file, or a list of dicts"
            raise ValueError(message(where, "source", f"is {str(source)!r}", expected))
        if not path.is_file():
            raise FileNotFoundError(
                message(where, "source", f"is {str(path)!r}, which is not a file", "an existing file")
            )
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    if isinstance(source, Sequence) and all(isinstance(row, Mapping) for row in source):
        return datasets.Dataset.from_list([dict(row) for row in source])
    raise TypeError(message(where, "source", f"is a {type(source).__name__}", "a name, a file path or a list of dicts"))


def _rename(where: str, dataset: datasets.Dataset, mapping: Mapping[str, str], arg: str) -> datasets.Dataset:
    """Rename source columns (mapping: target -> source) and check every target is a string column."""
    found = list(dataset.column_names)
    if len(set(mapping.values())) < len(mapping):
        raise ValueError(message(where, arg, f"maps {dict(mapping)} with a repeated column", "distinct columns"))
    for target, column in mapping.items():
        if column not in found:
            raise ValueError(
                message(
                    where, arg, f"names the {target} column {column!r}, but the columns are {found}", f"one of {found}"
                )
            )
        if column != target and target in found:
            raise ValueError(
                message(where, arg, f"maps {column!r} to {target!r}, which is already a column", "a free target name")
            )
    dataset = dataset.rename_columns({column: target for target, column in mapping.items() if column != target})
    for target in mapping:
        feature = dataset.features[target]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise TypeError(message(where, arg, f"names the {target} column holding {feature}", "a column of strings"))
    return dataset


def _select(where: str, dataset: datasets.Dataset, split: str | None, seed: int | None, limit: int | None):
    """Shuffle (seed), slice (split), truncate (limit), in that order."""
    if seed is not None:
        dataset = dataset.shuffle(seed=integer(where, "seed", seed, minimum=0))
    if split is not None:
        try:
            parts = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(dataset)})
        except (AssertionError, TypeError, ValueError):
            expected = "'train' or a slice of it such as 'train[:90%]' or 'train[100:]'"
            raise ValueError(message(where, "split", f"is {split!r}", expected)) from None
        dataset = dataset.select([index for part in parts for index in range(part.from_, part.to)])
    if limit is not None:
        dataset = dataset.select(range(min(integer(where, "limit", limit, minimum=0), len(dataset))))
    return dataset


def _render(where: str, dataset: datasets.Dataset, tokenizer: Any, chat_template: bool, system_prompt: str | None):
    """Prompts rendered through the tokenizer's chat template (or left alone when chat_template is False)."""
    if not isinstance(chat_template, bool):
        raise TypeError(message(where, "chat_template", f"is a {type(chat_template).__name__}", "a bool"))
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError(message(where, "system_prompt", f"is a {type(system_prompt).__name__}", "a string or None"))
    if not chat_template:
        if system_prompt is not None:
            raise ValueError(message(where, "system_prompt", "is set with chat_template=False", "chat_template=True"))
        return dataset
    if getattr(tokenizer, "chat_template", None) is None:
        seen = "is None" if tokenizer is None else f"({type(tokenizer).__name__}) has no chat_template"
        raise ValueError(message(where, "tokenizer", seen, "a tokenizer with a chat template when chat_template=True"))
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    rendered = [
        tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        for prompt in dataset["prompt"]
    ]
    columns = {name: (rendered if name == "prompt" else dataset[name]) for name in dataset.column_names}
    return datasets.Dataset.from_dict(columns, features=dataset.features)


def load_prompts(
    source: DataSource,
    *,
    split: str | None = None,
    limit: int | None = None,
    seed: int | None = 0,
    prompt_column: str = "prompt",
    tokenizer: Any = None,
    chat_template: bool = False,
    system_prompt: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """A prompt dataset with a ``prompt`` column of strings; every other column is kept.

    Args:
      source: a built-in name (a key of ``SOURCES``; ``"movie_reviews"`` gives review-continuation
        prompts), a ``.jsonl`` / ``.json`` / ``.parquet`` path, a list of dicts, or a ``datasets.Dataset``.
      split: ``"train"`` or a slice of it in the ``datasets`` syntax (``"train[:90%]"``); None keeps all.
      limit: keep at most this many rows (after shuffling and slicing).
      seed: shuffle seed; None keeps the source order.
      prompt_column: the column holding the prompts; renamed to ``prompt``.
      tokenizer: a ``transformers`` tokenizer, needed for ``chat_template=True``.
      chat_template: render each prompt as a user turn through ``tokenizer.apply_chat_template``
        with the generation prompt appended.
      system_prompt: optional system turn placed before the user turn (needs ``chat_template=True``).
      cache_dir: the mojax cache for built-in sources; default ``mojax.data.cache_dir()``.

    Returns:
      A ``datasets.Dataset``.

    Raises:
      ValueError: the prompt column is missing (the message lists the columns found), or an argument
        is out of its domain.

    References:
      Lhoest et al., "Datasets: A Community Library for Natural Language Processing", EMNLP 2021
      (system demonstrations), arXiv 2109.02846.

    Example:
      >>> rows = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}]
      >>> dataset = load_prompts(rows, prompt_column="question", seed=None)
      >>> dataset.column_names, dataset["prompt"][:]
      (['prompt', 'answer'], ['2+2?', '3+3?'])
    """
    where = "load_prompts"
    if not isinstance(prompt_column, str):
        raise TypeError(message(where, "prompt_column", f"is a {type(prompt_column).__name__}", "a column name"))
    dataset = _as_dataset(where, source, builtins=True, cache_dir=cache_dir)
    dataset = _rename(where, dataset, {"prompt": prompt_column}, "prompt_column")
    dataset = _select(where, dataset, split, seed, limit)
    return _render(where, dataset, tokenizer, chat_template, system_prompt)


def load_pairs(
    source: DataSource,
    *,
    split: str | None = None,
    limit: int | None = None,
    seed: int | None = 0,
    columns: Mapping[str, str] | None = None,
    tokenizer: Any = None,
    chat_template: bool = False,
    system_prompt: str | None = None,
) -> datasets.Dataset:
    """A preference dataset with string columns ``prompt``, ``chosen`` and ``rejected``; others are kept.

    Args:
      source: a ``.jsonl`` / ``.json`` / ``.parquet`` path, a list of dicts (e.g. from
        ``synthetic_sentiment_pairs``), or a ``datasets.Dataset``.
      split: ``"train"`` or a slice of it in the ``datasets`` syntax; None keeps all.
      limit: keep at most this many rows (after shuffling and slicing).
      seed: shuffle seed; None keeps the source order.
      columns: where the three columns are in the source, e.g. ``{"chosen": "good", "rejected": "bad"}``;
        missing keys default to their own name.
      tokenizer: a ``transformers`` tokenizer, needed for ``chat_template=True``.
      chat_template: render each prompt through the chat template (the responses stay plain text).
      system_prompt: optional system turn (needs ``chat_template=True``).

    Returns:
      A ``datasets.Dataset``.

    References:
      Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
      NeurIPS 2023, arXiv 2305.18290 (the prompt / chosen / rejected format).

    Example:
      >>> pairs = load_pairs([{"q": "Hi", "good": "Hello!", "bad": "Go away."}], columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
      >>> pairs[0]
      {'prompt': 'Hi', 'chosen': 'Hello!', 'rejected': 'Go away.'}
    """
    where = "load_pairs"
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(PAIR_COLUMNS))
    if unknown or not all(isinstance(column, str) for column in columns.values()):
        raise ValueError(message(where, "columns", f"is {columns!r}", f"a mapping from {PAIR_COLUMNS} to column names"))
    dataset = _as_dataset(where, source, builtins=False, cache_dir=None)
    dataset = _rename(where, dataset, {target: columns.get(target, target) for target in PAIR_COLUMNS}, "columns")
    dataset = _select(where, dataset, split, seed, limit)
    return _render(where, dataset, tokenizer, chat_template, system_prompt)
