"""Train a byte-level BPE tokenizer (GPT-2, Radford et al. 2019) on text files with the `tokenizers` trainer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import LLMKitError
from .chat import CHATML_TEMPLATE
from .core import Tokenizer, bos_post_processor

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_bpe(files: Iterable[str | Path], vocab_size: int, special_tokens: Iterable[str] | None = None, *,
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
    tok = Tokenizer(hf, bos_token=bos_token, eos_token=eos_token, add_bos=add_bos, chat_template=chat_template)
    hf.post_processor = bos_post_processor(tok.bos_token, tok.bos_id, tok.add_bos)
    return tok
