"""T5 (models/t5.py) against transformers' T5ForConditionalGeneration on tiny random models: v1.0 (ReLU,
tied head with the d_model^-1/2 rescale) and v1.1 (gated GELU, untied head): logits with padding,
greedy generation through the engine's decode loop (batched, ragged prompts), the export back to HF,
`llmkit generate` on a T5 folder, and the one-line error for an unsupported architecture."""

import json

import pytest
import torch

from llmkit.checkpoint import load_hf_model
from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.inference import SamplingParams, generate, generate_batch
from llmkit.models.t5 import T5, T5Config, load_hf_t5, relative_position_bucket, save_hf_t5

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 260  # the byte chat tokenizer's 258 ids fit (tests/_shared.py)


def _hf_t5(d, v11: bool):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(1 if v11 else 0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                feed_forward_proj="gated-gelu" if v11 else "relu", tie_word_embeddings=not v11,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    m = transformers.T5ForConditionalGeneration(cfg)
    with torch.no_grad():  # norms away from 1 so a misplaced norm shows
        for n, p in m.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5)
    m.save_pretrained(d)
    if v11:  # a v1.1 checkpoint as published: its own lm_head, tie_word_embeddings false
        sd = load_file(str(d / "model.safetensors"))
        sd["lm_head.weight"] = torch.randn(VOCAB, 32) * 0.5
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        c = json.loads((d / "config.json").read_text())
        c.update(tie_word_embeddings=False, scale_decoder_outputs=False)
        (d / "config.json").write_text(json.dumps(c))
    return transformers.T5ForConditionalGeneration.from_pretrained(d).eval()


@pytest.fixture(scope="module", params=["v1.0", "v1.1"])
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("t5" + request.param)
    hf = _hf_t5(d, request.param == "v1.1")
    return d, hf, load_hf_model(d)


def test_relative_position_bucket_matches_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for bidir in (True, False):
        for nb, md in ((32, 128), (8, 20)):
            ref = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=md)
            assert torch.equal(relative_position_bucket(rel, bidir, nb, md), ref)


def test_logits_equal_transformers(pair):
    d, hf, model = pair
    assert isinstance(model, T5)
    assert model.cfg.tie_embeddings == (model.lm_head.weight is model.embed_tokens.weight)
    torch.manual_seed(0)
    enc = torch.randint(2, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # a padded row
    dec = torch.randint(2, VOCAB, (2, 7))
    with torch.no_grad():
        ref = hf(input_ids=enc, attention_mask=mask, decoder_input_ids=dec).logits
        out = model(enc, dec, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_greedy_generation_equals_transformers(pair):
    d, hf, model = pair
    prompts = [[5, 17, 33, 90, 4, 250, 9], [71, 3, 12]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_ids=(1,))
    batch = generate_batch(model, prompts, params)
    for p, g in zip(prompts, batch):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12, min_new_tokens=0,
                              use_cache=False)[0].tolist()
        ref = ref[1:]  # drop the decoder start token
        ref = ref[:ref.index(1)] if 1 in ref else ref  # the stop token is not part of llmkit's output
        assert g.tokens == ref
        assert generate(model, p, params).tokens == ref  # alone = in a ragged batch
    # n samples share one encoding: greedy rows agree
    many = generate(model, prompts[0], SamplingParams(temperature=0.0, max_new_tokens=5, n=3))
    assert len({tuple(c.tokens) for c in many.completions}) == 1


def test_save_hf_roundtrip(pair, tmp_path):
    d, hf, model = pair
    save_hf_t5(model, tmp_path)
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(load_hf_t5(tmp_path), T5)
    enc, dec = torch.randint(2, VOCAB, (1, 6)), torch.randint(2, VOCAB, (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=enc, decoder_input_ids=dec).logits,
                                   hf(input_ids=enc, decoder_input_ids=dec).logits, atol=1e-5, rtol=1e-5)


def test_cli_generate_on_t5_folder(pair, capsys, tmp_path):
    from _shared import byte_chat_tokenizer

    d, hf, model = pair
    tok = byte_chat_tokenizer()
    save_hf_t5(model, tmp_path)
    tok.save(tmp_path)
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "Hello there", "--max-new-tokens", "6", "--json",
               "--ignore-eos"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    got = json.loads(out)
    ids = tok.encode("Hello there")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6, min_new_tokens=6,
                              use_cache=False)[0, 1:].tolist()
    assert got["tokens"] == ref and got["prompt_tokens"] == len(ids)


def test_presets_and_training_shapes():
    cfg = T5Config.from_preset("tiny-t5")
    m = T5(cfg)
    enc, dec = torch.randint(0, 256, (2, 10)), torch.randint(0, 256, (2, 5))
    assert m(enc, dec).shape == (2, 5, 256)
    with pytest.raises(LLMKitError, match="unknown t5 preset 'tiny-t6'.*tiny-t5"):
        T5Config.from_preset("tiny-t6")
    with pytest.raises(LLMKitError, match="unsupported t5 mlp 'gated-swish'"):
        T5Config(mlp="gated-swish")
    small = T5Config.from_preset("t5-small")
    with torch.device("meta"):
        n = sum(p.numel() for p in T5(small).parameters())
    assert 60_000_000 < n < 61_000_000  # t5-small: 60.5M


def test_unsupported_architecture_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart", "architectures": ["BartModel"]}))
    with pytest.raises(LLMKitError, match="unsupported model_type 'bart'.*supported: gpt2, llama.*t5"):
        load_hf_model(tmp_path)
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "unsupported model_type 'bart'" in err and err.count("\n") == 1 and "Traceback" not in err
