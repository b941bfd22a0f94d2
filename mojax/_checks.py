"""Argument checks shared by every public entry point of mojax: one place, one message convention.

Every message reads ``"<callable>: `<arg>` <what was seen>; expected <what>."``. A value of the wrong
type raises ``TypeError``; a value of the right type but outside its domain raises ``ValueError``.
The checks run on concrete Python or numpy values at construction time, before anything is traced. A scalar
hyperparameter may also be a traced JAX value (``optax.inject_hyperparams`` rebuilds a factory inside ``update`` with
its hyperparameters as arrays): its type is checked, and its range, which a tracer does not know, is not.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SIMPLEX_ATOL = 1e-6
"""Tolerance on sum(w) = 1 for every preference or weight vector that must lie on the simplex."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
"""Objective and metric names: letters, digits, '_' and '-'."""


def message(where: str, arg: str, seen: str, expected: str) -> str:
    """The project's message: ``<where>: `<arg>` <seen>; expected <expected>.``"""
    return f"{where}: `{arg}` {seen}; expected {expected}."


def is_traced(value: Any) -> bool:
    """Whether `value` is an abstract JAX value (inside jit): its numbers are unknown until run time."""
    return isinstance(value, jax.core.Tracer)


def number(where: str, arg: str, value: Any) -> Any:
    """float(value) for a real number (bool excluded) or a real 0-d array; a traced 0-d value is returned as is."""
    if isinstance(value, jax.Array | np.ndarray) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.number):
        return value if is_traced(value) else float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real | np.floating | np.integer):
        raise TypeError(message(where, arg, f"is a {type(value).__name__} ({value!r})", "a real number"))
    return float(value)


def integer(where: str, arg: str, value: Any, *, minimum: int | None = None) -> int:
    """int(value) for an integer (bool excluded) >= minimum; TypeError or ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral | np.integer):
        raise TypeError(message(where, arg, f"is a {type(value).__name__} ({value!r})", "an integer"))
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(message(where, arg, f"is {value}", f"an integer >= {minimum}"))
    return value


def finite(where: str, arg: str, value: Any) -> float:
    """A finite real number; TypeError for a non-number, ValueError for inf or NaN (a traced value is not checked)."""
    value = number(where, arg, value)
    if is_traced(value):
        return value
    if not math.isfinite(value):
        raise ValueError(message(where, arg, f"is {value}", "a finite number"))
    return value


def in_range(
    where: str,
    arg: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    meaning: str = "",
) -> float:
    """A finite number in [low, high] (or the open variants); ValueError naming the interval otherwise."""
    value = finite(where, arg, value)
    if is_traced(value):
        return value
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        explained = f" ({meaning})" if meaning else ""
        raise ValueError(message(where, arg, f"is {value:g}", f"a number in {interval}{explained}"))
    return value


def nonnegative(where: str, arg: str, value: Any, meaning: str = "") -> float:
    """A finite number >= 0."""
    return in_range(where, arg, value, low=0.0, meaning=meaning)


def positive(where: str, arg: str, value: Any, meaning: str = "") -> float:
    """A finite number > 0."""
    return in_range(where, arg, value, low=0.0, low_open=True, meaning=meaning)


def choice(where: str, arg: str, value: Any, options: Iterable[str]) -> str:
    """value if it is one of `options`; ValueError listing them otherwise."""
    options = tuple(options)
    if value not in options:
        raise ValueError(message(where, arg, f"is {value!r}", f"one of {', '.join(map(repr, options))}"))
    return value


def finite_vector(where: str, arg: str, value: Any, *, length: int | None = None) -> np.ndarray:
    """f64[n] from a sequence or array of finite numbers (a scalar broadcasts when `length` is given)."""
    try:
        array = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise TypeError(message(where, arg, f"is {value!r}", "a vector of real numbers")) from None
    if array.ndim == 0 and length is not None:
        array = np.full((length,), float(array))
    if array.ndim != 1 or array.size == 0:
        raise ValueError(message(where, arg, f"has shape {array.shape}", "a non-empty vector"))
    if length is not None and array.size != length:
        raise ValueError(message(where, arg, f"has {array.size} entries", f"{length}, one per objective"))
    if not np.all(np.isfinite(array)):
        raise ValueError(message(where, arg, f"is {array.tolist()}", "finite entries (no NaN or inf)"))
    return array


def simplex(where: str, arg: str, value: Any, *, length: int | None = None) -> np.ndarray:
    """A finite vector with entries >= 0 summing to 1 (within SIMPLEX_ATOL)."""
    array = finite_vector(where, arg, value, length=length)
    if np.any(array < 0) or abs(array.sum() - 1.0) > SIMPLEX_ATOL:
        raise ValueError(
            message(where, arg, f"is {array.tolist()}", "a point of the simplex: entries >= 0 summing to 1")
        )
    return array


def names(where: str, arg: str, values: Sequence[str]) -> tuple[str, ...]:
    """Distinct names matching [A-Za-z0-9_-]+."""
    values = tuple(values)
    for value in values:
        if not isinstance(value, str):
            raise TypeError(message(where, arg, f"holds {value!r}", "strings"))
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(message(where, arg, f"holds {value!r}", "names made of letters, digits, '_' and '-'"))
    duplicates = sorted({value for value in values if values.count(value) > 1})
    if duplicates:
        raise ValueError(message(where, arg, f"repeats {duplicates}", "distinct names"))
    return values
