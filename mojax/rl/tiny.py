"""The tiny task: a character-level tokenizer, a tiny random LLaMA and prompts, built locally with no download.

One shared constructor for the tests, the demo and the examples. The tokenizer is a
``transformers.PreTrainedTokenizerFast`` whose vocabulary is the special tokens ``<pad>`` (0), ``<bos>`` (1),
``<eos>`` (2) followed by :data:`ALPHABET`, one token per character, so any string over the alphabet round-trips.
The prompts are short strings of letters; the tiny task's objectives (see ``mojax/rl/configs/tiny.yaml``) are
programmatic rewards over the completions that conflict by construction: the fraction of one set of letters against
the fraction of another, and length.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from mojax.models.config import ModelConfig

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?"
"""The characters of the tiny vocabulary, after the three special tokens."""
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@functools.cache
def tiny_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` over :data:`ALPHABET` with ``<pad>``, ``<bos>``, ``<eos>``.

    Returns:
      The tokenizer (cached: every call returns the same object). It adds no special tokens when encoding.

    Example:
      >>> tok = tiny_tokenizer()
      >>> tok("abc")["input_ids"]
      [3, 4, 5]
      >>> tok.decode([3, 4, 5, 2], skip_special_tokens=True)
      'abc'
    """
    return character_tokenizer()


def character_tokenizer(vocab_size: int | None = None) -> Any:
    """:func:`tiny_tokenizer`'s tokenizer (a new object), with placeholder tokens ``<t34>``, ``<t35>``, ... filling
    the ids up to ``vocab_size`` when given: for a model of a wider vocabulary (SmolLM2's shapes with random weights)
    that samples any id while the tiny task's prompts and rewards read characters. Encoding never produces a
    placeholder; decoding writes it out.

    Raises:
      ValueError: ``vocab_size`` is smaller than the special tokens and characters.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = (*SPECIAL_TOKENS, *ALPHABET)
    vocab_size = len(tokens) if vocab_size is None else vocab_size
    if vocab_size < len(tokens):
        raise ValueError(
            f"vocab_size must be at least the {len(tokens)} characters and special tokens; got {vocab_size}"
        )
    vocab = {token: index for index, token in enumerate(tokens)}
    vocab.update({f"<t{index}>": index for index in range(len(tokens), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """The tiny LLaMA for the tiny task: ``ModelConfig.tiny`` with the character vocabulary (34 tokens).

    Args:
      **overrides: fields of :class:`mojax.models.ModelConfig` to change.

    Returns:
      A ``ModelConfig`` whose special token ids match :func:`tiny_tokenizer`.
    """
    fields = dict(
        vocab_size=len(SPECIAL_TOKENS) + len(ALPHABET), pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID
    )
    return ModelConfig.tiny(**{**fields, **overrides})


def tiny_prompts(count: int, *, seed: int = 0, min_length: int = 3, max_length: int = 8) -> list[dict[str, str]]:
    """`count` prompt rows ``{"prompt": ...}``: random lowercase words of min_length..max_length letters.

    Args:
      count: number of rows.
      seed: the random seed (the same seed gives the same prompts).
      min_length: shortest prompt, in characters.
      max_length: longest prompt, in characters.

    Returns:
      A list of dicts with one key, ``"prompt"``.
    """
    rng = random.Random(seed)
    letters = ALPHABET[:26]
    return [
        {"prompt": "".join(rng.choice(letters) for _ in range(rng.randint(min_length, max_length)))}
        for _ in range(count)
    ]
