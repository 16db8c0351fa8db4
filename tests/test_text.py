"""Text is text (llmkit/text.py): invalid UTF-8 and lone surrogates become U+FFFD with a warning naming
where, in prompts, JSONL files, corpora and the tokenizer's encode."""

import json

import pytest

from llmkit.text import clean, decode, read_pieces


def test_clean_replaces_lone_surrogates_and_warns(capsys):
    assert clean("plain café") == "plain café" and capsys.readouterr().err == ""
    assert clean("caf\udce9 x\ud800", "the prompt") == "caf\ufffd x\ufffd"
    assert "the prompt: 2 invalid UTF-8" in capsys.readouterr().err


def test_decode_names_the_line(capsys):
    assert decode(b"ok\nbad \xe9 here\n", "f.jsonl") == "ok\nbad \ufffd here\n"
    assert "f.jsonl:2: invalid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("block", [1, 3, 7, 1 << 20])
def test_read_pieces_keeps_split_characters_and_names_the_line(tmp_path, capsys, block):
    p = tmp_path / "c.txt"
    good = "héllo wörld\n€uro\n" * 3
    p.write_bytes(good.encode() + b"line \xff bad\n" + "ñ end".encode())
    assert "".join(read_pieces(p, block)) == good + "line \ufffd bad\nñ end"
    assert f"{p}:7: invalid UTF-8" in capsys.readouterr().err


def test_tokenizer_jsonl_and_prepare_survive_invalid_utf8(tmp_path, capsys):
    from tests._shared import byte_chat_tokenizer

    from llmkit.finetune.data import read_records
    from llmkit.train.data import prepare

    tok = byte_chat_tokenizer()
    assert tok.decode(tok.encode("caf\udce9")) == "caf\ufffd"  # argv's surrogateescape byte
    assert tok.encode_batch(["a\ud800"]) == [tok.encode("a\ufffd")]
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "\\ud800"}\n')
    recs = read_records(tmp_path / "d.jsonl")
    assert [r["text"] for _, r in recs] == ["ok", "caf\ufffd", "\ud800"]
    assert "d.jsonl:2: invalid UTF-8" in capsys.readouterr().err
    (tmp_path / "c.txt").write_bytes(b"some text \xff\xfe more text\n" * 50)
    prepare([tmp_path / "c.txt"], tok, tmp_path / "shards", progress=False)
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["splits"]["train"]["tokens"] > 0
    assert "c.txt:1: invalid UTF-8" in capsys.readouterr().err


def test_jsonl_corpus_lines_are_cleaned(tmp_path, capsys):
    from llmkit.train.data import iter_documents

    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "lone \\udc00"}\n')
    assert ["".join(d) for d in iter_documents([p])] == ["fine", "bad \ufffd byte", "lone \ufffd"]
    err = capsys.readouterr().err
    assert f"{p}:2:" in err and f"{p}:3:" in err
