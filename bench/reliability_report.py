"""Write the figures of the last reliability test run into RELIABILITY.md.

The reliability tests (tests/test_bad_inputs.py, test_fuzz.py, test_misbehaving_clients.py, test_overload.py,
test_faults.py, test_soak.py, test_server_lifecycle.py) append their figures to ``.reliability/figures.jsonl``
(or ``$TRANSERVE_FIGURES``). This script keeps the newest record of each test and rewrites the part of
RELIABILITY.md between its figure markers, with the commit and the CPU that produced them.

Usage: ``python bench/reliability_report.py [--figures FILE] [--out RELIABILITY.md]`` after
``pytest tests/test_bad_inputs.py tests/test_fuzz.py tests/test_misbehaving_clients.py tests/test_overload.py
tests/test_faults.py tests/test_soak.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_bench import machine

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- figures:start -->", "<!-- figures:end -->"


def newest(figures: Path) -> dict[str, dict[str, object]]:
    """The last record of each test in the figures file."""
    records: dict[str, dict[str, object]] = {}
    for line in figures.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[str(record["test"])] = record
    return records


def shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {shown(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " → ".join(shown(v) for v in value)
    return str(value)


def table(records: dict[str, dict[str, object]]) -> str:
    rows = ["| test | figures |", "|---|---|"]
    for name in sorted(records):
        values = {k: v for k, v in records[name].items() if k not in ("test", "time")}
        rows.append(f"| `{name}` ({records[name]['time']}) | " + "; ".join(
            f"{k.replace('_', ' ')}: {shown(v)}" for k, v in values.items()).replace("|", "/") + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", type=Path, default=ROOT / ".reliability" / "figures.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "RELIABILITY.md")
    args = parser.parse_args()
    section = (f"{START}\n{machine()}. Each row is the newest record of that test in "
               f"`{args.figures.name}`.\n\n{table(newest(args.figures))}\n{END}")
    text = args.out.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.out}: no {START} … {END} section to rewrite")
    args.out.write_text(text[:text.index(START)] + section + text[text.index(END) + len(END):])
    print(f"wrote {len(newest(args.figures))} tests' figures into {args.out}")


if __name__ == "__main__":
    main()
