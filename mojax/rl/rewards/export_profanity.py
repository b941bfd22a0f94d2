"""Exports the alt-profanity-check 1.9.1 model to plain arrays (npz + json) and verifies the numpy scores.

Run once, with the Python of a throw-away virtual environment (scikit-learn is not a mojax dependency)::

    python -m venv /tmp/profanity && /tmp/profanity/bin/pip install alt-profanity-check==1.9.1
    /tmp/profanity/bin/python mojax/rl/rewards/export_profanity.py

It is run by path, not as ``-m mojax...``, because that environment has no JAX. It loads the pickled
vectorizer and calibrated LinearSVC (the only place where the pickles are ever loaded), writes
``data/profanity_model.npz`` and ``data/profanity_vocabulary.json`` next to this file, then scores 600
texts with scikit-learn and with :func:`profanity.offensive_probability` and prints the largest difference.
alt-profanity-check is MIT-licensed: its licence ships beside the arrays as ``data/LICENSE.alt-profanity-check``
and the json repeats the copyright line.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

SOURCE = "alt-profanity-check==1.9.1 (scikit-learn 1.9.1)"
LICENCE = (
    "MIT License. Copyright (c) 2018 Victor Zhou, 2021 Menelaos Kotoglou, and Dimitrios Mistriotis. "
    "Full text: LICENSE.alt-profanity-check in this folder."
)
VERIFICATION_SIZE = 600


def _load_numpy_reimplementation():
    """profanity.py loaded by path, so that neither mojax nor JAX is imported."""
    path = Path(__file__).resolve().parent / "profanity.py"
    spec = importlib.util.spec_from_file_location("profanity_numpy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export(vectorizer, model, data_dir: Path) -> None:
    """Writes the fitted arrays of `vectorizer` (TfidfVectorizer) and `model` (CalibratedClassifierCV)."""
    params = vectorizer.get_params()
    expected = {"analyzer": "word", "ngram_range": (1, 1), "norm": "l2", "use_idf": True, "sublinear_tf": False}
    expected |= {"binary": False, "strip_accents": None, "preprocessor": None, "tokenizer": None, "lowercase": True}
    differing = {key: params[key] for key in expected if params[key] != expected[key]}
    if differing or model.method != "sigmoid" or list(model.classes_) != [0, 1]:
        raise SystemExit(f"export_profanity: the pipeline differs from the one re-implemented: {differing}")
    vocabulary = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.__getitem__)
    folds = model.calibrated_classifiers_
    arrays = {
        "idf": np.asarray(vectorizer.idf_, np.float64),
        "coef": np.stack([fold.estimator.coef_[0] for fold in folds]).astype(np.float64),
        "intercept": np.asarray([fold.estimator.intercept_[0] for fold in folds], np.float64),
        "sigmoid_a": np.asarray([fold.calibrators[0].a_ for fold in folds], np.float64),
        "sigmoid_b": np.asarray([fold.calibrators[0].b_ for fold in folds], np.float64),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(data_dir / "profanity_model.npz", **arrays)
    meta = {
        "source": SOURCE,
        "licence": LICENCE,
        "lowercase": True,
        "token_pattern": params["token_pattern"],
        "vocabulary": vocabulary,
    }
    (data_dir / "profanity_vocabulary.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def verification_texts(vocabulary: list[str], seed: int = 0) -> list[str]:
    """Hand-written sentences plus random mixtures of vocabulary words, unknown words, case and punctuation."""
    rng = np.random.default_rng(seed)
    texts = [
        "",
        "!!!",
        "have a nice day",
        "shut up you idiot",
        "That movie sucked.",
        "What a WONDERFUL, lovely morning!",
        "I can't believe you'd say that, you fool",
        "naïve café résumé",
    ]
    extras = ["xyzzy", "qwrt", "a", "I", "the", "ÄÖÜ", "42", "don't", "e-mail"]
    while len(texts) < VERIFICATION_SIZE:
        words = [
            str(rng.choice(vocabulary)) if rng.random() < 0.7 else str(rng.choice(extras))
            for _ in range(rng.integers(1, 40))
        ]
        words = [word.upper() if rng.random() < 0.1 else word for word in words]
        texts.append(" ".join(words) + str(rng.choice(["", ".", "!", "?!", " :)"])))
    return texts


def main() -> None:
    from profanity_check import profanity_check

    data_dir = Path(__file__).resolve().parent / "data"
    export(profanity_check.vectorizer, profanity_check.model, data_dir)
    numpy_model = _load_numpy_reimplementation()
    loaded = numpy_model.load_profanity_model(data_dir)
    texts = verification_texts(sorted(loaded.vocabulary, key=loaded.vocabulary.__getitem__))
    reference = profanity_check.predict_prob(texts)
    ours = numpy_model.offensive_probability(texts, loaded)
    sizes = {path.name: path.stat().st_size for path in sorted(data_dir.glob("profanity_*"))}
    print(f"texts={len(texts)} max_abs_diff={np.max(np.abs(reference - ours)):.3g} sizes={sizes}", file=sys.stderr)


if __name__ == "__main__":
    main()
