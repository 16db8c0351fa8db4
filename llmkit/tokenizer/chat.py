"""Chat templates: the Jinja templates of tokenizer_config.json / GGUF rendered with transformers'
`apply_chat_template(..., tokenize=False)` semantics, ChatML as the default, and the end-of-turn tokens."""

from __future__ import annotations

import functools
import json
from datetime import datetime

from ..errors import LLMKitError

# Tokens that end an assistant turn in the common chat formats (ChatML, Llama 3, Phi-3, GPT-2 style).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")

# Used when a tokenizer carries no chat template (e.g. one trained here without --chat-template):
# ChatML (OpenAI), the format of the default special tokens (tokenizer.train.DEFAULT_SPECIAL_TOKENS).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def compile_template(template: str):
    """Jinja2 environment with transformers' apply_chat_template semantics (sandboxed, trim/lstrip
    blocks, raise_exception, strftime_now, a tojson that keeps non-ASCII and does not escape HTML)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a core dependency
        raise LLMKitError("chat templates need jinja2 (pip install jinja2)") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LLMKitError(f"chat template does not parse: {e.message} (line {e.lineno})") from e


_compile_template_cached = functools.lru_cache(maxsize=8)(compile_template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
    """Render `messages` ([{"role", "content"}, ...]) with the Jinja `template`; the template also sees
    `add_generation_prompt`, `tools`/`documents` (None unless in `variables`) and `variables`."""
    import jinja2

    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise LLMKitError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
    variables = {"tools": None, "documents": None, **variables}
    try:
        return _compile_template_cached(template).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise LLMKitError(f"chat template error: {e}") from e
