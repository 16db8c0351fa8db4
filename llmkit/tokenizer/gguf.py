"""GGUF vocabularies -> Hugging Face tokenizers: rebuild the tokenizer stored in a GGUF file's metadata
(byte-level BPE "gpt2" and sentencepiece BPE "llama", Gemma's variant of it too), with the same ids as
transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import LLMKitError
from ..gguf_io import read_metadata
from .byte_level import bytes_to_unicode
from .core import Tokenizer, bos_post_processor

# Pre-tokenizer split regexes keyed by GGUF `tokenizer.ggml.pre`, exactly as transformers maps them
# (transformers/integrations/gguf/gguf_tokenizer_mapping.py) so that ids agree with
# `AutoTokenizer.from_pretrained(dir, gguf_file=...)`. Names not listed (e.g. "smollm", "gpt2") get
# the GPT-2 ByteLevel regex, as in transformers.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# llama.cpp token types (gguf.TokenType): 3 = CONTROL (special), 4 = USER_DEFINED (added, not special).
_CONTROL, _USER_DEFINED = 3, 4


def read_gguf_tokenizer_metadata(path: str | Path) -> dict:
    """The `tokenizer.*` and `general.architecture` metadata of a GGUF file as plain Python values."""
    return read_metadata(path, ("tokenizer.", "general.architecture"))


def tokenizer_from_gguf_metadata(meta: dict, source: str = "GGUF") -> Tokenizer:
    """A Tokenizer from GGUF metadata as a {key: value} dict (`tokenizer.*` keys, values as `field.contents()`).

    Mirrors transformers' GGUF conversion (integrations/gguf/gguf_tokenizer_mapping.py) so ids agree
    with `AutoTokenizer.from_pretrained(dir, gguf_file=...)`. Two tokenizer models:
    - "gpt2" (byte-level BPE: SmolLM, Llama 3, Qwen2, ...): vocab respelled into the byte alphabet where
      needed, merges from the file, the split regex chosen by tokenizer.ggml.pre, ByteLevel decoder;
    - "llama" (sentencepiece BPE with byte fallback: Llama 2, Mistral, ...): Metaspace pre-tokenizer
      prepending "▁" to the first word, merges from the file or recovered from the token scores;
      Gemma's files ("llama" with architecture gemma*) the same BPE without the prepended "▁" (see `_gemma`).
    Then CONTROL tokens (type 3) become special tokens and USER_DEFINED (type 4) plain added tokens,
    and bos is prepended when tokenizer.ggml.add_bos_token (default: no for gpt2, yes for llama).
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise LLMKitError(f"{source} has no tokenizer metadata (tokenizer.ggml.model missing)")
    arch = meta.get("general.architecture")
    if kind not in ("gpt2", "llama") or (kind == "llama" and arch == "phi3"):
        what = f"{kind!r}" + (f" for architecture {arch!r}" if kind == "llama" else "")
        raise LLMKitError(f"{source}: unsupported GGUF tokenizer model {what} (llmkit reads 'gpt2' byte-level "
                          f"BPE and 'llama' sentencepiece BPE)")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise LLMKitError(f"{source}: tokenizer.ggml.tokens is missing or empty")
    token_types = list(meta.get("tokenizer.ggml.token_type") or [])
    build = _byte_level if kind == "gpt2" else _gemma if str(arch).startswith("gemma") else _sentencepiece
    try:
        hf, vocab, addable = build(meta, tokens, source)
    except LLMKitError:
        raise
    except Exception as e:
        raise LLMKitError(f"{source}: inconsistent tokenizer vocabulary/merges: {e}") from e

    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, token_types) if ty == _CONTROL and addable(t)]
    if control:
        hf.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, token_types) if ty == _USER_DEFINED and t in vocab]
    if user:
        hf.add_tokens(user)

    def tok_at(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        t = tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None
        return t if t in vocab else None

    bos, eos, unk, pad = (tok_at(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                              "padding_token_id"))
    named = [AddedToken(t, normalized=False, special=True) for t in (bos, eos, unk, pad)
             if t is not None and hf.token_to_id(t) not in hf.get_added_tokens_decoder()]
    if named:  # transformers registers the named special tokens too
        hf.add_special_tokens(named)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    tok = Tokenizer(hf, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, add_bos=add_bos,
                    chat_template=meta.get("tokenizer.chat_template"))
    hf.post_processor = bos_post_processor(tok.bos_token, tok.bos_id, tok.add_bos)
    return tok


def _merges(meta: dict, source: str) -> list[tuple[str, str]] | None:
    raw = meta.get("tokenizer.ggml.merges")
    if not raw:
        return None
    merges = []
    for m in raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise LLMKitError(f"{source}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))
    return merges


def _byte_level(meta: dict, tokens: list[str], source: str):
    """GGUF "gpt2" tokenizer -> (tokenizers.Tokenizer, vocab, which control tokens may be added)."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = _merges(meta, source)
    if merges is None:
        raise LLMKitError(f"{source}: tokenizer.ggml.merges is missing (needed for a 'gpt2' tokenizer)")
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False))
    split = GGUF_PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would grow
    # the vocabulary past the model's embedding, so it is skipped (as transformers does).
    return hf, vocab, lambda t: set(t) <= alphabet


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Sentencepiece BPE stores no merges: every split of a token into two vocab pieces is a merge,
    ranked by the token's score (higher first), ties by piece lengths then ids, as transformers'
    `generate_merges` ranks them."""
    merges = []
    for merge, score in scores.items():
        local = [(merge[:k], merge[k:], score) for k in range(1, len(merge))
                 if merge[:k] in vocab and merge[k:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece(meta: dict, tokens: list[str], source: str):
    """GGUF "llama" tokenizer (sentencepiece BPE, byte fallback <0xXX>) as transformers' LlamaTokenizer
    builds it: no normalizer, Metaspace("▁", prepend to the first word only), decoder that maps "▁" back
    to spaces, fuses byte-fallback tokens and strips the one prepended space."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta, source)
    if merges is None:
        scores = meta.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise LLMKitError(f"{source}: a 'llama' tokenizer needs tokenizer.ggml.merges or one score per token")
        merges = _merges_from_scores(vocab, dict(zip(tokens, map(float, scores))))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)])
    return hf, vocab, lambda t: True


def _gemma(meta: dict, tokens: list[str], source: str):
    """Gemma's sentencepiece BPE as transformers' GGUF loader builds it (gguf_tokenizer_mapping.gemma_tokenizer
    and GemmaTokenizer): spaces become "▁" by a normalizer (no prefix space, no pre-tokenizer split), byte
    fallback, and two fixes for the file: tokens made only of spaces are stored as spaces ("  ") but looked
    up as "▁▁", so they are respelled; and the file has no merges and Gemma's scores do not follow its
    merge order, the token order does, so merges are recovered ranked by position (earlier first)."""
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta, source)
    if merges is None:
        merges = _merges_from_scores(vocab, {t: -i for i, t in enumerate(tokens)})
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk)] if unk is not None and 0 <= int(unk) < len(tokens) else None
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, byte_fallback=True,
                                dropout=None))
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return hf, vocab, lambda t: True
