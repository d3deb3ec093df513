"""Document splitting: sentences are spans of the original, so putting translations back keeps every character
between them; the splitter gets our test set right."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from transerve.server.engine.documents import split_document

CASES = json.loads((Path(__file__).parent / "data" / "segmentation_cases.json").read_text())

words = st.sampled_from(["The", "server", "answers", "Dr.", "3.5", "e.g.", "U.S.", "Kubernetes", "他来了。", "“Stop.”",
                         "-", "1.", "ok", "Heading", "x"])
gaps = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n \n ", "\r\n", "", "\u00a0"])
ends = st.sampled_from(["", ".", "!", "?", "...", "…", ":"])


@st.composite
def documents(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.tuples(words, ends, gaps), max_size=40))
    return draw(gaps) + "".join(w + e + g for w, e, g in parts)


@given(documents())
@settings(max_examples=300, deadline=None)
def test_reassembly_keeps_every_character_between_sentences(text: str) -> None:
    doc = split_document(text)
    assert doc.reassemble(doc.sentences) == text
    assert doc.reassemble(["X"] * len(doc.spans)).count("X") >= len(doc.spans)
    previous_end = 0
    for start, end in doc.spans:  # in order, disjoint, non-empty, trimmed
        assert previous_end <= start < end
        assert text[start:end] == text[start:end].strip()
        previous_end = end
    gaps_between = [doc.gap_before(i) for i in range(len(doc.spans))] + [doc.tail()]
    assert all(not gap.strip() for gap in gaps_between)  # nothing but whitespace is left untranslated
    covered = "".join(doc.gap_before(i) + doc.sentences[i] for i in range(len(doc.spans))) + doc.tail()
    assert covered == text


def test_whitespace_and_empty_documents_have_no_sentences() -> None:
    for text in ("", " ", "\n\n\t", "\u00a0"):
        doc = split_document(text)
        assert doc.spans == () and doc.reassemble([]) == text


def test_the_test_set_is_split_as_the_benchmark_says() -> None:
    """29 of the 30 cases of tests/data/segmentation_cases.json (bench/RESULTS.md, "Sentence splitters"): the
    one miss is "Wait… What was that?", kept whole."""
    wrong = [case["kind"] for case in CASES
             if split_document(case["text"], case["lang"]).sentences != case["sentences"]]
    assert wrong == ["ellipses"]


def test_paragraphs_lines_and_spacing_come_back_as_sent() -> None:
    text = "  Title\n\nFirst one.  Second one!\n- item\n\tIndented line.\r\n\r\nLast, wrapped\nover two lines.  \n"
    doc = split_document(text)
    assert doc.sentences == ["Title", "First one.", "Second one!", "- item", "Indented line.",
                             "Last, wrapped\nover two lines."]
    assert doc.reassemble([s.upper() for s in doc.sentences]) == (
        "  TITLE\n\nFIRST ONE.  SECOND ONE!\n- ITEM\n\tINDENTED LINE.\r\n\r\nLAST, WRAPPED\nOVER TWO LINES.  \n")
