"""Sentence splitters compared, to pick the one document translation uses (issue 25).

Usage: ``python bench/sentence_splitters.py [--repeats 5]``. Candidates: sentencex, pysbd, blingfire, syntok
(each skipped, saying so, where not installed: only the chosen one is a project dependency; install the others
with ``pip install sentencex pysbd blingfire syntok`` to rerun the comparison).

(1) accuracy on ``tests/data/segmentation_cases.json``: 30 cases in English, German, French, Spanish, Chinese and
    Japanese — abbreviations, decimals and dates, quotes, ellipses, lists, headings without punctuation, CJK
    full stops, hard-wrapped lines, text without newlines. A case counts when the splitter's sentences
    (whitespace stripped) are exactly the expected ones. Every candidate gets what the server gives the splitter:
    the text of one paragraph (blank lines are paragraph breaks the server splits at itself);
    The last row is what the server runs: sentencex after transerve's own line-break and list-number rules
    (``server/engine/documents.py``);
(2) speed: the cases' texts repeated to ~300 000 characters, median ms per 100 000 characters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, markdown, write_section

CASES = Path(__file__).parents[1] / "tests" / "data" / "segmentation_cases.json"
HEADING = "## Sentence splitters"
Splitter = Callable[[str, str], list[str]]


def candidates() -> dict[str, Splitter | str]:
    """Name → split(lang, text), or the reason it cannot run."""
    out: dict[str, Splitter | str] = {}
    try:
        import sentencex
        out["sentencex"] = lambda lang, text: list(sentencex.segment(lang, text))
    except ImportError as e:
        out["sentencex"] = f"not installed ({e.name})"
    try:
        import pysbd
        segmenters: dict[str, pysbd.Segmenter] = {}

        def pysbd_split(lang: str, text: str) -> list[str]:
            if lang not in segmenters:
                segmenters[lang] = pysbd.Segmenter(language=lang, clean=False)
            return list(segmenters[lang].segment(text))
        out["pysbd"] = pysbd_split
    except ImportError as e:
        out["pysbd"] = f"not installed ({e.name})"
    try:
        import blingfire
        out["blingfire"] = lambda lang, text: blingfire.text_to_sentences(text).split("\n")
    except ImportError as e:
        out["blingfire"] = f"not installed ({e.name})"
    try:
        from syntok import segmenter
        out["syntok"] = lambda lang, text: ["".join(str(t) for t in s) for p in segmenter.analyze(text) for s in p]
    except ImportError as e:
        out["syntok"] = f"not installed ({e.name})"
    from transerve.server.engine.documents import split_document
    out["transerve (sentencex + its line rules)"] = lambda lang, text: split_document(text, lang).sentences
    return out


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def sentences(split: Splitter, lang: str, text: str) -> list[str]:
    return [s.strip() for p in paragraphs(text) for s in split(lang, p) if s.strip()]


def accuracy(split: Splitter, cases: list[dict]) -> tuple[int, list[str]]:
    """(cases right, the kinds it got wrong)."""
    wrong = []
    for case in cases:
        try:
            got = sentences(split, case["lang"], case["text"])
        except Exception as e:  # a splitter that fails on a language counts as wrong there
            got = [f"{type(e).__name__}"]
        if got != [s.strip() for s in case["sentences"]]:
            wrong.append(f"{case['lang']} {case['kind']}")
    return len(cases) - len(wrong), wrong


def speed_ms(split: Splitter, cases: list[dict], repeats: int) -> float:
    """Median ms per 100 000 characters of English and German text."""
    text = "\n\n".join(c["text"] for c in cases if c["lang"] in ("en", "de"))
    big = "\n\n".join([text] * max(1, 300_000 // len(text)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for p in paragraphs(big):
            split("en", p)
        times.append((time.perf_counter() - start) * 1000 * 100_000 / len(big))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cases = json.loads(CASES.read_text())
    rows = []
    for name, split in candidates().items():
        if isinstance(split, str):
            rows.append({"splitter": name, "cases right": split, "wrong on": "", "ms / 100 000 chars": ""})
            continue
        right, wrong = accuracy(split, cases)
        rows.append({"splitter": name, "cases right": f"{right} / {len(cases)}", "wrong on": "; ".join(wrong),
                     "ms / 100 000 chars": f"{speed_ms(split, cases, args.repeats):.1f}"})
    table = markdown(rows)
    print(table)
    write_section(Path(__file__).with_name("RESULTS.md"), HEADING,
                  f"{HEADING}: candidates for document translation's sentence splitting (median of "
                  f"{args.repeats} runs)\n\n{command_line()}\n\n{table}\n")


if __name__ == "__main__":
    main()
