"""Verifiable toy tasks: prompts whose exact answer is known, for correctness rewards.

Four kinds, made with the standard library only and deterministic for a given seed:

* ``add``: the sum of two integers in [0, 999].
* ``reverse``: a random lowercase string of 4 to 8 letters, reversed.
* ``count``: how many times a letter occurs in a random string of 6 to 12 letters drawn from
  ``a``-``f`` (so counts above 1 are common); the letter is one of the string's own.
* ``sort``: 3 to 6 distinct integers in [0, 99] sorted ascending, answered as ``"a, b, c"``.

Kinds are assigned round-robin in the order given, so every kind gets n / len(kinds) rows (+-1).
Answers are strings, so a reward compares them by exact match after stripping.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from typing import Any

from mojax._checks import choice, integer, message

TASK_KINDS = ("add", "reverse", "count", "sort")


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    text = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 8)))
    return f"Reverse the string '{text}'. Answer with the reversed string only.", text[::-1]


def _count(rng: random.Random) -> tuple[str, str]:
    text = "".join(rng.choices("abcdef", k=rng.randint(6, 12)))
    letter = rng.choice(text)
    prompt = f"How many times does the letter '{letter}' appear in '{text}'? Answer with the number only."
    return prompt, str(text.count(letter))


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(100), rng.randint(3, 6))
    shown = ", ".join(map(str, numbers))
    return (
        f"Sort these numbers in ascending order: {shown}. Answer with the sorted numbers separated by commas.",
        ", ".join(map(str, sorted(numbers))),
    )


_MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "count": _count,
    "sort": _sort,
}


def arithmetic_tasks(n: int, *, seed: int, kinds: Sequence[str] = TASK_KINDS) -> list[dict[str, Any]]:
    """n verifiable tasks with their exact answers.

    Args:
      n: number of rows (>= 0).
      seed: seed of the task generator; the same (n, seed, kinds) always gives the same rows, and a
        larger n extends a smaller one.
      kinds: non-empty subset of ``("add", "reverse", "count", "sort")``, assigned round-robin.

    Returns:
      Rows ``{"prompt", "answer", "kind"}``; every answer is a string.

    References:
      Lambert et al., "Tulu 3: Pushing Frontiers in Open Language Model Post-Training", arXiv 2411.15124,
      2024 (reinforcement learning with verifiable rewards); Stojanovski et al., "Reasoning Gym: Reasoning
      Environments for Reinforcement Learning with Verifiable Rewards", arXiv 2505.24760, 2025
      (procedurally generated tasks).

    Example:
      >>> rows = arithmetic_tasks(2, seed=0, kinds=("add",))
      >>> [row["kind"] for row in rows], all(row["answer"].isdigit() for row in rows)
      (['add', 'add'], True)
    """
    n = integer("arithmetic_tasks", "n", n, minimum=0)
    seed = integer("arithmetic_tasks", "seed", seed)
    if isinstance(kinds, str) or not kinds:
        raise ValueError(message("arithmetic_tasks", "kinds", f"is {kinds!r}", f"a non-empty sequence of {TASK_KINDS}"))
    kinds = tuple(choice("arithmetic_tasks", "kinds", kind, TASK_KINDS) for kind in kinds)
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        kind = kinds[index % len(kinds)]
        prompt, answer = _MAKERS[kind](rng)
        rows.append({"prompt": prompt, "answer": answer, "kind": kind})
    return rows
