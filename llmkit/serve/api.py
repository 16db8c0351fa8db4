"""The HTTP face of the engine: OpenAI- and ollama-compatible routes (FastAPI), text at this edge only.

    GET  /v1/models  POST /v1/completions  POST /v1/chat/completions  POST /v1/embeddings
    POST /api/generate  POST /api/chat  GET /api/tags  GET /api/version        (ollama, NDJSON streaming)
    GET  /health  GET /metrics (Prometheus text)  GET / (the web chat page)

Request bodies are validated strictly (unknown fields, wrong types, out-of-range values: 400 in
OpenAI's error schema `{"error": {"message", "type", "param", "code"}}`, ollama's `{"error": msg}` on
/api/*). Each of the n samples of a request is one engine request; their events come back through an
asyncio queue fed from the engine thread. A stream whose client goes away cancels its requests (the
engine frees their rows at the next step), and so does a non-streamed request whose client left.

Security (`Guard`, a plain ASGI middleware so streaming and disconnects pass through untouched):
with an API key every route but /health and the static page / needs `Authorization: Bearer KEY`
(compared in constant time); bodies are size-limited (413); no CORS headers unless an origin is
given. No request field names a file or code: prompts are text or token ids, the chat template is
the model's own.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import struct
import time
import uuid
from pathlib import Path
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LLMKitError
from ..inference.generate import TextStream
from ..inference.sampling import SamplingParams
from .engine import Engine, EngineClosed, Event, QueueFull, Request


@dataclass
class Limits:
    max_prompt_tokens: int | None = None  # default: the engine's context less one
    max_output_tokens: int = 2048
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    max_stop: int = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error_response(path: str, status: int, message: str, type_: str = "invalid_request_error",
                    param: str | None = None, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    if path.startswith("/api/"):  # ollama's schema
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


# ---------------------------------------------------------------- request schemas
class _Strict(BaseModel):
    # unknown fields and wrong types are errors (no "5" -> 5 coercion)
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 (the openai client's default)
    user: str | None = None


class OllamaMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    images: list[str] | None = None


class _OllamaCommon(_Strict):
    model: str | None = None
    stream: bool = True
    options: dict[str, Any] | None = None
    format: str | dict | None = None
    keep_alive: str | int | float | None = None


class OllamaGenerate(_OllamaCommon):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaChat(_OllamaCommon):
    messages: list[OllamaMessage] = Field(min_length=1)


# ollama `options` -> SamplingParams; the runtime ones (threads, context, GPU layers) are the server's
_OLLAMA_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "num_predict": "max_new_tokens", "seed": "seed", "stop": "stop",
                   "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty"}
_OLLAMA_RUNTIME = {"num_ctx", "num_thread", "num_gpu", "num_batch", "main_gpu", "use_mmap", "use_mlock", "numa",
                   "num_keep", "low_vram", "vocab_only", "repeat_last_n"}


# ---------------------------------------------------------------- the app
class Guard:
    """ASGI middleware: bearer-key check and body-size limit, before any route runs."""

    OPEN = {"/health", "/", "/favicon.ico"}  # the page holds no data; it asks for the key itself

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.key and path not in self.OPEN and scope["method"] != "OPTIONS":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.key.encode()):
                msg = "missing or wrong API key: send the header Authorization: Bearer KEY"
                return await _error_response(path, 401, msg, "authentication_error", code="invalid_api_key",
                                             headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _error_response(path, 413, f"request body larger than this server's limit of "
                                         f"{self.max_body} bytes")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise StarletteHTTPException(413, f"request body larger than this server's limit of "
                                                      f"{self.max_body} bytes")
            return msg

        return await self.app(scope, limited, send)


def text_embedder(spec: str):
    """embed(texts) -> (list of unit vectors, token count) from a sentence encoder (llmkit.rag.embeddings:
    mean-pooled MiniLM, equal to sentence-transformers); `spec` is a registry name or a model folder."""
    from ..rag.embeddings import Embedder

    path = spec
    if not Path(spec).is_dir():
        from ..hub import pull

        path = pull(spec, quiet=True)
    embedder = Embedder(path)

    def embed(texts: list[str]) -> tuple[list[list[float]], int]:
        return embedder.embed(texts).tolist(), sum(len(ids) for ids in embedder.token_ids(texts))

    return embed


def create_app(engine: Engine, tokenizer, *, model_name: str, api_key: str | None = None,
               cors: list[str] | None = None, limits: Limits | None = None, embedder=None) -> FastAPI:
    """The FastAPI app over a started or unstarted engine; the app's lifespan starts it and, at
    shutdown (SIGTERM: uvicorn first lets in-flight responses finish), drains and stops it."""
    limits = limits or Limits()
    max_prompt = limits.max_prompt_tokens or engine.max_len - 1
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="llmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body=limits.max_body_bytes)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    # ------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, e: APIError):
        return _error_response(request.url.path, e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        kind = err.get("type", "")
        if kind == "json_invalid":
            msg = f"malformed JSON body: {err.get('ctx', {}).get('error', 'cannot parse')}"
        elif kind == "extra_forbidden":
            msg = f"unknown field {param!r}"
        elif kind == "missing":
            msg = f"missing required field {param!r}"
        else:
            msg = f"{param}: {err.get('msg', 'invalid value')}" if param else err.get("msg", "invalid request body")
        return _error_response(request.url.path, 400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HTTPRequest, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(request.url.path, e.status_code, str(e.detail), type_)

    @app.exception_handler(Exception)
    async def _crash(request: HTTPRequest, e: Exception):
        return _error_response(request.url.path, 500, f"internal error: {type(e).__name__}", "server_error")

    # ------------------------------------------------------------ helpers
    def check_model(name: str | None):
        if name and name != model_name:
            raise APIError(404, f"model {name!r} not found (this server serves {model_name!r})", "not_found_error",
                           "model", "model_not_found")

    def make_params(*, prompt_len: int, max_tokens: int | None, stop, **kw) -> SamplingParams:
        if prompt_len > max_prompt:
            raise APIError(400, f"prompt has {prompt_len} tokens, more than this server's limit of {max_prompt} "
                           f"(max prompt tokens)", param="messages", code="context_length_exceeded")
        room = engine.max_len - prompt_len
        if max_tokens is None:
            max_tokens = min(limits.max_output_tokens, room)
        if max_tokens > limits.max_output_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is more than this server's limit of "
                           f"{limits.max_output_tokens} (max output tokens)", param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"prompt of {prompt_len} tokens + max_tokens {max_tokens} is more than the "
                           f"context of {engine.max_len} tokens", param="max_tokens", code="context_length_exceeded")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > limits.max_stop or any(not s for s in stops):
            raise APIError(400, f"stop takes at most {limits.max_stop} non-empty strings", param="stop")
        try:
            return SamplingParams(max_new_tokens=max_tokens, stop=tuple(stops),
                                  stop_ids=tuple(sorted(tokenizer.stop_ids)), **kw)
        except (LLMKitError, TypeError, ValueError) as e:
            raise APIError(400, str(e)) from None

    def check_openai(body) -> None:
        """What /v1/completions and /v1/chat/completions both refuse: another model, n over the limit, logit_bias."""
        check_model(body.model)
        if body.n > limits.max_n:
            raise APIError(400, f"n={body.n} is more than this server's limit of {limits.max_n} (max n)", param="n")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")

    async def run(prompt: list[int], params: SamplingParams, n: int, http: HTTPRequest):
        """Submit n samples; yield (index, Event) as they come; cancel what is left on exit."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for i in range(n):
                p = params if n == 1 or params.seed is None else SamplingParams(**{**params.__dict__,
                                                                                   "seed": params.seed + i})
                reqs.append(engine.submit(Request(prompt, p, lambda ev, i=i: loop.call_soon_threadsafe(
                    q.put_nowait, (i, ev)))))
        except QueueFull as e:
            for r in reqs:
                engine.cancel(r)
            raise APIError(429, f"{e}: retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineClosed as e:
            raise APIError(503, str(e), "server_error", headers={"Retry-After": "5"}) from None
        except LLMKitError as e:
            raise APIError(400, str(e)) from None
        return _events(q, reqs, http)

    async def _events(q: asyncio.Queue, reqs: list[Request], http: HTTPRequest):
        left = len(reqs)
        try:
            while left:
                try:
                    i, ev = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if ev.finish_reason:
                    left -= 1
                yield i, ev
        finally:
            for r in reqs:  # client gone or consumer stopped: free the rows now
                engine.cancel(r)

    def token_str(t: int) -> str:
        return tokenizer.decode([t])

    def check_error(ev: Event):
        if ev.finish_reason == "error":
            raise APIError(500, f"generation failed: {ev.error}", "server_error")

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def sse_failure(ev) -> str:
        """The event that ends a stream whose generation raised (OpenAI's error schema)."""
        return sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error", "param": None,
                              "code": None}})

    def usage(prompt_len: int, completion: int) -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}

    def finish_reason(ev: Event) -> str:
        return "stop" if ev.finish_reason in ("stop", "cancelled") else ev.finish_reason

    def chat_logprob(ev: Event) -> dict:
        s = token_str(ev.token)
        return {"token": s, "logprob": ev.logprob, "bytes": list(s.encode()),
                "top_logprobs": [{"token": token_str(t), "logprob": lp, "bytes": list(token_str(t).encode())}
                                 for t, lp in ev.top]}

    # ------------------------------------------------------------ OpenAI
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": engine.running, "queued": engine.queued}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llmkit"}]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str):
        check_model(name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "llmkit"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        check_openai(body)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = tokenizer.encode_chat(msgs)
        except Exception as e:
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = make_params(prompt_len=len(prompt), max_tokens=mt, stop=body.stop, temperature=body.temperature,
                             top_p=body.top_p, seed=body.seed, presence_penalty=body.presence_penalty,
                             frequency_penalty=body.frequency_penalty, logprobs=body.top_logprobs or 0)
        events = await run(prompt, params, body.n, http)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        texts = [TextStream(tokenizer, params.stop) for _ in range(body.n)]
        counts = [0] * body.n
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def gen():
                head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}
                for i in range(body.n):
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                async for i, ev in events:
                    if ev.finish_reason == "error":
                        yield sse_failure(ev)
                        return
                    counts[i] += ev.token is not None
                    delta = texts[i].put(ev.token, finished=bool(ev.finish_reason))
                    lp = {"content": [chat_logprob(ev)]} if body.logprobs and ev.token is not None else None
                    if delta or lp:
                        yield sse({**head, "choices": [{"index": i, "delta": {"content": delta}, "logprobs": lp,
                                                        "finish_reason": None}]})
                    if ev.finish_reason:
                        yield sse({**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                        "finish_reason": finish_reason(ev)}]})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(len(prompt) * body.n, sum(counts))})
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        lps: list[list[dict]] = [[] for _ in range(body.n)]
        reasons = [None] * body.n
        async for i, ev in events:
            check_error(ev)
            counts[i] += ev.token is not None
            texts[i].put(ev.token, finished=bool(ev.finish_reason))
            if body.logprobs and ev.token is not None:
                lps[i].append(chat_logprob(ev))
            if ev.finish_reason:
                reasons[i] = finish_reason(ev)
        if any(r is None for r in reasons):  # client left
            return JSONResponse({}, status_code=499)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i].final_text},
                             "logprobs": {"content": lps[i]} if body.logprobs else None, "finish_reason": reasons[i]}
                            for i in range(body.n)],
                "usage": usage(len(prompt) * body.n, sum(counts))}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_openai(body)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        p = body.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise APIError(400, "this server takes one prompt per request", param="prompt")
            p = p[0]
        prompt = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not prompt:
            raise APIError(400, "empty prompt", param="prompt")
        params = make_params(prompt_len=len(prompt), max_tokens=16 if body.max_tokens is None else body.max_tokens,
                             stop=body.stop, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                             presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                             logprobs=body.logprobs or 0)
        events = await run(prompt, params, body.n, http)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        texts = [TextStream(tokenizer, params.stop) for _ in range(body.n)]
        counts = [0] * body.n
        want_lp = body.logprobs is not None

        def lp_block(evs: list[Event], offset: int) -> dict:
            toks = [token_str(e.token) for e in evs]
            offs, o = [], offset
            for s in toks:
                offs.append(o)
                o += len(s)
            return {"tokens": toks, "token_logprobs": [e.logprob for e in evs],
                    "top_logprobs": [{token_str(t): lp for t, lp in e.top} for e in evs], "text_offset": offs}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def gen():
                head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
                async for i, ev in events:
                    if ev.finish_reason == "error":
                        yield sse_failure(ev)
                        return
                    counts[i] += ev.token is not None
                    before = texts[i].sent
                    delta = texts[i].put(ev.token, finished=bool(ev.finish_reason))
                    lp = lp_block([ev], before) if want_lp and ev.token is not None else None
                    if delta or lp or ev.finish_reason:
                        yield sse({**head, "choices": [{"index": i, "text": delta, "logprobs": lp,
                                                        "finish_reason": finish_reason(ev) if ev.finish_reason
                                                        else None}]})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(len(prompt) * body.n, sum(counts))})
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        evs: list[list[Event]] = [[] for _ in range(body.n)]
        reasons = [None] * body.n
        async for i, ev in events:
            check_error(ev)
            counts[i] += ev.token is not None
            texts[i].put(ev.token, finished=bool(ev.finish_reason))
            if ev.token is not None:
                evs[i].append(ev)
            if ev.finish_reason:
                reasons[i] = finish_reason(ev)
        if any(r is None for r in reasons):
            return JSONResponse({}, status_code=499)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": i, "text": texts[i].final_text,
                             "logprobs": lp_block(evs[i], 0) if want_lp else None, "finish_reason": reasons[i]}
                            for i in range(body.n)],
                "usage": usage(len(prompt) * body.n, sum(counts))}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        if embedder is None:
            raise APIError(400, f"{model_name} is a decoder; this server has no embedding model (start it "
                           "with --embedding-model, e.g. minilm-l6-v2)", param="model")
        inputs = [body.input] if isinstance(body.input, str) or (body.input and isinstance(body.input[0], int)) \
            else list(body.input)
        if not inputs or len(inputs) > 256:
            raise APIError(400, "input takes 1 to 256 texts", param="input")
        if not all(isinstance(x, str) for x in inputs):
            raise APIError(400, "input must be text: token-id input is not supported for embeddings", param="input")
        vecs, n_tok = await asyncio.get_running_loop().run_in_executor(None, embedder, inputs)
        return {"object": "list", "model": body.model or "embeddings",
                "data": [{"object": "embedding", "index": i,
                          "embedding": v if body.encoding_format == "float" else
                          base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()} for i, v in enumerate(vecs)],
                "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}

    # ------------------------------------------------------------ ollama
    def ollama_params(options: dict | None, prompt_len: int) -> SamplingParams:
        kw: dict = {"temperature": 0.8}  # ollama's default
        max_tokens = None
        for k, v in (options or {}).items():
            if k in _OLLAMA_RUNTIME:
                continue
            if k not in _OLLAMA_OPTIONS:
                raise APIError(400, f"unknown option {k!r}")
            name = _OLLAMA_OPTIONS[k]
            if name == "max_new_tokens":
                max_tokens = None if v is None or v < 0 else v
            elif name != "stop":
                kw[name] = v
        for k, v in kw.items():  # strict types, as for the OpenAI routes
            want = int if k in ("top_k", "seed") else (int, float)
            if v is not None and (isinstance(v, bool) or not isinstance(v, want)):
                raise APIError(400, f"option {k!r} must be a number, got {v!r}")
        stop = (options or {}).get("stop")
        return make_params(prompt_len=prompt_len, max_tokens=max_tokens, stop=stop, **kw)

    def ollama_response(prompt: list[int], params: SamplingParams, stream: bool, chat: bool, events):
        t0 = time.perf_counter()
        text = TextStream(tokenizer, params.stop)
        state = {"n": 0, "t_first": None}

        def piece(delta: str, done: bool, reason: str | None = None) -> dict:
            d = {"model": model_name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "done": done}
            if chat:
                d["message"] = {"role": "assistant", "content": delta}
            else:
                d["response"] = delta
            if done:
                end = time.perf_counter()
                tf = state["t_first"] or end
                d.update(done_reason=reason, total_duration=int((end - t0) * 1e9), prompt_eval_count=len(prompt),
                         prompt_eval_duration=int((tf - t0) * 1e9), eval_count=state["n"],
                         eval_duration=int((end - tf) * 1e9))
            return d

        async def gen():
            async for _, ev in events:
                if ev.finish_reason == "error":
                    yield json.dumps({"error": f"generation failed: {ev.error}"}) + "\n"
                    return
                if ev.token is not None:
                    state["n"] += 1
                    state["t_first"] = state["t_first"] or time.perf_counter()
                delta = text.put(ev.token, finished=bool(ev.finish_reason))
                if delta:
                    yield json.dumps(piece(delta, False), ensure_ascii=False) + "\n"
                if ev.finish_reason:
                    yield json.dumps(piece("", True, finish_reason(ev))) + "\n"

        if stream:
            return StreamingResponse(gen(), media_type="application/x-ndjson")

        async def whole():
            out, last = "", None
            async for line in gen():
                d = json.loads(line)
                if "error" in d:
                    raise APIError(500, d["error"], "server_error")
                out += d["message"]["content"] if chat else d["response"]
                last = d
            if last is None or not last["done"]:
                return JSONResponse({}, status_code=499)
            if chat:
                last["message"]["content"] = out
            else:
                last["response"] = out
            return last

        return whole()

    @app.post("/api/generate")
    async def ollama_generate(body: OllamaGenerate, http: HTTPRequest):
        check_model_ollama(body.model)
        if body.images:
            raise APIError(400, "images are not supported")
        if body.raw:
            prompt = tokenizer.encode(body.prompt)
        else:
            msgs = ([{"role": "system", "content": body.system}] if body.system else []) + \
                   [{"role": "user", "content": body.prompt}]
            prompt = tokenizer.encode_chat(msgs)
        if not body.prompt:  # ollama: an empty prompt just loads the model
            return {"model": model_name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "response": "", "done": True, "done_reason": "load"}
        params = ollama_params(body.options, len(prompt))
        events = await run(prompt, params, 1, http)
        r = ollama_response(prompt, params, body.stream, False, events)
        return r if body.stream else await r

    @app.post("/api/chat")
    async def ollama_chat(body: OllamaChat, http: HTTPRequest):
        check_model_ollama(body.model)
        if any(m.images for m in body.messages):
            raise APIError(400, "images are not supported")
        prompt = tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in body.messages])
        params = ollama_params(body.options, len(prompt))
        events = await run(prompt, params, 1, http)
        r = ollama_response(prompt, params, body.stream, True, events)
        return r if body.stream else await r

    def check_model_ollama(name: str | None):
        # ollama clients add a ":latest" tag to bare names
        if name and name.removesuffix(":latest") != model_name.removesuffix(":latest"):
            raise APIError(404, f"model {name!r} not found (this server serves {model_name!r})")

    @app.get("/api/tags")
    async def ollama_tags():
        return {"models": [{"name": model_name, "model": model_name,
                            "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)), "size": 0,
                            "digest": "", "details": {"format": "llmkit", "family": engine.model.cfg.family}}]}

    @app.get("/api/version")
    async def ollama_version():
        from .. import __version__

        return {"version": __version__}

    # ------------------------------------------------------------ the web page
    page = resources.files(__package__).joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        # everything the page needs is in it: nothing may load from elsewhere
        csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer"})

    return app
