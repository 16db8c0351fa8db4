"""The BERT-style encoder equals transformers' BertModel (every layer's hidden states, padding,
segments) on a tiny random model saved as a Hugging Face folder, and attends both ways."""

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.models import Encoder, EncoderConfig, save_encoder


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=40, type_vocab_size=2,
                                  hidden_act="gelu", layer_norm_eps=1e-12)
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): move them so a swapped name would show
        for n, p in hf.named_parameters():
            if "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(d, safe_serialization=True)
    return d, hf


def test_equals_transformers_bert(hf_bert):
    d, hf = hf_bert
    ours = Encoder.from_dir(d)
    assert ours.cfg.n_layer == 3 and ours.cfg.d_model == 32
    ids = torch.randint(1, 99, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # ragged batch: padding keys must be ignored
    mask[2, 4:] = 0
    types = torch.zeros(3, 11, dtype=torch.long)
    types[0, 5:] = 1  # a sentence pair
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True).hidden_states
        for L in range(4):
            mine = ours(ids, mask, num_layers=L, token_types=types)
            real = mask.bool()  # padded positions' states are never used
            assert (mine[real] - ref[L][real]).abs().max() < 1e-5, L
        # token types default to segment 0
        ref0 = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (ours(ids, mask)[mask.bool()] - ref0[mask.bool()]).abs().max() < 1e-5


def test_attention_is_bidirectional():
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.from_preset("tiny-bert")).eval()
    ids = torch.randint(0, 256, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 256
    with torch.no_grad():  # the first token's state depends on the last token (a decoder's would not)
        assert (enc(ids)[0, 0] - enc(changed)[0, 0]).abs().max() > 1e-4


def test_bad_input(tmp_path):
    with pytest.raises(LLMKitError, match="config.json is missing"):
        Encoder.from_dir(tmp_path)
    with pytest.raises(LLMKitError, match="did you mean 'tiny-bert'"):
        EncoderConfig.from_preset("tiny-bertt")
    with pytest.raises(LLMKitError, match="absolute positions"):
        EncoderConfig.from_hf({"model_type": "roberta"})
    enc = Encoder(EncoderConfig.from_preset("tiny-bert"))
    with pytest.raises(LLMKitError, match="longer than"):
        enc(torch.zeros(1, 129, dtype=torch.long))


def _tiny_hf(cls_name: str, d, **extra):
    """A tiny random transformers BERT of class `cls_name`, LayerNorms moved off (1, 0), saved to `d`."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=40, hidden_act="gelu", **extra)
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "LayerNorm" in n or n.endswith("predictions.bias") or "classifier" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(d, safe_serialization=True)
    return hf


def _batch():
    ids = torch.randint(1, 99, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def test_masked_lm_equals_transformers(tmp_path):
    hf = _tiny_hf("BertForMaskedLM", tmp_path)
    ours = Encoder.from_dir(tmp_path)
    assert ours.mlm is not None and ours.pooler is None and ours.classifier is None
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours.mlm_logits(ours(ids, mask))
    assert mine.shape == (2, 9, 99)
    assert (mine[mask.bool()] - ref[mask.bool()]).abs().max() < 1e-5
    # the decoder is tied: one parameter, the word embeddings
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


def test_sequence_classifier_equals_transformers(tmp_path):
    hf = _tiny_hf("BertForSequenceClassification", tmp_path, num_labels=3,
                  id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    ours = Encoder.from_dir(tmp_path)
    assert ours.cfg.num_labels == 3 and ours.cfg.labels == ("neg", "neu", "pos")
    ids, mask = _batch()
    types = torch.zeros_like(ids)
    types[0, 4:] = 1
    with torch.no_grad():
        ref_pooled = hf.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        assert (ours.pool(ours(ids, mask, token_types=types)) - ref_pooled).abs().max() < 1e-5
        assert (ours.classify(ids, mask, types) - ref).abs().max() < 1e-5


def test_save_round_trip_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    for kind, over in (("mlm", {"mlm_head": True}), ("cls", {"num_labels": 2, "labels": ("no", "yes")})):
        enc = Encoder(EncoderConfig.from_preset("tiny-bert", **over)).eval()
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        d = save_encoder(enc, tmp_path / kind)
        with pytest.raises(LLMKitError, match="exists"):
            save_encoder(enc, d)
        back = Encoder.from_dir(d)
        assert back.cfg == enc.cfg
        for (k, a), b in zip(enc.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), k
        ids = torch.randint(0, 256, (2, 7))
        with torch.no_grad():
            if kind == "mlm":
                ref = transformers.BertForMaskedLM.from_pretrained(d).eval()(input_ids=ids).logits
                torch.testing.assert_close(enc.mlm_logits(enc(ids)), ref, rtol=1e-5, atol=1e-5)  # logits ~15
            else:
                hf = transformers.BertForSequenceClassification.from_pretrained(d).eval()
                assert hf.config.id2label == {0: "no", 1: "yes"}
                assert (enc.classify(ids) - hf(input_ids=ids).logits).abs().max() < 1e-5


def test_fresh_classifier_on_a_plain_encoder(hf_bert):
    d, _ = hf_bert
    enc = Encoder.from_dir(d, num_labels=2)
    assert enc.classify(torch.ones(1, 4, dtype=torch.long)).shape == (1, 2)
    with pytest.raises(LLMKitError, match="no masked-LM head"):
        enc.mlm_logits(torch.zeros(1, 32))
