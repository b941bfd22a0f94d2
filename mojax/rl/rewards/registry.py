"""Objectives from configuration entries: the built-in rewards by name, or any callable as "module:function"."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from mojax import _checks
from mojax.rl.rewards.lexical import readability, sentiment
from mojax.rl.rewards.objectives import Objective
from mojax.rl.rewards.profanity import non_toxicity
from mojax.rl.rewards.text import char_count, char_fraction, conciseness, exact_match, format_match, refusal

BUILTIN_REWARDS: Mapping[str, Callable[..., Callable]] = MappingProxyType(
    {
        "char_count": char_count,
        "char_fraction": char_fraction,
        "conciseness": conciseness,
        "exact_match": exact_match,
        "format": format_match,
        "non_toxicity": non_toxicity,
        "readability": readability,
        "refusal": refusal,
        "sentiment": sentiment,
    }
)
"""Built-in reward name -> factory(**options) returning a batched reward."""

SPEC_KEYS = ("name", "fn", "weight", "kind", "options")


def _import_object(where: str, target: str) -> Any:
    """The attribute named by "package.module:attribute.path"."""
    module_name, _, attribute_path = target.partition(":")
    try:
        found = importlib.import_module(module_name)
        for attribute in attribute_path.split("."):
            found = getattr(found, attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            _checks.message(where, "fn", f"is {target!r} ({error})", "an importable module:function")
        ) from error
    return found


def _build(name: str, factory: Callable, options: Mapping[str, Any], described: str) -> Any:
    """factory(**options), with a TypeError listing the accepted options when they do not bind."""
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(factory).parameters) or "none"
        raise TypeError(
            _checks.message(
                "resolve",
                "options",
                f"of objective {name!r} are {sorted(options)} ({error})",
                f"options of {described}: {accepted}",
            )
        ) from error
    return factory(**options)


def resolve(spec: Mapping[str, Any]) -> Objective:
    """Builds an :class:`Objective` from a configuration entry.

    ``fn`` is a built-in name (``BUILTIN_REWARDS``; ``options`` are its factory's keyword arguments) or
    ``"module:function"``: without ``options`` the imported object is the reward itself (a batched callable,
    a :func:`token_reward` or a :func:`reward_model`); with ``options`` it is a factory called with them.

    Args:
        spec: ``{"name": str, "fn": str, "weight": float = 1.0, "kind": "reward" | "cost", "options": dict}``.

    Returns:
        The objective.

    References:
        L. von Werra et al., "TRL: Transformer Reinforcement Learning", GitHub, 2020 (reward functions named
        by import path in configuration files).

    Example:
        >>> resolve({"name": "positivity", "fn": "sentiment", "weight": 0.5}).weight
        0.5
        >>> resolve({"name": "short", "fn": "conciseness", "options": {"target": 8, "unit": "chars"}}).kind
        'reward'
        >>> resolve({"name": "x", "fn": "sentimnet"})
        Traceback (most recent call last):
        ValueError: resolve: `fn` is 'sentimnet'; expected a built-in reward (char_count, ...) or 'module:function'.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(_checks.message("resolve", "spec", f"is a {type(spec).__name__}", "a mapping"))
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    missing = [key for key in ("name", "fn") if key not in spec]
    if unknown or missing:
        raise ValueError(
            _checks.message(
                "resolve", "spec", f"has keys {sorted(spec)}", f"'name' and 'fn', optionally {SPEC_KEYS[2:]}"
            )
        )
    name, target, options = spec["name"], spec["fn"], spec.get("options") or {}
    if not isinstance(target, str):
        raise TypeError(_checks.message("resolve", "fn", f"is a {type(target).__name__}", "a string"))
    if not isinstance(options, Mapping):
        raise TypeError(_checks.message("resolve", "options", f"is a {type(options).__name__}", "a mapping"))
    if ":" in target:
        found = _import_object("resolve", target)
        fn = _build(name, found, options, target) if options else found
    elif target in BUILTIN_REWARDS:
        fn = _build(name, BUILTIN_REWARDS[target], options, repr(target))
    else:
        known = ", ".join(BUILTIN_REWARDS)
        raise ValueError(
            _checks.message("resolve", "fn", f"is {target!r}", f"a built-in reward ({known}) or 'module:function'")
        )
    return Objective(name, fn, weight=spec.get("weight", 1.0), kind=spec.get("kind", "reward"))
