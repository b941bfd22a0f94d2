"""mojax: multi-objective alignment for LLMs in JAX/Flax."""
