"""Tokenizers: byte-level BPE (trained here, loaded from tokenizer.json, or rebuilt from GGUF metadata,
where sentencepiece BPE "llama" vocabularies are read too), special tokens, chat templates and
streaming decode.

One class, `Tokenizer` (core.py), wraps a Hugging Face `tokenizers.Tokenizer`; beside it, one concern a file:

    byte_level.py  GPT-2's byte alphabet
    train.py       byte-level BPE training
    chat.py        Jinja chat templates (transformers' semantics), ChatML, end-of-turn tokens
    stream.py      streaming decode (StreamDecoder)
    gguf.py        GGUF vocabularies -> tokenizers (the file is read by llmkit.gguf_io, shared with checkpoint/)

    tok = Tokenizer.train(["corpus.txt"], vocab_size=4096)      # special tokens <|endoftext|>, ChatML
    tok = Tokenizer.from_gguf("SmolLM2.gguf")                   # same ids as transformers' GGUF loader
    ids = tok.encode("Hello 👋")
    assert tok.decode(ids) == "Hello 👋"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""

from .byte_level import bytes_to_unicode
from .chat import CHATML_TEMPLATE, END_OF_TURN_TOKENS
from .core import Tokenizer
from .gguf import GGUF_PRE_TOKENIZER_SPLITS, read_gguf_tokenizer_metadata
from .stream import StreamDecoder
from .train import DEFAULT_SPECIAL_TOKENS

__all__ = ["Tokenizer", "StreamDecoder", "CHATML_TEMPLATE", "DEFAULT_SPECIAL_TOKENS", "END_OF_TURN_TOKENS",
           "GGUF_PRE_TOKENIZER_SPLITS", "bytes_to_unicode", "read_gguf_tokenizer_metadata"]
