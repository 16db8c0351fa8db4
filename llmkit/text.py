"""Text is text: one rule for invalid UTF-8 everywhere.

Bytes that are not UTF-8 (in a corpus, a JSONL file, a command-line argument or a chat line) and lone
surrogates (a JSON "\\ud800" escape) become U+FFFD, the replacement character, with one warning line
on stderr naming where (file:line, or what the text was); nothing stops and nothing is dropped
silently. Python hands command-line arguments and (with surrogateescape) stdin lines over with each
bad byte as a lone surrogate U+DC80..U+DCFF, so `clean` covers them as well.
"""

from __future__ import annotations

import codecs
import re
import sys
from pathlib import Path
from typing import Iterator

_SURROGATE = re.compile("[\ud800-\udfff]")


def warn(message: str) -> None:
    print(f"llmkit: warning: {message}", file=sys.stderr)


def clean(text: str, where: str = "text") -> str:
    """`text` with every lone surrogate replaced by U+FFFD (and a warning naming `where`)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        fixed, n = _SURROGATE.subn("\ufffd", text)
        warn(f"{where}: {n} invalid UTF-8 byte(s) or lone surrogate(s) replaced with U+FFFD")
        return fixed


def decode(raw: bytes, where: str) -> str:
    """bytes -> str; invalid UTF-8 becomes U+FFFD with a warning naming `where`:line of the first."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        warn(f"{where}:{line}: invalid UTF-8 replaced with U+FFFD (first at byte {e.start})")
        return raw.decode("utf-8", errors="replace")


def read_pieces(path: Path, block: int = 1 << 20) -> Iterator[str]:
    """A text file in ~`block`-byte pieces, decoded incrementally (a character split across blocks is
    kept whole); invalid UTF-8 becomes U+FFFD with one warning naming path:line of the first."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    lines = 0
    with open(path, "rb") as f:
        while raw := f.read(block):
            try:
                yield dec.decode(raw)
            except UnicodeDecodeError as e:
                pending, _ = dec.getstate()  # bytes of a character begun in the previous block
                line = lines + (pending + raw)[:max(0, e.start)].count(b"\n") + 1
                warn(f"{path}:{line}: invalid UTF-8 replaced with U+FFFD (here and wherever else it occurs)")
                dec = codecs.getincrementaldecoder("utf-8")("replace")
                yield dec.decode(pending + raw)
            lines += raw.count(b"\n")
        if tail := dec.decode(b"", final=True):
            yield tail
