"""The classic LMs: n-gram smoothing equal to nltk.lm, recurrent cells equal to torch.nn, the recurrent
training loop and the `speedrun --arch` path end to end on a small corpus."""

import math
import random

import pytest
import torch

from llmkit.classic.ngram import NGramLM
from llmkit.classic.rnn import CELLS, RNNConfig, RNNLM, Recurrent, stream_logprobs
from llmkit.errors import LLMKitError

pytestmark = pytest.mark.usefixtures("one_thread")


def _corpus(n=3000, V=12, seed=0, order=2):
    """A token stream with structure (a noisy Markov chain of `order` 1 or 2)."""
    rng = random.Random(seed)
    ids = [0, 1]
    for _ in range(n):
        a, b = ids[-2], ids[-1]
        ids.append(((a * 3 if order == 2 else 1) + b * 5) % V if rng.random() < 0.6 else rng.randrange(V))
    return ids


def _nltk_model(cls, order, ids, **kw):
    from nltk.lm import Vocabulary
    from nltk.lm.counter import NgramCounter
    from nltk.util import ngrams

    lm = cls(order=order, **kw)
    sent = [str(t) for t in ids]
    lm.fit([[tuple(sent[i:i + n]) for n in range(1, order + 1) for i in range(len(sent) - n + 1)]],
           vocabulary_text=sent)
    return lm


@pytest.mark.parametrize("order,discount", [(2, 0.1), (3, 0.1), (3, 0.75), (4, 0.5)])
def test_kneser_ney_equals_nltk(order, discount):
    from nltk.lm import KneserNeyInterpolated

    ids = _corpus()
    ref = _nltk_model(KneserNeyInterpolated, order, ids, discount=discount)
    ours = NGramLM(order=order, smoothing="kneser_ney", discount=discount, uniform_floor=False).fit(ids)
    test = _corpus(300, seed=1)
    checked = 0
    for i in range(1, len(test)):
        ctx = tuple(test[max(0, i - order + 1):i])
        p_ref = ref.score(str(test[i]), [str(t) for t in ctx])
        assert ours.prob(test[i], ctx) == pytest.approx(p_ref, rel=1e-12, abs=1e-15)
        checked += 1
    assert checked == len(test) - 1


@pytest.mark.parametrize("k", [1.0, 0.1])
def test_add_k_equals_nltk_lidstone(k):
    from nltk.lm import Lidstone

    ids = _corpus()
    ref = _nltk_model(Lidstone, 3, ids, gamma=k)
    # nltk's vocabulary is the seen tokens plus <UNK>
    ours = NGramLM(order=3, smoothing="add_k", k=k, vocab_size=len(ref.vocab)).fit(ids)
    ours.vocab_size = len(ref.vocab)
    test = _corpus(200, seed=2)
    for i in range(2, len(test)):
        ctx = tuple(test[i - 2:i])
        assert ours.prob(test[i], ctx) == pytest.approx(ref.score(str(test[i]), [str(t) for t in ctx]), rel=1e-12)


@pytest.mark.parametrize("smoothing,floor", [("kneser_ney", True), ("kneser_ney", False), ("add_k", True)])
def test_ngram_distributions_sum_to_one(smoothing, floor):
    ids = _corpus()
    lm = NGramLM(order=3, smoothing=smoothing, uniform_floor=floor, vocab_size=12).fit(ids)
    for ctx in [(), (3,), (3, 4), (11, 11), (0, 1)]:
        assert sum(lm.prob(w, ctx) for w in range(12)) == pytest.approx(1.0, abs=1e-12)
    # the floor gives an unseen token mass; without it, KN's unigram level gives it none
    lm13 = NGramLM(order=2, smoothing=smoothing, uniform_floor=floor, vocab_size=13).fit(ids)
    assert (lm13.prob(12, (3,)) > 0) == (floor or smoothing == "add_k")


def test_ngram_bad_input():
    with pytest.raises(LLMKitError, match="order must be an integer >= 1, got 0"):
        NGramLM(order=0)
    with pytest.raises(LLMKitError, match="unknown n-gram smoothing 'witten'"):
        NGramLM(smoothing="witten")
    with pytest.raises(LLMKitError, match="fewer than the n-gram order"):
        NGramLM(order=5).fit([1, 2])


@pytest.mark.parametrize("kind,ref_cls", [("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU), ("rnn", torch.nn.RNN)])
def test_cells_equal_torch_nn(kind, ref_cls):
    torch.manual_seed(0)
    I, H, B, T = 7, 11, 3, 9
    ours = Recurrent(kind, I, H)
    ref = ref_cls(I, H, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, f"{name}_l0").copy_(getattr(ours, name))
    x = torch.randn(B, T, I, dtype=torch.float64)
    ours, ref = ours.double(), ref.double()
    h0 = torch.randn(B, H, dtype=torch.float64)
    if kind == "lstm":
        c0 = torch.randn(B, H, dtype=torch.float64)
        y, (h, c) = ours(x, (h0, c0))
        y_ref, (h_ref, c_ref) = ref(x, (h0[None], c0[None]))
        torch.testing.assert_close(c, c_ref[0], atol=1e-12, rtol=0)
    else:
        y, (h, _) = ours(x, (h0, None))
        y_ref, h_ref = ref(x, h0[None])
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, h_ref[0], atol=1e-12, rtol=0)
    # gradients flow through the written-out cell as through torch's
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(ours.weight_hh.grad, ref.weight_hh_l0.grad, atol=1e-10, rtol=0)


def test_stream_logprobs_carry_state_across_chunks():
    torch.manual_seed(0)
    model = RNNLM(RNNConfig(kind="lstm", vocab_size=20, d_embed=8, d_hidden=16, n_layer=2)).eval()
    ids = torch.randint(0, 20, (50,)).tolist()
    full = torch.log_softmax(model(torch.tensor(ids)[None])[0][0, :-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(stream_logprobs(model, ids, chunk=7), full, atol=1e-5, rtol=0)


def test_unknown_cell():
    with pytest.raises(LLMKitError, match="unknown recurrent cell 'lstn'.*did you mean 'lstm'"):
        Recurrent("lstn", 2, 2)


def test_train_recurrent_lowers_loss(tmp_path):
    from llmkit.recipes.classic import ClassicSection, train_recurrent
    from llmkit.train.loop import read_metrics

    ids = _corpus(6000, order=1)
    c = ClassicSection(d_embed=16, d_hidden=32, bptt=16, batch_size=8, lr=1e-2, warmup_steps=5, dropout=0.0)
    model, summary = train_recurrent("gru", c, ids, 12, budget_s=3.0, out=tmp_path, progress=False)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert summary["steps"] >= 50 and len(recs) >= 2
    # uniform guessing costs ln 12 = 2.48 nats; the chain's rule (60% of the tokens) is learnable
    assert recs[-1]["loss"] < math.log(12) - 0.4
    assert (tmp_path / "loss.png").exists()


def test_speedrun_ngram_end_to_end(tmp_path):
    from llmkit.recipes.classic import ClassicSection
    from llmkit.recipes.speedrun import SpeedrunConfig, corpus_path, speedrun

    corpus = tmp_path / "small.txt"
    corpus.write_bytes(corpus_path(SpeedrunConfig()).read_bytes()[:60000])
    cfg = SpeedrunConfig(arch="ngram", minutes=0.5, out=str(tmp_path / "run"), corpus=str(corpus), vocab_size=300,
                         classic=ClassicSection(max_order=3))
    r = speedrun(cfg, progress=False)
    assert 1 <= r["order"] <= 3 and 1.5 < r["heldout_bits_per_byte"] < 8
    assert (tmp_path / "run" / "report.md").read_text().startswith("# llmkit speedrun report: ngram")
    with pytest.raises(LLMKitError, match="unknown speedrun arch 'cnn'"):
        speedrun(SpeedrunConfig(arch="cnn", out=str(tmp_path / "x")), progress=False)


@pytest.mark.parametrize("sg", [True, False])
def test_word2vec_groups_words_that_share_contexts(sg):
    from llmkit.classic.word2vec import Word2Vec, Word2VecConfig

    rng = random.Random(0)
    a, b = [f"a{i}" for i in range(6)], [f"b{i}" for i in range(6)]
    corpus = []
    for _ in range(3000):  # sentences drawn from one group at a time
        corpus += rng.choices(rng.choice([a, b]), k=6)
    m = Word2Vec(Word2VecConfig(sg=sg, dim=16, window=2, min_count=1, sample=0, epochs=3, batch_pairs=256)).fit(corpus)
    for w in ("a0", "b3"):
        assert all(n[0] == w[0] for n, _ in m.most_similar(w, 5))  # its 5 neighbours are its own group
    assert m.analogy("a0", "a1", "zzz") is None


def test_word2vec_bad_input():
    from llmkit.classic.word2vec import Word2Vec, Word2VecConfig, words

    assert words("Thou art, O ROMEO! 'tis i'faith 3 times") == ["thou", "art", "o", "romeo", "tis", "i'faith", "times"]
    with pytest.raises(LLMKitError, match="fewer than 2 words occur at least min_count=5"):
        Word2Vec(Word2VecConfig(min_count=5)).fit(["a", "b", "a"])
    m = Word2Vec(Word2VecConfig(min_count=1, epochs=1, dim=4)).fit(["a", "b"] * 10)
    with pytest.raises(LLMKitError, match="'zzz' is not in the vocabulary"):
        m.most_similar("zzz")


@pytest.mark.parametrize("kind", list(CELLS))
def test_fused_and_written_out_lms_agree(kind):
    """The same weights give the same logits through torch.nn's fused loop and through the cells."""
    torch.manual_seed(0)
    cfg = dict(kind=kind, vocab_size=30, d_embed=8, d_hidden=12, n_layer=2, dropout=0.0)
    fused, plain = RNNLM(RNNConfig(**cfg, fused=True)), RNNLM(RNNConfig(**cfg, fused=False))
    plain.load_state_dict({k.replace("rnn.", "").replace("_l0", ""): v for k, v in fused.state_dict().items()})
    ids = torch.randint(0, 30, (2, 15))
    (a, sa), (b, sb) = fused(ids), plain(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(sa[-1][0], sb[-1][0], atol=1e-5, rtol=0)
