"""What opening a GGUF model costs before its weights: parsing the file's header (its metadata, the tokenizer's
vocabulary among them) and the tokenizer, in one process (transformers imported before any timing).

Each round times:

- ``header: gguf.GGUFReader``: the ``gguf`` package's reader over the file's ``np.memmap``;
- ``header: mojax's reader``: the same reader over a plain ``ndarray`` view of the map, as ``GGUFFile`` opens a file;
- ``tokenizer: converted``: ``load_tokenizer`` with ``MOJAX_TOKENIZER_CACHE=off``, transformers' conversion alone
  (the file's ``tokenizer.ggml.*`` fields read through the ``gguf`` package, then transformers' converter);
- ``tokenizer: converted and kept``: the first load on a new empty folder of kept tokenizers, the conversion and the
  folder written;
- ``tokenizer: kept``: the next load, which reads that folder.

Reported per kind: median (min-max) over the rounds; whether both readers parsed the same fields and tensors, and
whether every tokenizer load gave the same tokenizer (its ``tokenizer.json``, special tokens and chat template).
Results go to ``OUT/gguf_load.{json,md}``.

    MOJAX_CACHE=/tmp/mojax-data-cache python benchmarks/gguf_load.py          # SmolLM2-135M's GGUF
    python benchmarks/gguf_load.py --gguf FILE --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mojax.models import load_tokenizer
from mojax.models.gguf import array_view_reader
from mojax.testing import benchmark_command, cpu_summary, report_heading, write_report

REPO = Path(__file__).resolve().parents[1]
HEADER_KINDS = ("header: gguf.GGUFReader", "header: mojax's reader")
TOKENIZER_KINDS = ("tokenizer: converted", "tokenizer: converted and kept", "tokenizer: kept")
KINDS = HEADER_KINDS + TOKENIZER_KINDS


def tokenizer_fingerprint(tokenizer) -> tuple[str, str, str]:
    """What makes two loads the same tokenizer: its ``tokenizer.json``, special tokens and chat template."""
    return (
        tokenizer.backend_tokenizer.to_str(),
        repr(sorted(tokenizer.special_tokens_map.items())),
        str(tokenizer.chat_template),
    )


def header_fingerprint(reader) -> tuple[str, ...]:
    """What makes two parses the same: every field's name and contents, every tensor's name, type, shape and bytes."""
    fields = tuple(f"{name}={field.contents()!r}" for name, field in reader.fields.items())
    tensors = tuple(f"{t.name}:{t.tensor_type.name}:{tuple(t.shape)}:{hash(t.data.tobytes())}" for t in reader.tensors)
    return fields + tensors


def timed(load: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = load()
    return time.perf_counter() - started, result


def timed_tokenizer(path: str, kept_folder: str) -> tuple[float, tuple[str, str, str]]:
    """(seconds, fingerprint) of one ``load_tokenizer(path)`` with ``MOJAX_TOKENIZER_CACHE=kept_folder`` (left set in
    this process)."""
    os.environ["MOJAX_TOKENIZER_CACHE"] = kept_folder
    seconds, tokenizer = timed(lambda: load_tokenizer(path))
    return seconds, tokenizer_fingerprint(tokenizer)


def measure_round(path: str) -> tuple[dict[str, float], set, set]:
    """Kind -> seconds for one round; the fingerprints of its two header parses and of its tokenizer loads."""
    import gguf

    headers = {
        kind: timed(lambda reader=reader: reader(path))
        for kind, reader in zip(HEADER_KINDS, (gguf.GGUFReader, array_view_reader()), strict=True)
    }
    with tempfile.TemporaryDirectory(prefix="gguf-load-") as folder:
        kept = {"tokenizer: converted": "off"}
        tokenizers = {kind: timed_tokenizer(path, kept.get(kind, folder)) for kind in TOKENIZER_KINDS}
    seconds = {kind: result[0] for kind, result in {**headers, **tokenizers}.items()}
    parses = {header_fingerprint(reader) for _, reader in headers.values()}
    return seconds, parses, {found for _, found in tokenizers.values()}


def markdown(report: dict) -> str:
    """The report's table."""
    lines = [
        *report_heading("Opening a GGUF file: its header and its tokenizer", report),
        f"File: `{report['gguf']}`; {len(report['rounds'])} round(s); median (min-max) over the rounds.",
        "",
        "| load | s |",
        "|---|---:|",
    ]
    for kind in KINDS:
        median, low, high = report["summary"][kind]
        lines.append(f"| {kind} | {median:.3f} ({low:.3f}-{high:.3f}) |")
    same = {True: "yes", False: "NO"}
    lines += [
        "",
        f"Both readers parsed the same fields and tensors: {same[report['same_header']]}. "
        f"Every tokenizer load gave the same tokenizer: {same[report['same_tokenizer']]}.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default=None, help="the GGUF file (default: SmolLM2-135M's, `mojax fetch smollm2`)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the five loads (default 3)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="the reports' folder")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.gguf is None:
        from mojax.data import smollm2_gguf

        args.gguf = str(smollm2_gguf())
    import transformers  # noqa: F401  (imported before the first timing)

    rounds, parses, tokenizers = [], set(), set()
    for index in range(1, args.rounds + 1):
        seconds, round_parses, round_tokenizers = measure_round(args.gguf)
        rounds.append(seconds)
        parses |= round_parses
        tokenizers |= round_tokenizers
        print(f"round {index}: " + ", ".join(f"{kind} {seconds[kind]:.3f} s" for kind in KINDS))
    report = {
        "command": benchmark_command("benchmarks/gguf_load.py", sys.argv[1:] if argv is None else argv),
        "machine": cpu_summary(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gguf": Path(args.gguf).name,
        "rounds": rounds,
        "summary": {
            kind: (
                statistics.median(r[kind] for r in rounds),
                min(r[kind] for r in rounds),
                max(r[kind] for r in rounds),
            )
            for kind in KINDS
        },
        "same_header": len(parses) == 1,
        "same_tokenizer": len(tokenizers) == 1,
    }
    table = markdown(report)
    write_report(args.out, "gguf_load", report, table)
    print(table)
    return report


if __name__ == "__main__":
    main()
