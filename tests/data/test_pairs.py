"""synthetic_sentiment_pairs: the promised structure of each setting, determinism, argument checks."""

from __future__ import annotations

import pytest

from mojax.data import PAIR_SETTINGS, synthetic_sentiment_pairs
from mojax.data.pairs import LONG_SENTENCES, SENTIMENT_WORDS, SHORT_SUFFIXES

SNIPPETS = [
    "A small movie with a big impact on anyone who sees it.",
    "The character of ZigZag is not sufficiently developed to support a film.",
    "Wry, engrossing and far smarter than it has any right to be.",
    "Too short.",
    "An overlong, joyless slog through every cliché of the genre.",
    "Funny, moving and beautifully acted from the first scene to the last.",
]
USABLE = [snippet for snippet in SNIPPETS if len(snippet.split()) > 4]


def _openings_and_rests(pairs, words=4):
    """For each pair, the snippet it came from: the one whose first words are the prompt's opening."""
    found = []
    for pair in pairs:
        opening = pair["prompt"].removeprefix("Continue this movie review: ")
        (snippet,) = [text for text in USABLE if " ".join(text.split()[:words]) == opening]
        found.append(" ".join(snippet.split()[words:]))
    return found


def test_one_token_pairs_differ_in_exactly_one_sentiment_word():
    pairs = synthetic_sentiment_pairs(SNIPPETS, "one_token", n=5, seed=1, words=4)
    antonyms = set(SENTIMENT_WORDS)
    for pair, rest in zip(pairs, _openings_and_rests(pairs), strict=True):
        chosen, rejected = pair["chosen"].split(), pair["rejected"].split()
        assert len(chosen) == len(rejected)
        differing = [(a, b) for a, b in zip(chosen, rejected, strict=True) if a != b]
        assert len(differing) == 1
        ((positive, negative),) = differing
        assert (positive.rstrip("."), negative.rstrip(".")) in antonyms
        assert chosen[-1] == positive  # the word is the last one
        assert pair["chosen"].startswith(rest + " ") and pair["rejected"].startswith(rest + " ")


@pytest.mark.parametrize("setting", ["short_suffix", "long_suffix"])
def test_suffix_pairs_share_the_rest_of_the_review_then_differ(setting):
    positive_bank, negative_bank = SHORT_SUFFIXES if setting == "short_suffix" else LONG_SENTENCES
    pairs = synthetic_sentiment_pairs(SNIPPETS, setting, n=5, seed=2, words=4)
    for pair, rest in zip(pairs, _openings_and_rests(pairs), strict=True):
        chosen_suffix = pair["chosen"].removeprefix(rest + " ")
        rejected_suffix = pair["rejected"].removeprefix(rest + " ")
        assert chosen_suffix != pair["chosen"] and rejected_suffix != pair["rejected"]
        assert chosen_suffix != rejected_suffix
        if setting == "short_suffix":
            assert chosen_suffix in positive_bank and rejected_suffix in negative_bank
            assert len(rejected_suffix.split()) <= 4
        else:
            for suffix, bank in ((chosen_suffix, positive_bank), (rejected_suffix, negative_bank)):
                sentences = [sentence + "." for sentence in suffix.removesuffix(".").split(". ")]
                assert len(sentences) == 3 == len(set(sentences)) and set(sentences) <= set(bank)


def test_the_differing_tail_grows_across_settings():
    def tail_range(setting):
        """(min, max) over pairs of the number of rejected words after the longest common word prefix."""
        tails = []
        for pair in synthetic_sentiment_pairs(SNIPPETS, setting, n=5, seed=0, words=4):
            chosen, rejected = pair["chosen"].split(), pair["rejected"].split()
            common = next(i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b)
            tails.append(len(rejected) - common)
        return min(tails), max(tails)

    one, short, long = (tail_range(setting) for setting in PAIR_SETTINGS)
    assert one == (1, 1)
    assert 1 <= short[0] and short[1] <= 4
    assert long[0] > short[1]


def test_pairs_use_distinct_snippets_and_depend_only_on_the_seed():
    first = synthetic_sentiment_pairs(SNIPPETS, "long_suffix", n=5, seed=7, words=4)
    assert first == synthetic_sentiment_pairs(SNIPPETS, "long_suffix", n=5, seed=7, words=4)
    assert len({pair["prompt"] for pair in first}) == 5
    assert first != synthetic_sentiment_pairs(SNIPPETS, "long_suffix", n=5, seed=8, words=4)


def test_pairs_feed_load_pairs():
    from mojax.data import load_pairs

    pairs = synthetic_sentiment_pairs(SNIPPETS, "short_suffix", n=3, seed=0, words=4)
    assert load_pairs(pairs, seed=None).to_list() == pairs


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "pattern"),
    [
        ((SNIPPETS, "two_tokens"), {"n": 1, "seed": 0}, ValueError, r"`setting` is 'two_tokens'; expected one of"),
        ((SNIPPETS, "one_token"), {"n": 6, "seed": 0, "words": 4}, ValueError, r"`n` is 6; expected at most 5"),
        ((SNIPPETS, "one_token"), {"n": 1, "seed": 0, "words": 0}, ValueError, r"`words` is 0"),
        (("a b c d e f g", "one_token"), {"n": 1, "seed": 0}, TypeError, r"`snippets` is str"),
        (([1, 2], "one_token"), {"n": 1, "seed": 0}, TypeError, r"`snippets` is list"),
        ((SNIPPETS, "one_token"), {"n": 1, "seed": 0, "template": "x"}, ValueError, r"`template` is 'x'"),
    ],
)
def test_arguments_are_checked(args, kwargs, error, pattern):
    with pytest.raises(error, match=f"synthetic_sentiment_pairs: {pattern}"):
        synthetic_sentiment_pairs(*args, **kwargs)
