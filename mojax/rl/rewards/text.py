"""Programmatic rewards over completion strings: cheap, dependency-free and easy to make conflict.

* ``char_fraction`` and ``char_count`` reward characters from a set, so "fraction of 'a'" and "fraction of
  'b'" are antagonistic objectives for a character-level toy policy, and ``conciseness`` makes length
  conflict with ``char_count`` (which needs characters) and, through the KL budget, with everything else.
* ``format``, ``exact_match`` and ``refusal`` are the verifiable rewards of instruction and reasoning
  tasks: a regular expression or JSON validity, an extracted answer compared with the dataset's
  ``answer`` column (as in GSM8K-style GRPO recipes), and a keyword detector of refusals.

Every factory checks its options at construction and returns a batched reward
``fn(prompts, completions, **columns) -> list[float | None]``.
"""

from __future__ import annotations

import json as jsonlib
import math
import re
from collections.abc import Callable, Sequence

from mojax import _checks

ANSWER_PATTERN = r"<answer>(.*?)</answer>"
"""The default answer extractor of ``exact_match``: the text between answer tags."""

ANSWER_FORMAT = r"^\s*<answer>.*?</answer>\s*$"
"""The default format of ``format``: the whole completion is one answer in tags."""

NUMBER_PATTERN = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
"""Numbers as written in answers: an optional minus, digits with optional thousands commas and decimals."""

REFUSAL_PHRASES = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm not able to",
    "i am not able to",
    "i'm unable to",
    "i am unable to",
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "my apologies",
    "as an ai",
    "as a language model",
    "i'm not comfortable",
    "i must decline",
    "i refuse",
    "against my guidelines",
    "not appropriate for me",
)
"""Lower-case refusal openers and disclaimers detected by ``refusal`` (curly apostrophes are straightened)."""

TextRule = Callable[[str], float]


def per_completion(rule: TextRule, name: str) -> Callable[..., list[float]]:
    """Lifts a rule on one completion string to a batched reward over lists of completions.

    Args:
        rule: ``rule(completion) -> float``.
        name: the ``__name__`` of the returned function (shown in logs and error messages).

    Returns:
        ``fn(prompts, completions, **columns) -> list[float]`` that ignores the prompts and the columns.

    Example:
        >>> shouting = per_completion(lambda text: float(text.isupper()), "shouting")
        >>> shouting(["", ""], ["HEY", "hey"], completion_ids=[[], []])
        [1.0, 0.0]
    """

    def reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        return [rule(completion) for completion in completions]

    reward.__name__ = name
    return reward


def _character_set(where: str, chars: str) -> frozenset[str]:
    """The non-empty set of characters of `chars`."""
    if not isinstance(chars, str):
        raise TypeError(_checks.message(where, "chars", f"is a {type(chars).__name__} ({chars!r})", "a string"))
    if not chars:
        raise ValueError(_checks.message(where, "chars", "is empty", "at least one character"))
    return frozenset(chars)


def char_fraction(chars: str = "a") -> Callable[..., list[float]]:
    """Built-in reward ``char_fraction``: the fraction of the completion's characters that are in `chars`.

    Range [0, 1]; 0 for an empty completion. Two instances with disjoint sets are antagonistic.

    Args:
        chars: the rewarded characters (a string, read as a set; case-sensitive).

    Returns:
        A batched reward ``fn(prompts, completions, **columns) -> list[float]``.

    References:
        A toy objective for character-level policies, in the spirit of the programmatic rewards of
        L. von Werra et al., "TRL: Transformer Reinforcement Learning", GitHub, 2020.

    Example:
        >>> char_fraction("ab")(["", ""], ["abcd", ""], completion_ids=[[], []])
        [0.5, 0.0]
    """
    rewarded = _character_set("char_fraction", chars)
    return per_completion(
        lambda text: sum(character in rewarded for character in text) / len(text) if text else 0.0, "char_fraction"
    )


def char_count(chars: str = "a", target: int = 8) -> Callable[..., list[float]]:
    """Built-in reward ``char_count``: min(1, number of characters in `chars` / `target`).

    Range [0, 1]. It needs length, so it conflicts with ``conciseness``.

    Args:
        chars: the rewarded characters (a string, read as a set; case-sensitive).
        target: the count at which the reward saturates at 1 (an integer >= 1).

    Returns:
        A batched reward ``fn(prompts, completions, **columns) -> list[float]``.

    References:
        A toy objective for character-level policies (see :func:`char_fraction`).

    Example:
        >>> char_count("a", target=4)(["", ""], ["aab", "aaaaaa"], completion_ids=[[], []])
        [0.5, 1.0]
    """
    rewarded = _character_set("char_count", chars)
    target = _checks.integer("char_count", "target", target, minimum=1)
    return per_completion(
        lambda text: min(1.0, sum(character in rewarded for character in text) / target), "char_count"
    )


def _length(text: str, unit: str) -> int:
    """Number of whitespace-separated words or of characters."""
    return len(text.split()) if unit == "words" else len(text)


def conciseness(target: int = 50, unit: str = "words") -> Callable[..., list[float]]:
    """Built-in reward ``conciseness``: 1 - min(1, length / target), length in words or characters.

    Range [0, 1]: 1 for an empty completion, 0 from `target` on.

    Args:
        target: the length at which the reward reaches 0 (an integer >= 1).
        unit: "words" (whitespace-separated) or "chars".

    Returns:
        A batched reward ``fn(prompts, completions, **columns) -> list[float]``.

    References:
        The length rewards of verl's multi-objective MATH recipe and of TRL's GRPO quickstart
        (L. von Werra et al., "TRL: Transformer Reinforcement Learning", GitHub, 2020).

    Example:
        >>> conciseness(target=4)(["", ""], ["one two", "one two three four five"], completion_ids=[[], []])
        [0.5, 0.0]
    """
    target = _checks.integer("conciseness", "target", target, minimum=1)
    unit = _checks.choice("conciseness", "unit", unit, ("words", "chars"))
    return per_completion(lambda text: 1.0 - min(1.0, _length(text, unit) / target), "conciseness")


def _is_json(text: str) -> bool:
    """True when the stripped text parses as one JSON value."""
    try:
        jsonlib.loads(text.strip())
    except ValueError:
        return False
    return True


def format_match(pattern: str | None = None, json: bool = False) -> Callable[..., list[float]]:
    """Built-in reward ``format``: 1 if the completion has the required format, else 0.

    The format is either `pattern` (a regular expression searched anywhere, with ``re.DOTALL``; anchor it
    with ``^...$`` to require the whole completion) or, with ``json=True``, JSON validity of the stripped
    completion.

    Args:
        pattern: the regular expression; None for ``ANSWER_FORMAT`` (one ``<answer>...</answer>``), or with `json`.
        json: check JSON validity instead of a pattern.

    Returns:
        A batched reward ``fn(prompts, completions, **columns) -> list[float]`` with values in {0, 1}.

    References:
        The format rewards of DeepSeek-AI, "DeepSeek-R1: Incentivizing Reasoning Capability in LLMs via
        Reinforcement Learning", arXiv 2501.12948, 2025.

    Example:
        >>> format_match(r"^<answer>.*</answer>$")(["", ""], ["<answer>4</answer>", "4"], completion_ids=[[], []])
        [1.0, 0.0]
        >>> format_match(json=True)([""], ['{"a": 1}'], completion_ids=[[]])
        [1.0]
    """
    if not isinstance(json, bool):
        raise TypeError(_checks.message("format_match", "json", f"is a {type(json).__name__}", "a bool"))
    if json and pattern is not None:
        raise ValueError(_checks.message("format_match", "pattern", f"is {pattern!r} with json=True", "None with json"))
    if json:
        return per_completion(lambda text: float(_is_json(text)), "format")
    compiled = _compile("format_match", ANSWER_FORMAT if pattern is None else pattern)
    return per_completion(lambda text: float(compiled.search(text) is not None), "format")


def _compile(where: str, pattern: str, *, groups: int = 0) -> re.Pattern:
    """A compiled regular expression (re.DOTALL) with at least `groups` groups."""
    if not isinstance(pattern, str):
        raise TypeError(_checks.message(where, "pattern", f"is a {type(pattern).__name__}", "a regular expression"))
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as error:
        raise ValueError(_checks.message(where, "pattern", f"is {pattern!r} ({error})", "a valid regex")) from error
    if compiled.groups < groups:
        raise ValueError(_checks.message(where, "pattern", f"is {pattern!r}", "a regex with a capturing group"))
    return compiled


def _as_number(text: str) -> float | None:
    """The float written in `text` (thousands commas allowed), or None."""
    if not NUMBER_PATTERN.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def _same_answer(predicted: str, expected: str) -> bool:
    """Numbers compare as numbers, other answers as case-folded, whitespace-collapsed strings."""
    predicted_number, expected_number = _as_number(predicted.strip()), _as_number(expected.strip())
    if predicted_number is not None and expected_number is not None:
        return math.isclose(predicted_number, expected_number, rel_tol=0.0, abs_tol=1e-9)
    return " ".join(predicted.casefold().split()) == " ".join(expected.casefold().split())


def exact_match(pattern: str = ANSWER_PATTERN, number_fallback: bool = True) -> Callable[..., list[float | None]]:
    """Built-in reward ``exact_match``: 1 if the completion's answer equals the dataset column ``answer``.

    The answer is the first group of the first match of `pattern`; without a match it is the last
    number in the completion (when `number_fallback`), else the completion scores 0. Numbers compare
    as numbers ("1,000" = "1000.0"), other answers as case-folded strings with whitespace collapsed.
    Range {0, 1}; None ("not applicable") for every sample when no ``answer`` column is passed, and for
    samples whose answer is None.

    Args:
        pattern: a regular expression with a capturing group (``re.DOTALL``).
        number_fallback: use the last number of the completion when `pattern` does not match.

    Returns:
        A batched reward ``fn(prompts, completions, *, answer=None, **columns) -> list[float | None]``.

    References:
        K. Cobbe et al., "Training Verifiers to Solve Math Word Problems", arXiv 2110.14168, 2021 (GSM8K);
        Z. Shao et al., "DeepSeekMath", arXiv 2402.03300, 2024 (rule-based accuracy rewards in GRPO).

    Example:
        >>> fn = exact_match()
        >>> fn(["", "", ""], ["<answer>42</answer>", "so it is 41", "x"], completion_ids=[[]] * 3, answer=["42"] * 3)
        [1.0, 0.0, 0.0]
        >>> fn([""], ["42"], completion_ids=[[]])
        [None]
    """
    compiled = _compile("exact_match", pattern, groups=1)
    if not isinstance(number_fallback, bool):
        raise TypeError(_checks.message("exact_match", "number_fallback", f"is {number_fallback!r}", "a bool"))

    def extract(text: str) -> str | None:
        found = compiled.search(text)
        if found is not None:
            return found.group(1)
        numbers = NUMBER_PATTERN.findall(text) if number_fallback else []
        return numbers[-1] if numbers else None

    def reward(
        prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence | None = None, **columns
    ) -> list[float | None]:
        if answer is None:
            return [None] * len(completions)
        scores = []
        for completion, expected in zip(completions, answer, strict=True):
            predicted = extract(completion)
            if expected is None:
                scores.append(None)
            else:
                scores.append(float(predicted is not None and _same_answer(predicted, str(expected))))
        return scores

    reward.__name__ = "exact_match"
    return reward


def _refuses(text: str) -> bool:
    """True when the text contains one of REFUSAL_PHRASES (case-insensitive, curly apostrophes straightened)."""
    text = text.casefold().replace("\u2019", "'")
    return any(phrase in text for phrase in REFUSAL_PHRASES)


def refusal(invert: bool = False) -> Callable[..., list[float]]:
    """Built-in reward ``refusal``: 1 if the completion contains a refusal phrase (``REFUSAL_PHRASES``), else 0.

    Range {0, 1}. With ``invert=True`` it is 1 for a completion that does not refuse (helpfulness on
    benign prompts); as a reward on harmful prompts it rewards refusing.

    Args:
        invert: score 1 - refusal.

    Returns:
        A batched reward ``fn(prompts, completions, **columns) -> list[float]``.

    References:
        A. Zou et al., "Universal and Transferable Adversarial Attacks on Aligned Language Models",
        arXiv 2307.15043, 2023 (refusal-prefix detection).

    Example:
        >>> refusal()(["", ""], ["I\u2019m sorry, I can't help.", "Sure: 4"], completion_ids=[[], []])
        [1.0, 0.0]
    """
    if not isinstance(invert, bool):
        raise TypeError(_checks.message("refusal", "invert", f"is {invert!r}", "a bool"))
    return per_completion(lambda text: float(_refuses(text) != invert), "refusal")
