"""The README's combiners table and ``mojax.combiners.REGISTRY`` list the same methods."""

import re
from pathlib import Path

from mojax.combiners import REGISTRY

README = Path(__file__).resolve().parents[1] / "README.md"


def table_names() -> list[str]:
    """The backquoted first cell of every row of the table headed ``| registry name |``."""
    lines = README.read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("| registry name |"))
    names = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        match = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        assert match, f"a README table row without a backquoted registry name: {line!r}"
        names.append(match.group(1))
    return names


def test_every_registry_entry_is_in_the_readme_table():
    assert sorted(set(REGISTRY) - set(table_names())) == []


def test_every_readme_table_row_is_a_registry_entry():
    names = table_names()
    assert sorted(set(names) - set(REGISTRY)) == []
    assert len(names) == len(set(names)), names
