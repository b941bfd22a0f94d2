"""The tiny task's character tokenizer, and its version padded to a wider model vocabulary."""

import pytest

from mojax.rl.tiny import ALPHABET, SPECIAL_TOKENS, character_tokenizer, tiny_tokenizer

WIDTH = len(SPECIAL_TOKENS) + len(ALPHABET)


def test_the_padded_tokenizer_encodes_as_the_tiny_one_and_decodes_every_id():
    padded = character_tokenizer(100)
    assert len(padded) == 100 and len(tiny_tokenizer()) == WIDTH
    text = "hello, world!"
    assert padded(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]
    assert padded.decode([99, 3, WIDTH]) == f"<t99>a<t{WIDTH}>"  # a placeholder decodes to text, never raises


def test_the_padded_tokenizer_rejects_a_vocabulary_narrower_than_the_characters():
    with pytest.raises(ValueError, match=f"at least the {WIDTH} characters"):
        character_tokenizer(WIDTH - 1)
