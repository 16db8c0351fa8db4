"""BERT encoders end to end on tiny random models with a tiny WordPiece vocabulary: fill-mask equals
transformers' BertForMaskedLM (ids, top-k tokens and probabilities), `llmkit embed` is the Embedder's
path, task=classify fine-tuning learns a separable task, and the encoder/decoder mix-ups are one-line
errors (exit 2)."""

import json

import pytest
import torch

from llmkit.cli import main
from llmkit.config import load_config
from llmkit.errors import LLMKitError
from llmkit.inference.fill_mask import fill_mask, mask_ids
from llmkit.loading import load_encoder
from llmkit.models import Encoder
from llmkit.recipes.finetune import FinetuneConfig, finetune

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("the a cat dog sat on mat rug is was good bad great awful movie film very not and it this "
         "paris france capital of city , . ? !").split()


def _tiny_bert(d, cls_name="BertForMaskedLM"):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True)  # transformers 5: vocab=
    assert len(tok) == len(vocab)
    tok.save_pretrained(d)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # sharper, non-trivial predictions
        for n, p in model.named_parameters():
            if "predictions" in n or "word_embeddings" in n:
                p.mul_(8.0)
    model.save_pretrained(d, safe_serialization=True)
    return model, tok


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-mlm")
    model, tok = _tiny_bert(d)
    return d, model, tok


def test_fill_mask_equals_transformers(mlm_dir):
    d, hf, hf_tok = mlm_dir
    enc, tok = load_encoder(str(d))
    text = "The cat sat on the [MASK] , [MASK] was very good ."
    ids, where = mask_ids(enc, tok, text)
    ref_ids = hf_tok(text)["input_ids"]
    assert ids == ref_ids and where == [i for i, t in enumerate(ref_ids) if t == hf_tok.mask_token_id]
    got = fill_mask(enc, tok, text, top_k=4)
    with torch.no_grad():
        probs = hf(input_ids=torch.tensor([ref_ids])).logits[0, where].softmax(-1)
    top = probs.topk(4)
    for cands, p, i in zip(got, top.values, top.indices):
        assert [c["id"] for c in cands] == i.tolist()
        assert max(abs(c["prob"] - float(q)) for c, q in zip(cands, p)) < 1e-5
        assert [c["token"] for c in cands] == hf_tok.convert_ids_to_tokens(i.tolist())


def test_fill_mask_cli_and_bad_input(mlm_dir, capsys, tmp_path):
    d = str(mlm_dir[0])
    assert main(["fill-mask", "--model", d, "--text", "paris is the [MASK] of france .", "--json", "--top-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["masks"]) == 1 and len(out["masks"][0]) == 3
    assert out["masks"][0][0]["prob"] >= out["masks"][0][1]["prob"]
    cases = [(["fill-mask", "--model", d, "--text", "no mask here"], "has no [MASK] to fill"),
             (["fill-mask", "--model", "smollm2-135m-instruct", "--text", "a [MASK]"], "not a BERT encoder"),
             (["generate", "--model", d, "--prompt", "hi"], "is a BERT encoder, not a language model"),
             (["fill-mask", "--model", str(tmp_path / "nope"), "--text", "a [MASK]"], "encoder not found")]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_fill_mask_needs_an_mlm_head(tmp_path, capsys):
    _tiny_bert(tmp_path, "BertModel")
    assert main(["fill-mask", "--model", str(tmp_path), "--text", "a [MASK] ."]) == 2
    assert "no masked-LM head" in capsys.readouterr().err


def test_embed_cli_is_the_embedder(mlm_dir, capsys):
    from llmkit.rag.embeddings import Embedder

    d = str(mlm_dir[0])
    texts = ["the cat sat on the mat .", "a very good film !"]
    assert main(["embed", "--model", d, "--json", *(a for t in texts for a in ("--text", t))]) == 0
    out = json.loads(capsys.readouterr().out)
    got = torch.tensor(out["embeddings"])
    assert out["dim"] == 32 and got.shape == (2, 32)
    assert torch.allclose(got, torch.from_numpy(Embedder(d).embed(texts)), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_classify_finetune_learns(mlm_dir, tmp_path):
    import random

    rng = random.Random(0)
    rows = []
    for i in range(160):  # the label is the sentiment word; the rest is noise
        label = rng.choice(["neg", "pos"])
        word = rng.choice(["good", "great"] if label == "pos" else ["bad", "awful"])
        filler = " ".join(rng.choice(WORDS[:8]) for _ in range(rng.randint(2, 6)))
        rows.append({"text": f"{filler} {word} {filler}", "label": label})
    data = tmp_path / "sent.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"model={mlm_dir[0]}", "task=classify", f"train.out_dir={tmp_path / 'out'}", "train.steps=40",
            "train.batch_size=16", "data.seq_len=32", "optim.lr=1e-2", "optim.warmup_steps=4", "train.eval_every=0",
            "train.ckpt_every=0", "data.val_fraction=0.25", "train.progress=false"]
    cfg = load_config(FinetuneConfig, None, base)  # method defaults to lora: refused
    cfg.data.files = [str(data)]
    with pytest.raises(LLMKitError, match="set method=full"):
        finetune(cfg)
    cfg.method = "full"
    s = finetune(cfg)
    assert s["classes"] == ["neg", "pos"] and s["val_examples"] == 40
    assert s["val_accuracy_after"] >= 0.9 and s["val_loss_after"] < s["val_loss_before"]
    # the output is a BertForSequenceClassification folder: transformers gives the same logits
    ours = Encoder.from_dir(tmp_path / "out")
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    ids = torch.tensor([[2, 7, 16, 3]])
    with torch.no_grad():
        assert torch.allclose(ours.classify(ids), hf(input_ids=ids).logits, atol=1e-5)
