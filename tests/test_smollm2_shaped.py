"""benchmarks/smollm2_shaped.py: a random-weight HF folder of SmolLM2-135M's architecture that the trainer loads, with
the tiny task's characters in a tokenizer as wide as the model's vocabulary."""

from pathlib import Path

import pytest
from script_module import load_script

from mojax.models import load_causal_lm, load_tokenizer
from mojax.rl.tiny import ALPHABET, SPECIAL_TOKENS, tiny_tokenizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    return load_script(BENCHMARKS / "smollm2_shaped.py", "smollm2_shaped_benchmark")


def test_padded_tokenizer_encodes_as_the_tiny_tokenizer_and_decodes_every_id():
    tokenizer = _load().padded_character_tokenizer(100)
    assert len(tokenizer) == 100
    text = "hello, world!"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]
    assert tokenizer.decode([99, 3]) == "<t99>a"  # a placeholder id decodes to text, never raises


def test_padded_tokenizer_rejects_a_vocabulary_narrower_than_the_characters():
    with pytest.raises(ValueError, match="at least the 34"):
        _load().padded_character_tokenizer(len(SPECIAL_TOKENS) + len(ALPHABET) - 1)


def test_the_folder_loads_with_smollm2s_architecture(tmp_path):
    _load().main([str(tmp_path), "--layers", "2", "--vocab", "128"])
    model = load_causal_lm(str(tmp_path))
    config = model.config
    shape = (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads)
    assert shape == (576, 1536, 9, 3)
    assert (config.num_hidden_layers, config.vocab_size, config.tie_word_embeddings) == (2, 128, True)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.decode(tokenizer("abc xyz")["input_ids"]) == "abc xyz"
    assert len(tokenizer) == 128
