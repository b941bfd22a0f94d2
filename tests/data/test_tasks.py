"""arithmetic_tasks: every answer recomputed from its prompt, determinism, balance, argument checks."""

from __future__ import annotations

import collections
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mojax.data import TASK_KINDS, arithmetic_tasks


def _recompute(prompt: str) -> tuple[str, str]:
    """(kind, answer) worked out from the prompt text alone."""
    if match := re.fullmatch(r"What is (\d+) \+ (\d+)\? Answer with the number only\.", prompt):
        return "add", str(int(match[1]) + int(match[2]))
    if match := re.fullmatch(r"Reverse the string '([a-z]+)'\. Answer with the reversed string only\.", prompt):
        return "reverse", "".join(reversed(match[1]))
    if match := re.fullmatch(r"How many times does the letter '([a-z])' appear in '([a-z]+)'\? .*", prompt):
        return "count", str(sum(character == match[1] for character in match[2]))
    if match := re.fullmatch(r"Sort these numbers in ascending order: ([\d, ]+)\. .*", prompt):
        numbers = [int(item) for item in match[1].split(", ")]
        return "sort", ", ".join(str(value) for value in sorted(numbers))
    raise AssertionError(f"unrecognised prompt {prompt!r}")


@given(seed=st.integers(0, 2**31 - 1))
def test_every_answer_matches_the_prompt(seed):
    for row in arithmetic_tasks(40, seed=seed):
        assert (row["kind"], row["answer"]) == _recompute(row["prompt"])


def test_kinds_are_assigned_round_robin():
    rows = arithmetic_tasks(10, seed=3, kinds=("sort", "add"))
    assert [row["kind"] for row in rows] == ["sort", "add"] * 5
    assert collections.Counter(row["kind"] for row in arithmetic_tasks(9, seed=0)) == {
        "add": 3,
        "reverse": 2,
        "count": 2,
        "sort": 2,
    }


def test_same_seed_same_rows_and_longer_runs_extend_shorter_ones():
    assert arithmetic_tasks(12, seed=5) == arithmetic_tasks(12, seed=5)
    assert arithmetic_tasks(20, seed=5)[:12] == arithmetic_tasks(12, seed=5)
    assert arithmetic_tasks(12, seed=5) != arithmetic_tasks(12, seed=6)


def test_task_shapes_stay_in_their_documented_ranges():
    for row in arithmetic_tasks(400, seed=11):
        if row["kind"] == "reverse":
            assert 4 <= len(row["answer"]) <= 8
        if row["kind"] == "count":
            (letters,) = re.findall(r"in '([a-f]+)'", row["prompt"])
            assert 6 <= len(letters) <= 12 and int(row["answer"]) >= 1
        if row["kind"] == "sort":
            values = [int(value) for value in row["answer"].split(", ")]
            assert 3 <= len(values) <= 6 and len(set(values)) == len(values) and max(values) < 100


def test_zero_tasks_is_an_empty_list():
    assert arithmetic_tasks(0, seed=0) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"n": -1, "seed": 0}, ValueError, r"`n` is -1; expected an integer >= 0"),
        ({"n": 2.0, "seed": 0}, TypeError, r"`n` is a float"),
        ({"n": 2, "seed": "a"}, TypeError, r"`seed` is a str"),
        ({"n": 2, "seed": 0, "kinds": ()}, ValueError, r"`kinds` is \(\)"),
        ({"n": 2, "seed": 0, "kinds": "add"}, ValueError, r"`kinds` is 'add'"),
        ({"n": 2, "seed": 0, "kinds": ("add", "mul")}, ValueError, r"`kinds` is 'mul'; expected one of 'add'"),
    ],
)
def test_arguments_are_checked(kwargs, error, pattern):
    with pytest.raises(error, match=f"arithmetic_tasks: {pattern}"):
        arithmetic_tasks(**kwargs)


def test_kind_names_are_exported():
    assert TASK_KINDS == ("add", "reverse", "count", "sort")
