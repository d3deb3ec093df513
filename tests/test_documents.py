"""Document splitting: sentences are spans of the original, so putting translations back keeps every character
between them; the splitter gets our test set right."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transerve.server.engine.document_plan import DocumentPlanner, TextLimits
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


@pytest.fixture(scope="module")
def planner(small_repo: Path) -> DocumentPlanner:
    tokenizer = Tokenizer.from_file(str(small_repo / "tiny-mt" / "tokenizer.json"))
    return DocumentPlanner(tokenizer, eos_id=2, limits=TextLimits(
        max_chars=50_000, max_sentences=10_000, max_input_tokens=20, default_budget=16, hard_budget=47,
        language="en"))


def test_a_long_sentence_is_cut_into_pieces_that_fit_at_its_best_boundaries(planner: DocumentPlanner) -> None:
    clause = "seven hundred and twelve, forty three; nine hundred and one"
    text = "One. " + " ".join([clause] * 30) + " Two."
    plan = planner.plan_one(text, "texts[0]", None)
    assert plan.document.reassemble(plan.document.sentences) == text
    assert all(len(s) <= 20 for s in plan.sources)  # every piece fits the encoder, EOS included
    assert len(plan.sources) > 10 and plan.document.sentences[0] == "One." and plan.document.sentences[-1] == "Two."
    middle = plan.document.sentences[1:-1]
    assert sum(p.endswith((",", ";")) for p in middle) >= len(middle) // 2  # cut after punctuation where it can


def test_a_sentence_without_any_boundary_is_cut_at_tokens(planner: DocumentPlanner) -> None:
    text = "seven" * 10_000  # 50 000 characters, not one space
    plan = planner.plan_one(text, "texts[0]", None)
    assert "".join(plan.document.sentences) == text and all(len(s) <= 20 for s in plan.sources)


def test_budgets_scale_with_the_source_unless_the_request_sets_one(planner: DocumentPlanner) -> None:
    """The larger of the default (16) and 2 × source tokens (EOS included) + 10, capped by the hard limit (47)."""
    plan = planner.plan_one("seven. seven hundred and twelve thousand.", "texts[0]", None)
    short, long = (len(s) for s in plan.sources)
    assert plan.budgets == [2 * short + 10, 47] and 16 < 2 * short + 10 < 47 < 2 * long + 10
    larger_default = DocumentPlanner(planner.tokenizer, 2, replace(planner.limits, default_budget=30))
    assert larger_default.plan_one("seven.", "texts[0]", None).budgets == [30]  # never below the default
    assert planner.plan_one("seven. eight.", "texts[0]", 5).budgets == [5, 5]
