"""Incremental detokenization: new text per token, correct for characters spanning several tokens."""
from __future__ import annotations

from typing import Any

# Prompt tokens kept as context, so tokenizers that drop a leading space of the first token still decode
# the boundary right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the text they completed (may be empty while a character is incomplete)."""
        new = ""
        if self.tokenizer is None:  # skip_tokenizer_init: token ids only
            return new
        for token in token_ids:
            self.tokens.append(token)
            prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
            full = self._decode(self.tokens[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                new += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.text += new
        return new

    def flush(self) -> str:
        """At the end, emit whatever is still held back (e.g. an incomplete trailing byte sequence)."""
        if self.tokenizer is None:
            return ""
        full = self._decode(self.tokens[self.prefix_offset:])
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        tail = full[len(prefix):] if len(full) > len(prefix) else ""
        self.text += tail
        self.prefix_offset = self.read_offset = len(self.tokens)
        return tail
