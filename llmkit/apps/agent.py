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

The model is any `complete(prompt: str) -> str` callable, so tests drive the loop with scripted outputs.
`model_completer` (llmkit's engine) can also `choose(prompt, options) -> index` by log-probability;
with it the text loop constrains each step (`constrained_step`): free thought, then the action picked
among the given tools and "Final Answer" (and an enum argument among its values), then free Action
Input. The system prompt carries worked trajectories (`EXAMPLES`) rendered with the given tools' names.
`AgentResult.transcript` is the whole exchange as text.

Measured (BENCHMARKS.md, benchmarks/agent_suite.py): SmolLM2-135M-Instruct solves 9 of 20 held-out
two-step lookup + calculator tasks with the constrained steps and examples, 6 with free-text actions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Callable

from ..errors import LLMKitError
from .tools import Tool

REACT_SYSTEM = """Answer the question. You can use these tools:

{tools}

Use exactly this format:

Thought: what to do next
Action: the tool to use ({names})
Action Input: the tool's arguments as JSON
Observation: the tool's result (written for you)
... (Thought / Action / Action Input / Observation can repeat)
Thought: I know the answer
Final Answer: the answer"""


@dataclass(frozen=True)
class Example:
    """A worked trajectory for the system prompt, shown only when every tool it uses is given.
    steps: (thought, tool name, the value of the tool's first argument, observation)."""
    question: str
    steps: tuple[tuple[str, str, str, str], ...]
    answer: str

    def uses(self) -> set[str]:
        return {s[1] for s in self.steps}


# Few-shot trajectories as in the ReAct paper's prompts: a 135M model follows a format it has seen
# filled in far better than one described (with the description alone SmolLM2-135M wrote arithmetic in
# the Action line and copied placeholders). Keys and numbers differ from benchmarks/agent_suite.py.
EXAMPLES = (
    Example("How much do 3 pens cost?",
            (("I need the price of one pen, then 3 times it.", "lookup", "pen price", "2"),
             ("3 pens cost 3 * 2.", "calculator", "3 * 2", "6")), "6"),
    Example("How many cups are in 4 crates?",
            (("I need the number of cups per crate, then 4 times it.", "lookup", "cups per crate", "25"),
             ("4 crates hold 4 * 25 cups.", "calculator", "4 * 25", "100")), "100"),
    Example("How much do 2 hats cost with a 3 dollar discount?",
            (("I need the price of one hat, then 2 times it minus 3.", "lookup", "hat price", "15"),
             ("2 hats cost 2 * 15 - 3.", "calculator", "2 * 15 - 3", "27")), "27"),
    Example("What is 15% of 80?", (("15% of 80 is 80 * 15 / 100.", "calculator", "80 * 15 / 100", "12"),), "12"),
    Example("Who designed the Eiffel Tower?",
            (("I should search the documents.", "search", "Eiffel Tower designer",
              "[paris.md#2] The tower was designed by the engineers of Gustave Eiffel's company."),),
            "the engineers of Gustave Eiffel's company"),
    Example("What is the sum of the squares of 1 to 10?",
            (("A short program can add them up.", "python", "print(sum(i * i for i in range(1, 11)))", "385"),),
            "385"),
)

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


def _first_arg(tool: Tool) -> str:
    return (tool.parameters["required"] or list(tool.parameters["properties"]) or ["input"])[0]


def render_example(ex: Example, tools: dict[str, Tool]) -> str:
    """The trajectory with the given tools' real names and argument names, as the loop writes steps."""
    lines = []
    for thought, name, value, obs in ex.steps:
        lines += [f"Thought: {thought}", f"Action: {name}",
                  f"Action Input: {json.dumps({_first_arg(tools[name]): value})}", f"Observation: {obs}"]
    return "\n".join(lines + ["Thought: I know the answer", f"Final Answer: {ex.answer}"])


def worked_examples(tools: dict[str, Tool], max_examples: int = 3) -> list[tuple[str, str]]:
    """[(question, trajectory)]: the examples that use only the given tools, those using the most of them
    first (a lookup then a calculator call before a calculator call alone). Tools none of the examples
    fits get one skeleton step with the first tool, so the format is still shown filled in."""
    fits = sorted((ex for ex in EXAMPLES if ex.uses() <= set(tools)), key=lambda ex: -len(ex.uses()))
    if not fits:
        first = next(iter(tools.values()))
        fits = [Example("...", (("I should use a tool.", first.name, "...", "..."),), "...")]
    return [(ex.question, render_example(ex, tools)) for ex in fits[:max_examples]]


def react_system_prompt(tools: dict[str, Tool]) -> str:
    return REACT_SYSTEM.format(tools=_tool_list(tools), names=", ".join(tools))


def react_prompt(tools: dict[str, Tool], question: str, tokenizer=None, chat: bool = True,
                 examples: int = 3) -> str:
    """The prompt the first step continues. With a chat template the worked examples are earlier turns
    (user: question, assistant: trajectory), so the model's own turn starts exactly as theirs did;
    without one they are "Question: ..." blocks before the question."""
    shots = worked_examples(tools, examples)
    system = react_system_prompt(tools)
    if tokenizer is not None and chat:
        msgs = [{"role": "system", "content": system}]
        for q, trajectory in shots:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": trajectory}]
        msgs.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    blocks = "".join(f"Question: {q}\n{trajectory}\n\n" for q, trajectory in shots)
    return f"{system}\n\n{blocks}Question: {question}\n"


# stops for the free-text parts of a constrained step: each is one line
_LINE_STOPS = ("\n", "Action:", "Final Answer:", "Observation:")


def _cut(text: str, stops: tuple[str, ...]) -> str:
    """Text before the first stop string, stripped: the engine already stops there, a completer that
    ignores `stop` (a remote model, a test stub) still yields one field."""
    return text[:min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))].strip()


def constrained_step(complete, choose: Callable[[str, list[str]], int], prompt: str, tools: dict[str, Tool]) -> Step:
    """One ReAct step where the model picks the action from the allowed ones instead of free-writing it.

    Grammar-constrained decoding in the way of llama.cpp grammars or guidance, at the granularity
    that matters here: the thought is free text (one line); then the next line must be one of
    `Action: <tool>` for a given tool or `Final Answer:`, and `choose` picks the one the model gives the
    highest log-probability (the whole continuation's, so "Action: lookup" competes as one string).
    A small model can no longer write arithmetic or a placeholder where the tool name goes. An argument
    whose schema lists its values (`enum`: the lookup table's keys) is chosen the same way; other Action
    Inputs and the final answer are free text again, one line each."""
    thought = _cut(complete(prompt + "Thought:", stop=_LINE_STOPS), _LINE_STOPS)
    base = f"{prompt}Thought: {thought}\n"
    names = list(tools)
    pick = choose(base, [f"Action: {n}" for n in names] + ["Final Answer:"])
    if not 0 <= pick <= len(names):
        raise LLMKitError(f"choose returned {pick}, not an index into {len(names) + 1} options")
    if pick == len(names):
        answer = _cut(complete(base + "Final Answer:", stop=("\n",)), ("\n",))
        raw = f"Thought: {thought}\nFinal Answer: {answer}"
        if not answer:
            msg = "'Final Answer:' is empty; write the answer after it."
            return Step(thought=thought, raw=raw, error=msg, observation=f"Error: {msg}")
        return Step(thought=thought, final_answer=answer, raw=raw)
    name = names[pick]
    arg = _first_arg(tools[name])
    enum = tools[name].parameters["properties"].get(arg, {}).get("enum")
    if enum:  # a closed set of values (the lookup table's keys): chosen the same way as the tool
        value = enum[choose(f"{base}Action: {name}\nAction Input: ", [json.dumps({arg: v}) for v in enum])]
        raw_input = json.dumps({arg: value})
    else:
        raw_input = _cut(complete(f"{base}Action: {name}\nAction Input:", stop=("\n", "Observation:")),
                         ("\n", "Observation:"))
    return Step(thought=thought, action=name, action_input=parse_arguments(raw_input),
                raw=f"Thought: {thought}\nAction: {name}\nAction Input: {raw_input}")


def run_agent(complete: Callable[[str], str], question: str, tools: list[Tool], tokenizer=None,
              max_steps: int = 6, chat: bool = True, on_step: Callable | None = None, examples: int = 3) -> AgentResult:
    """Answer `question` with the ReAct loop (or native tool calls, see the module docstring).
    examples: how many worked trajectories the prompt shows (0: the format description alone)."""
    if not tools:
        raise LLMKitError("the agent needs at least one tool")
    if max_steps < 1:
        raise LLMKitError(f"max_steps must be >= 1, got {max_steps}")
    tmap = {t.name: t for t in tools}
    if tokenizer is not None and chat and template_supports_tools(tokenizer):
        return _run_native(complete, question, tmap, tokenizer, max_steps, on_step)
    head = react_prompt(tmap, question, tokenizer, chat, examples)
    scratch = ""
    steps: list[Step] = []
    # a completer that can score options (model_completer's) gets the action chosen among the allowed
    # ones; a plain complete(prompt) callable (scripted tests, remote models) is parsed as free text
    choose = getattr(complete, "choose", None)
    for _ in range(max_steps):
        if choose is not None:
            step = constrained_step(complete, choose, head + scratch, tmap)
        else:
            step = _free_step(complete, head + scratch)
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


def _free_step(complete, prompt: str) -> Step:
    out = complete(prompt + "Thought:")
    text = "Thought:" + out if not _FIELD.match(out) else out
    try:
        return parse_react(text)
    except ParseError as e:
        return Step(raw=text, error=str(e), observation=f"Error: {e}")


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


class ModelCompleter:
    """llmkit's engine as the agent's model: `completer(prompt, stop=None) -> text` (greedy unless a
    temperature is given; by default stops at "Observation:" so the model never writes a tool's result
    itself) and `choose(prompt, options) -> index` (the option with the highest log p(option | prompt),
    for constrained_step)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 200, temperature: float = 0.0, seed: int = 0,
                 stop: tuple[str, ...] = ("Observation:", "\nQuestion:")):
        from ..inference import SamplingParams
        from ..inference.prefix import PrefixCache

        self.model, self.tokenizer = model, tokenizer
        # every call of a run starts with the same system prompt and the steps so far: their K/V are
        # reused instead of prefilled again (~1k tokens a call with the worked examples)
        self.prefix_cache = PrefixCache(max_entries=4)
        self.params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                     stop_ids=tuple(tokenizer.stop_ids), stop=stop, seed=seed)

    def __call__(self, prompt: str, stop: tuple[str, ...] | None = None) -> str:
        from ..inference import generate

        params = self.params if stop is None else replace(self.params, stop=tuple(stop))
        ids = self.tokenizer.encode(prompt, add_bos=False)
        return generate(self.model, ids, params, tokenizer=self.tokenizer, prefix_cache=self.prefix_cache,
                        truncate=False).text

    def choose(self, prompt: str, options: list[str]) -> int:
        # the eval harness's multiple-choice scorer: the prompt is run once, the options packed after it
        from ..eval.harness import continuation_logprobs

        ctx = self.tokenizer.encode(prompt, add_bos=False)
        lp = continuation_logprobs(self.model, [(ctx, self.tokenizer.encode(o, add_bos=False)) for o in options])
        return max(range(len(options)), key=lp.__getitem__)


def model_completer(model, tokenizer, max_new_tokens: int = 200, temperature: float = 0.0, seed: int = 0,
                    stop: tuple[str, ...] = ("Observation:", "\nQuestion:")) -> ModelCompleter:
    """The agent's model over llmkit's engine (see ModelCompleter)."""
    return ModelCompleter(model, tokenizer, max_new_tokens, temperature, seed, stop)
