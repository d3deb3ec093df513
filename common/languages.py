"""Language codes as clients send them, reduced to one routing key.

Clients write a language many ways — ``de``, ``deu``, ``ger``, ``de-DE``, ``de_DE``, ``DE`` — and a repository
entry declares its pair one way. Both sides go through :func:`normalize`: the BCP-47 language subtag, its ISO
639-1 form where one exists (``deu`` → ``de``, ``iw`` → ``he``), else ISO 639-3 (``fil``). Region and script
are dropped: translation entries (opus-mt and its kin) are made per language, and a client asking for
``de-AT`` wants the German model. ``auto`` is not a language: it asks the server to detect one.
"""

from __future__ import annotations

import langcodes

AUTO = "auto"
NOT_LANGUAGES = frozenset({"und", "mul", "zxx", "mis"})  # undetermined, multiple, no content, uncoded
MAX_CODE_CHARS = 35  # BCP-47's longest sensible tag, with room


class LanguageCodeError(ValueError):
    """A code that names no language; the message says what was wrong with it."""


def normalize(code: str) -> str:
    """The routing key for ``code`` (see the module's docstring); :class:`LanguageCodeError` if it is none."""
    text = code.strip()
    if not text or len(text) > MAX_CODE_CHARS:
        raise LanguageCodeError(f"{code[:40]!r} is not a language code (an ISO 639-1/-3 code or a BCP-47 tag, "
                                "e.g. de, deu, de-DE)")
    try:
        language = langcodes.Language.get(text.replace("_", "-"))
    except (langcodes.LanguageTagError, ValueError):
        raise LanguageCodeError(f"{code!r} is not a language code (an ISO 639-1/-3 code or a BCP-47 tag, "
                                "e.g. de, deu, de-DE)") from None
    if language.language is None or language.language in NOT_LANGUAGES or not language.is_valid():
        raise LanguageCodeError(f"{code!r} is well-formed but names no known language")
    return str(language.language)


def display_name(code: str) -> str:
    """English name of a normalised code, for messages and discovery (``de`` → ``German``)."""
    try:
        return str(langcodes.Language.get(code).display_name())
    except (langcodes.LanguageTagError, ValueError):  # pragma: no cover - normalised codes always parse
        return code
