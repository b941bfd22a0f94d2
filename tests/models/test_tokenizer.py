"""Tokenizers from HF folders and GGUF files, and the end-of-turn token read off a chat template (offline)."""

import os

import pytest
from gguf_fixtures import hf_weights, write_llama_gguf
from hf_fixtures import save_tiny_tokenizer

from mojax.models import (
    ModelConfig,
    chat_stop_token_ids,
    converted_tokenizer_folder,
    end_of_turn_token_id,
    load_tokenizer,
)

pytest.importorskip("gguf")

TEXTS = ["the quick brown fox jumps", "A helpful, harmless assistant!", "rewards  balance\nobjectives"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def original(folder):
    """A byte-level BPE tokenizer with ChatML special tokens and template, saved as an HF folder."""
    tokenizer = save_tiny_tokenizer(folder / "scratch")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder / "hf")
    return tokenizer


@pytest.fixture(scope="module")
def gguf_file(folder, original):
    config = ModelConfig.tiny(vocab_size=len(original), num_hidden_layers=1)
    _, weights = hf_weights(config, folder / "weights")
    return write_llama_gguf(folder / "chat.gguf", config, weights, tokenizer=original)


def test_hf_folder_tokenizer_equals_the_original(folder, original):
    loaded = load_tokenizer(folder / "hf")
    for text in TEXTS:
        assert loaded(text)["input_ids"] == original(text)["input_ids"]
    assert loaded.chat_template == CHATML


def test_gguf_tokenizer_equals_the_original_and_keeps_the_chat_template(gguf_file, original):
    loaded = load_tokenizer(gguf_file)
    for text in TEXTS:
        assert (
            loaded(text, add_special_tokens=False)["input_ids"] == original(text, add_special_tokens=False)["input_ids"]
        )
    assert loaded.chat_template == CHATML
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    chat = [{"role": "user", "content": "hi"}]
    rendered = loaded.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert (
        loaded(rendered, add_special_tokens=False)["input_ids"]
        == original(rendered, add_special_tokens=False)["input_ids"]
    )
    assert end_of_turn_token_id(loaded) == original.convert_tokens_to_ids("<|im_end|>")


def _same_tokenizer(loaded, expected) -> None:
    """The same vocabulary, merges, normalisation and post-processing, special tokens, template and encodings."""
    assert type(loaded) is type(expected)
    assert loaded.backend_tokenizer.to_str() == expected.backend_tokenizer.to_str()
    assert loaded.special_tokens_map == expected.special_tokens_map
    assert loaded.chat_template == expected.chat_template
    for text in [*TEXTS, "<|im_start|>hi<|im_end|>"]:
        assert loaded(text)["input_ids"] == expected(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == expected.decode(expected(text)["input_ids"])


@pytest.mark.parametrize("add_bos_token", [False, True])
def test_a_gguf_tokenizer_is_converted_once_then_read_from_the_cache(
    folder, original, tmp_path, monkeypatch, add_bos_token
):
    import gguf

    config = ModelConfig.tiny(vocab_size=len(original), num_hidden_layers=1)
    _, weights = hf_weights(config, tmp_path / "weights")
    path = write_llama_gguf(tmp_path / "t.gguf", config, weights, tokenizer=original, add_bos_token=add_bos_token)
    monkeypatch.setenv("MOJAX_TOKENIZER_CACHE", str(tmp_path / "kept"))
    converted = load_tokenizer(path)
    assert (converted_tokenizer_folder(path) / "tokenizer.json").is_file()
    assert (converted("hi")["input_ids"][0] == converted.bos_token_id) == add_bos_token

    def no_gguf_read(*args, **kwargs):
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", no_gguf_read)  # mojax's reader, a subclass, too
    _same_tokenizer(load_tokenizer(path), converted)


def test_a_kept_tokenizer_loads_without_transformers_auto_classes(gguf_file, tmp_path):
    """In a fresh process the conversion imports ``AutoTokenizer`` (and with it transformers' model configuration,
    and torch where installed); the kept folder, of class ``PreTrainedTokenizerFast``, loads without it."""
    import subprocess
    import sys

    code = (
        "import sys; from mojax.models import load_tokenizer; tokenizer = load_tokenizer(sys.argv[1]); "
        "print('transformers.models.auto.tokenization_auto' in sys.modules, tokenizer.chat_template is not None)"
    )
    env = {**os.environ, "MOJAX_TOKENIZER_CACHE": str(tmp_path / "kept")}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code, str(gguf_file)], env=env, capture_output=True, text=True, check=True
        )
        for _ in range(2)
    ]
    assert [output.stdout.split() for output in outputs] == [["True", "True"], ["False", "True"]]


def test_a_rewritten_gguf_file_is_converted_again(folder, original, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("MOJAX_TOKENIZER_CACHE", str(tmp_path / "kept"))
    path = tmp_path / "chat.gguf"
    shutil.copy(folder / "chat.gguf", path)
    first = converted_tokenizer_folder(path)
    assert load_tokenizer(path).chat_template == CHATML
    plain = save_tiny_tokenizer(tmp_path / "plain")  # no chat template
    config = ModelConfig.tiny(vocab_size=len(plain), num_hidden_layers=1)
    _, weights = hf_weights(config, tmp_path / "weights")
    write_llama_gguf(path, config, weights, tokenizer=plain)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))  # even on a coarse clock
    assert converted_tokenizer_folder(path) != first
    assert load_tokenizer(path).chat_template is None


def test_off_keeps_no_converted_tokenizer(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MOJAX_TOKENIZER_CACHE", "off")
    monkeypatch.setenv("MOJAX_CACHE", str(tmp_path))
    assert converted_tokenizer_folder(gguf_file) is None
    assert load_tokenizer(gguf_file).chat_template == CHATML
    assert list(tmp_path.iterdir()) == []


def test_the_default_folder_is_in_the_mojax_cache(gguf_file, tmp_path, monkeypatch):
    monkeypatch.delenv("MOJAX_TOKENIZER_CACHE", raising=False)
    monkeypatch.setenv("MOJAX_CACHE", str(tmp_path))
    assert converted_tokenizer_folder(gguf_file).parent == tmp_path / "tokenizers"


def test_gguf_without_a_tokenizer_is_a_clear_error(folder):
    config = ModelConfig.tiny(num_hidden_layers=1)
    _, weights = hf_weights(config, folder / "bare-weights")
    path = write_llama_gguf(folder / "bare.gguf", config, weights)
    with pytest.raises(ValueError, match="GGUF file without a tokenizer.*tokenizer.ggml.model"):
        load_tokenizer(path)


def test_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


def test_end_of_turn_is_the_special_token_after_the_assistant_content(original):
    im_end = original.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_token_id(original) == im_end
    assert chat_stop_token_ids(original) == (2, im_end)


@pytest.mark.parametrize(
    "template",
    [None, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", "{{ raise_exception('no') }}"],
)
def test_no_end_of_turn_without_a_special_token_after_the_turn(original, template):
    """No template, a template ending turns with plain text, or one that refuses the conversation."""
    tokenizer = original.__class__(tokenizer_object=original.backend_tokenizer, eos_token="</s>")
    tokenizer.chat_template = template
    assert end_of_turn_token_id(tokenizer) is None
    assert chat_stop_token_ids(tokenizer) == (2,)


def test_the_gguf_load_benchmark_times_both_readers_and_the_kept_folder(gguf_file, tmp_path, monkeypatch):
    """``benchmarks/gguf_load.py``: per round both readers, the conversion alone and the first load on an empty folder
    parse the GGUF file (mojax's reader is a subclass of ``gguf.GGUFReader``: its parse counts too), the third load
    reads the folder; both readers parse the same, and every load gives the same tokenizer."""
    from pathlib import Path

    import gguf
    from script_module import load_script

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gguf_load.py"
    parses = []
    parse = gguf.GGUFReader.__init__
    monkeypatch.setattr(
        gguf.GGUFReader, "__init__", lambda *args, **kwargs: parses.append(args) or parse(*args, **kwargs)
    )
    monkeypatch.setenv("MOJAX_TOKENIZER_CACHE", str(tmp_path / "unused"))
    report = load_script(script, "gguf_load_benchmark").main(
        ["--gguf", str(gguf_file), "--rounds", "2", "--out", str(tmp_path)]
    )
    assert len(parses) == 8
    assert report["same_header"] and report["same_tokenizer"] and len(report["rounds"]) == 2
    assert set(report["summary"]) == {
        "header: gguf.GGUFReader",
        "header: mojax's reader",
        "tokenizer: converted",
        "tokenizer: converted and kept",
        "tokenizer: kept",
    }
    table = (tmp_path / "gguf_load.md").read_text()
    assert "| tokenizer: kept | " in table and "Every tokenizer load gave the same tokenizer: yes." in table
    assert not (tmp_path / "unused").exists()
