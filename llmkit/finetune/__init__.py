"""Supervised fine-tuning data: chat-template rendering, completion-only labels, packing, mixing."""

from .data import (IGNORE, Example, SFTData, document_mask, example_stream, load_sft_data, packed_batch, pad_batch,
                   to_messages, tokenize_chat)

__all__ = ["IGNORE", "Example", "SFTData", "document_mask", "example_stream", "load_sft_data", "packed_batch",
           "pad_batch", "to_messages", "tokenize_chat"]
