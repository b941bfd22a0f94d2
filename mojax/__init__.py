"""mojax: multi-objective alignment for LLMs in JAX/Flax.

Combiners are optax gradient transformations: put one first in an `optax.chain`, feed it
updates whose every leaf carries a leading objective axis of size n, and it returns one update.
Every name of `mojax.combiners` and `mojax.diagnostics` is re-exported here; models live in
`mojax.models`.
"""

from mojax import combiners, diagnostics
from mojax.combiners import *  # noqa: F403 (the public API is exactly combiners.__all__ + diagnostics.__all__)
from mojax.diagnostics import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [*combiners.__all__, *diagnostics.__all__]
