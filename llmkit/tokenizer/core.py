"""The `Tokenizer` wrapper: a Hugging Face `tokenizers.Tokenizer` (`.hf`) plus what tokenizer.json
does not hold: the bos/eos tokens, whether to prepend bos, and the Jinja chat template (these live in
tokenizer_config.json beside it, or in the GGUF metadata); saved and loaded as tokenizer.json +
tokenizer_config.json. Training, chat templates, streaming decode and GGUF vocabularies live beside it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from ..errors import LLMKitError
from ..io import atomic_write_json, atomic_write_text
from .byte_level import unicode_to_bytes
from .chat import CHATML_TEMPLATE, END_OF_TURN_TOKENS, render_chat_template
from .stream import StreamDecoder


def bos_post_processor(bos: str | None, bos_id: int | None, add_bos: bool):
    """The post-processor transformers builds (TokenizersBackend.update_post_processor): prepend bos
    when add_bos, else nothing; keeps `.hf.encode(text)` consistent with `Tokenizer.encode`."""
    if add_bos and bos is not None and bos_id is not None:
        return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                             special_tokens=[(bos, bos_id)])
    return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])


def _token_str(value) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialised AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


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
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates (invalid UTF-8 from argv/stdin, a JSON "\ud800"): U+FFFD
            from ..text import clean

            ids = self.hf.encode(clean(text), add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust library)."""
        try:
            encs = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        except TypeError:  # a text with lone surrogates: U+FFFD (llmkit/text.py)
            from ..text import clean

            encs = self.hf.encode_batch_fast([clean(t) for t in texts], add_special_tokens=False)
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
        spec = json.loads(self.hf.to_str())
        post = spec.get("post_processor") or {}
        if post.get("type") == "TemplateProcessing" and not post.get("special_tokens") and \
                post.get("single") == [{"Sequence": {"id": "A", "type_id": 0}}]:
            # `tokenizers` reads a null post_processor back from a file as this no-op template: the same ids
            spec["post_processor"] = None
        canon = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
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
            u2b = unicode_to_bytes()
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
        specials = {name: getattr(self, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                    if getattr(self, name) is not None}
        return render_chat_template(chat_template or self.chat_template or CHATML_TEMPLATE, messages,
                                    add_generation_prompt, {**specials, **kwargs})

    @functools.cached_property
    def special_texts(self) -> tuple[str, ...]:
        """The text of every special (control) token, e.g. "<|im_start|>"."""
        return tuple(t.content for t in self.hf.get_added_tokens_decoder().values() if t.special)

    @functools.cached_property
    def _plain_hf(self):
        """A copy of the tokenizer that reads special-token text as ordinary text (its own instance, so
        no shared flag is flipped under a server's concurrent requests)."""
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(self.hf.to_str())
        hf.encode_special_tokens = True
        return hf

    def encode_chat(self, messages: list[dict], special_in_content: bool = False) -> list[int]:
        """Token ids of `messages` rendered with the chat template, the assistant turn opened (the
        template writes any bos itself).

        Special-token text inside a message's content ("<|im_start|>system ...") is encoded as plain
        text, so a user cannot forge a turn or a role (transformers parses it as control tokens; a
        server must not); `special_in_content=True` parses it as the template's own text is parsed.
        Messages without such text encode exactly as `encode(apply_chat_template(...))`."""
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        contents = [m.get("content") for m in messages if isinstance(m.get("content"), str)]
        if special_in_content or not any(sp in c for c in contents for sp in self.special_texts):
            return self.encode(text, add_bos=False)
        # find each content in the rendering, in order; encode the template's text with control tokens
        # and the contents without (the pieces are cut where the template meets the content)
        ids, pos = [], 0
        for c in contents:
            if not c:
                continue
            at = text.find(c, pos)
            if at < 0:
                raise LLMKitError("a chat message's content holds special-token text and the chat template "
                                  "changes that content, so it cannot be encoded as plain text")
            ids += self.encode(text[pos:at], add_bos=False) if at > pos else []
            ids += self._plain_hf.encode(c, add_special_tokens=False).ids
            pos = at + len(c)
        return ids + (self.encode(text[pos:], add_bos=False) if pos < len(text) else [])

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
        def known(t: str | None) -> bool:  # token_to_id, not get_vocab(): no 49k-entry dict per load
            return t is not None and hf.token_to_id(t) is not None

        if not cfg:  # bare tokenizer.json: guess the usual names
            for b, e in (("<|endoftext|>", "<|endoftext|>"), ("<s>", "</s>"), ("<|begin_of_text|>", "<|end_of_text|>")):
                if known(e):
                    bos, eos = (b if known(b) else None), e
                    break
        names = {k: _token_str(cfg.get(k)) for k in ("pad_token", "unk_token")}
        # a config may name a token the vocabulary lacks (e.g. "<unk>" of a byte-level BPE): ignore it
        bos, eos, pad, unk = (t if known(t) else None for t in (bos, eos, names["pad_token"], names["unk_token"]))
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
            hf.post_processor = bos_post_processor(tok.bos_token, tok.bos_id, tok.add_bos)
        return tok

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """From a GGUF file's tokenizer metadata (tokenizer.ggml.model == "gpt2": byte-level BPE)."""
        from .gguf import read_gguf_tokenizer_metadata

        return cls.from_gguf_metadata(read_gguf_tokenizer_metadata(path), source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "GGUF") -> Tokenizer:
        """From GGUF metadata as a {key: value} dict (see `tokenizer.gguf.tokenizer_from_gguf_metadata`)."""
        from .gguf import tokenizer_from_gguf_metadata

        return tokenizer_from_gguf_metadata(meta, source)

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, files: Iterable[str | Path], vocab_size: int, special_tokens: Iterable[str] | None = None,
              **options) -> Tokenizer:
        """Train a byte-level BPE tokenizer on text files: `tokenizer.train.train_bpe` (options: bos_token,
        eos_token, add_bos, chat_template, min_frequency, progress)."""
        from .train import train_bpe

        return train_bpe(files, vocab_size, special_tokens, **options)
