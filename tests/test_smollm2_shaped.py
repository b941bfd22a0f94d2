"""benchmarks/smollm2_shaped.py: a random-weight HF folder of SmolLM2-135M's architecture that the trainer loads, with
the tiny task's characters in a tokenizer as wide as the model's vocabulary."""

from pathlib import Path

import pytest
from script_module import load_script

from mojax.models import load_causal_lm, load_tokenizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    return load_script(BENCHMARKS / "smollm2_shaped.py", "smollm2_shaped_benchmark")


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


def test_56m_shapes_are_the_model_benchmarks_56m_configuration(tmp_path):
    _load().main([str(tmp_path), "--shapes", "56m", "--layers", "2", "--vocab", "128"])
    config = load_causal_lm(str(tmp_path)).config
    shape = (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads)
    assert shape == (512, 1408, 8, 4)
    assert (config.num_hidden_layers, config.vocab_size, config.tie_word_embeddings) == (2, 128, False)
    assert len(load_tokenizer(str(tmp_path))) == 128


def test_default_sizes_are_the_architectures_own():
    module = _load()
    assert (module.shaped_config("56m").num_hidden_layers, module.shaped_config("56m").vocab_size) == (8, 32000)
    assert (module.shaped_config().num_hidden_layers, module.shaped_config().vocab_size) == (30, 49152)
    with pytest.raises(ValueError, match="shapes must be one of"):
        module.shaped_config("7b")


@pytest.mark.parametrize(
    "shapes, width, expected",
    [("smollm2", 192, (192, 512, 3, 1)), ("smollm2", 1152, (1152, 3072, 18, 6)), ("56m", 128, (128, 352, 2, 1))],
)
def test_width_narrows_the_architecture_keeping_its_head_size_and_ratios(shapes, width, expected):
    config = _load().shaped_config(shapes, layers=1, width=width)
    shape = (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads)
    assert shape == expected and config.head_dim == 64


@pytest.mark.parametrize("width", [0, 96, 200])
def test_a_width_that_splits_a_head_group_is_refused(width):
    with pytest.raises(ValueError, match=f"width must be a positive multiple of 192 .*got {width}"):
        _load().shaped_config(width=width)
