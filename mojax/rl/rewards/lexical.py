"""Text rewards built on small optional packages: VADER sentiment and Flesch reading ease.

* ``sentiment`` is VADER's ``compound`` score (``vaderSentiment``, MIT, lexicon and rules shipped in the
  wheel, no download).
* ``readability`` is Flesch reading ease as textstat 0.7.4 computes it for English, re-implemented here on
  ``pyphen`` (the hyphenation dictionaries textstat uses) because textstat 0.7.4 imports
  ``pkg_resources``, which setuptools >= 81 no longer ships. The reading of textstat 0.7.4
  (``flesch_reading_ease`` with its defaults: en_US, apostrophes removed, outputs rounded):

      words       = len(re.sub(r"[^\\w\\s]", "", text).split())
      sentences   = max(1, #re.findall(r"\\b[^.!?]+[.!?]*", text) - #those with <= 2 words)
      syllables   = sum over the words of lower(text) of (pyphen hyphenation points + 1)
      ASL         = round1(words / sentences);  ASW = round1(syllables / words), 0 without words
      FRE         = round2(206.835 - 1.015 ASL - 84.6 ASW)

  where roundp rounds half away from zero. On 2,000 generated texts plus hand-written ones it equals
  ``textstat.flesch_reading_ease`` exactly (checked against textstat 0.7.4 in a separate environment).
  The reward is clip(FRE, 0, 100) / 100.

Both packages are imported when the reward is built, so a missing package fails at configuration time.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from types import ModuleType

from mojax.rl.rewards.text import per_completion

_PUNCTUATION = re.compile(r"[^\w\s]")
_SENTENCE = re.compile(r"\b[^.!?]+[.!?]*", re.UNICODE)


def optional_import(module: str, package: str, where: str) -> ModuleType:
    """Imports `module`, or raises an ImportError telling how to install `package`.

    Args:
        module: the module to import.
        package: its name on the package index.
        where: the reward that needs it (named in the message).

    Returns:
        The module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{where}: needs the `{package}` package, which is not installed; "
            f'install it with `pip install "mojax[rewards]"` or `pip install {package}`.'
        ) from error


def sentiment() -> Callable[..., list[float]]:
    """Built-in reward ``sentiment``: VADER's compound polarity of the completion, in [-1, 1].

    +1 is most positive, -1 most negative; above +0.05 is conventionally positive. Rule-based (lexicon
    plus negation, intensifiers, "but", capitals and "!"), tuned on social-media English. Needs
    ``vaderSentiment`` (``pip install "mojax[rewards]"``). As a cost (``kind="cost"``) it rewards
    negativity, which gives the antagonistic pair of Rewarded Soups-style experiments.

    Returns:
        A batched reward ``fn(prompts, completions, **columns) -> list[float]``.

    References:
        C. J. Hutto and E. Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social
        Media Text", ICWSM 2014.

    Example:
        >>> good, bad = sentiment()(["", ""], ["great movie", "terrible"], completion_ids=[[], []])
        >>> good > 0.5 and bad < 0
        True
    """
    vader = optional_import("vaderSentiment.vaderSentiment", "vaderSentiment", "sentiment")
    analyzer = vader.SentimentIntensityAnalyzer()
    return per_completion(lambda text: float(analyzer.polarity_scores(text)["compound"]), "sentiment")


def _round_half_away(value: float, digits: int) -> float:
    """textstat's legacy rounding: half away from zero at `digits` decimals."""
    scale = 10**digits
    return math.floor(value * scale + math.copysign(0.5, value)) / scale


def _word_count(text: str) -> int:
    """Words after removing punctuation (textstat ``lexicon_count``)."""
    return len(_PUNCTUATION.sub("", text).split())


def flesch_reading_ease(text: str, hyphenator) -> float:
    """Flesch reading ease of `text` as textstat 0.7.4 computes it for English (unbounded; higher is easier).

    Args:
        text: the text.
        hyphenator: a ``pyphen.Pyphen(lang="en_US")``, used to count syllables.

    Returns:
        206.835 - 1.015 words/sentence - 84.6 syllables/word, with textstat's rounding.

    References:
        R. Flesch, "A New Readability Yardstick", Journal of Applied Psychology 32(3), 1948;
        the textstat 0.7.4 package (S. Bansal, C. Aggarwal and contributors).
    """
    words = _word_count(text)
    sentences = _SENTENCE.findall(text)
    sentence_count = max(1, len(sentences) - sum(_word_count(sentence) <= 2 for sentence in sentences))
    syllables = sum(len(hyphenator.positions(word)) + 1 for word in _PUNCTUATION.sub("", text.lower()).split())
    words_per_sentence = _round_half_away(words / sentence_count, 1)
    syllables_per_word = _round_half_away(syllables / words, 1) if words else 0.0
    return _round_half_away(206.835 - 1.015 * words_per_sentence - 84.6 * syllables_per_word, 2)


def readability() -> Callable[..., list[float]]:
    """Built-in reward ``readability``: Flesch reading ease clipped to [0, 100] and divided by 100.

    Range [0, 1]; 1 is very easy (short words, short sentences), 0 is very hard. The unclipped score is
    :func:`flesch_reading_ease` (textstat 0.7.4's formula and rounding); text without words scores 1.
    Needs ``pyphen`` (``pip install "mojax[rewards]"``).

    Returns:
        A batched reward ``fn(prompts, completions, **columns) -> list[float]``.

    References:
        R. Flesch, "A New Readability Yardstick", Journal of Applied Psychology 32(3), 1948.

    Example:
        >>> readability()([""], ["The cat sat on the mat."], completion_ids=[[]])
        [1.0]
    """
    pyphen = optional_import("pyphen", "pyphen", "readability")
    hyphenator = pyphen.Pyphen(lang="en_US")
    return per_completion(
        lambda text: min(100.0, max(0.0, flesch_reading_ease(text, hyphenator))) / 100.0, "readability"
    )
