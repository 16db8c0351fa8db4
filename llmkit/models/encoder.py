"""A BERT-style bidirectional encoder (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding"), e.g. for BERTScore's token embeddings.

It differs from the decoder (transformer.py) where BERT does:
  - embeddings: token + learned absolute position + token type (segment), then LayerNorm;
  - attention is bidirectional: every token sees every other non-padding token (no causal mask);
  - post-norm blocks (Vaswani et al. 2017): x = LN(x + Attn(x)); x = LN(x + MLP(x)), biases everywhere.
Attention is the decoder's registered attention (modules.ATTENTIONS) with causal=False, and the MLP
the decoder's `GeluMLP` (exact erf GELU for BERT's "gelu"): `EncoderConfig.module_config()`.

Optional heads, each switched on by its config field and loaded when the checkpoint has its weights:
  - pooler (`pooler`): tanh(W·h_[CLS] + b), BERT's sentence vector for next-sentence / classification;
  - masked-LM head (`mlm_head`, BertForMaskedLM's cls.predictions): LN(act(W·h + b)) · E^T + b_vocab,
    the decoder tied to the word embeddings E;
  - sequence classifier (`num_labels` > 0, BertForSequenceClassification): W·pooler(h) + b (B, num_labels).
`forward` returns hidden states; `mlm_logits`, `pool` and `classify` apply the heads.

`Encoder.from_dir(path)` loads a Hugging Face BERT folder (config.json + model.safetensors), e.g.
all-MiniLM-L6-v2 (`llmkit pull minilm-l6-v2`), without `transformers`; `save_encoder` writes one back
(HF names, so transformers loads it too). Hidden states, MLM logits and classifier logits equal
transformers' BertModel / BertForMaskedLM / BertForSequenceClassification (tests/test_models_encoder.py).

Shapes: B batch, T tokens, C d_model, H heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError, closest
from .config import ModelConfig
from .modules import ACTIVATIONS, GeluMLP, attention_class

# Hugging Face `hidden_act` -> the key of modules.ACTIVATIONS
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    max_seq_len: int = 512  # learned absolute positions
    type_vocab_size: int = 2  # segments (sentence A / B)
    norm_eps: float = 1e-12
    activation: str = "gelu"  # key of modules.ACTIVATIONS
    bias: bool = True  # BERT has biases on every linear (read by GeluMLP)
    pad_token_id: int = 0
    pooler: bool = False  # the [CLS] pooler (tanh dense)
    mlm_head: bool = False  # the masked-LM head (tied decoder)
    num_labels: int = 0  # > 0: a sequence-classification head on the pooler
    labels: tuple = ()  # the classes' names (id2label), when known
    mask_token_id: int | None = None  # the id masked-LM inputs use for [MASK]

    def __post_init__(self):
        self.labels = tuple(self.labels)
        self.pooler = self.pooler or self.num_labels > 0  # BertForSequenceClassification pools [CLS]
        if self.d_model % self.n_head:
            raise LLMKitError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")

    def module_config(self) -> ModelConfig:
        """The shared modules' view of this encoder: bidirectional (causal=False) multi-head attention
        with biases, and the GELU MLP, taken from the registries of models/modules.py."""
        return ModelConfig(family="bert", vocab_size=self.vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                           d_model=self.d_model, d_ff=self.d_ff, max_seq_len=self.max_seq_len, norm="layernorm",
                           norm_eps=self.norm_eps, mlp="gelu", activation=self.activation, pos_emb="learned",
                           bias=self.bias, causal=False)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EncoderConfig":
        if name not in ENCODER_PRESETS:
            raise LLMKitError(f"unknown encoder preset {name!r}{closest(name, ENCODER_PRESETS)}; "
                              f"choose one of {', '.join(ENCODER_PRESETS)}")
        return dataclasses.replace(ENCODER_PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, hf: dict) -> "EncoderConfig":
        """From a Hugging Face BERT config.json (absolute positions only)."""
        if hf.get("model_type", "bert") != "bert" or hf.get("position_embedding_type", "absolute") != "absolute":
            raise LLMKitError("the encoder supports BERT with absolute positions, got model_type="
                              f"{hf.get('model_type')!r}, position_embedding_type={hf.get('position_embedding_type')!r}")
        act = hf.get("hidden_act", "gelu")
        if act not in _HF_ACTIVATIONS:
            raise LLMKitError(f"unsupported encoder activation {act!r} (supported: {', '.join(_HF_ACTIVATIONS)})")
        return cls(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                   d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                   max_seq_len=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                   norm_eps=hf.get("layer_norm_eps", 1e-12), activation=_HF_ACTIVATIONS[act],
                   pad_token_id=hf.get("pad_token_id") or 0, mask_token_id=hf.get("mask_token_id"))

    def to_hf(self) -> dict:
        """A Hugging Face BertConfig dict (transformers loads the folder save_encoder writes)."""
        arch = ("BertForSequenceClassification" if self.num_labels else "BertForMaskedLM" if self.mlm_head
                else "BertModel")
        act = {v: k for k, v in reversed(list(_HF_ACTIVATIONS.items()))}[self.activation]
        hf = {"architectures": [arch], "model_type": "bert", "vocab_size": self.vocab_size,
              "hidden_size": self.d_model, "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
              "intermediate_size": self.d_ff, "max_position_embeddings": self.max_seq_len,
              "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.norm_eps, "hidden_act": act,
              "pad_token_id": self.pad_token_id, "position_embedding_type": "absolute",
              "tie_word_embeddings": True, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
        if self.num_labels:
            names = self.labels or tuple(f"LABEL_{i}" for i in range(self.num_labels))
            hf["id2label"] = {str(i): n for i, n in enumerate(names)}
            hf["label2id"] = {n: i for i, n in enumerate(names)}
        if self.mask_token_id is not None:
            hf["mask_token_id"] = self.mask_token_id
        return hf


ENCODER_PRESETS = {
    "bert-base": EncoderConfig(),
    "minilm-l6": EncoderConfig(n_layer=6, d_model=384, d_ff=1536),  # all-MiniLM-L6-v2 (Wang et al. 2020)
    "tiny-bert": EncoderConfig(vocab_size=256, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=128),
}


class MLMHead(nn.Module):
    """BertForMaskedLM's cls.predictions: logits = LN(act(W·h + b)) · E^T + bias, E the word embeddings
    (tied: the decoder's weight is passed in, so it is one parameter)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation]
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(h))), embeddings, self.bias)  # (..., C) -> (..., V)


class EncoderBlock(nn.Module):
    """Post-norm block: x = LN(x + Attn(x)); x = LN(x + W2·act(W1·x))."""

    def __init__(self, cfg: EncoderConfig, layer_idx: int = 0):
        super().__init__()
        mcfg = cfg.module_config()
        self.self_attn = attention_class(mcfg)(mcfg, layer_idx)  # the decoder's registered attention, non-causal
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = GeluMLP(mcfg)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.self_attn(x, None, keep))  # no rotary: positions are learned embeddings
        return self.mlp_norm(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.d_model
        self.embed_tokens = nn.Embedding(cfg.vocab_size, C)
        self.embed_positions = nn.Embedding(cfg.max_seq_len, C)
        self.embed_types = nn.Embedding(cfg.type_vocab_size, C)
        self.embed_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(EncoderBlock(cfg, i) for i in range(cfg.n_layer))
        self.pooler = nn.Linear(C, C) if cfg.pooler else None
        self.mlm = MLMHead(cfg) if cfg.mlm_head else None
        self.classifier = nn.Linear(C, cfg.num_labels) if cfg.num_labels else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """BERT's initialisation (initializer_range 0.02): N(0, 0.02) weights, zero biases, LayerNorm (1, 0);
        with PyTorch's N(0, 1) embeddings the tied MLM logits would start ~8x too large."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, num_layers: int | None = None,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T), mask (B, T) 1 at real tokens, 0 at padding -> hidden states (B, T, C) after the
        first `num_layers` blocks (default all; 0 = the embeddings). token_types (B, T), default 0."""
        L = self.cfg.n_layer if num_layers is None else num_layers
        if not 0 <= L <= self.cfg.n_layer:
            raise LLMKitError(f"num_layers must be in 0..{self.cfg.n_layer}, got {L}")
        T = ids.size(1)
        if T > self.cfg.max_seq_len:
            raise LLMKitError(f"input of {T} tokens is longer than the encoder's {self.cfg.max_seq_len} positions")
        pos = torch.arange(T, device=ids.device)
        types = self.embed_types.weight[0] if token_types is None else self.embed_types(token_types)
        x = self.embed_norm(self.embed_tokens(ids) + self.embed_positions(pos) + types)
        keep = None if mask is None else mask.bool()[:, None, None, :]
        for layer in self.layers[:L]:
            x = layer(x, keep)
        return x

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> masked-LM logits (..., V)."""
        if self.mlm is None:
            raise LLMKitError("this encoder has no masked-LM head (it was not trained to fill masks)")
        return self.mlm(h, self.embed_tokens.weight)

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output: tanh(W·h[:, 0] + b), (B, T, C) -> (B, C)."""
        if self.pooler is None:
            raise LLMKitError("this encoder has no pooler")
        return torch.tanh(self.pooler(h[:, 0]))

    def classify(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                 token_types: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence-classification logits (B, num_labels) from the [CLS] token's pooled state."""
        if self.classifier is None:
            raise LLMKitError("this encoder has no classification head (num_labels is 0)")
        return self.classifier(self.pool(self(ids, mask, token_types=token_types)))

    @classmethod
    def from_dir(cls, path: str | Path, num_labels: int | None = None) -> "Encoder":
        """Load a Hugging Face BERT folder (config.json + model.safetensors), in eval mode, with the heads
        whose weights it holds. `num_labels`: add a freshly initialised classifier of that many classes
        (fine-tuning) when the folder has none."""
        from safetensors.torch import load_file

        p = Path(path)
        for f in ("config.json", "model.safetensors"):
            if not (p / f).is_file():
                raise LLMKitError(f"{p} is not a BERT folder: {f} is missing")
        hf = json.loads((p / "config.json").read_text())
        cfg = EncoderConfig.from_hf(hf)
        raw = load_file(p / "model.safetensors")
        if "cls.predictions.decoder.weight" in raw:  # tied in every BERT we read; an untied one is not
            emb = raw.get("bert.embeddings.word_embeddings.weight", raw.get("embeddings.word_embeddings.weight"))
            if emb is None or not torch.equal(raw["cls.predictions.decoder.weight"], emb):
                raise LLMKitError(f"{p}: the masked-LM decoder is not tied to the word embeddings (not supported)")
        sd = from_hf_bert_state(raw)
        cfg.pooler = "pooler.weight" in sd
        cfg.mlm_head = "mlm.dense.weight" in sd
        if "classifier.weight" in sd:
            cfg.num_labels = sd["classifier.weight"].shape[0]
            names = [hf.get("id2label", {}).get(str(i)) for i in range(cfg.num_labels)]
            cfg.labels = tuple(names) if all(names) else ()
        elif num_labels:
            cfg.num_labels, cfg.pooler = num_labels, True
        model = cls(cfg)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        fresh = ("classifier.", "pooler.") if "classifier.weight" not in sd else ()
        missing = [k for k in missing if not k.startswith(fresh)] if fresh else missing
        if missing or unexpected:
            raise LLMKitError(f"{p / 'model.safetensors'} does not fit its config.json: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval()


def save_encoder(model: Encoder, out_dir: str | Path, tokenizer=None, force: bool = False) -> Path:
    """Write `model` as a Hugging Face BERT folder (config.json, model.safetensors with HF names, the
    tokenizer), atomically; refuses to overwrite unless force. Encoder.from_dir and transformers read it."""
    from safetensors.torch import save_file

    from ..io import MODEL_FILES, atomic_dir

    out = Path(out_dir)
    with atomic_dir(out, force=force, owns=MODEL_FILES) as tmp:
        sd = {k: v.detach().contiguous().cpu() for k, v in to_hf_bert_state(model.state_dict()).items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out


# Hugging Face BertModel name -> llmkit name (after "bert." and "encoder.layer.i." are taken off)
_HF_LAYER_KEYS = {
    "attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.o_proj",
    "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "mlp.up_proj",
    "output.dense": "mlp.down_proj", "output.LayerNorm": "mlp_norm",
}
_HF_EMBED_KEYS = {"word_embeddings": "embed_tokens", "position_embeddings": "embed_positions",
                  "token_type_embeddings": "embed_types", "LayerNorm": "embed_norm"}
# the heads (full HF names, after "bert." is taken off)
_HF_HEAD_KEYS = {"pooler.dense": "pooler", "cls.predictions.transform.dense": "mlm.dense",
                 "cls.predictions.transform.LayerNorm": "mlm.norm", "classifier": "classifier"}
# not read: the tied decoder (= word embeddings, = cls.predictions.bias), next-sentence prediction
_HF_SKIPPED = ("cls.predictions.decoder.", "cls.seq_relationship.", "embeddings.position_ids")


def from_hf_bert_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face BERT state dict (BertModel, BertForMaskedLM, BertForSequenceClassification,
    BertForPreTraining) -> the Encoder's names; drops next-sentence prediction, the tied MLM decoder
    and the position_ids buffer. Old checkpoints' LayerNorm gamma/beta become weight/bias."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("bert.")
        if k.startswith(_HF_SKIPPED):
            continue
        k = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and m.group(2) in _HF_LAYER_KEYS:
            k = f"layers.{m.group(1)}.{_HF_LAYER_KEYS[m.group(2)]}.{m.group(3)}"
        elif k == "cls.predictions.bias":
            k = "mlm.bias"
        else:
            m = re.fullmatch(r"embeddings\.(\w+)\.(weight|bias)", k)
            h = re.fullmatch(r"(.+)\.(weight|bias)", k)
            if m and m.group(1) in _HF_EMBED_KEYS:
                k = f"{_HF_EMBED_KEYS[m.group(1)]}.{m.group(2)}"
            elif h and h.group(1) in _HF_HEAD_KEYS:
                k = f"{_HF_HEAD_KEYS[h.group(1)]}.{h.group(2)}"
        out[k] = v
    return out


def to_hf_bert_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Encoder's state dict -> Hugging Face names (the inverse of from_hf_bert_state; the tied
    decoder is left to transformers' tying)."""
    layer = {v: k for k, v in _HF_LAYER_KEYS.items()}
    embed = {v: k for k, v in _HF_EMBED_KEYS.items()}
    head = {v: k for k, v in _HF_HEAD_KEYS.items()}
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", k)
        name, _, kind = k.rpartition(".")
        if m:
            k = f"bert.encoder.layer.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"
        elif k == "mlm.bias":
            k = "cls.predictions.bias"
        elif name in embed:
            k = f"bert.embeddings.{embed[name]}.{kind}"
        elif name in head:
            k = (f"bert.{head[name]}.{kind}" if name == "pooler"
                 else f"{head[name]}.{kind}")
        out[k] = v
    return out
