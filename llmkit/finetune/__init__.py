"""Supervised fine-tuning data: chat-template rendering, completion-only labels, packing, mixing."""

from .data import (IGNORE, DocumentMask, Example, SFTData, example_stream, load_sft_data, packed_batch, pad_batch,
                   to_messages, tokenize_chat)

__all__ = ["IGNORE", "DocumentMask", "Example", "SFTData", "example_stream", "load_sft_data", "packed_batch",
           "pad_batch", "to_messages", "tokenize_chat"]
