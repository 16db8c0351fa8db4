"""`llmkit rag index/search` end to end with the real MiniLM, and bad input as one-line errors (exit 2)."""

import json

from llmkit.cli import main


def test_rag_cli(tmp_path, minilm_dir, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "paris.txt").write_text("Paris is the capital and largest city of France.")
    (docs / "cats.md").write_text("# Cats\n\nCats are small domesticated carnivorous mammals that purr.")
    idx = str(tmp_path / "i.sqlite")
    enc = ["--encoder", str(minilm_dir)]
    assert main(["rag", "index", "--docs", str(docs), "--index", idx, *enc]) == 0
    for mode in ("bm25", "dense", "hybrid"):
        capsys.readouterr()
        assert main(["rag", "search", "--index", idx, "--k", "2", "--mode", mode, "--json", *enc,
                     "Which city is the capital of France?"]) == 0
        hits = json.loads(capsys.readouterr().out)["hits"]
        assert hits[0]["source"].endswith("paris.txt") and hits[0]["rank"] == 1 and "score" in hits[0]
    # re-running updates in place: the unchanged documents are skipped
    assert main(["rag", "index", "--docs", str(docs), "--index", idx, *enc]) == 0
    assert "unchanged 2" in capsys.readouterr().err


def test_rag_cli_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["rag", "index", "--docs", str(tmp_path / "empty"), "--index", str(tmp_path / "i.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no" in err
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / "bad.pdf").write_bytes(b"%PDF-1.7 nonsense")
    assert main(["rag", "index", "--docs", str(tmp_path / "pdfs"), "--index", str(tmp_path / "i.sqlite")]) == 2
    assert "bad.pdf is not a readable PDF" in capsys.readouterr().err
    assert not (tmp_path / "i.sqlite").exists()
