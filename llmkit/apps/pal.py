"""PAL: program-aided language models (Gao et al. 2022, "PAL: Program-aided Language Models").

The model does not compute; it writes a Python function `solution()` whose return value is the
answer, and the interpreter computes. Here the interpreter is the sandbox (llmkit/apps/sandbox.py),
the same path as `llmkit sandbox run` and the agent's python tool, since the program is untrusted
model output.

    extract_code(text)     the program: the first ```python fenced block, else the text from the first
                           `def solution` (or the whole text)
    run_program(code, ...) sandbox(code + "print(solution())") -> (answer, SandboxResult); the answer is
                           the last printed line as a number, None when the program fails
    PAL_METHOD             the registered method (prompting.METHODS["pal"]): PAL-style exemplars
                           (three GSM8K-train problems written as programs, in the paper's format)
"""

from __future__ import annotations

import re

from .prompting import Method, PromptStyle, Shot, normalize_number
from .sandbox import SandboxLimits, SandboxResult, run_python

PAL_INSTRUCTION = ("Solve the math word problem by writing a Python function solution() that computes and returns "
                   "the answer. Reply with the code only, in a ```python block.")

_EXEMPLARS = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
     "clips did Natalia sell altogether in April and May?",
     "def solution():\n    clips_april = 48\n    clips_may = clips_april / 2\n"
     "    result = clips_april + clips_may\n    return result", "72"),
    ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she "
     "earn?",
     "def solution():\n    hourly_rate = 12\n    minutes = 50\n    result = hourly_rate / 60 * minutes\n"
     "    return result", "10"),
    ("Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her "
     "parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How "
     "much more money does Betty need to buy the wallet?",
     "def solution():\n    wallet = 100\n    betty = wallet / 2\n    parents = 15\n    grandparents = 2 * parents\n"
     "    result = wallet - betty - parents - grandparents\n    return result", "5"),
]
PAL_SHOTS = [Shot(q, f"```python\n{code}\n```", a) for q, code, a in _EXEMPLARS]

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(text: str) -> str:
    m = _FENCE.search(text)
    if m:
        return m.group(1).strip("\n")
    i = text.find("def solution")
    return (text[i:] if i >= 0 else text).strip("\n")


def run_program(code: str, limits: SandboxLimits | None = None) -> tuple[str | None, SandboxResult]:
    """Run a PAL program in the sandbox and read its answer (see the module docstring)."""
    prog = code
    if re.search(r"^def solution\s*\(", code, re.MULTILINE):
        prog = code + "\n\nprint(solution())\n"
    res = run_python(prog, limits or SandboxLimits(timeout_s=5.0, memory_mb=256))
    if not res.ok:
        return None, res
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return (normalize_number(lines[-1]) if lines else None), res


def _run(outputs: list[str], cfg) -> tuple[list, list]:
    answers, extra = [], []
    for text in outputs:
        ans, res = run_program(extract_code(text), SandboxLimits(timeout_s=cfg.sandbox_timeout_s, memory_mb=256))
        answers.append(ans)
        extra.append({"reason": res.reason, "detail": res.detail, "stdout": res.stdout[-500:]})
    return answers, extra


PAL_METHOD = Method("pal", PromptStyle(PAL_INSTRUCTION), default_shots=3, stop=("\n\nQuestion:", "Question:"),
                    run=_run, fixed_shots=PAL_SHOTS, help="program-aided: the model writes Python, the sandbox runs it")
