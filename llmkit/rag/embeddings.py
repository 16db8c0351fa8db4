"""Sentence embeddings from a BERT encoder: all-MiniLM-L6-v2 (Reimers & Gurevych 2019, Sentence-BERT;
weights from `llmkit pull minilm-l6-v2`) through llmkit's `Encoder` (models/encoder.py).

  e(text) = normalize( sum_t mask_t * h_t / sum_t mask_t ),  h = Encoder([CLS] ids [SEP]) (T, C)

i.e. mean pooling over real tokens then L2 normalisation, as the model's sentence-transformers
modules.json prescribes (Transformer -> Pooling(mean) -> Normalize); texts are truncated to the
folder's max_seq_length (256 for MiniLM). Equal to sentence-transformers on the same folder
(tests/test_rag_embeddings.py). Batches are built from texts sorted by length, so each batch pads
to a similar length (padding is most of the cost otherwise), and results return in input order.

`identity` names the weights (SHA-256 of model.safetensors + dim): an index records
it and refuses to be queried or extended with another model's vectors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import LLMKitError
from ..models.encoder import Encoder
from ..tokenizer import Tokenizer


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Embedder:
    """`embed(texts) -> (N, C) float32, unit rows`; `tokenizer` counts tokens for the chunkers."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 32, max_length: int | None = None):
        if model_dir is None:
            from ..hub import pull

            model_dir = pull("minilm-l6-v2", quiet=True)
        p = Path(model_dir)
        self.model = Encoder.from_dir(p)
        self.tokenizer = Tokenizer.from_dir(p)
        cfg = p / "sentence_bert_config.json"
        seq = json.loads(cfg.read_text()).get("max_seq_length") if cfg.is_file() else None
        self.max_length = min(max_length or seq or self.model.cfg.max_seq_len, self.model.cfg.max_seq_len)
        self.cls_id, self.sep_id = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        if self.cls_id is None or self.sep_id is None:
            raise LLMKitError(f"{p / 'tokenizer.json'} has no [CLS]/[SEP] tokens: not a BERT tokenizer")
        self.pad_id = self.model.cfg.pad_token_id
        self.batch_size = batch_size
        self.dim = self.model.cfg.d_model
        # the weights themselves, not the folder's name: a copy elsewhere is the same model
        self.identity = f"sha256:{file_sha256(p / 'model.safetensors')[:16]}/dim{self.dim}"

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        body = self.max_length - 2
        return [[self.cls_id] + ids[:body] + [self.sep_id] for ids in self.tokenizer.encode_batch(texts, add_bos=False)]

    @torch.no_grad()
    def embed(self, texts: list[str], progress=None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        ids = self.token_ids(list(texts))
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: batches pad little
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        for s in range(0, len(order), self.batch_size):
            rows = order[s:s + self.batch_size]
            T = len(ids[rows[0]])
            batch = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), T)
            for b, i in enumerate(rows):
                batch[b, :len(ids[i])] = torch.tensor(ids[i])
                mask[b, :len(ids[i])] = 1
            h = self.model(batch, mask)  # (B, T, C)
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)  # (B, C)
            out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=-1).numpy()
            if progress is not None:
                progress.update(len(rows))
        return out
