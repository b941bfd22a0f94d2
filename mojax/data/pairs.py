"""Synthetic sentiment preference pairs in the three settings of the gradient-entanglement study.

Yuan et al. (arXiv 2410.13828) train GPT-2 with DPO on sentiment pairs named "1t" (chosen and
rejected differ in one token), "short-suffix" and "long-suffix", to show that the more of the two
responses is shared, the larger <grad log pi_w, grad log pi_l> and the more the two log-probabilities
move together. Their data is not published with the paper, so this module rebuilds the three
settings from movie-review snippets; the construction is ours:

* the prompt is the review's first `words` words in a continuation template;
* both responses start with the same **shared prefix**, the rest of the review;
* ``one_token``: shared prefix + a shared frame ("Overall, it was") + one sentiment word, positive in
  the chosen response and its antonym in the rejected one ("good" / "bad"); the two differ in
  exactly one whitespace-separated word, and each of these words (with its leading space) is a
  single token of the SmolLM2 vocabulary;
* ``short_suffix``: shared prefix + a short positive phrase (2-4 words) vs a short negative one;
* ``long_suffix``: shared prefix + three positive sentences vs three negative sentences (~30 words).

The chosen response is always the positive one, as in the sentiment task; positive and negative
phrases are drawn independently, so a pair's suffixes differ in wording as well as polarity.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mojax._checks import choice, integer, message
from mojax.data.sources import REVIEW_TEMPLATE

PAIR_SETTINGS = ("one_token", "short_suffix", "long_suffix")

SENTIMENT_WORDS = (
    ("good", "bad"),
    ("great", "awful"),
    ("wonderful", "terrible"),
    ("brilliant", "dull"),
    ("fun", "boring"),
    ("excellent", "poor"),
    ("beautiful", "ugly"),
    ("perfect", "weak"),
)
"""(positive, negative) one-word antonyms for the ``one_token`` setting."""

FRAMES = ("Overall, it was", "All in all, the film is", "In short, this movie is", "I thought it was")
"""Shared words before the single sentiment word of the ``one_token`` setting."""

SHORT_SUFFIXES = (
    ("A real delight.", "I loved every minute.", "Highly recommended.", "A must-see.", "Truly worth watching."),
    ("A total mess.", "I hated every minute.", "Not recommended.", "A waste of time.", "Truly painful to watch."),
)
"""(positive phrases, negative phrases) for the ``short_suffix`` setting."""

LONG_SENTENCES = (
    (
        "The performances are warm, sharp and completely convincing.",
        "Every scene is beautifully shot and carefully paced.",
        "The script is witty and full of genuine surprises.",
        "I left the theater smiling and want to see it again.",
        "It is the kind of film that stays with you for days.",
        "The director tells the story with real skill and heart.",
    ),
    (
        "The performances are flat, stiff and completely unconvincing.",
        "Every scene drags on long after its point is made.",
        "The script is clumsy and full of tired clichés.",
        "I left the theater bored and wanting my money back.",
        "It is the kind of film you forget before the credits end.",
        "The director tells the story with no skill or feeling.",
    ),
)
"""(positive sentences, negative sentences); ``long_suffix`` draws three of each."""

_LONG_COUNT = 3


def _suffixes(setting: str, rng: random.Random) -> tuple[str, str]:
    """(positive, negative) text appended to the shared prefix."""
    if setting == "one_token":
        frame = rng.choice(FRAMES)
        positive, negative = rng.choice(SENTIMENT_WORDS)
        return f"{frame} {positive}.", f"{frame} {negative}."
    if setting == "short_suffix":
        return rng.choice(SHORT_SUFFIXES[0]), rng.choice(SHORT_SUFFIXES[1])
    return tuple(" ".join(rng.sample(bank, _LONG_COUNT)) for bank in LONG_SENTENCES)


def synthetic_sentiment_pairs(
    snippets: Sequence[str],
    setting: str,
    *,
    n: int,
    seed: int,
    words: int = 6,
    template: str = REVIEW_TEMPLATE,
) -> list[dict[str, str]]:
    """n preference pairs whose chosen (positive) and rejected (negative) responses share a prefix.

    Snippets with `words` words or fewer are skipped; n distinct snippets are drawn without
    replacement, so n may not exceed the number of usable snippets.

    Args:
      snippets: review texts, e.g. ``[row["text"] for row in movie_reviews()]``.
      setting: ``"one_token"``, ``"short_suffix"`` or ``"long_suffix"`` (see the module docstring).
      n: number of pairs (>= 0).
      seed: seed of the draw; the same arguments always give the same pairs.
      words: how many leading words of a snippet form the prompt's opening.
      template: the prompt, with an ``{opening}`` field.

    Returns:
      Rows ``{"prompt", "chosen", "rejected"}``.

    References:
      Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
      ICLR 2025, arXiv 2410.13828.

    Example:
      >>> (pair,) = synthetic_sentiment_pairs(["A small movie with a big impact."], "one_token", n=1, seed=0, words=3)
      >>> pair["prompt"]
      'Continue this movie review: A small movie'
      >>> [a == b for a, b in zip(pair["chosen"].split(), pair["rejected"].split())].count(False)
      1
    """
    where = "synthetic_sentiment_pairs"
    setting = choice(where, "setting", setting, PAIR_SETTINGS)
    n = integer(where, "n", n, minimum=0)
    seed = integer(where, "seed", seed)
    words = integer(where, "words", words, minimum=1)
    if isinstance(snippets, str) or not all(isinstance(snippet, str) for snippet in snippets):
        raise TypeError(message(where, "snippets", f"is {type(snippets).__name__}", "a sequence of strings"))
    if not isinstance(template, str) or "{opening}" not in template:
        raise ValueError(message(where, "template", f"is {template!r}", "a string with an {opening} field"))
    usable = [tokens for tokens in (snippet.split() for snippet in snippets) if len(tokens) > words]
    if n > len(usable):
        raise ValueError(
            message(where, "n", f"is {n}", f"at most {len(usable)}, the snippets longer than {words} words")
        )
    rng = random.Random(seed)
    pairs = []
    for tokens in rng.sample(usable, n):
        shared = " ".join(tokens[words:])
        positive, negative = _suffixes(setting, rng)
        pairs.append(
            {
                "prompt": template.format(opening=" ".join(tokens[:words])),
                "chosen": f"{shared} {positive}",
                "rejected": f"{shared} {negative}",
            }
        )
    return pairs
