"""Glossaries: terms a translation must use — the model's own file and a request's entries.

Where a source term occurs in a sentence, its target term becomes a constraint of that sentence's decode
(:mod:`transerve.constrained`): the translation then contains the target exactly as written.

Matching, and why only this much: a source term matches case-insensitively, on word boundaries (not inside
another word), with any run of whitespace where the term has a space, and — for an English source, the only
source language whose inflection we can state without a morphological analyser — with a plural ``s``/``es``
(``invoice`` matches ``Invoices``). Terms are tried longest first, so of two overlapping terms (``credit card``
and ``card``) the longer wins where both start; each occurrence matches one term. The target side is not
inflected: it is forced as the tokens the tokenizer writes for it at the start of a word, which is what a
terminology list means ("use this form"). A sentence whose translation already contains the target needs
nothing forced; constrained search accepts the model's own writing of it.

Limits (refused with INVALID_ARGUMENT naming the entry): entries per request, characters and tokens per term,
terms per sentence; an empty term, a source term given twice, or a target the vocabulary cannot write (it
would decode to something else) are refused too. A term that never occurs is no error: glossaries are
shared lists.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from transerve.constrained import Constraint, Constraints
from transerve.server.engine.document_plan import CONTROL_CHARACTERS
from transerve.server.exceptions import ConfigError, RequestError

MAX_ENTRIES = 256  # per request
MAX_TERM_CHARS = 200
MAX_TERM_TOKENS = 32
MAX_SENTENCE_TERMS = 8  # constraints one sentence may carry
COMPILED_CACHE = 32  # request glossaries kept compiled (clients send the same list again and again)


@dataclass(frozen=True)
class GlossaryEntry:
    source: str
    target: str


def _normal(term: str) -> str:
    return " ".join(term.casefold().split())


class Glossary:
    """Entries compiled into one matcher and their targets' tokens."""

    def __init__(self, entries: Sequence[GlossaryEntry], tokenizer: Tokenizer, unk_id: int | None,
                 english: bool, field: str = "glossary") -> None:
        self.entries = tuple(entries)
        self.targets: list[Constraint] = []
        seen: dict[str, int] = {}
        for i, e in enumerate(self.entries):
            _check_term(e.source, f"{field}[{i}].source")
            _check_term(e.target, f"{field}[{i}].target")
            key = _normal(e.source)
            if key in seen:
                raise RequestError(f"{field}[{i}].source: {e.source[:40]!r} is already glossary[{seen[key]}]")
            seen[key] = i
            self.targets.append(_target_tokens(e.target, tokenizer, unk_id, f"{field}[{i}].target"))
        order = sorted(range(len(self.entries)), key=lambda i: -len(self.entries[i].source))
        alternatives = "|".join(f"(?P<t{i}>{_source_pattern(self.entries[i].source, english)})" for i in order)
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if order else None

    def constraints(self, sentence: str, field: str) -> Constraints:
        """The target terms ``sentence``'s source terms call for, each once, in order of occurrence."""
        if self.pattern is None:
            return Constraints(())
        found = dict.fromkeys(self.targets[int(m.lastgroup[1:])] for m in self.pattern.finditer(sentence)
                              if m.lastgroup)
        if len(found) > MAX_SENTENCE_TERMS:
            raise RequestError(f"{field}: one sentence matches {len(found)} glossary terms, the limit is "
                               f"{MAX_SENTENCE_TERMS} ({sentence[:60]!r})")
        return Constraints(list(found))


def _check_term(term: str, field: str) -> None:
    if not term.strip():
        raise RequestError(f"{field}: empty term")
    if len(term) > MAX_TERM_CHARS:
        raise RequestError(f"{field}: {len(term)} characters exceed the limit of {MAX_TERM_CHARS}")
    control = CONTROL_CHARACTERS.search(term)
    if control or "\n" in term or "\t" in term:
        raise RequestError(f"{field}: control character in the term (a term is one line of text)")


def _source_pattern(term: str, english: bool) -> str:
    words = [re.escape(w) for w in term.split()]
    plural = "(?:e?s)?" if english and term.strip()[-1:].isalpha() else ""
    return r"\s+".join(words) + plural


def _target_tokens(target: str, tokenizer: Tokenizer, unk_id: int | None, field: str) -> Constraint:
    """The tokens that write ``target`` at the start of a word; refused when they would decode to something
    else (characters outside the vocabulary)."""
    ids = tuple(tokenizer.encode(target.strip(), add_special_tokens=False).ids)
    if (unk_id is not None and unk_id in ids) or tokenizer.decode(list(ids)).strip() != " ".join(target.split()):
        raise RequestError(f"{field}: {target[:40]!r} cannot be written with the model's vocabulary")
    if len(ids) > MAX_TERM_TOKENS:
        raise RequestError(f"{field}: {len(ids)} tokens exceed the limit of {MAX_TERM_TOKENS}")
    return ids


class Glossaries:
    """A model's glossary (its repository file) merged with each request's entries; a request entry replaces
    the model's entry for the same source term. Compiled glossaries are kept for requests that repeat theirs."""

    def __init__(self, own: Sequence[GlossaryEntry], tokenizer: Tokenizer, english: bool) -> None:
        self.tokenizer, self.english = tokenizer, english
        # token_to_id, not get_vocab(): building the vocabulary's dict cost 46 ms of an opus-mt-sized load
        found = (tokenizer.token_to_id(t) for t in ("<unk>", "[UNK]", "<UNK>"))
        self.unk_id = next((i for i in found if i is not None), None)
        self.own = tuple(own)
        try:
            self.model = Glossary(self.own, tokenizer, self.unk_id, english, "glossary file")
        except RequestError as e:
            raise ConfigError(str(e)) from None
        self._compiled: OrderedDict[tuple[GlossaryEntry, ...], Glossary] = OrderedDict()

    def for_request(self, entries: Sequence[GlossaryEntry]) -> Glossary:
        if not entries:
            return self.model
        if len(entries) > MAX_ENTRIES:
            raise RequestError(f"glossary: {len(entries)} entries exceed the limit of {MAX_ENTRIES}")
        key = tuple(entries)
        found = self._compiled.get(key)
        if found is None:
            Glossary(key, self.tokenizer, self.unk_id, self.english)  # the request's own entries, checked by index
            mine = {_normal(e.source) for e in key}
            merged = [e for e in self.own if _normal(e.source) not in mine] + list(key)
            found = Glossary(merged, self.tokenizer, self.unk_id, self.english)
            self._compiled[key] = found
            if len(self._compiled) > COMPILED_CACHE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return found


def read_glossary_file(path: Path) -> list[GlossaryEntry]:
    """``source<TAB>target`` per line; blank lines and ``#`` comments skipped. Errors name the line."""
    if not path.is_file():
        raise ConfigError(f"{path}: glossary file missing")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise ConfigError(f"{path}:{number}: expected 'source<TAB>target', got {len(parts)} fields")
        entries.append(GlossaryEntry(parts[0].strip(), parts[1].strip()))
    return entries


__all__ = ["MAX_ENTRIES", "MAX_SENTENCE_TERMS", "MAX_TERM_CHARS", "Glossaries", "Glossary", "GlossaryEntry",
           "read_glossary_file"]
