"""Reward model (InstructGPT: Ouyang et al. 2022, sec. 3.5; Stiennon et al. 2020): the decoder with a scalar
head in place of its LM head, read at the last non-pad token of each sequence.

    h = Transformer(idx, return_hidden=True)       (B, T, C)   final normalised hidden states
    r = score(h[b, last_b])                         (B,)        score: Linear(C, 1, bias=False)

`last_b` is the rightmost position whose token is not the pad id: Hugging Face's rule in its
`*ForSequenceClassification` models, kept here so that the same ids get the same reward in both.
Trained with the Bradley-Terry loss on preference pairs (`losses.bradley_terry_loss`).

On disk an RM is a Hugging Face sequence-classification checkpoint (LlamaForSequenceClassification,
Qwen2-, Mistral-, Mixtral-, GPT2ForSequenceClassification): config.json with that architecture,
num_labels 1 and pad_token_id; weights `model.*` (GPT-2: `transformer.*`) + `score.weight`; the
tokenizer files; and llmkit_reward.json with llmkit's exact ModelConfig and the run's metadata.
`transformers.AutoModelForSequenceClassification.from_pretrained(dir)` loads it; `load_reward_model(dir)`
loads it (or one made by transformers/TRL) back into llmkit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint.hf import (config_from_hf, config_to_hf, load_state, read_config_json, read_hf_weights,
                             state_dict_from_hf, state_dict_to_hf)
from ..errors import LLMKitError
from ..io import MODEL_FILES, atomic_dir
from ..models import ModelConfig, Transformer

SEQ_CLS = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
           "mistral": "MistralForSequenceClassification", "mixtral": "MixtralForSequenceClassification",
           "qwen2": "Qwen2ForSequenceClassification"}
META_FILE = "llmkit_reward.json"


def last_token_index(idx: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """idx (B, T) -> (B,) the rightmost position whose token is not pad_id (0 for an all-pad row); the
    last position when there is no pad id. Works for right and left padding (transformers' rule)."""
    B, T = idx.shape
    if pad_id is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=idx.device)
    pos = torch.arange(T, device=idx.device)
    return (pos * (idx != pad_id)).argmax(-1)


class RewardModel(nn.Module):
    """A Transformer backbone (`self.model`, its LM head removed) and a scalar head (`self.score`).

    The attribute names make the parameter names HF's for the LLaMA-like families (model.layers.0...,
    score.weight). A PEFT method applies to `self.model` (`apply_method`), the head always trains."""

    def __init__(self, model: Transformer, pad_id: int | None, score: nn.Linear | None = None):
        super().__init__()
        model.lm_head = nn.Identity()  # unused: the head reads hidden states (forward(return_hidden=True))
        self.model = model
        self.pad_id = pad_id
        C = model.cfg.d_model
        w = model.embed_tokens.weight
        if score is None:
            score = nn.Linear(C, 1, bias=False, device=w.device, dtype=w.dtype)
            # std 1/sqrt(C+1): the reward head init of Ziegler et al. 2019 (lm-human-preferences), r ~ N(0, ~1)
            nn.init.normal_(score.weight, std=1 / math.sqrt(C + 1))
        self.score = score

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) right- or left-padded with pad_id -> rewards (B,) fp32."""
        h = self.model(idx, return_hidden=True)  # (B, T, C)
        last = last_token_index(idx, self.pad_id)
        pooled = h[torch.arange(idx.size(0), device=idx.device), last]  # (B, C)
        return self.score(pooled).squeeze(-1).float()


def reward_model_from(model: Transformer, tokenizer=None, pad_id: int | None = None) -> RewardModel:
    """A fresh RM on a (policy or base) language model: its LM head is dropped, a new scalar head added.
    pad_id: default the tokenizer's (whose pad, else eos, pads the batches)."""
    if pad_id is None and tokenizer is not None:
        pad_id = tokenizer.pad_id
    return RewardModel(model, pad_id)


def apply_method(rm: RewardModel, name: str, cfg=None, tokenizer=None) -> RewardModel:
    """PEFT method `name` on the backbone (LoRA, full, selective...); the scalar head trains in every case."""
    from ..peft import apply_method as apply_peft

    apply_peft(rm.model, name, cfg, tokenizer)
    rm.score.weight.requires_grad_(True)
    return rm


# ------------------------------------------------------------------ files
def reward_config_to_hf(rm: RewardModel) -> dict:
    hf = config_to_hf(rm.cfg)
    family = hf["model_type"]
    hf.update(architectures=[SEQ_CLS[family]], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
              pad_token_id=rm.pad_id)
    return hf


def save_reward_model(rm: RewardModel, out_dir: str | Path, tokenizer=None, meta: dict | None = None,
                      force: bool = False) -> Path:
    """Write the RM as a Hugging Face sequence-classification checkpoint, atomically. The backbone must be a
    plain Transformer: merge an adapter first (`llmkit.peft.unload(rm.model, merge=True)`)."""
    from safetensors.torch import save_file

    from ..peft import adapter_method

    if adapter_method(rm.model) is not None:
        raise LLMKitError(f"the reward model carries a {adapter_method(rm.model)} adapter: merge it into the "
                          "weights before saving (llmkit.peft.unload(rm.model, merge=True))")
    sd = state_dict_to_hf(rm.model)
    sd["score.weight"] = rm.score.weight.detach().contiguous()
    out = Path(out_dir)
    with atomic_dir(out, force=force, owns=MODEL_FILES) as tmp:
        (tmp / "config.json").write_text(json.dumps(reward_config_to_hf(rm), indent=2) + "\n")
        save_file({k: v.to("cpu") for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        info = {"format": "llmkit-reward-model", "model_config": rm.cfg.to_dict(), "pad_id": rm.pad_id,
                "meta": meta or {}}
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out


def is_reward_model(d: str | Path) -> bool:
    p = Path(d)
    if (p / META_FILE).is_file():
        return True
    try:
        arch = json.loads((p / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in arch)


def load_reward_model(path: str | Path, with_tokenizer: bool = True) -> tuple[RewardModel, object]:
    """An RM directory (llmkit's or one transformers/TRL wrote) -> (RewardModel in eval mode, Tokenizer or None)."""
    d = Path(path)
    if not d.is_dir():
        raise LLMKitError(f"reward model directory not found: {d}")
    hf = read_config_json(d)
    arch = hf.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in arch):
        raise LLMKitError(f"{d} is not a reward model (config.json architectures {arch}, expected a "
                          "*ForSequenceClassification with num_labels 1): train one with `llmkit align --method rm`")
    n_labels = hf.get("num_labels", len(hf.get("id2label") or {"0": 0}))
    if n_labels != 1:
        raise LLMKitError(f"{d}: a reward model has one output, this classifier has num_labels={n_labels}")
    meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}
    cfg = (ModelConfig.from_dict(meta["model_config"]) if "model_config" in meta
           else config_from_hf(hf, where=str(d / "config.json")))
    sd = read_hf_weights(d)
    score_w = sd.pop("score.weight", None)
    if score_w is None or tuple(score_w.shape) != (1, cfg.d_model):
        raise LLMKitError(f"{d}: no score.weight of shape (1, {cfg.d_model}) (the reward head)")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.lm_head = nn.Identity()
    model = model.to_empty(device="cpu")
    model._rope = None
    load_state(model, state_dict_from_hf(sd, cfg), str(d))
    score = nn.Linear(cfg.d_model, 1, bias=False)
    with torch.no_grad():
        score.weight.copy_(score_w.float())
    rm = RewardModel(model, hf.get("pad_token_id"), score).eval()
    tok = None
    if with_tokenizer and (d / "tokenizer.json").is_file():
        from ..tokenizer import Tokenizer

        tok = Tokenizer.from_dir(d)
    return rm, tok


@torch.no_grad()
def score_batches(rm: RewardModel, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
    """Rewards of token sequences, right-padded in batches of `batch_size`."""
    pad = rm.pad_id if rm.pad_id is not None else 0
    if rm.pad_id is None:  # without a pad id the reward is read at the last position: no padding possible
        batch_size = 1
    device = next(rm.parameters()).device
    out: list[float] = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        L = max(len(s) for s in chunk)
        idx = torch.full((len(chunk), L), pad, dtype=torch.long)
        for b, s in enumerate(chunk):
            idx[b, :len(s)] = torch.tensor(s)
        out += rm(idx.to(device)).tolist()
    return out


def check_same_tokenizer(rm_tokenizer, policy_tokenizer, rm_name: str = "the reward model") -> None:
    """RLHF scores the policy's token ids with the RM: both must tokenise alike (equal tokenizer.json
    fingerprints), else a one-line LLMKitError."""
    if rm_tokenizer is None or policy_tokenizer is None:
        raise LLMKitError(f"cannot check that {rm_name} and the policy share a tokenizer: one of them has none")
    if rm_tokenizer.fingerprint() != policy_tokenizer.fingerprint():
        raise LLMKitError(f"{rm_name}'s tokenizer differs from the policy's (vocabularies of {rm_tokenizer.vocab_size} "
                          f"and {policy_tokenizer.vocab_size} tokens): train the reward model from the policy's "
                          "family (llmkit align --method rm --model POLICY)")


# ------------------------------------------------------------------ the RM as a reward source of RL
def prompt_messages(example: dict) -> list[dict]:
    """The conversation a completion answers: the row's "messages" (prompts read from preference data), else
    its question as one user turn. The policy's task system prompt is not part of it: it instructs the
    policy, while the RM judges the conversation as its training pairs showed it."""
    return list(example["messages"]) if example.get("messages") else [{"role": "user", "content": example["question"]}]


class RewardModelReward:
    """A trained RM as one reward function of llmkit.align.rewards (name "rm"): `(completion, example) ->
    float`, and `score_batch(completions, examples)` to score a whole rollout in batches.

    Each completion is laid out as the RM was trained (llmkit.align.data.tokenize_pair): the chat-templated
    prompt, then the completion as the assistant's reply ending with the end-of-turn token; the reward is
    the RM's score at the last non-pad token. The RM is frozen (eval mode, no gradients) on `device`."""

    def __init__(self, rm: RewardModel, tokenizer, device=None, batch_size: int = 8):
        self.rm = rm.eval().requires_grad_(False)
        if device is not None:
            self.rm.to(device)
        self.tokenizer, self.batch_size = tokenizer, batch_size

    @classmethod
    def load(cls, path: str | Path, policy_tokenizer, device=None, batch_size: int = 8) -> "RewardModelReward":
        """Load the RM at `path` after checking, from its tokenizer file alone, that it shares the policy's
        tokenizer (a one-line LLMKitError otherwise, before the weights are read)."""
        from ..tokenizer import Tokenizer

        d = Path(path)
        if not is_reward_model(d):
            raise LLMKitError(f"--reward-model {d} is not a reward model directory (config.json of a "
                              "*ForSequenceClassification): train one with `llmkit align --method rm`")
        rm_tok = Tokenizer.from_dir(d) if (d / "tokenizer.json").is_file() else None
        check_same_tokenizer(rm_tok, policy_tokenizer, f"reward model {d}")
        rm, _ = load_reward_model(d, with_tokenizer=False)
        return cls(rm, policy_tokenizer, device, batch_size)

    def ids(self, completion: str, example: dict) -> list[int]:
        from .data import tokenize_pair

        prompt, reply, _ = tokenize_pair(self.tokenizer, prompt_messages(example), completion, completion)
        return prompt + reply

    def score_batch(self, completions: list[str], examples: list[dict]) -> list[float]:
        return score_batches(self.rm, [self.ids(c, e) for c, e in zip(completions, examples)], self.batch_size)

    def __call__(self, completion: str, example: dict) -> float:
        return self.score_batch([completion], [example])[0]
