"""Fill-mask: the masked-LM head's most likely tokens for each [MASK] of a text (BERT, Devlin et al.
2019), as transformers' fill-mask pipeline reports them (softmax over the vocabulary at each mask).

The text is split at the mask string and the pieces encoded around the mask id, so the same code
serves a BERT vocabulary (which has "[MASK]") and an encoder pretrained by llmkit on a byte-level
BPE (whose [MASK] is an extra embedding row past the tokenizer, config.json mask_token_id).
[CLS] ... [SEP] wrap the ids when the vocabulary has them (BERT's input format).
"""

from __future__ import annotations

import torch

from ..errors import LLMKitError

MASK = "[MASK]"


def mask_ids(model, tokenizer, text: str) -> tuple[list[int], list[int]]:
    """-> (token ids of `text` with each [MASK] as the mask id, the positions of the masks)."""
    mask_id = model.cfg.mask_token_id
    if mask_id is None:
        mask_id = tokenizer.token_to_id(MASK)
    if mask_id is None:
        raise LLMKitError(f"the encoder has no {MASK} token (no mask_token_id in its config.json)")
    pieces = text.split(MASK)
    if len(pieces) < 2:
        raise LLMKitError(f"the text has no {MASK} to fill, e.g. \"Paris is the {MASK} of France.\"")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    ids = [cls] if cls is not None else []
    where = []
    for i, piece in enumerate(pieces):
        if i:
            where.append(len(ids))
            ids.append(mask_id)
        ids += tokenizer.encode(piece, add_bos=False) if piece.strip() else []
    if sep is not None:
        ids.append(sep)
    if len(ids) > model.cfg.max_seq_len:
        raise LLMKitError(f"the text is {len(ids)} tokens, longer than the encoder's {model.cfg.max_seq_len}")
    return ids, where


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[dict]]:
    """For each [MASK] in `text`, in order: the top_k tokens [{"id", "token", "prob"}], most likely first."""
    if model.mlm is None:
        raise LLMKitError("this encoder has no masked-LM head (a sentence encoder such as all-MiniLM-L6-v2 "
                          "was not trained to fill masks): give a BertForMaskedLM folder or an `objective=mlm` run")
    if top_k < 1:
        raise LLMKitError(f"--top-k must be >= 1, got {top_k}")
    ids, where = mask_ids(model, tokenizer, text)
    h = model(torch.tensor([ids]))  # (1, T, C)
    probs = model.mlm_logits(h[0, where]).float().softmax(-1)  # (n_masks, V)
    top = probs.topk(min(top_k, probs.size(-1)))
    n = tokenizer.vocab_size
    return [[{"id": int(i), "token": tokenizer.decode([int(i)]) if i < n else MASK, "prob": float(p)}
             for p, i in zip(ps, idx)] for ps, idx in zip(top.values, top.indices)]
