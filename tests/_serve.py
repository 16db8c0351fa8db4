"""Helpers for the server tests: a tiny random chat model and a real uvicorn server on a loopback port."""

import contextlib
import threading
import time

import torch
from _shared import byte_chat_tokenizer, free_port

from llmkit.models.config import ModelConfig
from llmkit.models.transformer import Transformer


def tiny_chat_model(seed=0, **over):
    """tiny-llama over the byte-level chat tokenizer, with peaked next-token distributions."""
    tok = byte_chat_tokenizer()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, max_seq_len=256)
    cfg.update(over)
    m = Transformer(ModelConfig.from_preset("tiny-llama", **cfg)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return m, tok


@contextlib.contextmanager
def running_server(engine, tok, **kw):
    """create_app + uvicorn in a thread; yields the base URL; stops (draining) at exit."""
    import uvicorn

    from llmkit.serve.api import create_app

    app = create_app(engine, tok, model_name=kw.pop("model_name", "tiny"), **kw)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not t.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(30)
