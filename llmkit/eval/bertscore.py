"""BERTScore (Zhang et al. 2020, https://arxiv.org/abs/1904.09675) with a small local BERT encoder.

The encoder is a plain torch BERT (Devlin et al. 2019) that loads a Hugging Face BERT folder
(config.json + model.safetensors + tokenizer.json), e.g. all-MiniLM-L6-v2 from
`llmkit pull minilm-l6-v2`, so no `transformers` is needed. Scores equal the `bert-score`
package given the same folder and layer (tests/test_eval_bertscore.py).

Greedy matching: each candidate token takes its most cosine-similar reference token (precision),
each reference token its most similar candidate token (recall); [CLS]/[SEP] get weight 0; with
idf the weights are idf(w) = log((M + 1) / (df(w) + 1)) over the M references.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError
from .metrics import check_lengths


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        C = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], C)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], C)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], C)
        self.LayerNorm = nn.LayerNorm(C, eps=cfg["layer_norm_eps"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        pos = torch.arange(ids.size(1), device=ids.device)
        # single-segment input: token type 0 everywhere
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, C: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, C)
        self.LayerNorm = nn.LayerNorm(C, eps=eps)


class _Attention(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        setattr(self, "self", _SelfAttention(C))  # HF name: attention.self.query
        self.output = _DenseNorm(C, C, eps)


class _Intermediate(nn.Module):
    def __init__(self, C: int, d_ff: int):
        super().__init__()
        self.dense = nn.Linear(C, d_ff)


class BertLayer(nn.Module):
    """Post-norm block: x = LN(x + Attn(x)); x = LN(x + W2·gelu(W1·x))."""

    def __init__(self, cfg: dict):
        super().__init__()
        C, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.n_head = cfg["num_attention_heads"]
        self.attention = _Attention(C, eps)
        self.intermediate = _Intermediate(C, cfg["intermediate_size"])
        self.output = _DenseNorm(cfg["intermediate_size"], C, eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); keep (B, 1, 1, T) bool, False at padding keys."""
        B, T, C = x.shape
        sa = getattr(self.attention, "self")
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for lin in (sa.query, sa.key, sa.value))  # (B, H, T, D)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, T, C)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(a))
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT's "gelu"
        return self.output.LayerNorm(x + self.output.dense(h))


class _Stack(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg["num_hidden_layers"]))


class BertEncoder(nn.Module):
    """BERT encoder with Hugging Face parameter names (embeddings.*, encoder.layer.i.*)."""

    def __init__(self, cfg: dict):
        super().__init__()
        if cfg.get("model_type", "bert") != "bert" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise LLMKitError(f"BERTScore encoder supports BERT with absolute positions, got {cfg.get('model_type')}")
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Stack(cfg)

    @classmethod
    def from_dir(cls, path: str | Path) -> "BertEncoder":
        from safetensors.torch import load_file

        p = Path(path)
        for f in ("config.json", "model.safetensors"):
            if not (p / f).is_file():
                raise LLMKitError(f"{p} is not a BERT folder: {f} is missing")
        model = cls(json.loads((p / "config.json").read_text()))
        sd = {k.removeprefix("bert."): v for k, v in load_file(p / "model.safetensors").items()}
        sd = {k: v for k, v in sd.items() if not k.startswith(("pooler.", "cls.")) and k != "embeddings.position_ids"}
        model.load_state_dict(sd, strict=True)
        return model.eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """ids, mask (B, T) -> hidden states after `num_layers` layers (B, T, C); 0 = embeddings."""
        L = len(self.encoder.layer) if num_layers is None else num_layers
        if not 0 <= L <= len(self.encoder.layer):
            raise LLMKitError(f"num_layers must be in 0..{len(self.encoder.layer)}, got {L}")
        keep = mask.bool()[:, None, None, :]
        x = self.embeddings(ids)
        for layer in self.encoder.layer[:L]:
            x = layer(x, keep)
        return x


class BertScorer:
    """Holds the encoder and tokenizer; `score(cands, refs)` gives per-segment P, R, F1 tensors."""

    def __init__(self, model_dir: str | Path | None = None, num_layers: int | None = None,
                 batch_size: int = 64, max_length: int = 512):
        from tokenizers import Tokenizer

        if model_dir is None:
            from ..hub import pull

            model_dir = pull("minilm-l6-v2", quiet=True)
        p = Path(model_dir)
        self.model = BertEncoder.from_dir(p)
        if not (p / "tokenizer.json").is_file():
            raise LLMKitError(f"{p} has no tokenizer.json")
        self.num_layers = num_layers if num_layers is not None else len(self.model.encoder.layer)
        tok = Tokenizer.from_file(str(p / "tokenizer.json"))
        tok.no_padding()  # sentence-transformers folders ship fixed padding/truncation at 128
        tok.enable_truncation(max_length)  # bert-score truncates at model_max_length (512)
        self.tok = tok
        self.cls_id, self.sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        self.pad_id = self.model.cfg.get("pad_token_id", 0)
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
