"""`llmkit chat`: an interactive chat with a model, answers streamed as they are generated.

Commands: /reset clears the history, /exit (or Ctrl-D) quits. Ctrl-C while an answer is being
written stops that answer (what was written stays in the history); Ctrl-C at the prompt quits.
"""

from __future__ import annotations

import sys

from ..devices import add_device_arg
from .generate import add_sampling_args, chat_ids, load, sampling_params


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat (streamed answers, /reset, /exit)")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--adapter", help="adapter directory applied on top of the model")
    p.add_argument("--system", help="system message")
    add_sampling_args(p)
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..inference import PrefixCache, stream

    sampling_params(args, None)  # bad values fail before the model loads
    model, tok = load(args.model, args)
    params = sampling_params(args, tok)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    prefix = PrefixCache(max_entries=2)  # each turn's prompt starts with the previous turn's: reuse its K/V
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a line of invalid UTF-8 must not end the session: U+FFFD instead
        sys.stdin.reconfigure(errors="surrogateescape")
    from ..text import clean
    if interactive:
        print("chat with the model; /reset clears the history, /exit quits, Ctrl-C stops an answer", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            return 0
        text = clean(line.strip(), "chat input")
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        ids = chat_ids(tok, system + history)
        answer = ""
        try:
            for delta in stream(model, tok, ids, params, prefix_cache=prefix, truncate=True):
                answer += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print(" [stopped]", end="", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": answer})
