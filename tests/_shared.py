"""Small helpers several test files share: a byte-level chat tokenizer for tiny models, and what
torchrun would set up for the 2-process gloo tests (tests/test_*_dist.py)."""

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives each process, on this machine only."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def byte_chat_tokenizer():
    """A 258-token byte-level BPE with no merges plus <|im_start|>/<|im_end|> (ChatML, no template):
    any text round-trips, so tiny random models (vocab >= 260) can run the chat-formatted recipes."""
    from tokenizers import Tokenizer as HFT
    from tokenizers import decoders, models, pre_tokenizers

    from llmkit.tokenizer import Tokenizer, bytes_to_unicode

    hf = HFT(models.BPE(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(hf, eos_token="<|im_end|>")


def tiny_llama(seed: int = 0, vocab_size: int = 260):
    """A seeded random tiny-llama (vocab 260: the byte chat tokenizer's 258 ids fit) for the recipe tests."""
    import torch

    from llmkit.models import ModelConfig, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=vocab_size, max_seq_len=512))
