"""A ReAct agent (Yao et al. 2022, "ReAct: Synergizing Reasoning and Acting in Language Models").

The model writes, one step at a time,

    Thought: <reasoning>
    Action: <tool name>
    Action Input: <JSON arguments, or a bare value for a one-argument tool>

and the loop runs the tool and appends `Observation: <result>`, until the model writes
`Final Answer: ...` or the step limit is reached. Generation stops at "Observation:", so the model
never writes its own observations.

Recovery instead of failure: an output the parser cannot read, an unknown tool (the list of real
tools comes back), bad arguments or a tool error each become an Observation telling the model what
went wrong, and the loop goes on (each such step counts against the limit).

Two ways to talk to the model, chosen by what its chat template can do (callers never choose):
  - text ReAct (above): the tools' signatures and descriptions are in the system prompt; works with
    any model, including SmolLM2 whose ChatML template has no tool support;
  - native tool calls: when the tokenizer's chat template mentions `tools`, the tools' JSON schemas go
    through the template (`apply_chat_template(..., tools=[...])`) and the model answers with
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes / Qwen convention); results
    go back as `{"role": "tool"}` messages.

The model is any `complete(prompt: str) -> str` callable (`model_completer` wraps llmkit's engine), so
tests drive the loop with scripted outputs. `AgentResult.transcript` is the whole exchange as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from ..errors import LLMKitError
from .tools import Tool

REACT_SYSTEM = """Answer the question. You can use these tools:

{tools}

Use exactly this format:

Thought: what to do next
Action: one of [{names}]
Action Input: the tool's arguments as JSON, e.g. {example}
Observation: the tool's result (written for you)
... (Thought / Action / Action Input / Observation can repeat)
Thought: I know the answer
Final Answer: the answer

Example:
Question: What is 3 times the number of legs of a spider?
Thought: A spider has 8 legs. I multiply 3 by 8.
Action: {first}
Action Input: {example_call}
Observation: 24
Thought: I know the answer
Final Answer: 24"""

TOOL_SYSTEM = "Answer the question. Call the tools when they help, then give the final answer."


@dataclass
class Step:
    thought: str = ""
    action: str | None = None
    action_input: object = None
    final_answer: str | None = None
    observation: str | None = None
    raw: str = ""
    error: str | None = None  # why the output could not be used as written


@dataclass
class AgentResult:
    answer: str | None
    steps: list[Step]
    transcript: str
    stopped: str  # "answer" | "step_limit" | "no_output"

    def to_dict(self) -> dict:
        return {"answer": self.answer, "stopped": self.stopped, "transcript": self.transcript,
                "steps": [s.__dict__ for s in self.steps]}


class ParseError(ValueError):
    pass


_FIELD = re.compile(r"^\s*(Thought|Action Input|Action|Final Answer|Observation)\s*:\s?", re.IGNORECASE | re.MULTILINE)


def parse_react(text: str) -> Step:
    """One model turn -> Step. Raises ParseError with a message written for the model."""
    text = text.split("\nObservation:")[0] if "\nObservation:" in text else text
    fields: dict[str, str] = {}
    marks = list(_FIELD.finditer(text))
    if not marks:
        raise ParseError("Could not find 'Action:' or 'Final Answer:'. Write 'Thought: ...' then either "
                         "'Action: <tool>' and 'Action Input: <JSON>', or 'Final Answer: <answer>'.")
    lead = text[:marks[0].start()].strip()
    for i, m in enumerate(marks):
        key = m.group(1).lower()
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        if key not in fields:  # the first of each field counts (a model may ramble on)
            fields[key] = text[m.end():end].strip()
    step = Step(thought=fields.get("thought", lead), raw=text)
    first_action = min((m.start() for m in marks if m.group(1).lower() == "action"), default=None)
    first_final = min((m.start() for m in marks if m.group(1).lower() == "final answer"), default=None)
    if first_final is not None and (first_action is None or first_final < first_action):
        step.final_answer = fields["final answer"].strip() or None
        if step.final_answer is None:
            raise ParseError("'Final Answer:' is empty; write the answer after it.")
        return step
    if first_action is None:
        raise ParseError("No 'Action:' line. Write 'Action: <tool>' and 'Action Input: <JSON>', "
                         "or 'Final Answer: <answer>'.")
    action = fields["action"].splitlines()[0].strip() if fields["action"] else ""
    call = re.fullmatch(r"`?([A-Za-z_][\w\-]*)\s*\((.*)\)`?", action, re.DOTALL)  # calculator(2+3) style
    if call and "action input" not in fields:
        action, raw_input = call.group(1), call.group(2)
    else:
        action = action.strip("`*[]'\" ")
        raw_input = fields.get("action input")
    if not action:
        raise ParseError("'Action:' is empty; name one tool.")
    if raw_input is None:
        raise ParseError(f"No 'Action Input:' after 'Action: {action}'. Give the arguments as JSON.")
    step.action, step.action_input = action, parse_arguments(raw_input)
    return step


def parse_arguments(raw: str):
    """JSON when it parses (an object or a value), else the stripped text (one-argument tools take it)."""
    s = raw.strip()
    fence = re.fullmatch(r"```(?:json|python|py)?\s*\n?(.*?)\n?```", s, re.DOTALL)
    if fence:
        s = fence.group(1).strip()
    if s.startswith(("{", "[", '"')):
        try:
            return json.loads(s)
        except ValueError:
            pass
    return s.strip("`").strip()


# ---------------------------------------------------------------- native tool calls
def template_supports_tools(tokenizer) -> bool:
    t = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in t


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str) -> list[tuple[str, object]]:
    """[(name, arguments)] from `<tool_call>{json}</tool_call>` blocks. Raises ParseError on bad JSON."""
    calls = []
    for m in _TOOL_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            raise ParseError('A <tool_call> is not valid JSON; write <tool_call>{"name": "<tool>", '
                             '"arguments": {...}}</tool_call>.') from None
        if not isinstance(obj, dict) or "name" not in obj:
            raise ParseError('A <tool_call> needs {"name": ..., "arguments": {...}}.')
        calls.append((str(obj["name"]), obj.get("arguments", {})))
    return calls


# ---------------------------------------------------------------- the loop
def run_tool(tools: dict[str, Tool], name: str, arguments) -> str:
    if name not in tools:
        lowered = {k.lower(): k for k in tools}
        if name.lower() in lowered:
            name = lowered[name.lower()]
        else:
            return f"Error: there is no tool {name!r}. The tools are: {', '.join(tools)}."
    return tools[name].call(arguments)


def _tool_list(tools: dict[str, Tool]) -> str:
    return "\n".join(f"- {t.signature()}: {t.description}" for t in tools.values())


def react_system_prompt(tools: dict[str, Tool]) -> str:
    first = next(iter(tools.values()))
    arg = next(iter(first.parameters["properties"]), "x")
    # one worked trajectory, as the ReAct paper's few-shot prompts: small models copy the format
    call = json.dumps({arg: "3 * 8"}) if first.name == "calculator" else json.dumps({arg: "..."})
    return REACT_SYSTEM.format(tools=_tool_list(tools), names=", ".join(tools), example=json.dumps({arg: "..."}),
                               first=first.name, example_call=call)


def run_agent(complete: Callable[[str], str], question: str, tools: list[Tool], tokenizer=None,
              max_steps: int = 6, chat: bool = True, on_step: Callable | None = None) -> AgentResult:
    """Answer `question` with the ReAct loop (or native tool calls, see the module docstring)."""
    if not tools:
        raise LLMKitError("the agent needs at least one tool")
    if max_steps < 1:
        raise LLMKitError(f"max_steps must be >= 1, got {max_steps}")
    tmap = {t.name: t for t in tools}
    if tokenizer is not None and chat and template_supports_tools(tokenizer):
        return _run_native(complete, question, tmap, tokenizer, max_steps, on_step)
    system = react_system_prompt(tmap)
    if tokenizer is not None and chat:
        head = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": question}], add_generation_prompt=True)
    else:
        head = f"{system}\n\nQuestion: {question}\n"
    scratch = ""
    steps: list[Step] = []
    for _ in range(max_steps):
        out = complete(head + scratch + "Thought:")
        text = "Thought:" + out if not _FIELD.match(out) else out
        try:
            step = parse_react(text)
        except ParseError as e:
            step = Step(raw=text, error=str(e), observation=f"Error: {e}")
        if step.final_answer is not None:
            steps.append(step)
            scratch += step.raw.strip() + "\n"
            if on_step:
                on_step(step)
            return AgentResult(step.final_answer, steps, head + scratch, "answer")
        if step.error is None:
            step.observation = run_tool(tmap, step.action, step.action_input)
            args = step.action_input if isinstance(step.action_input, str) else json.dumps(step.action_input)
            written = f"Thought: {step.thought}\nAction: {step.action}\nAction Input: {args}"
        else:
            written = step.raw.strip()
        scratch += f"{written}\nObservation: {step.observation}\n"
        steps.append(step)
        if on_step:
            on_step(step)
    return AgentResult(None, steps, head + scratch, "step_limit")


def _run_native(complete, question, tmap, tokenizer, max_steps, on_step) -> AgentResult:
    msgs = [{"role": "system", "content": TOOL_SYSTEM}, {"role": "user", "content": question}]
    schemas = [t.schema() for t in tmap.values()]
    steps: list[Step] = []
    for _ in range(max_steps):
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tools=schemas)
        out = complete(prompt)
        try:
            calls = parse_tool_calls(out)
        except ParseError as e:
            step = Step(raw=out, error=str(e), observation=f"Error: {e}")
            msgs += [{"role": "assistant", "content": out}, {"role": "tool", "content": step.observation}]
            steps.append(step)
            continue
        if not calls:
            step = Step(raw=out, final_answer=out.strip())
            steps.append(step)
            if on_step:
                on_step(step)
            msgs.append({"role": "assistant", "content": out})
            return AgentResult(out.strip(), steps, tokenizer.apply_chat_template(msgs, tools=schemas), "answer")
        msgs.append({"role": "assistant", "content": out})
        for name, args in calls:
            step = Step(raw=out, action=name, action_input=args, observation=run_tool(tmap, name, args))
            msgs.append({"role": "tool", "content": step.observation})
            steps.append(step)
            if on_step:
                on_step(step)
    return AgentResult(None, steps, tokenizer.apply_chat_template(msgs, tools=schemas), "step_limit")


def model_completer(model, tokenizer, max_new_tokens: int = 200, temperature: float = 0.0, seed: int = 0,
                    stop: tuple[str, ...] = ("Observation:", "\nQuestion:")) -> Callable[[str], str]:
    """complete(prompt) -> text with llmkit's engine: greedy unless a temperature is given; stops at
    "Observation:" so the model never writes the tool's result itself."""
    from ..inference import SamplingParams, generate

    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop_ids=tuple(tokenizer.stop_ids),
                            stop=stop, seed=seed)

    def complete(prompt: str) -> str:
        ids = tokenizer.encode(prompt, add_bos=False)
        return generate(model, ids, params, tokenizer=tokenizer, truncate=False).text

    return complete
