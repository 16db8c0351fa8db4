"""BERTScore with llmkit's own BERT encoder equals the bert-score package (same model and layer)."""

import json
import warnings

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.eval.bertscore import BertScorer, bertscore


@pytest.fixture(scope="module")
def data(shared_data):
    rows = [json.loads(x) for x in (shared_data / "summarization" / "dialogsum_dev.jsonl").open()][:16]
    cands = [" ".join(r["dialogue"].split()[:40]) for r in rows]
    return cands, [r["summary"] for r in rows], [r["topic"] for r in rows]


@pytest.mark.parametrize("layers,idf", [(6, False), (3, True)])
def test_equals_bert_score_package(minilm_dir, data, layers, idf):
    bert_score = pytest.importorskip("bert_score")
    cands, refs, topics = data
    mine = BertScorer(minilm_dir, num_layers=layers)
    P, R, F = mine.score(cands, [refs, topics], idf=idf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P2, R2, F2 = bert_score.score(cands, [[a, b] for a, b in zip(refs, topics)], model_type=str(minilm_dir),
                                      num_layers=layers, idf=idf, device="cpu", nthreads=1, batch_size=16)
    for a, b in ((P, P2), (R, R2), (F, F2)):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    res = bertscore(cands, [refs, topics], scorer=mine, idf=idf)
    assert res["bertscore_f1"] == pytest.approx(F.mean().item())


def test_empty_candidate_scores_zero(minilm_dir):
    # as bert-score does (whose own empty-sentence path breaks under transformers 5)
    P, R, F = BertScorer(minilm_dir).score(["", "a cat"], [["a dog", "a cat"]])
    assert P[0] == R[0] == F[0] == 0 and F[1] > 0.99


def test_encoder_layer_bounds_and_bad_folder(minilm_dir, tmp_path):
    s = BertScorer(minilm_dir)
    assert s.num_layers == 6
    with pytest.raises(LLMKitError, match="num_layers"):
        s.model(torch.tensor([[101, 102]]), torch.ones(1, 2), num_layers=7)
    with pytest.raises(LLMKitError, match="config.json is missing"):
        BertScorer(tmp_path)
