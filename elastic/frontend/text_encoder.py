"""Prompt text -> token ids, safe for untrusted input. Blocking: servers call it off the event loop.

- A text that cannot fit the context is refused without being tokenized (tokenizing tens of MB takes
  minutes): a token covers at most `max_token_chars` characters (the longest string in the vocabulary), so
  a text longer than max_model_len * max_token_chars characters has more than max_model_len tokens.
- With `keep_last` (truncate_prompt_tokens) only the tail that can hold those tokens is tokenized, plus a
  margin so that the cut (which may split a word) lies in tokens that are dropped anyway.
- Fast tokenizers encode through `encode_batch`, which releases the GIL, so the event loop keeps serving
  while a worker thread tokenizes (transformers' `encode` does the same, plus Python work per token).
"""
from __future__ import annotations

from typing import Any

_TAIL_MARGIN_TOKENS = 16


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for: its longest vocabulary string (byte-level BPE stores one
    character per byte, so this bounds the decoded text too; byte-fallback pieces like <0x0A> only
    over-estimate)."""
    try:
        return max(1, max(len(t) for t in tokenizer.get_vocab()))
    except (AttributeError, TypeError, ValueError):
        return 64  # no vocabulary to look at: a generous bound


class TextEncoder:
    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_token_chars = max_token_chars(tokenizer)
        self.backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's tokenizers.Tokenizer

    @property
    def max_chars(self) -> int:
        """Texts longer than this cannot fit max_model_len tokens."""
        return self.max_model_len * self.max_token_chars

    def encode(self, text: str, add_special_tokens: bool = True, keep_last: int | None = None) -> list[int]:
        """Token ids of `text` (its last `keep_last` ones if given); ValueError if it cannot fit the context."""
        if keep_last is not None:
            window = (keep_last + _TAIL_MARGIN_TOKENS) * self.max_token_chars
            if len(text) > window:
                text = text[-window:]
        elif len(text) > self.max_chars:
            raise ValueError(f"the prompt has {len(text)} characters, so more than {self.max_model_len} tokens "
                             f"(max_model_len; a token is at most {self.max_token_chars} characters here)")
        if self.backend is not None:
            ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return list(ids[-keep_last:]) if keep_last else list(ids)
