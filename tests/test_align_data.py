"""Preference data: the formats, chat templating, prompt masking, the held-out split, bad input."""

import gzip
import json

import pytest
import torch
from _shared import byte_chat_tokenizer

from llmkit.align.data import load_preference_data, preference_batch, split_hh, to_pair, tokenize_pair
from llmkit.errors import LLMKitError
from llmkit.losses import sequence_logprobs
from llmkit.models import ModelConfig, Transformer


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()  # ChatML; pad = eos = <|im_end|> (257)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PLAIN = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
SHAREGPT = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello"}, {"from": "human", "value": "2+2?"}],
            "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}
HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: It is 4.",
      "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: It is 5."}


def test_formats_give_the_same_prompt_and_replies():
    assert to_pair(PLAIN, "x") == ([{"role": "user", "content": "2+2?"}], "4", "5")
    prompt, c, r = to_pair(SHAREGPT, "x")
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"] and (c, r) == ("4", "5")
    # HH: the two replies share "It is ": the prompt still ends at the last Assistant: of the shared prefix
    prompt, c, r = to_pair(HH, "x")
    assert prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "2+2?"}]
    assert (c, r) == ("It is 4.", "It is 5.")
    chat = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}]}
    assert to_pair(chat, "x") == to_pair(PLAIN, "x")


def test_tokenized_pair_is_the_chat_template_split_at_the_generation_prompt(tok):
    prompt, c, r = to_pair(SHAREGPT, "x")
    p_ids, c_ids, r_ids = tokenize_pair(tok, prompt, c, r)
    assert tok.decode(p_ids) == tok.apply_chat_template(prompt, add_generation_prompt=True)
    assert tok.decode(p_ids + c_ids) == tok.apply_chat_template(prompt + [{"role": "assistant", "content": "4"}])
    assert tok.decode(c_ids) == "4<|im_end|>\n" and tok.decode(r_ids) == "5<|im_end|>\n"


def test_batch_masks_the_prompt_out_of_every_response_logprob(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=260, max_seq_len=256)).eval()
    pairs = []
    for rec in (PLAIN, SHAREGPT, HH):
        p, c, r = tokenize_pair(tok, *to_pair(rec, "x"))
        from llmkit.align.data import PreferencePair
        pairs.append(PreferencePair(p, c, r))
    b = preference_batch(pairs, tok.pad_id)
    assert b["idx"].shape[0] == 6
    with torch.no_grad():
        lp = sequence_logprobs(model, b["idx"], b["targets"])  # (2B, L)
        for i, pair in enumerate(pairs + pairs):
            reply = pair.chosen_ids if i < 3 else pair.rejected_ids
            ids = torch.tensor([pair.prompt_ids + reply])
            logits = model(ids)[0, len(pair.prompt_ids) - 1:-1].log_softmax(-1)  # predicts the reply, unpadded
            want = logits.gather(-1, torch.tensor(reply)[:, None]).sum()
            assert torch.allclose(lp[i].sum(), want, atol=1e-4)
            assert int((b["targets"][i] != -100).sum()) == len(reply)
            assert int(b["lengths"][i]) == len(pair.prompt_ids) + len(reply)


def test_load_split_and_length_handling(tmp_path, tok, caplog):
    recs = [{"prompt": f"question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    recs.append({"prompt": "x" * 300, "chosen": "a", "rejected": "b"})  # prompt longer than seq_len
    recs.append({"prompt": "q", "chosen": "y" * 300, "rejected": "n"})  # reply cut to fit
    f = write_jsonl(tmp_path / "p.jsonl", recs)
    data = load_preference_data(str(f), tok, seq_len=64, val_fraction=0.1, seed=0)
    assert data.dropped == 1 and data.truncated == 1 and "no room" in caplog.text
    assert len(data.val) == 2 and len(data.train) == 19
    key = lambda p: tuple(p.prompt_ids)  # noqa: E731  (every prompt differs)
    assert not {key(p) for p in data.val} & {key(p) for p in data.train}
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 64 for p in data.train + data.val)
    again = load_preference_data(str(f), tok, seq_len=64, val_fraction=0.1, seed=0)
    assert again.val == data.val  # the split is a function of the seed


@pytest.mark.parametrize("rec,msg", [
    ({"prompt": "q", "chosen": "a"}, "no 'rejected' field"),
    ({"prompt": "q", "rejected": "a"}, "no 'chosen' field"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "totally different"}, "share no"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be"),
    ({"conversations": [{"from": "alien", "value": "q"}], "chosen": "a", "rejected": "b"}, "unknown speaker"),
])
def test_bad_rows_name_file_and_row(tmp_path, tok, rec, msg):
    f = write_jsonl(tmp_path / "bad.jsonl", [PLAIN, rec])
    with pytest.raises(LLMKitError, match=msg) as e:
        load_preference_data(str(f), tok, seq_len=128)
    assert f"{f}:2:" in str(e.value) and "\n" not in str(e.value)


def test_every_prompt_too_long_is_an_error(tmp_path, tok):
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 100, "chosen": "a", "rejected": "b"}])
    with pytest.raises(LLMKitError, match="no preference pairs fit seq_len 16"):
        load_preference_data(str(f), tok, seq_len=16)


def test_real_shared_files_load(shared_data, tok, tmp_path):
    pref = shared_data / "preference"
    demo = load_preference_data(str(pref / "dpo_en_demo.json"), tok, 4096, val_fraction=0.2, max_records=10)
    hh = load_preference_data(str(pref / "hh_rlhf_harmless_test.jsonl.gz"), tok, 4096, val_fraction=0.2,
                              max_records=10)
    for data in (demo, hh):
        assert len(data.train) + len(data.val) == 10 and data.dropped == 0
        for p in data.train:
            head = tok.decode(p.prompt_ids)
            assert head.endswith("<|im_start|>assistant\n") and p.chosen_ids != p.rejected_ids
    # HH row 1: the replies share their start, yet the prompt is the dialogue up to the final Assistant:
    row = json.loads(gzip.open(pref / "hh_rlhf_harmless_test.jsonl.gz", "rt").readline())
    prompt, c, r = split_hh(row["chosen"], row["rejected"], "hh:1")
    assert prompt[-1]["role"] == "user" and c != r
    assert row["chosen"].endswith(c) and row["rejected"].endswith(r)
