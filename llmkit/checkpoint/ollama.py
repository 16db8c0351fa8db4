"""Ollama Modelfiles: what `ollama create NAME -f Modelfile` needs beside an exported GGUF.

    FROM ./model.gguf
    TEMPLATE \"\"\"{{ range .Messages }}...{{ end }}\"\"\"   # Go text/template over .Messages
    PARAMETER stop "<|im_end|>"
    PARAMETER temperature 0

Ollama renders prompts with Go templates, not the Jinja chat template the tokenizer carries, so the
template is derived from the Jinja one by rendering it on sentinel messages: a system message alone
gives the system wrapper (text before and after its content), adding a user message gives the user
wrapper, an assistant reply the assistant's, and `add_generation_prompt` the text that opens the reply.
This covers the per-message formats (ChatML, Llama 3, Zephyr, ...); a template whose rendering is not
such a concatenation (one that moves or rewrites messages) is refused with a plain error.
"""

from __future__ import annotations

from ..errors import LLMKitError

_S, _U, _A = "\x00SYSTEM\x00", "\x00USER\x00", "\x00ASSISTANT\x00"


def _split(text: str, sentinel: str, what: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise LLMKitError(f"cannot turn the chat template into an ollama TEMPLATE: the {what} message's "
                          "content does not appear exactly once in its rendering")
    before, after = text.split(sentinel)
    return before, after


def _after(longer: str, prefix: str, what: str) -> str:
    if not longer.startswith(prefix):
        raise LLMKitError(f"cannot turn the chat template into an ollama TEMPLATE: adding a {what} message "
                          "changes the text rendered before it")
    return longer[len(prefix):]


def role_wrappers(tok) -> dict[str, tuple[str, str]]:
    """{"system"|"user"|"assistant": (before, after) the content, "generation": (opening, "")} of the
    tokenizer's chat template, found by rendering sentinel messages. A bos the template writes first
    is dropped when the tokenizer adds bos itself: llama.cpp (and ollama) then prepend it
    (tokenizer.ggml.add_bos_token). A default system prompt the template inserts when the conversation
    has none is not reproduced (the wrappers are taken from a conversation that has one)."""
    def render(msgs, gen=False):
        return tok.apply_chat_template(msgs, add_generation_prompt=gen)

    sys_msg, user_msg, asst_msg = ({"role": "system", "content": _S}, {"role": "user", "content": _U},
                                   {"role": "assistant", "content": _A})
    r_s = render([sys_msg])
    r_su = render([sys_msg, user_msg])
    r_sua = render([sys_msg, user_msg, asst_msg])
    r_gen = render([sys_msg, user_msg], gen=True)
    s_pre, s_post = _split(r_s, _S, "system")
    if tok.add_bos and tok.bos_token and s_pre.startswith(tok.bos_token):
        s_pre = s_pre[len(tok.bos_token):]
        r_s, r_su, r_sua, r_gen = (r[len(tok.bos_token):] for r in (r_s, r_su, r_sua, r_gen))
    u_pre, u_post = _split(_after(r_su, r_s, "user"), _U, "user")
    a_pre, a_post = _split(_after(r_sua, r_su, "assistant"), _A, "assistant")
    gen = _after(r_gen, r_su, "generation prompt")
    return {"system": (s_pre, s_post), "user": (u_pre, u_post), "assistant": (a_pre, a_post),
            "generation": (gen, "")}


def _literal(s: str) -> str:
    """Text outside Go template actions is copied as is; only "{{" would open an action."""
    if "{{" in s or '"""' in s:
        raise LLMKitError(f"cannot write {s!r} into an ollama TEMPLATE (it contains '{{{{' or '\"\"\"')")
    return s


def go_template(tok) -> str:
    """An ollama Go TEMPLATE equal to the tokenizer's chat template on per-message formats."""
    w = role_wrappers(tok)
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_literal(w[role][0])}{{{{ .Content }}}}'
        f"{_literal(w[role][1])}" for i, role in enumerate(("system", "user", "assistant")))
    # the reply is opened after the last message unless it is the assistant's own; no "{{-" trimming
    # except at the very start, as the wrappers' own newlines are part of the format
    return (f"{{{{- range $i, $_ := .Messages }}}}{branches}{{{{ end }}}}"
            f'{{{{ if eq (len (slice $.Messages $i)) 1 }}}}{{{{ if ne .Role "assistant" }}}}'
            f"{_literal(w['generation'][0])}{{{{ end }}}}{{{{ end }}}}{{{{ end }}}}")


def render_go_template(w: dict[str, tuple[str, str]], messages: list[dict]) -> str:
    """What `go_template` renders for `messages` (the semantics, for tests and previews: ollama is not
    installable here): each message in its role's wrapper, then the reply's opening if the last
    message is not the assistant's."""
    out = "".join(w[m["role"]][0] + m["content"] + w[m["role"]][1] for m in messages)
    if messages and messages[-1]["role"] != "assistant":
        out += w["generation"][0]
    return out


def modelfile(gguf_name: str, tok, cfg, temperature: float = 0.0) -> str:
    """Modelfile text: FROM the GGUF beside it, TEMPLATE from the chat template, one PARAMETER stop per
    end-of-turn token in the vocabulary, temperature (llmkit's default 0: greedy) and num_ctx."""
    lines = ["# written by llmkit export --format ollama; create with: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}"]
    if tok is not None:
        lines.append(f'TEMPLATE """{go_template(tok)}"""')
        for i in sorted(tok.stop_ids):
            lines.append(f'PARAMETER stop "{tok.id_to_token(i)}"')
    lines.append(f"PARAMETER temperature {temperature:g}")
    lines.append(f"PARAMETER num_ctx {cfg.max_seq_len}")
    return "\n".join(lines) + "\n"
