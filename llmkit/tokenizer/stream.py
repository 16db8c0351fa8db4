"""Streaming decode: text deltas for ids that arrive one at a time, never half a UTF-8 character."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

from ..errors import LLMKitError

if TYPE_CHECKING:
    from .core import Tokenizer


class StreamDecoder:
    """Incremental detokenization for streaming generation.

    Feed ids one at a time with `put(id)`; each call returns the new text (possibly ""), never half of a
    UTF-8 character whose bytes are spread over several byte-level tokens. `flush()` returns what is
    still pending (an incomplete character becomes U+FFFD, as in `decode`). The concatenation of all
    deltas equals `tokenizer.decode(all_ids, skip_special_tokens)`.

    Byte-level tokenizers: bytes go through an incremental UTF-8 decoder. Others: decode the ids since
    the last emitted prefix and hold back text that ends in U+FFFD (the approach of HF TextStreamer), and
    while the last token is a sentencepiece byte-fallback token <0xXX> (its run is decoded as a whole).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.byte_level = tokenizer.is_byte_level
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # generic path: ids not yet fully emitted
        self._emitted = ""  # generic path: text already emitted from self._ids
        self.text = ""  # everything emitted so far

    def put(self, token_id: int) -> str:
        i = int(token_id)
        if not 0 <= i < self.tok.vocab_size:
            raise LLMKitError(f"token id {i} is outside the vocabulary (size {self.tok.vocab_size})")
        if self.skip_special_tokens and i in self.tok.special_ids:
            return ""
        if self.byte_level:
            delta = self._utf8.decode(self.tok.token_bytes(i))
        else:
            self._ids.append(i)
            if i in self.tok.byte_fallback_ids:
                return ""  # the <0xXX> run may go on; the decoder groups it into characters only once it ends
            full = self.tok.decode(self._ids)
            if full.endswith("\ufffd"):
                return ""
            delta = full[len(self._emitted):]
            self._emitted = full
            if len(self._ids) > 8:  # keep a little left context (leading-space handling), drop the rest
                self._ids = self._ids[-4:]
                self._emitted = self.tok.decode(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        if self.byte_level:
            delta = self._utf8.decode(b"", final=True)
        else:
            full = self.tok.decode(self._ids) if self._ids else ""
            delta = full[len(self._emitted):]
            self._ids, self._emitted = [], ""
        self.text += delta
        return delta
