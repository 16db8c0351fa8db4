"""BERTScore (Zhang et al. 2020, https://arxiv.org/abs/1904.09675) with a small local BERT encoder.

The encoder is llmkit's BERT-style `Encoder` (models/encoder.py, Devlin et al. 2019) loaded from a
Hugging Face BERT folder (config.json + model.safetensors + tokenizer.json), e.g. all-MiniLM-L6-v2
from `llmkit pull minilm-l6-v2`, so no `transformers` is needed. Scores equal the `bert-score`
package given the same folder and layer (tests/test_eval_bertscore.py).

Greedy matching: each candidate token takes its most cosine-similar reference token (precision),
each reference token its most similar candidate token (recall); [CLS]/[SEP] get weight 0; with
idf the weights are idf(w) = log((M + 1) / (df(w) + 1)) over the M references.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from ..errors import LLMKitError
from ..models.encoder import Encoder
from .metrics import check_lengths


class BertScorer:
    """Holds the encoder and tokenizer; `score(cands, refs)` gives per-segment P, R, F1 tensors."""

    def __init__(self, model_dir: str | Path | None = None, num_layers: int | None = None,
                 batch_size: int = 64, max_length: int = 512):
        from tokenizers import Tokenizer

        if model_dir is None:
            from ..hub import pull

            model_dir = pull("minilm-l6-v2", quiet=True)
        p = Path(model_dir)
        self.model = Encoder.from_dir(p)
        if not (p / "tokenizer.json").is_file():
            raise LLMKitError(f"{p} has no tokenizer.json")
        self.num_layers = num_layers if num_layers is not None else self.model.cfg.n_layer
        tok = Tokenizer.from_file(str(p / "tokenizer.json"))
        tok.no_padding()  # sentence-transformers folders ship fixed padding/truncation at 128
        tok.enable_truncation(max_length)  # bert-score truncates at model_max_length (512)
        self.tok = tok
        self.cls_id, self.sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        self.pad_id = self.model.cfg.pad_token_id
        self.batch_size = batch_size

    def encode_ids(self, text: str) -> list[int]:
        text = text.strip()
        if not text:  # as bert-score: an empty sentence is just [CLS] [SEP]
            return [self.cls_id, self.sep_id]
        return self.tok.encode(text).ids

    @torch.no_grad()
    def embed(self, texts: list[str]) -> dict[str, tuple[list[int], torch.Tensor]]:
        """Unique texts -> (ids, unit-norm token embeddings (T, C)), batched by length."""
        uniq = sorted(set(texts), key=len, reverse=True)
        out = {}
        for s in range(0, len(uniq), self.batch_size):
            chunk = uniq[s:s + self.batch_size]
            ids = [self.encode_ids(t) for t in chunk]
            T = max(len(x) for x in ids)
            batch = torch.full((len(ids), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(ids), T, dtype=torch.long)
            for i, x in enumerate(ids):
                batch[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = 1
            h = self.model(batch, mask, self.num_layers)  # (B, T, C)
            for i, (t, x) in enumerate(zip(chunk, ids)):
                e = h[i, :len(x)]
                out[t] = (x, e / e.norm(dim=-1, keepdim=True))
        return out

    def idf_weights(self, refs: list[str]) -> dict[int, float]:
        """idf(w) = log((M + 1) / (df(w) + 1)) over the M reference segments (bert-score's)."""
        df = Counter()
        for r in refs:
            df.update(set(self.encode_ids(r)))
        M = len(refs)
        return {w: math.log((M + 1) / (c + 1)) for w, c in df.items()} | {"_unseen": math.log(M + 1)}

    def _weights(self, ids: list[int], idf: dict | None) -> torch.Tensor:
        w = [0.0 if t in (self.cls_id, self.sep_id) else (idf.get(t, idf["_unseen"]) if idf else 1.0) for t in ids]
        return torch.tensor(w)

    def score(self, cands: list[str], refs: list[list[str]], idf: bool = False):
        """cands (N,), refs K streams of N -> P, R, F1 (N,) each: the best reference per component."""
        flat_refs = [r[i] for i in range(len(cands)) for r in refs]
        emb = self.embed(list(cands) + flat_refs)
        idf_w = self.idf_weights(flat_refs) if idf else None
        P, R, F1 = (torch.zeros(len(cands)) for _ in range(3))
        for i, c in enumerate(cands):
            best = None
            for r in refs:
                (hid, he), (rid, re_) = emb[c], emb[r[i]]
                if len(hid) <= 2 or len(rid) <= 2:  # empty sentence: scores 0 (as bert-score)
                    prf = torch.zeros(3)
                else:
                    sim = he @ re_.T  # (Th, Tr) cosine similarities
                    wh, wr = self._weights(hid, idf_w), self._weights(rid, idf_w)
                    p = (sim.max(dim=1).values * wh).sum() / wh.sum()
                    rr = (sim.max(dim=0).values * wr).sum() / wr.sum()
                    f = 2 * p * rr / (p + rr)
                    prf = torch.stack([p, rr, torch.nan_to_num(f, nan=0.0)])
                best = prf if best is None else torch.maximum(best, prf)
            P[i], R[i], F1[i] = best
        return P, R, F1


def bertscore(predictions: list[str], references: list[list[str]], model_dir: str | Path | None = None,
              num_layers: int | None = None, idf: bool = False, scorer: BertScorer | None = None) -> dict:
    """Corpus BERTScore: the mean of the per-segment P, R and F1."""
    check_lengths(predictions, references)
    scorer = scorer or BertScorer(model_dir, num_layers)
    P, R, F1 = scorer.score(predictions, references, idf=idf)
    return {"bertscore_precision": P.mean().item(), "bertscore_recall": R.mean().item(),
            "bertscore_f1": F1.mean().item(), "num_layers": scorer.num_layers, "idf": idf}
