"""The web chat page at / in a real headless browser: Debian's chromium started here and driven over
the DevTools protocol by playwright (`connect_over_cdp`; playwright downloads no browser). The page
asks for the API key, streams an answer, stops it (the server frees the row), keeps the conversation
in the browser, and renders model output as escaped text (no HTML injection). The screenshot is kept
in the test's tmp dir, and copied to $LLMKIT_ARTIFACTS (a folder; 1 = test-artifacts/) when set."""

import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install llmkit[test])")

from _serve import running_server, tiny_chat_model  # noqa: E402
from _shared import free_port  # noqa: E402

from llmkit.serve import Engine  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser",
                                           "google-chrome") if n and shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium found (CI installs it: apt-get install chromium)")


@pytest.fixture
def browser(tmp_path):
    port = free_port()
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-dev-shm-usage", f"--remote-debugging-port={port}",
                             f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with sync_api.sync_playwright() as p:
            deadline = time.time() + 90
            while True:  # chromium takes a while to open its DevTools port on a busy machine
                try:
                    b = p.chromium.connect_over_cdp(f"http://127.0.0.1:{port}", timeout=10_000)
                    break
                except Exception:
                    if time.time() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.5)
            yield b
            b.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def until(cond, page, timeout=60.0):
    """Poll from Python: the page's CSP forbids the string evaluation wait_for_function uses."""
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out; status {page.text_content('#status')!r}, log " \
                                       f"{page.inner_html('#log')[:300]!r}"
        time.sleep(0.05)


def test_web_chat_streams_stops_and_renders_safely(browser, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = tiny_chat_model()
    engine = Engine(model, max_batch=2, max_len=250, detok=tok.decode)
    step = engine.step
    engine.step = lambda: (time.sleep(0.03), step())  # slow enough that Stop lands mid-answer
    submit = engine.submit  # and no end-of-turn token: the random model's answer runs until stopped
    engine.submit = lambda req: submit(dataclasses.replace(req, params=dataclasses.replace(req.params, stop_ids=())))
    try:
        with running_server(engine, tok, api_key="pw") as url:
            page = browser.contexts[0].new_page()
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            page.wait_for_selector("#keybox.show")  # the server wants a key: the page asks for it
            page.fill("#apikey", "pw")
            page.click("#savekey")
            until(lambda: page.text_content("#status") == "ready", page)
            assert page.text_content("#model") == "tiny"
            page.fill("#system", "You are terse.")
            page.fill("#max_tokens", "150")
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant")
            until(lambda: len(page.text_content(".msg.assistant")) > 3, page)
            assert engine.running == 1
            page.click("#stop")
            until(lambda: page.text_content("#status") == "stopped", page)
            deadline = time.time() + 10
            while engine.running and time.time() < deadline:  # the aborted fetch cancelled the request
                time.sleep(0.05)
            assert engine.running == 0 and engine.metrics.get("finished_cancelled") == 1
            page.screenshot(path=str(tmp_path / "web_chat_stopped.png"), full_page=True)  # the streamed answer
            answer = page.text_content(".msg.assistant")
            assert 3 < len(answer) and engine.metrics.get("completion_tokens") < 150
            # the conversation lives in the browser
            saved = page.evaluate("JSON.parse(localStorage.getItem('llmkit.chat.v1'))")
            assert [m["role"] for m in saved] == ["user", "assistant"]
            assert saved[0]["content"] == "What is the capital of France?"
            # model output is escaped before formatting: markup in it is text, markdown still renders
            html = page.evaluate("renderMarkdown('<img src=x onerror=alert(1)> **bold** `x<y`\\n```py\\n"
                                 "print(\"<b>\")\\n```')")
            assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
            assert "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
            assert '<pre><code data-lang="py">print(&quot;&lt;b&gt;&quot;)' in html
            page.evaluate("localStorage.setItem('llmkit.chat.v1', JSON.stringify([{role: 'user', content: 'hi'}, "
                          "{role: 'assistant', content: '<img src=x id=pwned> ```js\\nalert(1)\\n```'}]))")
            page.reload()
            page.wait_for_selector(".msg.assistant pre")
            assert page.query_selector("#pwned") is None and page.query_selector(".msg img") is None
            shot = tmp_path / "web_chat.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
            dest = os.environ.get("LLMKIT_ARTIFACTS")
            if dest:  # a folder, or 1 for test-artifacts/ in the checkout
                out = Path(__file__).resolve().parents[1] / "test-artifacts" if dest in ("1", "true") else Path(dest)
                out.mkdir(parents=True, exist_ok=True)
                for name in ("web_chat_stopped.png", shot.name):
                    shutil.copy(tmp_path / name, out / name)
    finally:
        torch.set_num_threads(n)
