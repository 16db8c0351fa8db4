"""The BERT-style encoder equals transformers' BertModel (every layer's hidden states, padding,
segments) on a tiny random model saved as a Hugging Face folder, and attends both ways."""

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.models import Encoder, EncoderConfig


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
