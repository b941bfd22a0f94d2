"""Non-toxicity from the alt-profanity-check linear model, re-implemented in numpy (no scikit-learn, no pickle).

alt-profanity-check 1.9.1 (MIT License, Copyright (c) 2018 Victor Zhou, 2021 Menelaos Kotoglou, and
Dimitrios Mistriotis; the licence ships as ``data/LICENSE.alt-profanity-check``) scores P(offensive) with a
scikit-learn pipeline that this module reads as:

    tokens   = re.findall(r"(?u)\\b\\w\\w+\\b", text.lower())         TfidfVectorizer, ngram_range (1, 1)
    x_v      = count_v(tokens) * idf_v        v in the 15,442-word vocabulary (English stop words are not in it)
    x        = x / ||x||_2                    (x = 0 when no token is in the vocabulary)
    f_k      = coef_k . x + intercept_k       the LinearSVC of calibration fold k = 1..5
    p_k      = 1 / (1 + exp(a_k f_k + b_k))   its sigmoid (Platt) calibration
    P        = mean_k p_k                     CalibratedClassifierCV.predict_proba(...)[:, 1]

The fitted arrays were exported once by ``export_profanity.py`` (run in a throw-away environment holding
alt-profanity-check 1.9.1, scikit-learn 1.9.1 and joblib 1.6.0) into ``data/profanity_model.npz`` (idf,
coef, intercept, a, b; float64, 631,102 bytes compressed) and ``data/profanity_vocabulary.json`` (the
vocabulary in column order, the tokeniser settings and the licence; 169,265 bytes). On 600 texts the numpy
scores match scikit-learn's ``predict_proba`` to a maximum absolute difference of 2.2e-16. Nothing is
unpickled at run time: the arrays load with ``allow_pickle=False``.

This module imports only the standard library and numpy, so the export script can load it in that
environment to verify the export.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
MODEL_FILE = "profanity_model.npz"
VOCABULARY_FILE = "profanity_vocabulary.json"


class ProfanityModel(NamedTuple):
    """The exported pipeline: tokeniser, vocabulary f64 weights and the calibrated folds (k folds, V words)."""

    token_pattern: re.Pattern
    vocabulary: dict[str, int]
    idf: np.ndarray  # f64[V]
    coef: np.ndarray  # f64[k, V]
    intercept: np.ndarray  # f64[k]
    sigmoid_a: np.ndarray  # f64[k]
    sigmoid_b: np.ndarray  # f64[k]


def load_profanity_model(data_dir: Path = DATA_DIR) -> ProfanityModel:
    """Reads the exported arrays and vocabulary from `data_dir` (no pickle).

    Args:
        data_dir: the folder holding ``profanity_model.npz`` and ``profanity_vocabulary.json``.

    Returns:
        The :class:`ProfanityModel`.
    """
    meta = json.loads((data_dir / VOCABULARY_FILE).read_text(encoding="utf-8"))
    if not meta["lowercase"]:
        raise ValueError(f"load_profanity_model: `lowercase` is {meta['lowercase']!r}; expected true.")
    with np.load(data_dir / MODEL_FILE, allow_pickle=False) as arrays:
        return ProfanityModel(
            token_pattern=re.compile(meta["token_pattern"]),
            vocabulary={word: index for index, word in enumerate(meta["vocabulary"])},
            idf=arrays["idf"],
            coef=arrays["coef"],
            intercept=arrays["intercept"],
            sigmoid_a=arrays["sigmoid_a"],
            sigmoid_b=arrays["sigmoid_b"],
        )


@functools.cache
def _shipped_model() -> ProfanityModel:
    """The model shipped with the package, read once per process."""
    return load_profanity_model()


def _tfidf(model: ProfanityModel, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted vocabulary indices i64[m] and their l2-normalised tf-idf values f64[m] for one text."""
    indices = [
        model.vocabulary[token] for token in model.token_pattern.findall(text.lower()) if token in model.vocabulary
    ]
    columns, counts = np.unique(np.asarray(indices, np.int64), return_counts=True)
    values = counts * model.idf[columns]
    norm = np.sqrt(values @ values)
    return columns, values / norm if norm > 0 else values


def offensive_probability(texts: Sequence[str], model: ProfanityModel | None = None) -> np.ndarray:
    """P(offensive) f64[B] of each text under the alt-profanity-check model.

    Args:
        texts: B strings.
        model: the exported model; None for the one shipped with mojax.

    Returns:
        f64[B] in [0, 1], equal (to ~1e-16) to ``profanity_check.predict_prob(texts)``.

    References:
        V. Zhou, "Building a Better Profanity Detection Library with scikit-learn", 2019 (profanity-check);
        J. Platt, "Probabilistic Outputs for Support Vector Machines", Advances in Large Margin Classifiers, 1999.
    """
    model = _shipped_model() if model is None else model
    probabilities = np.empty((len(texts),), np.float64)
    for row, text in enumerate(texts):
        columns, values = _tfidf(model, text)
        decision = model.coef[:, columns] @ values + model.intercept
        probabilities[row] = np.mean(1.0 / (1.0 + np.exp(model.sigmoid_a * decision + model.sigmoid_b)))
    return probabilities


def non_toxicity():
    """Built-in reward ``non_toxicity``: 1 - P(offensive) of the completion, in [0, 1] (1 = inoffensive).

    A linear TF-IDF model of offensive English (insults, profanity); it flags words, not intent, so mild
    words ("sucked") score as offensive too. Needs only numpy and the package data shipped with mojax.

    Returns:
        A batched reward ``fn(prompts, completions, **columns) -> list[float]``.

    References:
        V. Zhou, "Building a Better Profanity Detection Library with scikit-learn", 2019; the
        alt-profanity-check 1.9.1 model (MIT licence).

    Example:
        >>> fn = non_toxicity()
        >>> clean, rude = fn(["", ""], ["have a nice day", "shut up you idiot"])
        >>> clean > 0.9 > 0.1 > rude
        True
    """
    _shipped_model()

    def reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        return (1.0 - offensive_probability(completions)).tolist()

    reward.__name__ = "non_toxicity"
    return reward
