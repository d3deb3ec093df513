"""Glossaries, sentence scores and word alignments: how often terms are used, and what each option costs.

Usage: ``python bench/glossary_bench.py [--repo repo] [--work /tmp/transerve-bench] [--repeats 3] [--budget 12]``
(``--repo``: the zoo's repository, ``make zoo``; ``--work``: document_bench's opus-mt-en-de-shaped model,
built there on first use).

(1) term usage, on the zoo's trained translator (en → de numbers): a constrained test set of 200 num2words
    sentences, each holding at least one source term of a terminology list that asks for forms the model does
    not write by itself ("two" → "zwo", "hundred" → "einhundert", …). Usage = share of (sentence, term) pairs
    whose target appears in the translation; without the glossary for comparison, greedy and beam 4 — target
    ≥ 99 %.
(2) cost, on document_bench's documents and model (opus-mt-en-de-shaped, random weights, greedy fp32, the
    sentence cache off): the same documents with a glossary whose one term occurs in ≤ 10 % of the sentences
    (the most frequent such word)
    against no glossary, sentences/s — target ≤ 10 % slower. Sentences with a term decode with the
    constrained beam (4 rows instead of 1).
(3) scores and alignments: the same documents with ``scores`` and ``alignments`` against plain — the cost of
    the scoring pass, reported.
(4) HTML: the same documents as pages (a ``<p>`` per paragraph, the first number of every sentence in
    ``<b>``, so every block needs word alignments) in ``format: html`` against the plain documents in text
    mode — reported.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import yaml
from num2words import num2words
from tokenizers import Tokenizer
from transerve.server.engine.documents import split_document
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from document_bench import MODEL, documents
from export_bench import command_line, markdown, verdict, write_section
from opus_model import exported
from server_bench import start

HEADING = "## Glossaries, scores and alignments"
ZOO_MODEL = "mt-en-de-numbers"
TERMS = {"two": "zwo", "hundred": "einhundert", "thousand": "eintausend", "seven": "sieben", "twelve": "zwölf",
         "five": "fünf"}
TEST_SENTENCES = 200


def term_sentences(seed: int = 3) -> list[str]:
    """``TEST_SENTENCES`` number sentences, each with at least one source term."""
    rng, out = random.Random(seed), []
    while len(out) < TEST_SENTENCES:
        kind = rng.choice(["cardinal", "cardinal", "ordinal", "year"])
        n = rng.randrange(1100, 2100) if kind == "year" else rng.randrange(1, 100_000)
        text = num2words(n, to=kind, lang="en")
        if any(re.search(rf"\b{w}s?\b", text) for w in TERMS):
            out.append(text)
    return out


async def translate(address: str, model: str, texts: list[str], **options: Any) -> tuple[float, list[str]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tpb_grpc.TranslatorStub(channel)
        start_t = time.perf_counter()
        replies = await asyncio.gather(*(stub.Translate(tpb.TranslateRequest(
            model=model, texts=[t], options=tpb.TranslateOptions(**options)), timeout=600) for t in texts))
        return time.perf_counter() - start_t, [r.translations[0].text for r in replies]


def usage_rows(repo: Path) -> list[dict[str, Any]]:
    texts = term_sentences()
    wanted = [[TERMS[w] for w in TERMS if re.search(rf"\b{w}s?\b", t)] for t in texts]
    pairs = sum(len(w) for w in wanted)
    glossary = [tpb.GlossaryEntry(source=s, target=t) for s, t in TERMS.items()]
    rows = []
    process, address = start(repo)
    try:
        for beam in (1, 4):
            rates = {}
            for name, entries in (("without", []), ("with", glossary)):
                _, out = asyncio.run(translate(address, ZOO_MODEL, texts, beam_size=beam, glossary=entries,
                                               cache=False))
                used = sum(term in o for o, terms in zip(out, wanted, strict=True) for term in terms)
                rates[name] = used / pairs
            rows.append({"search": "greedy" if beam == 1 else f"beam {beam}",
                         "test set": f"{len(texts)} sentences, {pairs} (sentence, term) pairs",
                         "term usage without glossary": f"{rates['without']:.1%}",
                         "term usage with glossary": f"{rates['with']:.1%}",
                         "target": verdict("≥ 99 %", rates["with"] >= 0.99)})
            print(rows[-1], flush=True)
    finally:
        process.terminate()
        process.wait(30)
    return rows


def tenth_term(docs: list[str], tokenizer: Tokenizer) -> tuple[str, str, float]:
    """The word of the documents in the largest share of their sentences up to 10 %, a target the model's
    vocabulary writes, and that share."""
    sentences = [s.lower() for d in docs for s in split_document(d).sentences]
    counts = Counter(w for s in sentences for w in set(re.findall(r"[a-z]+", s)))
    word = max((w for w in counts if counts[w] <= 0.10 * len(sentences)), key=lambda w: (counts[w], w))
    target = next(t for t in ("zwei", "Zwei", word.capitalize(), word)
                  if tokenizer.decode(tokenizer.encode(t, add_special_tokens=False).ids).strip() == t)
    return word, target, counts[word] / len(sentences)


def as_page(document: str) -> str:
    """A document as HTML: a ``<p>`` per paragraph, each sentence's first word in ``<b>``."""
    paragraphs = []
    for paragraph in document.split("\n\n"):
        sentences = split_document(paragraph).sentences
        paragraphs.append("<p>" + " ".join(re.sub(r"^(\w+)", r"<b>\1</b>", s) for s in sentences) + "</p>")
    return "<!DOCTYPE html>\n<html><body>\n" + "\n".join(paragraphs) + "\n</body></html>"


def cost_rows(work: Path, repeats: int, budget: int) -> list[dict[str, Any]]:
    repo = exported(work)
    config = yaml.safe_load((repo / MODEL / "config.yaml").read_text())
    config["scheduler"]["max_active_sequences"] = 128
    config["batching"]["max_queue_size"] = 2048
    (repo / MODEL / "config.yaml").write_text(yaml.safe_dump(config))
    docs = documents()
    count = sum(len(split_document(d).spans) for d in docs)
    word, target, share = tenth_term(docs, Tokenizer.from_file(str(repo / MODEL / "tokenizer.json")))
    plain: dict[str, Any] = {"max_new_tokens": budget, "cache": False}
    variants = {"plain": plain,
                "glossary": {**plain, "glossary": [tpb.GlossaryEntry(source=word, target=target)]},
                "scores + alignments": {**plain, "scores": True, "alignments": True}}
    pages = [as_page(d) for d in docs]
    times: dict[str, list[float]] = {name: [] for name in [*variants, "html"]}
    process, address = start(repo)
    try:
        asyncio.run(translate(address, MODEL, ["One. Two."], **plain))  # warm-up
        for _ in range(repeats):
            for name, options in variants.items():
                times[name].append(asyncio.run(translate(address, MODEL, docs, **options))[0])
            times["html"].append(asyncio.run(translate(address, MODEL, pages, format=tpb.FORMAT_HTML, **plain))[0])
        _, out = asyncio.run(translate(address, MODEL, docs, **variants["glossary"]))
    finally:
        process.terminate()
        process.wait(30)
    rate = {name: count / statistics.median(t) for name, t in times.items()}
    needed = [s for d in docs for s in split_document(d).sentences if re.search(rf"\b{word}s?\b", s, re.I)]
    used = sum(o.count(target) for o in out)
    glossary_cost = 1 - rate["glossary"] / rate["plain"]
    scoring_cost = 1 - rate["scores + alignments"] / rate["plain"]
    html_cost = 1 - rate["html"] / rate["plain"]
    return [{"option": f"glossary: {word!r} → {target!r}, in {share:.0%} of {count} sentences",
             "plain sentences/s": f"{rate['plain']:.1f}", "with option sentences/s": f"{rate['glossary']:.1f}",
             "cost": f"{glossary_cost:.1%}", "terms written": f"{min(used, len(needed))} of {len(needed)}",
             "target": verdict("≤ 10 %", glossary_cost <= 0.10)},
            {"option": f"scores + alignments, {count} sentences", "plain sentences/s": f"{rate['plain']:.1f}",
             "with option sentences/s": f"{rate['scores + alignments']:.1f}", "cost": f"{scoring_cost:.1%}",
             "terms written": "-", "target": "reported"},
            {"option": f"format html, {count} sentences in <p>, each with a <b>", "plain sentences/s":
             f"{rate['plain']:.1f}", "with option sentences/s": f"{rate['html']:.1f}", "cost": f"{html_cost:.1%}",
             "terms written": "-", "target": "reported"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("repo"), help="the zoo's repository (make zoo)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/transerve-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=12, help="new tokens per sentence in (2) and (3)")
    args = parser.parse_args()
    usage = usage_rows(args.repo)
    cost = cost_rows(args.work, args.repeats, args.budget)
    tables = "\n\n".join(markdown(rows) for rows in (usage, cost))
    print(tables)
    write_section(Path(__file__).with_name("RESULTS.md"), HEADING,
                  f"{HEADING}: term usage on the zoo translator; glossary and scoring cost on document_bench's "
                  f"documents and opus-mt-en-de-shaped random model, {args.budget} new tokens a sentence "
                  f"(median of {args.repeats})\n\n{command_line()}\n\n{tables}\n")


if __name__ == "__main__":
    main()
