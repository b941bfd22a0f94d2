"""A context manager that records every XLA compilation started inside it, to test that code does not recompile."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import jax


class _Collector(logging.Handler):
    """Keeps the log records that announce a compilation."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "Compiling" in record.getMessage():
            self.records.append(record)


@contextlib.contextmanager
def compilations() -> Iterator[list[logging.LogRecord]]:
    """Yields the list of 'Compiling ...' records that jax logs (with ``jax.log_compiles``) inside the block."""
    collector = _Collector()
    logger = logging.getLogger("jax")
    previous_level = logger.level
    logger.addHandler(collector)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield collector.records
    finally:
        logger.removeHandler(collector)
        logger.setLevel(previous_level)
