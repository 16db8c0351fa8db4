"""`llmkit serve` on a tiny random model: the continuous-batching engine against `generate`, and a real
uvicorn server on a loopback port driven by the official `openai` client and httpx (OpenAI and ollama
routes, streaming, errors, auth, back-pressure, cancellation, faults, metrics)."""

import functools
import json
import queue
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from _serve import running_server, tiny_chat_model  # noqa: E402

from llmkit.inference import SamplingParams, generate  # noqa: E402
from llmkit.serve import Engine, Request  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one torch thread


@pytest.fixture(scope="module")
def model_tok():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def server(model_tok):
    model, tok = model_tok
    engine = Engine(model, max_batch=4, max_len=200, prefill_chunk=16, detok=tok.decode)
    with running_server(engine, tok) as url:
        yield url, engine


# one HTTP client for the module: building one (its TLS context) costs more than a tiny request
HTTP = httpx.Client(timeout=30, verify=False)


@functools.lru_cache(maxsize=None)
def client(url, key="unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def reference(model, tok, prompt_ids, **kw):
    """`llmkit generate` on the same prompt: the text every server answer must equal."""
    p = SamplingParams(stop_ids=tuple(sorted(tok.stop_ids)), **kw)
    return generate(model, prompt_ids, p, tokenizer=tok)


def ids(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def collect(q):
    out, reason = [], None
    while reason is None:
        ev = q.get(timeout=30)
        if ev.token is not None:
            out.append(ev.token)
        reason = ev.finish_reason
    return out, reason


# ---------------------------------------------------------------- the engine alone
@pytest.mark.parametrize("prefill_chunk", [5, 256])
def test_engine_greedy_equals_generate_whatever_the_batch(model_tok, prefill_chunk):
    """Mixed prompt lengths, more requests than rows (they queue and join as rows free up), requests
    submitted while others decode: each greedy output equals generate() of that prompt alone."""
    model, _ = model_tok
    eng = Engine(model, max_batch=3, max_len=200, prefill_chunk=prefill_chunk).start()
    try:
        jobs = []
        for i, n in enumerate([3, 41, 9, 60, 1, 27, 14]):
            p, q = ids(n, seed=i), queue.Queue()
            params = SamplingParams(max_new_tokens=5 + 4 * i)
            eng.submit(Request(p, params, q.put))
            jobs.append((p, params, q))
            if i == 3:
                time.sleep(0.05)  # the rest join a batch already decoding
        for p, params, q in jobs:
            toks, reason = collect(q)
            assert toks == generate(model, p, params).tokens and reason == "length"
        assert eng.running == 0 and eng.queued == 0
    finally:
        eng.shutdown()


def test_engine_batched_prefill_equals_generate(model_tok):
    """A burst of requests admitted together prefills in shared forwards (adjacent rows, right-padded,
    each row at its own positions, chunks of prefill_chunk // rows tokens): every greedy output still
    equals generate() of that prompt alone, and fewer prefill forwards run than prompts x chunks."""
    model, tok = model_tok
    eng = Engine(model, max_batch=6, max_len=200, prefill_chunk=48, detok=tok.decode)
    calls = []
    forward = model.forward

    def counting(*a, **kw):
        calls.append(kw.get("input_pos").shape)
        return forward(*a, **kw)

    lengths = [3, 41, 9, 60, 1, 27]
    jobs = []
    for i, n in enumerate(lengths):  # queued before the engine starts: one step admits all six
        p, q = ids(n, seed=10 + i), queue.Queue()
        params = SamplingParams(max_new_tokens=6, stop=("zz",) if i == 2 else ())
        eng.submit(Request(p, params, q.put))
        jobs.append((p, params, q))
    model.forward = counting
    try:
        eng.start()
        for p, params, q in jobs:
            assert collect(q)[0] == generate(model, p, params, tokenizer=tok).tokens
    finally:
        model.forward = forward
        eng.shutdown()
    batched = [s for s in calls if len(s) == 2 and s[1] > 1]  # (B, T) prefill forwards
    assert batched and max(s[0] for s in batched) == 6
    assert len(batched) < sum(-(-n // 8) for n in lengths)


def test_prefill_with_per_row_start_positions_equals_one_prompt_at_a_time(model_tok):
    """prefill(start=(B,) tensor): two rows resuming at their own positions, right-padded, give the
    logits and K/V of prefilling each row alone."""
    from llmkit.inference.generate import prefill

    model, _ = model_tok
    a, b = ids(12, seed=1), ids(20, seed=2)
    cache = model.new_cache(2, 64)
    ref = model.new_cache(2, 64)
    prefill(model, torch.tensor([a[:5]]), cache.rows(0, 1), start=0)
    prefill(model, torch.tensor([b[:9]]), cache.rows(1, 2), start=0)
    x = torch.zeros(2, 11, dtype=torch.long)
    x[0, :7], x[1, :11] = torch.tensor(a[5:]), torch.tensor(b[9:])
    got = prefill(model, x, cache, start=torch.tensor([5, 9]), last_index=torch.tensor([6, 10]))
    want = torch.cat([prefill(model, torch.tensor([a]), ref.rows(0, 1)), prefill(model, torch.tensor([b]), ref.rows(1, 2))])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(cache.k[:, 0, :, :12], ref.k[:, 0, :, :12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.v[:, 1, :, :20], ref.v[:, 1, :, :20], atol=1e-4, rtol=1e-4)


def test_engine_prefix_cache_shares_a_system_prompt(model_tok):
    """Prompts that start alike reuse the stored K/V of the shared part; the answers do not change."""
    model, _ = model_tok
    eng = Engine(model, max_batch=2, max_len=200, prefix_cache=4).start()
    try:
        system = ids(30, seed=99)
        for i in range(3):
            p, q = system + ids(5 + i, seed=i), queue.Queue()
            params = SamplingParams(max_new_tokens=8)
            eng.submit(Request(p, params, q.put))
            assert collect(q)[0] == generate(model, p, params).tokens
        assert eng.metrics.get("prefix_hit_tokens") >= 2 * 30
    finally:
        eng.shutdown()


def test_engine_sampling_seed_and_penalties_match_generate(model_tok):
    """Each row samples with its own params and generator: a seeded sampled request equals generate()."""
    model, _ = model_tok
    eng = Engine(model, max_batch=4, max_len=200).start()
    try:
        cases = [SamplingParams(temperature=0.9, top_p=0.8, seed=s, max_new_tokens=12, frequency_penalty=f,
                                presence_penalty=0.3 * s)
                 for s, f in [(1, 0.0), (2, 0.5), (3, 1.0)]]
        qs = []
        for i, params in enumerate(cases):
            q = queue.Queue()
            eng.submit(Request(ids(7 + i, i), params, q.put))
            qs.append(q)
        for i, (params, q) in enumerate(zip(cases, qs)):
            assert collect(q)[0] == generate(model, ids(7 + i, i), params).tokens
    finally:
        eng.shutdown()


# ---------------------------------------------------------------- OpenAI routes
def test_models_health_and_metrics(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == ["tiny"]
    assert HTTP.get(url + "/health").json()["status"] == "ok"
    text = HTTP.get(url + "/metrics").text
    for name in ("llmkit_requests_total", "llmkit_prompt_tokens_total", "llmkit_completion_tokens_total",
                 "llmkit_queued ", "llmkit_running ", 'llmkit_ttft_seconds_bucket{le="+Inf"}', "llmkit_itl_seconds_sum"):
        assert name in text, name


def test_chat_and_completions_equal_generate(server, model_tok):
    url, _ = server
    model, tok = model_tok
    c = client(url)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=20)
    ref = reference(model, tok, tok.encode_chat(msgs), max_new_tokens=20)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.completions[0].finish_reason
    assert r.usage.prompt_tokens == len(tok.encode_chat(msgs)) and r.usage.completion_tokens == len(ref.tokens)
    r = c.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=15)
    ref = reference(model, tok, tok.encode("Once upon a time"), max_new_tokens=15)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.tokens)
    # token-id prompts, stop strings and n
    r = c.completions.create(model="tiny", prompt=tok.encode("Hello"), temperature=0, max_tokens=30, n=2)
    ref = reference(model, tok, tok.encode("Hello"), max_new_tokens=30)
    assert [ch.text for ch in r.choices] == [ref.text, ref.text] and [ch.index for ch in r.choices] == [0, 1]
    stop = ref.text[3:5]
    if stop:
        r = c.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=30, stop=[stop])
        cut = reference(model, tok, tok.encode("Hello"), max_new_tokens=30, stop=(stop,))
        assert r.choices[0].text == cut.text and r.choices[0].finish_reason == "stop" and stop not in cut.text


def test_seeded_sampling_and_logprobs(server, model_tok):
    url, _ = server
    model, tok = model_tok
    c = client(url)
    msgs = [{"role": "user", "content": "Tell me a story."}]
    r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0.8, top_p=0.9, seed=7, max_tokens=16,
                                  logprobs=True, top_logprobs=3)
    ref = reference(model, tok, tok.encode_chat(msgs), max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    assert r.choices[0].message.content == ref.text
    lps = r.choices[0].logprobs.content
    assert len(lps) == len(ref.tokens)
    assert [x.logprob for x in lps] == pytest.approx(ref.completions[0].logprobs, abs=1e-4)
    assert all(len(x.top_logprobs) == 3 and x.top_logprobs[0].logprob >= x.logprob - 1e-6 for x in lps)
    r = c.completions.create(model="tiny", prompt="abc", temperature=0, max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text


def test_stream_deltas_concatenate_to_the_whole_answer(server):
    url, _ = server
    c = client(url)
    msgs = [{"role": "user", "content": "Count to ten."}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=40)
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    whole = c.completions.create(model="tiny", prompt="xyz", temperature=0, max_tokens=25)
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="xyz", temperature=0,
                                                                     max_tokens=25, stream=True))
    assert text == whole.choices[0].text
    with HTTP.stream("POST", url + "/v1/completions", json={"prompt": "xyz", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_concurrent_requests_each_equal_generate(server, model_tok):
    """Batching equivalence over HTTP: concurrent clients with different prompts and lengths."""
    url, _ = server
    model, tok = model_tok
    prompts = [f"question number {i} " * (1 + i % 4) for i in range(8)]
    results = {}

    def ask(i):
        r = client(url).completions.create(model="tiny", prompt=prompts[i], temperature=0, max_tokens=10 + 5 * i)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        assert results[i] == reference(model, tok, tok.encode(p), max_new_tokens=10 + 5 * i).text


# ---------------------------------------------------------------- ollama routes
def test_ollama_generate_chat_tags(server, model_tok):
    url, _ = server
    model, tok = model_tok
    opts = {"temperature": 0, "num_predict": 12, "num_ctx": 2048}
    r = HTTP.post(url + "/api/generate", json={"model": "tiny", "prompt": "Why is the sky blue?", "stream": False,
                                                 "options": opts}).json()
    ref = reference(model, tok, tok.encode_chat([{"role": "user", "content": "Why is the sky blue?"}]),
                    max_new_tokens=12)
    assert r["response"] == ref.text and r["done"] and r["eval_count"] == len(ref.tokens)
    with HTTP.stream("POST", url + "/api/chat", json={"model": "tiny:latest", "options": opts, "messages": [
            {"role": "user", "content": "Why is the sky blue?"}]}) as s:
        assert s.headers["content-type"].startswith("application/x-ndjson")
        parts = [json.loads(line) for line in s.iter_lines() if line]
    assert "".join(p["message"]["content"] for p in parts) == ref.text
    assert parts[-1]["done"] and not any(p["done"] for p in parts[:-1])
    assert HTTP.get(url + "/api/tags").json()["models"][0]["name"] == "tiny"
    bad = HTTP.post(url + "/api/generate", json={"prompt": "x", "options": {"temperature": "hot"}})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("body,status,needle", [
    ('{"messages": [', 400, "malformed JSON"),
    ({"messages": [{"role": "user", "content": "hi"}], "colour": "red"}, 400, "unknown field 'colour'"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 100000}, 400, "limit of 8 (max n)"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max output tokens"),
    ({"messages": [{"role": "user", "content": "hi " * 300}]}, 400, "max prompt tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "not found"),
])
def test_bad_requests_are_clean_4xx_in_openai_schema(server, body, status, needle):
    url, _ = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = HTTP.post(url + "/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_openai_client_raises_typed_errors_and_limits(server):
    url, _ = server
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("nope")
    r = HTTP.post(url + "/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = HTTP.post(url + "/v1/embeddings", json={"input": "hello"})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    assert HTTP.get(url + "/nope").status_code == 404
    assert "access-control-allow-origin" not in HTTP.get(url + "/v1/models", headers={"Origin": "http://evil"}).headers


def test_embeddings_served_equal_the_encoder(model_tok, minilm_dir):
    """--embedding-model: the openai client's embeddings are llmkit's MiniLM vectors (which equal
    sentence-transformers', tests/test_rag_embeddings.py); token-id input is a clean 400."""
    import numpy as np

    from llmkit.rag.embeddings import Embedder
    from llmkit.serve.api import text_embedder

    model, tok = model_tok
    engine = Engine(model, max_batch=1, max_len=64, detok=tok.decode)
    texts = ["A man is eating food.", "Paris is the capital of France."]
    with running_server(engine, tok, embedder=text_embedder(str(minilm_dir))) as url:
        r = client(url).embeddings.create(model="minilm", input=texts)
        got = np.array([d.embedding for d in r.data])
        np.testing.assert_allclose(got, Embedder(minilm_dir).embed(texts), atol=1e-6)
        assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
        bad = HTTP.post(url + "/v1/embeddings", json={"input": [1, 2, 3]})
        assert bad.status_code == 400 and "token-id" in bad.json()["error"]["message"]


# ---------------------------------------------------------------- security, back-pressure, faults
def test_api_key_required_everywhere_but_health(model_tok):
    model, tok = model_tok
    engine = Engine(model, max_batch=2, max_len=128, detok=tok.decode)
    with running_server(engine, tok, api_key="s3cret") as url:
        assert HTTP.get(url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/api/tags"):
            assert HTTP.get(url + path).status_code == 401
            assert HTTP.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = HTTP.post(url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cre"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client(url, "nope").models.list()
        assert client(url, "s3cret").completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_queue_full_is_429_with_retry_after(model_tok):
    model, tok = model_tok
    engine = Engine(model, max_batch=1, max_len=128, max_queue=1, detok=tok.decode)
    gate = threading.Event()
    step = engine.step
    engine.step = lambda: (gate.wait(), step())  # hold the scheduler: the first request stays queued
    with running_server(engine, tok) as url:
        first = {}
        t = threading.Thread(target=lambda: first.update(r=HTTP.post(url + "/v1/completions", timeout=30,
                                                                       json={"prompt": "a", "max_tokens": 3})))
        t.start()
        deadline = time.time() + 10
        while engine.queued < 1 and time.time() < deadline:
            time.sleep(0.01)
        r = HTTP.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 3})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            client(url).completions.create(model="tiny", prompt="c", max_tokens=3)
        gate.set()
        t.join(30)
        assert first["r"].status_code == 200
        assert "llmkit_rejected_total 2" in HTTP.get(url + "/metrics").text


def test_disconnect_cancels_and_frees_the_slot(model_tok):
    model, tok = model_tok
    engine = Engine(model, max_batch=1, max_len=250, detok=tok.decode)
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())  # ~100 tokens/s: the stream outlives the client
    with running_server(engine, tok) as url:
        with HTTP.stream("POST", url + "/v1/completions", json={"prompt": "a", "max_tokens": 240, "stream": True,
                                                                  "temperature": 0}) as r:
            got = [line for _, line in zip(range(4), r.iter_lines())]
            assert len(got) == 4 and engine.running == 1
        deadline = time.time() + 5
        while engine.running and time.time() < deadline:
            time.sleep(0.01)
        assert engine.running == 0 and engine.metrics.get("finished_cancelled") == 1
        assert engine.metrics.get("completion_tokens") < 100  # stopped long before its 240 tokens
        # the freed row serves the next request at once
        assert client(url).completions.create(model="tiny", prompt="b", max_tokens=3).choices


def test_a_failing_request_does_not_take_down_the_others(model_tok):
    model, tok = model_tok
    engine = Engine(model, max_batch=4, max_len=128, detok=tok.decode)
    sample = engine._sample

    def faulty(s, *args):
        if s.req.params.seed == 666 and len(s.out) == 2:
            raise RuntimeError("boom")
        return sample(s, *args)

    engine._sample = faulty
    with running_server(engine, tok) as url:
        out = {}
        t = threading.Thread(target=lambda: out.update(ok=client(url).completions.create(
            model="tiny", prompt="fine", temperature=0, max_tokens=30)))
        t.start()
        r = HTTP.post(url + "/v1/completions", json={"prompt": "bad", "max_tokens": 30, "seed": 666})
        t.join(30)
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert out["ok"].choices[0].text == reference(model, tok, tok.encode("fine"), max_new_tokens=30).text
        assert HTTP.get(url + "/health").json()["status"] == "ok" and engine.metrics.get("errors") == 1


def test_load_generator_with_a_shared_system_prompt(server):
    """`llmkit bench serve`'s load generator: every request whole, and --system-prompt-words puts the same
    system message in front of every request (more prompt tokens, as the server's usage reports)."""
    from llmkit.serve.load import run_load, system_prompt

    url, engine = server
    tokens_in = []
    for system in (None, system_prompt(12)):
        before = engine.metrics.get("prompt_tokens")
        r = run_load(url, "tiny", 2, 3, 4, system=system)
        assert r["errors"] == 0 and r["incomplete"] == 0 and r["output_tokens"] >= 3
        tokens_in.append(engine.metrics.get("prompt_tokens") - before)
    assert tokens_in[1] > tokens_in[0] + 3 * 12
