"""Tokenizers: byte-level BPE (trained here, loaded from tokenizer.json, or rebuilt from GGUF metadata,
where sentencepiece BPE "llama" vocabularies are read too), special tokens, chat templates and
streaming decode.

One class, `Tokenizer`, wraps a Hugging Face `tokenizers.Tokenizer` (`.hf`) plus what tokenizer.json
does not hold: the bos/eos tokens, whether to prepend bos, and the Jinja chat template (these live in
tokenizer_config.json beside it, or in the GGUF metadata).

Byte-level BPE (GPT-2, Radford et al. 2019) maps every byte to one of 256 printable characters before
merging, so every UTF-8 string encodes (no unknown token) and decodes back to exactly the same string.

    tok = Tokenizer.train(["corpus.txt"], vocab_size=4096)      # special tokens <|endoftext|>, ChatML
    tok = Tokenizer.from_gguf("SmolLM2.gguf")                   # same ids as transformers' GGUF loader
    ids = tok.encode("Hello 👋")
    assert tok.decode(ids) == "Hello 👋"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import LLMKitError
from ..io import atomic_write_json, atomic_write_text

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Tokens that end an assistant turn in the common chat formats (ChatML, Llama 3, Phi-3, GPT-2 style).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")

# Used when a tokenizer carries no chat template (e.g. one trained here without --chat-template):
# ChatML (OpenAI), the format of the default special tokens above.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to themselves,
    the other 68 to U+0100.. in order), so BPE never sees whitespace or control bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_str(value) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialised AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _post_processor(bos: str | None, bos_id: int | None, add_bos: bool):
    """The post-processor transformers builds (TokenizersBackend.update_post_processor): prepend bos
    when add_bos, else nothing; keeps `.hf.encode(text)` consistent with `Tokenizer.encode`."""
    if add_bos and bos is not None and bos_id is not None:
        return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                             special_tokens=[(bos, bos_id)])
    return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])


def _compile_template(template: str):
    """Jinja2 environment with transformers' apply_chat_template semantics (sandboxed, trim/lstrip
    blocks, raise_exception, strftime_now, a tojson that keeps non-ASCII and does not escape HTML)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a core dependency
        raise LLMKitError("chat templates need jinja2 (pip install jinja2)") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LLMKitError(f"chat template does not parse: {e.message} (line {e.lineno})") from e


_compile_template_cached = functools.lru_cache(maxsize=8)(_compile_template)


class Tokenizer:
    """A `tokenizers.Tokenizer` (`.hf`) plus bos/eos, add_bos and the chat template.

    `encode` never adds special tokens except the bos token when `add_bos` (from tokenizer_config.json's
    `add_bos_token` or GGUF `tokenizer.ggml.add_bos_token`); special-token strings in the text such as
    "<|im_start|>" are matched as their single special ids, as transformers does.
    """

    def __init__(self, hf: HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, add_bos: bool = False,
                 chat_template: str | None = None):
        # encode() returns exactly the text's ids: no padding, no silent truncation (a tokenizer.json
        # may ship either, e.g. sentence encoders pad to 128); batching code pads on its own.
        hf.no_padding()
        hf.no_truncation()
        self.hf = hf
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            tok = getattr(self, name)
            if tok is not None and hf.token_to_id(tok) is None:
                raise LLMKitError(f"{name} {tok!r} is not in the vocabulary")
        self.add_bos = bool(add_bos) and bos_token is not None
        self.chat_template = chat_template
        self._token_bytes: list[bytes] | None = None

    # ------------------------------------------------------------------ basic API
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"add_bos={self.add_bos})")

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.hf.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.hf.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        """The pad token's id, else eos (batching pads with it; padded positions are masked anyway)."""
        return self.hf.token_to_id(self.pad_token) if self.pad_token is not None else self.eos_id

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special (control) tokens, e.g. those `decode(skip_special_tokens=True)` drops."""
        return frozenset(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special)

    @functools.cached_property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: eos plus the end-of-turn tokens of common chat formats present in the vocab."""
        ids = {self.eos_id} | {self.hf.token_to_id(t) for t in END_OF_TURN_TOKENS}
        return frozenset(i for i in ids if i is not None)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; prepends bos when `add_bos` (default: the tokenizer's own setting)."""
        if not isinstance(text, str):
            raise LLMKitError(f"encode expects a string, got {type(text).__name__}")
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust library)."""
        encs = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None else []
        return [prefix + e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise LLMKitError(f"token id {bad} is outside the vocabulary (size {n})")
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json (sorted keys, compact): equal hashes give equal ids."""
        canon = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ streaming
    @property
    def is_byte_level(self) -> bool:
        return (json.loads(self.hf.decoder.__getstate__()).get("type") == "ByteLevel"
                if self.hf.decoder is not None else False)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for (byte-level tokenizers). Mirrors the ByteLevel decoder: a token
        whose characters are not all in the byte alphabet (e.g. an added token) stands for its UTF-8."""
        if self._token_bytes is None:
            u2b = _unicode_to_bytes()
            table = []
            for j in range(self.vocab_size):
                t = self.hf.id_to_token(j) or ""
                table.append(bytes(u2b[c] for c in t) if all(c in u2b for c in t) else t.encode("utf-8"))
            self._token_bytes = table
        return self._token_bytes[i]

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of sentencepiece byte-fallback tokens "<0x00>".."<0xFF>" (empty for byte-level BPE)."""
        ids = (self.hf.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            chat_template: str | None = None, **kwargs) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the tokenizer's Jinja chat template, with
        transformers' `apply_chat_template(..., tokenize=False)` semantics: the template sees `messages`,
        `add_generation_prompt`, `tools`/`documents` (None unless given), bos_token/eos_token/unk_token/
        pad_token, and any extra keyword arguments. Without a template, ChatML (`CHATML_TEMPLATE`) is used."""
        import jinja2

        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise LLMKitError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
        template = chat_template or self.chat_template or CHATML_TEMPLATE
        specials = {name: getattr(self, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                    if getattr(self, name) is not None}
        variables = {"tools": None, "documents": None, **specials, **kwargs}
        try:
            return _compile_template_cached(template).render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise LLMKitError(f"chat template error: {e}") from e

    # ------------------------------------------------------------------ save / load
    def config_dict(self) -> dict:
        """tokenizer_config.json content (transformers reads it too)."""
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        return {k: v for k, v in cfg.items() if v is not None}

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `out_dir` (each atomically)."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "tokenizer.json", self.hf.to_str(pretty=True))
        atomic_write_json(d / "tokenizer_config.json", self.config_dict())
        return d

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a directory holding tokenizer.json, a tokenizer.json file, or a .gguf file."""
        p = Path(path)
        if p.is_dir():
            return cls.from_dir(p)
        if p.suffix == ".gguf":
            return cls.from_gguf(p)
        return cls.from_file(p)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        d = Path(path)
        if not d.is_dir():
            raise LLMKitError(f"tokenizer directory {d} does not exist")
        if not (d / "tokenizer.json").is_file():
            raise LLMKitError(f"{d} has no tokenizer.json")
        return cls.from_file(d / "tokenizer.json")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """From tokenizer.json; bos/eos, add_bos_token and chat_template come from tokenizer_config.json
        (and chat_template.jinja, the newer transformers layout) beside it when present."""
        p = Path(path)
        if not p.is_file():
            raise LLMKitError(f"tokenizer file {p} does not exist")
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as e:
            raise LLMKitError(f"{p} is not a valid tokenizer.json: {str(e).splitlines()[0] if str(e) else e}") from e
        hf.no_padding()
        hf.no_truncation()
        cfg: dict = {}
        cfg_path = p.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LLMKitError(f"{cfg_path} is not valid JSON: {e}") from e
            if not isinstance(cfg, dict):
                raise LLMKitError(f"{cfg_path} must hold a JSON object")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = p.parent / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        vocab = hf.get_vocab()
        if not cfg:  # bare tokenizer.json: guess the usual names
            for b, e in (("<|endoftext|>", "<|endoftext|>"), ("<s>", "</s>"), ("<|begin_of_text|>", "<|end_of_text|>")):
                if e in vocab:
                    bos, eos = (b if b in vocab else None), e
                    break
        names = {k: _token_str(cfg.get(k)) for k in ("pad_token", "unk_token")}
        # a config may name a token the vocabulary lacks (e.g. "<unk>" of a byte-level BPE): ignore it
        bos, eos, pad, unk = (t if t in vocab else None for t in (bos, eos, names["pad_token"], names["unk_token"]))
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # infer from the post-processor: does it prepend bos?
            bos_id = hf.token_to_id(bos) if bos else None
            with_specials = hf.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and len(with_specials) > 1 and with_specials[0] == bos_id
        tok = cls(hf, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, add_bos=bool(add_bos),
                  chat_template=template)
        if "add_bos_token" in cfg and json.loads(hf.post_processor.__getstate__() if hf.post_processor else "{}").get(
                "type") in (None, "TemplateProcessing"):
            # explicit setting wins over tokenizer.json, as in transformers 5 (update_post_processor)
            hf.post_processor = _post_processor(tok.bos_token, tok.bos_id, tok.add_bos)
        return tok

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """From a GGUF file's tokenizer metadata (tokenizer.ggml.model == "gpt2": byte-level BPE)."""
        return cls.from_gguf_metadata(read_gguf_tokenizer_metadata(path), source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "GGUF") -> Tokenizer:
        """From GGUF metadata as a {key: value} dict (`tokenizer.*` keys, values as `field.contents()`).

        Mirrors transformers' GGUF conversion (integrations/gguf/gguf_tokenizer_mapping.py) so ids agree
        with `AutoTokenizer.from_pretrained(dir, gguf_file=...)`. Two tokenizer models:
        - "gpt2" (byte-level BPE: SmolLM, Llama 3, Qwen2, ...): vocab respelled into the byte alphabet where
          needed, merges from the file, the split regex chosen by tokenizer.ggml.pre, ByteLevel decoder;
        - "llama" (sentencepiece BPE with byte fallback: Llama 2, Mistral, ...): Metaspace pre-tokenizer
          prepending "▁" to the first word, merges from the file or recovered from the token scores.
        Then CONTROL tokens (type 3) become special tokens and USER_DEFINED (type 4) plain added tokens,
        and bos is prepended when tokenizer.ggml.add_bos_token (default: no for gpt2, yes for llama).
        """
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise LLMKitError(f"{source} has no tokenizer metadata (tokenizer.ggml.model missing)")
        arch = meta.get("general.architecture")
        if kind not in ("gpt2", "llama") or (kind == "llama" and arch in ("gemma", "gemma2", "gemma3", "phi3")):
            what = f"{kind!r}" + (f" for architecture {arch!r}" if kind == "llama" else "")
            raise LLMKitError(f"{source}: unsupported GGUF tokenizer model {what} (llmkit reads 'gpt2' byte-level "
                              f"BPE and 'llama' sentencepiece BPE)")
        tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise LLMKitError(f"{source}: tokenizer.ggml.tokens is missing or empty")
        token_types = list(meta.get("tokenizer.ggml.token_type") or [])
        build = _gguf_byte_level if kind == "gpt2" else _gguf_sentencepiece
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
        tok = cls(hf, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, add_bos=add_bos,
                  chat_template=meta.get("tokenizer.chat_template"))
        hf.post_processor = _post_processor(tok.bos_token, tok.bos_id, tok.add_bos)
        return tok

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, files: Iterable[str | Path], vocab_size: int, special_tokens: Iterable[str] | None = None, *,
              bos_token: str | None = None, eos_token: str | None = None, add_bos: bool = False,
              chat_template: str | None = CHATML_TEMPLATE, min_frequency: int = 2,
              progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE tokenizer on text files or directories (.txt as UTF-8, .jsonl's "text"
        field, .parquet's "text" column; read by `llmkit.train.data.iter_documents`, streaming).

        Ids: the special tokens first (in the order given, default <|endoftext|>, <|im_start|>,
        <|im_end|>), then the 256 bytes, then merges until `vocab_size` (fewer if the corpus runs out of
        pairs seen `min_frequency` times). eos defaults to the first special token, bos to eos (GPT-2
        style); the chat template defaults to ChatML.
        """
        specials = list(dict.fromkeys(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens))
        if any(not isinstance(s, str) or not s for s in specials):
            raise LLMKitError("special tokens must be non-empty strings")
        need = 256 + len(specials)
        if int(vocab_size) < need:
            raise LLMKitError(f"vocab size {vocab_size} is too small: a byte-level tokenizer needs at least "
                              f"256 byte tokens + {len(specials)} special tokens = {need}")
        from ..train.data import iter_documents, list_inputs  # the corpus reader `llmkit data prepare` uses

        paths = list_inputs([files] if isinstance(files, (str, Path)) else list(files))
        if all(p.stat().st_size == 0 for p in paths):
            raise LLMKitError("the corpus is empty (all input files have 0 bytes)")
        eos_token = eos_token if eos_token is not None else (specials[0] if specials else None)
        bos_token = bos_token if bos_token is not None else eos_token
        for name, t in (("eos_token", eos_token), ("bos_token", bos_token)):
            if t is not None and t not in specials:
                raise LLMKitError(f"{name} {t!r} is not one of the special tokens {specials}")

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=min_frequency,
                                      special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=progress)
        seen = [0]

        def texts() -> Iterator[str]:
            for p in paths:  # one file at a time, so a decoding error can name its file
                try:
                    for doc in iter_documents([p]):
                        for piece in doc:
                            seen[0] += len(piece)
                            yield piece
                except UnicodeDecodeError as e:
                    raise LLMKitError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason})") from None

        hf.train_from_iterator(texts(), trainer=trainer)
        if seen[0] == 0:
            raise LLMKitError("the corpus is empty (no text in the input files)")
        tok = cls(hf, bos_token=bos_token, eos_token=eos_token, add_bos=add_bos, chat_template=chat_template)
        hf.post_processor = _post_processor(tok.bos_token, tok.bos_id, tok.add_bos)
        return tok


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


def _gguf_merges(meta: dict, source: str) -> list[tuple[str, str]] | None:
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


def _gguf_byte_level(meta: dict, tokens: list[str], source: str):
    """GGUF "gpt2" tokenizer -> (tokenizers.Tokenizer, vocab, which control tokens may be added)."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = _gguf_merges(meta, source)
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


def _gguf_sentencepiece(meta: dict, tokens: list[str], source: str):
    """GGUF "llama" tokenizer (sentencepiece BPE, byte fallback <0xXX>) as transformers' LlamaTokenizer
    builds it: no normalizer, Metaspace("▁", prepend to the first word only), decoder that maps "▁" back
    to spaces, fuses byte-fallback tokens and strips the one prepended space."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _gguf_merges(meta, source)
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


_META_CACHE: dict[tuple, dict] = {}


def read_gguf_tokenizer_metadata(path: str | Path) -> dict:
    """The `tokenizer.*` and `general.architecture` metadata of a GGUF file as plain Python values
    (cached per file path, size and mtime: GGUFReader takes seconds on a 100 MB file)."""
    p = Path(path)
    if not p.is_file():
        raise LLMKitError(f"GGUF file {p} does not exist")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _META_CACHE:
        return dict(_META_CACHE[key])
    try:
        from gguf import GGUFReader

        reader = GGUFReader(os.fspath(p))
        meta = {k: f.contents() for k, f in reader.fields.items()
                if k.startswith("tokenizer.") or k == "general.architecture"}
    except LLMKitError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LLMKitError(f"{p} is not a readable GGUF file ({msg})") from e
    _META_CACHE.clear()
    _META_CACHE[key] = meta
    return dict(meta)
