"""The language pair a Marian checkpoint translates, from what it says about itself.

In order: ``tokenizer_config.json``'s ``source_lang``/``target_lang`` (what ``MarianTokenizer.save_pretrained``
writes), else the ``opus-mt-SRC-TGT`` folder name Helsinki-NLP publishes under. A multilingual-target model
(``opus-mt-en-ROMANCE``, ``opus-mt-en-mul``) names a group, not a language: its targets are the ``>>xx<<``
tokens of its vocabulary, the token a source sentence starts with to pick one. A code that is no language
(a group name) is left out; nothing found returns None, and ``transerve export --source-language
--target-language`` says it instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transerve.languages import LanguageCodeError, normalize
from transerve.models.importers.vit import read_json

FOLDER = re.compile(r"opus-mt-(?:tc-(?:big|base)-)?([A-Za-z_]+)-([A-Za-z_]+)$")
TARGET_TOKEN = re.compile(r">>([A-Za-z_]{2,8})<<")


def _code(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return normalize(text)
    except LanguageCodeError:
        return None


def _declared(directory: Path) -> tuple[str | None, str | None]:
    path = directory / "tokenizer_config.json"
    if path.is_file():
        config = read_json(path)
        if config.get("source_lang") or config.get("target_lang"):
            return config.get("source_lang"), config.get("target_lang")
    match = FOLDER.match(directory.resolve().name)
    return (match.group(1), match.group(2)) if match else (None, None)


def target_tokens(directory: Path) -> dict[str, str]:
    """Each language of the vocabulary's ``>>xx<<`` tokens and its token, in id order."""
    path = directory / "vocab.json"
    if not path.is_file():
        return {}
    vocab = read_json(path)
    found = sorted((int(i), piece, _code(m.group(1))) for piece, i in vocab.items()
                   if (m := TARGET_TOKEN.fullmatch(piece)))
    out: dict[str, str] = {}
    for _, piece, code in found:
        if code and code not in out:
            out[code] = piece
    return out


def marian_languages(directory: Path, source: str | None = None, target: str | None = None
                     ) -> dict[str, Any] | None:
    """``config.yaml``'s ``languages`` for the checkpoint: ``source``/``target`` (the export options) win over
    what the checkpoint says."""
    said_source, said_target = _declared(directory)
    src = _code(source) if source else _code(said_source)
    tokens = target_tokens(directory)
    if target:
        tgt: str | list[str] | None = _code(target)
    elif tokens:
        tgt = list(tokens) if len(tokens) > 1 else next(iter(tokens))
    else:
        tgt = _code(said_target)
    if src is None or not tgt:
        return None
    languages: dict[str, Any] = {"source": src, "target": tgt}
    if isinstance(tgt, list):
        languages["target_tokens"] = {code: tokens[code] for code in tgt}
    return languages
