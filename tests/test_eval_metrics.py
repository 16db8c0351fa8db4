"""Text metrics against their reference implementations on real data (WMT22 en-de, DialogSum)."""

import json

import pytest

from llmkit.errors import LLMKitError
from llmkit.eval import metrics as M


@pytest.fixture(scope="module")
def wmt(shared_data):
    d = shared_data / "translation"
    read = lambda f: (d / f).read_text(encoding="utf-8").splitlines()  # noqa: E731
    return read("wmt22_en-de.ref.B.de"), read("wmt22_en-de.ref.A.de"), read("wmt22_en-de.src.en")


@pytest.fixture(scope="module")
def dialogsum(shared_data):
    rows = [json.loads(x) for x in (shared_data / "summarization" / "dialogsum_dev.jsonl").open()][:200]
    # a "system" summary: the dialogue's first 40 words (a lead baseline); references: the human summary
    return [" ".join(r["dialogue"].split()[:40]) for r in rows], [r["summary"] for r in rows], [r["topic"] for r in rows]


def test_classification_by_hand():
    preds, refs = ["a", "a", "b", "c", "c", "c"], [["a", "b", "b", "c", "a", "c"]]
    assert M.accuracy(preds, refs)["accuracy"] == pytest.approx(4 / 6)
    r = M.precision_recall_f1(preds, refs)
    # per label (p, r): a (1/2, 1/2), b (1, 1/2), c (2/3, 1)
    assert r["precision_macro"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert r["recall_macro"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    f = [2 * p * q / (p + q) for p, q in ((1 / 2, 1 / 2), (1, 1 / 2), (2 / 3, 1))]
    assert r["f1_macro"] == pytest.approx(sum(f) / 3)
    assert r["f1_micro"] == r["precision_micro"] == r["recall_micro"] == pytest.approx(4 / 6)


def test_exact_match():
    assert M.exact_match(["Paris", "the Eiffel Tower!"], [["paris", "Eiffel Tower"]])["exact_match"] == 0
    assert M.exact_match(["Paris", "the Eiffel Tower!"], [["paris", "Eiffel Tower"]], normalize=True)["exact_match"] == 1
    assert M.exact_match(["x", "y"], [["a", "y"], ["x", "b"]])["exact_match"] == 1  # any reference


def test_length_mismatch_names_both_counts():
    with pytest.raises(LLMKitError, match="predictions have 2 lines but refs.txt has 3 lines"):
        M.check_lengths(["a", "b"], [["a", "b", "c"]], names=["refs.txt"])
    with pytest.raises(LLMKitError, match="2 lines but reference stream 1 has 1"):
        M.bleu(["a", "b"], [["a"]])


def test_bleu_chrf_equal_sacrebleu_on_wmt22(wmt):
    import sacrebleu

    hyp, ref_a, src = (x[:1000] for x in wmt)
    b = M.bleu(hyp, [ref_a])
    assert b["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref_a]).score, abs=0.01)
    assert 20 < b["bleu"] < 50 and "tok:13a" in b["signature"]  # two human translations agree moderately
    # multi-reference: references from two streams; the source as a "translation" scores ~0
    assert M.bleu(hyp, [ref_a, ref_a])["bleu"] == pytest.approx(b["bleu"], abs=0.01)
    assert M.bleu(src, [ref_a])["bleu"] < 5
    assert M.chrf(hyp, [ref_a])["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyp, [ref_a]).score, abs=1e-6)


@pytest.mark.parametrize("stem", [False, True])
def test_rouge_equals_rouge_score(dialogsum, stem):
    from rouge_score import rouge_scorer

    hyp, ref, topic = dialogsum
    got = M.rouge(hyp, [ref, topic], use_stemmer=stem)
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=stem)
    want = {t: 0.0 for t in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for h, r, t in zip(hyp, ref, topic):
        for k in want:  # best reference by F, per segment
            hs = M.split_sentences(h)
            want[k] += max(sc.score(M.split_sentences(x), hs)[k].fmeasure for x in (r, t)) / len(hyp)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6)
    assert got["rougeLsum"] != pytest.approx(got["rougeL"], abs=1e-4)  # sentence-level LCS differs


def test_rouge_stemming_changes_scores(dialogsum):
    hyp, ref, _ = dialogsum
    assert M.rouge(hyp, [ref], use_stemmer=True)["rouge1"] > M.rouge(hyp, [ref])["rouge1"]


class _NoWordNet:
    def synsets(self, word):
        return []


class _Lemma:
    def __init__(self, n):
        self.n = n

    def name(self):
        return self.n


class _Synset:
    def __init__(self, names):
        self.names = names

    def lemmas(self):
        return [_Lemma(n) for n in self.names]


class _TinyWordNet:
    """A stand-in for nltk's WordNet reader (its data cannot be downloaded here)."""

    table = {"said": [["state", "say", "tell"]], "talk": [["speak", "talk", "public_speaking"]],
             "want": [["wish", "desire"], ["need"]], "buy": [["purchase", "bribe"]], "man": [["person", "adult_male"]]}

    def synsets(self, word):
        return [_Synset(s) for s in self.table.get(word, [])]


def test_meteor_equals_nltk(wmt, dialogsum):
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import meteor_score

    stem = PorterStemmer()
    hyp, ref_a, _ = wmt
    shyp, sref, _ = dialogsum
    pairs = list(zip(hyp[:300], ref_a[:300])) + list(zip(shyp, sref))
    for wn in (_NoWordNet(), _TinyWordNet()):
        for h, r in pairs:
            want = meteor_score([r.split()], h.split(), stemmer=stem, wordnet=wn)
            got = M.meteor_sentence(h.split(), r.split(), stem, None if isinstance(wn, _NoWordNet) else wn)
            assert got == pytest.approx(want, abs=1e-12)
    # the corpus value: mean of the best reference per segment
    got = M.meteor(shyp[:50], [sref[:50], [x[::-1] for x in sref[:50]]], synonyms=False)["meteor"]
    want = sum(meteor_score([r.split(), r[::-1].split()], h.split(), wordnet=_NoWordNet())
               for h, r in zip(shyp[:50], sref[:50])) / 50
    assert got == pytest.approx(want, abs=1e-12)


def test_meteor_synonym_stage_is_used():
    wn = _TinyWordNet()
    h, r = "he wants to buy".split(), "he wish to purchase".split()
    assert M.meteor_sentence(h, r, None, wn) > M.meteor_sentence(h, r, None, None) > 0


def test_unknown_metric():
    with pytest.raises(LLMKitError, match="did you mean 'bleu'"):
        M.compute("bleuu", ["a"], [["a"]])


def test_cli_metrics(tmp_path, wmt, capsys):
    from llmkit.cli import main

    hyp, ref_a, _ = wmt
    (tmp_path / "h").write_text("\n".join(hyp[:50]) + "\n")
    (tmp_path / "r").write_text("\n".join(ref_a[:50]) + "\n")
    (tmp_path / "r2").write_text("\n".join(ref_a[:49]) + "\n")
    assert main(["metrics", "bleu", "--predictions", str(tmp_path / "h"), "--references", str(tmp_path / "r"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    import sacrebleu

    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyp[:50], [ref_a[:50]]).score, abs=0.01)
    assert main(["metrics", "rouge", "--predictions", str(tmp_path / "h"), "--references", str(tmp_path / "r2")]) == 2
    assert "predictions have 50 lines but" in capsys.readouterr().err
