"""Streamed text from a growing token list, never splitting a character."""

from __future__ import annotations

from tokenizers import Tokenizer


class Detokenizer:
    """Text pieces from a growing token list: differences of the decoded prefix, held back while the prefix ends
    in an incomplete character (U+FFFD), so no piece splits a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.sent = tokenizer, ""

    def update(self, ids: list[int], final: bool) -> str:
        text = self.tokenizer.decode(ids)
        if final:
            piece = text[len(self.sent):] if text.startswith(self.sent) else text  # a re-segmented tail: resend
            self.sent = text
            return piece
        if text.startswith(self.sent) and not text.endswith("\ufffd") and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent):], text
            return piece
        return ""
