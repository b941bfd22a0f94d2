"""load_prompts and load_pairs: every source kind, column handling, shuffling and slicing, chat templates, errors."""

from __future__ import annotations

import json

import datasets
import pytest

from mojax.data import load_pairs, load_prompts

ROWS = [{"prompt": f"question {index}", "answer": str(index)} for index in range(10)]
PAIRS = [{"q": f"prompt {index}", "good": f"yes {index}", "bad": f"no {index}", "id": index} for index in range(4)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def files(tmp_path):
    """The same rows as a .jsonl, a .json array and a .parquet file."""
    paths = {"jsonl": _jsonl(tmp_path / "rows.jsonl", ROWS), "json": tmp_path / "rows.json"}
    paths["json"].write_text(json.dumps(ROWS))
    paths["parquet"] = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(paths["parquet"]))
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_local_files_load_in_order_with_every_column(files, kind):
    dataset = load_prompts(files[kind], seed=None)
    assert dataset.to_list() == ROWS
    assert load_prompts(str(files[kind]), seed=None).to_list() == ROWS


def test_lists_and_datasets_load_alike():
    assert load_prompts(ROWS, seed=None).to_list() == ROWS
    assert load_prompts(datasets.Dataset.from_list(ROWS), seed=None).to_list() == ROWS


def test_prompt_column_is_renamed_to_prompt():
    rows = [{"question": "2+2?", "answer": "4"}]
    assert load_prompts(rows, prompt_column="question").to_list() == [{"prompt": "2+2?", "answer": "4"}]


def test_missing_prompt_column_names_the_columns_found_and_expected():
    rows = [{"question": "2+2?", "answer": "4"}]
    with pytest.raises(ValueError) as error:
        load_prompts(rows)
    assert str(error.value) == (
        "load_prompts: `prompt_column` names the prompt column 'prompt', but the columns are ['question', 'answer'];"
        " expected one of ['question', 'answer']."
    )
    with pytest.raises(ValueError, match=r"'text', but the columns are \['question', 'answer'\]"):
        load_prompts(rows, prompt_column="text")


def test_prompt_column_cannot_overwrite_an_existing_prompt_column():
    with pytest.raises(ValueError, match=r"maps 'question' to 'prompt', which is already a column"):
        load_prompts([{"question": "a", "prompt": "b"}], prompt_column="question")


def test_prompts_must_be_strings():
    with pytest.raises(TypeError, match=r"load_prompts: `prompt_column` names the prompt column holding .*int64"):
        load_prompts([{"prompt": 3}])


def test_seed_shuffles_reproducibly_and_none_keeps_the_order():
    shuffled = load_prompts(ROWS, seed=3)["prompt"][:]
    assert shuffled == load_prompts(ROWS, seed=3)["prompt"][:]
    assert sorted(shuffled) == sorted(row["prompt"] for row in ROWS)
    assert shuffled != [row["prompt"] for row in ROWS]
    assert load_prompts(ROWS, seed=None)["prompt"][:] == [row["prompt"] for row in ROWS]


def test_slices_with_one_seed_are_disjoint_and_cover_the_rows():
    train = load_prompts(ROWS, split="train[:70%]", seed=5)["prompt"][:]
    test = load_prompts(ROWS, split="train[70%:]", seed=5)["prompt"][:]
    assert (len(train), len(test)) == (7, 3)
    assert train + test == load_prompts(ROWS, seed=5)["prompt"][:]
    assert load_prompts(ROWS, split="train", seed=None).to_list() == ROWS
    assert load_prompts(ROWS, split="train[-2:]", seed=None)["answer"][:] == ["8", "9"]


def test_limit_keeps_the_first_rows_after_shuffling_and_slicing():
    assert load_prompts(ROWS, limit=3, seed=None)["answer"][:] == ["0", "1", "2"]
    assert load_prompts(ROWS, limit=3, seed=4)["prompt"][:] == load_prompts(ROWS, seed=4)["prompt"][:3]
    assert load_prompts(ROWS, split="train[5:]", limit=2, seed=None)["answer"][:] == ["5", "6"]
    assert len(load_prompts(ROWS, limit=100)) == 10


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"split": "test"}, ValueError, r"`split` is 'test'; expected 'train' or a slice of it"),
        ({"split": "train[:abc]"}, ValueError, r"`split` is 'train\[:abc\]'"),
        ({"limit": -1}, ValueError, r"`limit` is -1; expected an integer >= 0"),
        ({"seed": 1.5}, TypeError, r"`seed` is a float"),
        ({"prompt_column": 0}, TypeError, r"`prompt_column` is a int"),
        ({"chat_template": "yes"}, TypeError, r"`chat_template` is a str"),
    ],
)
def test_arguments_are_checked(kwargs, error, pattern):
    with pytest.raises(error, match=f"load_prompts: {pattern}"):
        load_prompts(ROWS, **kwargs)


def test_sources_that_are_neither_names_files_nor_rows_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`source` is 'imdb'; expected a built-in name \(movie_reviews, "):
        load_prompts("imdb")
    with pytest.raises(ValueError, match=r"`source` is '.*rows.csv'; expected a built-in name"):
        load_prompts(tmp_path / "rows.csv")
    with pytest.raises(FileNotFoundError, match=r"`source` is '.*absent.jsonl', which is not a file"):
        load_prompts(tmp_path / "absent.jsonl")
    with pytest.raises(TypeError, match=r"`source` is a int"):
        load_prompts(3)
    with pytest.raises(TypeError, match=r"`source` is a list"):
        load_prompts(["just a string"])


def test_builtin_sources_load_through_the_cache(seeded_cache):
    harmful = load_prompts("harmbench", seed=None, cache_dir=seeded_cache)
    assert harmful["prompt"][:] == ["Give instructions for X", "Write a guide to Y"]
    reviews = load_prompts("movie_reviews", seed=None, cache_dir=seeded_cache)
    assert reviews.column_names == ["prompt", "opening", "label", "movie"]
    assert reviews[1] == {
        "prompt": "Continue this movie review: A small movie with a big",
        "opening": "A small movie with a big",
        "label": "fresh",
        "movie": "zig_zag",
    }


def test_chat_template_renders_each_prompt_as_a_user_turn(chat_tokenizer):
    dataset = load_prompts([{"prompt": "what is 2 + 2 ?", "answer": "4"}], tokenizer=chat_tokenizer, chat_template=True)
    assert dataset.to_list() == [{"prompt": "<|user|>what is 2 + 2 ?\n<|assistant|>", "answer": "4"}]
    with_system = load_prompts(
        [{"prompt": "hi"}], tokenizer=chat_tokenizer, chat_template=True, system_prompt="Be brief."
    )
    assert with_system["prompt"][:] == ["<|system|>Be brief.\n<|user|>hi\n<|assistant|>"]
    assert load_prompts([{"prompt": "hi"}], tokenizer=chat_tokenizer)["prompt"][:] == ["hi"]


def test_chat_template_after_a_shuffled_split_keeps_columns_and_prints_nothing(chat_tokenizer, capfd):
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(6)]
    dataset = load_prompts(rows, tokenizer=chat_tokenizer, chat_template=True, seed=0, split="train[:4]")
    unrendered = load_prompts(rows, seed=0, split="train[:4]")
    assert dataset.column_names == ["prompt", "answer"]
    assert dataset["answer"][:] == unrendered["answer"][:]
    assert dataset["prompt"][:] == [f"<|user|>{prompt}\n<|assistant|>" for prompt in unrendered["prompt"]]
    assert capfd.readouterr().err == ""


def test_chat_template_needs_a_tokenizer_with_a_template(chat_tokenizer):
    with pytest.raises(ValueError, match=r"`tokenizer` is None; expected a tokenizer with a chat template"):
        load_prompts(ROWS, chat_template=True)
    with pytest.raises(ValueError, match=r"`tokenizer` \(object\) has no chat_template"):
        load_prompts(ROWS, tokenizer=object(), chat_template=True)
    with pytest.raises(ValueError, match=r"`system_prompt` is set with chat_template=False"):
        load_prompts(ROWS, tokenizer=chat_tokenizer, system_prompt="Be brief.")


def test_pairs_load_with_a_column_mapping(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    dataset = load_pairs(path, columns={"prompt": "q", "chosen": "good", "rejected": "bad"}, seed=None)
    assert dataset.column_names == ["prompt", "chosen", "rejected", "id"]
    assert dataset[2] == {"prompt": "prompt 2", "chosen": "yes 2", "rejected": "no 2", "id": 2}
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(PAIRS).to_parquet(str(parquet))
    assert load_pairs(
        parquet, columns={"prompt": "q", "chosen": "good", "rejected": "bad"}, seed=1, limit=2
    ).to_list() == (dataset.shuffle(seed=1).select(range(2)).to_list())


def test_pairs_missing_a_column_name_the_columns_found():
    with pytest.raises(
        ValueError,
        match=r"load_pairs: `columns` names the rejected column 'rejected', but the columns are \['prompt', 'chosen'\]",
    ):
        load_pairs([{"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match=r"`columns` is \{'answer': 'a'\}; expected a mapping from"):
        load_pairs([{"prompt": "p", "chosen": "c", "rejected": "r"}], columns={"answer": "a"})
    with pytest.raises(ValueError, match=r"with a repeated column"):
        load_pairs([{"prompt": "p", "c": "c"}], columns={"chosen": "c", "rejected": "c"})
    with pytest.raises(ValueError, match=r"`source` is 'harmbench'; expected a .jsonl"):
        load_pairs("harmbench")


def test_pairs_render_only_the_prompt(chat_tokenizer):
    rows = [{"prompt": "hi", "chosen": "hello", "rejected": "go away"}]
    dataset = load_pairs(rows, tokenizer=chat_tokenizer, chat_template=True, system_prompt="Be kind.")
    assert dataset.to_list() == [
        {"prompt": "<|system|>Be kind.\n<|user|>hi\n<|assistant|>", "chosen": "hello", "rejected": "go away"}
    ]
