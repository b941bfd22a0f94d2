"""What ``load_tokenizer`` spends on a GGUF file's tokenizer: transformers' conversion from the file's vocabulary
against the HF tokenizer folder it keeps, in one process (transformers imported before any timing).

Each round times, on a new empty folder of kept tokenizers (``MOJAX_TOKENIZER_CACHE``):

- ``converted``: ``MOJAX_TOKENIZER_CACHE=off``, the conversion alone (the file's ``tokenizer.ggml.*`` fields read
  through the ``gguf`` package, then transformers' converter);
- ``converted and kept``: the first load on the empty folder, the conversion and the folder written;
- ``kept``: the next load, which reads that folder.

Reported per kind: median (min-max) over the rounds, and whether every load gave the same tokenizer (its
``tokenizer.json``, special tokens and chat template). Results go to ``OUT/tokenizer_load.{json,md}``.

    MOJAX_CACHE=/tmp/mojax-data-cache python benchmarks/tokenizer_load.py          # SmolLM2-135M's GGUF
    python benchmarks/tokenizer_load.py --gguf FILE --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from mojax.models import load_tokenizer
from mojax.testing import benchmark_command, cpu_summary, report_heading, write_report

REPO = Path(__file__).resolve().parents[1]
KINDS = ("converted", "converted and kept", "kept")


def fingerprint(tokenizer) -> tuple[str, str, str]:
    """What makes two loads the same tokenizer: its ``tokenizer.json``, special tokens and chat template."""
    return (
        tokenizer.backend_tokenizer.to_str(),
        repr(sorted(tokenizer.special_tokens_map.items())),
        str(tokenizer.chat_template),
    )


def timed_load(path: str, kept_folder: str) -> tuple[float, tuple[str, str, str]]:
    """(seconds, fingerprint) of one ``load_tokenizer(path)`` with ``MOJAX_TOKENIZER_CACHE=kept_folder`` (left set in
    this process)."""
    os.environ["MOJAX_TOKENIZER_CACHE"] = kept_folder
    started = time.perf_counter()
    tokenizer = load_tokenizer(path)
    return time.perf_counter() - started, fingerprint(tokenizer)


def measure_round(path: str) -> tuple[dict[str, float], set[tuple[str, str, str]]]:
    """Kind -> seconds for one round, and the fingerprints of its loads."""
    with tempfile.TemporaryDirectory(prefix="tokenizer-load-") as folder:
        loads = {kind: timed_load(path, "off" if kind == "converted" else folder) for kind in KINDS}
    return {kind: seconds for kind, (seconds, _) in loads.items()}, {found for _, found in loads.values()}


def markdown(report: dict) -> str:
    """The report's table."""
    lines = [
        *report_heading("`load_tokenizer` of a GGUF file: converted, or read from the folder it keeps", report),
        f"File: `{report['gguf']}`; {len(report['rounds'])} round(s); median (min-max) over the rounds.",
        "",
        "| load | s | x kept |",
        "|---|---:|---:|",
    ]
    kept = report["summary"]["kept"][0]
    for kind in KINDS:
        median, low, high = report["summary"][kind]
        lines.append(f"| {kind} | {median:.3f} ({low:.3f}-{high:.3f}) | {median / kept:.1f} |")
    same = "yes" if report["same_tokenizer"] else "NO"
    lines += ["", f"Every load gave the same tokenizer: {same}.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default=None, help="the GGUF file (default: SmolLM2-135M's, `mojax fetch smollm2`)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three loads (default 3)")
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

    rounds, fingerprints = [], set()
    for index in range(1, args.rounds + 1):
        seconds, found = measure_round(args.gguf)
        rounds.append(seconds)
        fingerprints |= found
        print(f"round {index}: " + ", ".join(f"{kind} {seconds[kind]:.3f} s" for kind in KINDS))
    report = {
        "command": benchmark_command("benchmarks/tokenizer_load.py", sys.argv[1:] if argv is None else argv),
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
        "same_tokenizer": len(fingerprints) == 1,
    }
    table = markdown(report)
    write_report(args.out, "tokenizer_load", report, table)
    print(table)
    return report


if __name__ == "__main__":
    main()
