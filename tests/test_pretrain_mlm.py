"""Masked-LM pretraining of a tiny BERT: the 80/10/10 corruption (statistically), the loss on selected
tokens only, and `pretrain` with objective=mlm lowering the masked-LM loss on tiny data."""

import json
import math
from pathlib import Path

import pytest
import torch

from llmkit.config import load_config
from llmkit.errors import LLMKitError
from llmkit.losses import mlm_loss, mlm_mask
from llmkit.models import Encoder
from llmkit.recipes.pretrain import PretrainConfig, pretrain
from llmkit.tokenizer import Tokenizer
from llmkit.train.data import prepare

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "llmkit" / "data" / "tinyshakespeare.txt"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mlm_mask_80_10_10():
    V, mask_id = 1000, 999
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 998, (64, 4096), generator=gen)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # e.g. [CLS], [SEP]
    inputs, labels = mlm_mask(ids, special, mask_id, V, gen)
    sel = labels != -100
    n = ids.numel() - special.sum().item()
    k = sel.sum().item()
    # each share within 5 standard deviations of its binomial expectation
    assert abs(k - 0.15 * n) < 5 * math.sqrt(n * 0.15 * 0.85)
    assert not sel[special].any() and torch.equal(labels[sel], ids[sel])
    assert torch.equal(inputs[~sel], ids[~sel])  # unselected tokens are never changed
    masked = (inputs[sel] == mask_id).sum().item()
    kept = (inputs[sel] == ids[sel]).sum().item()
    random = k - masked - kept
    p_keep = 0.1 + 0.1 / V  # a random replacement may draw the same token
    p_rand = 0.1 * (1 - 1 / V) - 0.1 / V  # ... or [MASK] itself (counted as masked)
    for got, p in ((masked, 0.8 + 0.1 / V), (kept, p_keep), (random, p_rand)):
        assert abs(got - p * k) < 5 * math.sqrt(k * p * (1 - p)), (got, p * k)
    # random replacements are spread over the vocabulary
    rand_ids = inputs[sel & (inputs != mask_id) & (inputs != ids)]
    assert rand_ids.unique().numel() > 0.9 * V


def test_mlm_loss_counts_selected_tokens_only():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 4, 2
    ref = -(logits[0, 1].log_softmax(-1)[4] + logits[1, 3].log_softmax(-1)[2]) / 2
    assert torch.allclose(mlm_loss(logits, labels), ref)
    assert mlm_loss(logits, torch.full((2, 5), -100)) == 0  # nothing selected: no NaN


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    text = CORPUS.read_text()[:60_000]
    (d / "a.txt").write_text(text[:50_000])
    (d / "b.txt").write_text(text[50_000:])
    tok = Tokenizer.train([d / "a.txt"], 300)
    out = tmp_path_factory.mktemp("tokens") / "d"
    prepare([d / "a.txt"], tok, out, val_inputs=[d / "b.txt"], progress=False)
    return out


def test_pretrain_mlm_lowers_the_loss(data_dir, tmp_path):
    cfg = load_config(PretrainConfig, None, [
        f"data.dir={data_dir}", f"train.out_dir={tmp_path / 'run'}", "preset=tiny-bert", "objective=mlm",
        "data.seq_len=32", "train.batch_size=8", "train.steps=40", "train.eval_every=0", "train.eval_batches=2",
        "train.ckpt_every=0", "optim.warmup_steps=5", "optim.lr=3e-3", "train.progress=false"])
    s = pretrain(cfg)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    V = s["model_config"]["vocab_size"]
    assert V == 301  # the byte-level BPE has no [MASK]: one extra row
    assert losses[0] > math.log(V) - 0.5  # starts near uniform
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert s["val_loss"] < math.log(V) - 0.5  # held-out masked tokens: well below uniform
    assert 0 <= s["val_mlm_accuracy"] <= 1
    enc = Encoder.from_dir(s["final_checkpoint"])  # a BERT folder with the MLM head
    assert enc.cfg.mlm_head and enc.cfg.mask_token_id == 300


def test_objective_and_preset_must_agree(data_dir, tmp_path):
    for over, msg in ((["preset=tiny-llama", "objective=mlm"], "trains an encoder"),
                      (["preset=tiny-bert"], "is an encoder: train it with objective=mlm"),
                      (["objective=mln"], "unknown objective .mln.*mlm")):
        cfg = load_config(PretrainConfig, None, [f"data.dir={data_dir}", f"train.out_dir={tmp_path / 'r'}", *over])
        with pytest.raises(LLMKitError, match=msg):
            pretrain(cfg)
