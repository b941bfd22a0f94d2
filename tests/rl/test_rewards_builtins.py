"""The built-in rewards of mojax.rl.rewards on hand-picked texts with known answers."""

import math
import re
import sys

import numpy as np
import pytest

from mojax.rl.rewards import (
    char_count,
    char_fraction,
    conciseness,
    exact_match,
    flesch_reading_ease,
    format_match,
    non_toxicity,
    offensive_probability,
    readability,
    refusal,
    sentiment,
)


def run(fn, completions, **columns):
    """Scores `completions` (empty prompts) with a batched reward."""
    return fn([""] * len(completions), list(completions), completion_ids=[[]] * len(completions), **columns)


# ---------------------------------------------------------------- toy-task rewards


def test_char_fraction_and_char_count_reward_characters_from_the_set():
    assert run(char_fraction("a"), ["aaba", "bbb", "", "A a"]) == [0.75, 0.0, 0.0, 1 / 3]
    assert run(char_fraction("ab"), ["abcd"]) == [0.5]
    assert run(char_count("b", target=2), ["", "b", "abba", "bbbbb"]) == [0.0, 0.5, 1.0, 1.0]


def test_a_and_b_fractions_are_antagonistic_and_length_conflicts_with_counts():
    texts = ["aaaa", "aabb", "bbbb", "ab", "aaaaaaaa"]
    fraction_a, fraction_b = np.asarray(run(char_fraction("a"), texts)), np.asarray(run(char_fraction("b"), texts))
    np.testing.assert_allclose(fraction_a + fraction_b, 1.0)  # texts of a and b only: one gains what the other loses
    runs = ["a" * length for length in range(9)]  # up to the target, a's cost exactly the conciseness they earn
    short, count_a = np.asarray(run(conciseness(8, "chars"), runs)), np.asarray(run(char_count("a", 8), runs))
    np.testing.assert_allclose(short + count_a, 1.0)
    assert short[0] == count_a[-1] == 1.0


def test_conciseness_counts_words_or_characters():
    assert run(conciseness(target=4), ["", "one two", "a b c d e"]) == [1.0, 0.5, 0.0]
    assert run(conciseness(target=10, unit="chars"), ["abcd", "x" * 12]) == [0.6, 0.0]


@pytest.mark.parametrize(
    "factory, options, error, text",
    [
        (char_fraction, {"chars": ""}, ValueError, "char_fraction: `chars` is empty; expected at least one character."),
        (char_fraction, {"chars": ["a"]}, TypeError, "char_fraction: `chars` is a list"),
        (char_count, {"target": 0}, ValueError, "char_count: `target` is 0; expected an integer >= 1."),
        (
            conciseness,
            {"unit": "tokens"},
            ValueError,
            "conciseness: `unit` is 'tokens'; expected one of 'words', 'chars'.",
        ),
        (conciseness, {"target": 2.5}, TypeError, "conciseness: `target` is a float"),
        (format_match, {"pattern": "(", "json": False}, ValueError, "format_match: `pattern` is '('"),
        (format_match, {"pattern": "x", "json": True}, ValueError, "`pattern` is 'x' with json=True; expected None"),
        (exact_match, {"pattern": "<answer>.*</answer>"}, ValueError, "expected a regex with a capturing group"),
        (exact_match, {"number_fallback": 1}, TypeError, "exact_match: `number_fallback` is 1; expected a bool."),
        (refusal, {"invert": "yes"}, TypeError, "refusal: `invert` is 'yes'; expected a bool."),
    ],
)
def test_builtin_options_are_checked_at_construction(factory, options, error, text):
    with pytest.raises(error, match=re.escape(text)):
        factory(**options)


# ---------------------------------------------------------------- verifiable rewards


def test_format_matches_a_pattern_or_json():
    tagged = format_match()
    assert run(tagged, ["<answer>4</answer>", " <answer>\n4\n</answer>\n", "so <answer>4</answer>", "4"]) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    assert run(format_match(r"\d+ apples"), ["I have 12 apples.", "apples"]) == [1.0, 0.0]
    assert run(format_match(json=True), ['{"a": [1, 2]}', " 3 ", "{'a': 1}", ""]) == [1.0, 1.0, 0.0, 0.0]


def test_exact_match_extracts_tagged_answers_then_the_last_number():
    completions = [
        "<answer> 42 </answer>",
        "first 3, then 42",
        "<answer>41</answer> but 42",
        "<answer>1,000</answer>",
        "<answer>Paris</answer>",
        "no answer",
        "-7.0",
        "it costs 1,500, or 2,5",
    ]
    answers = ["42", "42", "42", "1000", "paris", "1", -7, "5"]
    assert run(exact_match(), completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert run(exact_match(number_fallback=False), ["it is 42"], answer=["42"]) == [0.0]
    assert run(exact_match(r"#### (\S+)"), ["so #### 18", "18"], answer=["18", "18"]) == [1.0, 1.0]


def test_exact_match_is_not_applicable_without_an_answer():
    assert run(exact_match(), ["42", "42"]) == [None, None]
    assert run(exact_match(), ["42", "42"], answer=[None, "42"]) == [None, 1.0]


def test_refusal_detects_refusal_phrases_and_inverts():
    texts = [
        "I'm sorry, but I cannot help with that.",
        "As an AI, I won't.",
        "I CAN\u2019T do that",
        "Sure, here it is.",
    ]
    assert run(refusal(), texts) == [1.0, 1.0, 1.0, 0.0]
    assert run(refusal(invert=True), texts) == [0.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------- text rewards with packages


def test_sentiment_is_vader_compound():
    great, terrible, neutral = run(sentiment(), ["great movie", "terrible", "the table"])
    # VADER: compound = s / sqrt(s^2 + 15) with the lexicon valences great = 3.1, terrible = -2.1
    assert great == pytest.approx(round(3.1 / math.sqrt(3.1**2 + 15), 4)) and great > 0.5
    assert terrible == pytest.approx(round(-2.1 / math.sqrt(2.1**2 + 15), 4)) and terrible < 0
    assert neutral == 0.0


# P(offensive) from scikit-learn: alt-profanity-check 1.9.1 (scikit-learn 1.9.1) in a separate virtual
# environment, `profanity_check.predict_prob(texts)`, printed with repr() and pasted here.
SKLEARN_OFFENSIVE_PROBABILITY = {
    "have a nice day": 0.05844726394294451,
    "shut up you idiot": 0.999998867485824,
    "That movie sucked.": 0.37467396977794204,
    "what the hell is this": 0.9913861357105456,
    "": 0.036375752016469504,
    "the cat sat on the mat": 0.031449223424800624,
    "You are a stupid, worthless piece of garbage!": 0.999861091905605,
}


def test_exported_profanity_model_matches_scikit_learn():
    texts = list(SKLEARN_OFFENSIVE_PROBABILITY)
    expected = np.asarray(list(SKLEARN_OFFENSIVE_PROBABILITY.values()))
    np.testing.assert_allclose(offensive_probability(texts), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(run(non_toxicity(), texts), 1.0 - expected, rtol=0, atol=1e-12)


def test_flesch_reading_ease_follows_the_formula_on_a_hand_counted_sentence():
    import pyphen

    hyphenator = pyphen.Pyphen(lang="en_US")
    text = "The children played outside after dinner."
    # 6 words, 1 sentence, 10 syllables (the 1 + chil-dren 2 + played 1 + out-side 2 + af-ter 2 + din-ner 2);
    # textstat rounds words/sentence and syllables/word to 0.1: 6.0 and 1.7
    by_hand = 206.835 - 1.015 * 6.0 - 84.6 * 1.7
    assert flesch_reading_ease(text, hyphenator) == pytest.approx(by_hand, abs=0.005)
    assert run(readability(), [text]) == [pytest.approx(by_hand / 100, abs=5e-5)]


# textstat 0.7.4's flesch_reading_ease (run in a separate environment with setuptools < 81, which it needs).
TEXTSTAT_FLESCH = {
    "The cat sat on the mat.": 116.15,
    "Extraordinary circumstances necessitate unconventional methodologies.": -136.65,
    "I like it. It is good. We go home now.": 118.89,
    "We walked to the river. The water was cold.": 100.75,
    "My sister likes to read books about animals.": 80.28,
}


def test_readability_equals_textstat_and_is_clipped_to_the_unit_interval():
    import pyphen

    hyphenator = pyphen.Pyphen(lang="en_US")
    for text, expected in TEXTSTAT_FLESCH.items():
        assert flesch_reading_ease(text, hyphenator) == expected
    scores = run(readability(), list(TEXTSTAT_FLESCH))
    np.testing.assert_allclose(scores, [1.0, 0.0, 1.0, 1.0, 0.8028])


@pytest.mark.parametrize(
    "factory, modules, package",
    [
        (sentiment, ["vaderSentiment", "vaderSentiment.vaderSentiment"], "vaderSentiment"),
        (readability, ["pyphen"], "pyphen"),
    ],
)
def test_missing_package_error_says_how_to_install_it(monkeypatch, factory, modules, package):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    expected = f'{factory.__name__}: needs the `{package}` package, which is not installed; install it with `pip install "mojax[rewards]"` or `pip install {package}`.'
    with pytest.raises(ImportError, match=re.escape(expected)) as info:
        factory()
    assert isinstance(info.value.__cause__, ImportError)
