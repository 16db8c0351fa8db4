"""Token-aware chunkers. Sizes are counted in the embedding model's tokens (its tokenizer.json through
llmkit.tokenizer), so a chunk of `size` tokens plus [CLS]/[SEP] always fits the encoder's window.

  fixed      windows of `size` tokens, each starting `size - overlap` tokens after the last; cut at
             token boundaries and mapped back to the text through the tokenizer's character offsets.
  recursive  split on the first separator ("\\n\\n", "\\n", ". ", " ") that breaks a too-long piece,
             recursing into pieces still too long, then pack neighbours greedily up to `size`
             (the LangChain RecursiveCharacterTextSplitter idea, in tokens).
  sentence   split into sentences, pack whole sentences up to `size`, carrying the last sentences
             worth up to `overlap` tokens into the next chunk; a sentence longer than `size` falls
             back to fixed windows.

Every chunker is `fn(text, tokenizer, size, overlap) -> list[Chunk]` registered in CHUNKERS; a chunk
keeps its character span in the document so a citation can point back into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import LLMKitError, closest


@dataclass
class Chunk:
    text: str
    start: int  # character offsets into the document text
    end: int
    n_tokens: int


def _offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    return tokenizer.hf.encode(text, add_special_tokens=False).offsets


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.hf.encode(text, add_special_tokens=False).ids)


def _check(size: int, overlap: int) -> None:
    if size < 1:
        raise LLMKitError(f"chunk size must be >= 1 token, got {size}")
    if not 0 <= overlap < size:
        raise LLMKitError(f"chunk overlap must be in 0..{size - 1} tokens (below the size {size}), got {overlap}")


def _windows(text: str, offs: list[tuple[int, int]], size: int, overlap: int, base: int = 0) -> list[Chunk]:
    """Token windows [i, i + size) stepping by size - overlap, over the tokens' character offsets."""
    out, step = [], size - overlap
    for i in range(0, max(1, len(offs) - overlap), step):
        w = offs[i:i + size]
        if not w:
            break
        s, e = w[0][0], w[-1][1]
        out.append(Chunk(text[s:e], base + s, base + e, len(w)))
        if i + size >= len(offs):
            break
    return out


def fixed_chunks(text: str, tokenizer, size: int = 200, overlap: int = 40) -> list[Chunk]:
    _check(size, overlap)
    return _windows(text, _offsets(tokenizer, text), size, overlap)


SEPARATORS = ("\n\n", "\n", ". ", " ")


def _split_recursive(text: str, start: int, tokenizer, size: int, seps: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """-> spans (start, end, n_tokens) each of at most `size` tokens, split at the coarsest separator."""
    n = count_tokens(tokenizer, text)
    if n <= size:
        return [(start, start + len(text), n)] if text.strip() else []
    for k, sep in enumerate(seps):
        if sep in text:
            out, pos = [], 0
            for piece in text.split(sep):
                # the separator stays with the piece before it, so spans tile the text
                end = pos + len(piece) + (len(sep) if pos + len(piece) < len(text) else 0)
                out += _split_recursive(text[pos:end], start + pos, tokenizer, size, seps[k + 1:])
                pos = end
            return out
    return [(c.start, c.end, c.n_tokens) for c in _windows(text, _offsets(tokenizer, text), size, 0, start)]


def _pack(doc: str, spans: list[tuple[int, int, int]], tokenizer, size: int) -> list[Chunk]:
    """Greedily join neighbouring spans while the joined text stays within `size` tokens."""
    out: list[Chunk] = []
    cur = None
    for s, e, n in spans:
        if cur is not None:
            joined = count_tokens(tokenizer, doc[cur[0]:e])  # recount: merges can change tokenization at seams
            if joined <= size:
                cur = (cur[0], e, joined)
                continue
            out.append(cur)
        cur = (s, e, n)
    if cur is not None:
        out.append(cur)
    chunks = []
    for s, e, _ in out:  # strip whitespace at the edges, keeping offsets exact
        t = doc[s:e]
        s2, e2 = s + len(t) - len(t.lstrip()), e - (len(t) - len(t.rstrip()))
        if e2 > s2:
            chunks.append(Chunk(doc[s2:e2], s2, e2, count_tokens(tokenizer, doc[s2:e2])))
    return chunks


def recursive_chunks(text: str, tokenizer, size: int = 200, overlap: int = 0) -> list[Chunk]:
    """`overlap` is accepted for a uniform signature; recursive chunks do not overlap."""
    _check(size, overlap)
    return _pack(text, _split_recursive(text, 0, tokenizer, size, SEPARATORS), tokenizer, size)


# a sentence ends at . ! ? (plus closing quotes/brackets) followed by white space; a light rule that
# keeps "e.g. x" mostly intact by asking for an upper-case letter or digit after the gap
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])|\n\s*\n")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` (white space between them dropped)."""
    spans, pos = [], 0
    for m in _SENT_END.finditer(text):
        if text[pos:m.start()].strip():
            spans.append((pos, m.start()))
        pos = m.end()
    if text[pos:].strip():
        spans.append((pos, len(text.rstrip())))
    return spans


def sentence_chunks(text: str, tokenizer, size: int = 200, overlap: int = 40) -> list[Chunk]:
    _check(size, overlap)
    sents = []  # (start, end, n_tokens), long sentences pre-split into windows
    for s, e in split_sentences(text):
        n = count_tokens(tokenizer, text[s:e])
        if n <= size:
            sents.append((s, e, n))
        else:
            sents += [(c.start, c.end, c.n_tokens) for c in _windows(text[s:e], _offsets(tokenizer, text[s:e]),
                                                                      size, overlap, s)]
    out, i = [], 0
    while i < len(sents):
        j = i
        while j < len(sents) and count_tokens(tokenizer, text[sents[i][0]:sents[j][1]]) <= size:
            j += 1
        j = max(j, i + 1)
        s, e = sents[i][0], sents[j - 1][1]
        out.append(Chunk(text[s:e], s, e, count_tokens(tokenizer, text[s:e])))
        if j >= len(sents):
            break
        # next chunk starts with the trailing sentences of this one that fit in `overlap` tokens
        k = j
        while k - 1 > i and sum(x[2] for x in sents[k - 1:j]) <= overlap:
            k -= 1
        i = k
    return out


CHUNKERS = {"fixed": fixed_chunks, "recursive": recursive_chunks, "sentence": sentence_chunks}


def chunk_text(text: str, tokenizer, method: str = "sentence", size: int = 200, overlap: int = 40) -> list[Chunk]:
    if method not in CHUNKERS:
        raise LLMKitError(f"unknown chunker {method!r}{closest(method, CHUNKERS)}; choose one of {', '.join(CHUNKERS)}")
    return CHUNKERS[method](text, tokenizer, size, overlap)
