"""The ReAct parser on well-formed and malformed outputs, the tools, and whole agent runs driven by a
scripted fake model (deterministic outputs): a multi-step task solved, recovery from bad actions, the
step limit, and the native tool-call path through a chat template that supports tools."""

import json

import pytest

from llmkit.apps.agent import (ParseError, parse_arguments, parse_react, parse_tool_calls, react_prompt, run_agent,
                               template_supports_tools)
from llmkit.apps.tools import KeywordIndex, Tool, calculator, lookup_tool, search_tool
from llmkit.errors import LLMKitError


# ---------------------------------------------------------------- parser
def test_parse_well_formed_action():
    s = parse_react('Thought: add them\nAction: calculator\nAction Input: {"expression": "2+3"}')
    assert (s.thought, s.action, s.action_input) == ("add them", "calculator", {"expression": "2+3"})


def test_parse_final_answer_and_first_field_wins():
    s = parse_react("Thought: done\nFinal Answer: 42\nAction: calculator\nAction Input: 1")
    assert s.final_answer == "42" and s.action is None


@pytest.mark.parametrize("text,action,arg", [
    ("Thought: x\naction: Calculator\naction input: 2*7", "Calculator", "2*7"),  # any case, bare value
    ("Thought: x\nAction: `calculator`\nAction Input: ```json\n{\"expression\": \"1+1\"}\n```", "calculator",
     {"expression": "1+1"}),
    ("Thought: x\nAction: calculator(3 * 4)", "calculator", "3 * 4"),  # call syntax, no Action Input
    ("Thought: x\nAction: lookup\nAction Input: \"paris\"\nObservation: I made this up", "lookup", "paris"),
    ("Action: search\nAction Input: {bad json", "search", "{bad json"),  # not JSON: kept as text
])
def test_parse_tolerates_common_variations(text, action, arg):
    s = parse_react(text)
    assert s.action == action and s.action_input == arg


@pytest.mark.parametrize("text,msg", [
    ("I think the answer might be 5", "Could not find"),
    ("Thought: hmm\nAction: calculator", "No 'Action Input:'"),
    ("Thought: hmm\nAction:\nAction Input: 3", "empty"),
    ("Thought: hmm\nFinal Answer:", "empty"),
    ("Thought: only thinking", "No 'Action:'"),
])
def test_parse_malformed_raises_a_message_for_the_model(text, msg):
    with pytest.raises(ParseError, match=msg):
        parse_react(text)


def test_parse_arguments():
    assert parse_arguments(' {"a": 1} ') == {"a": 1} and parse_arguments("17") == "17"
    assert parse_arguments('"x"') == "x"


# ---------------------------------------------------------------- tools
def test_tool_schema_from_signature():
    def area(width: float, height: float, unit: str = "m") -> str:
        """Area of a rectangle.

        More text."""
        return f"{width * height} {unit}^2"

    t = Tool.from_function(area)
    assert t.schema() == {"type": "function", "function": {"name": "area", "description": "Area of a rectangle.",
                          "parameters": {"type": "object", "properties": {"width": {"type": "number"},
                                         "height": {"type": "number"}, "unit": {"type": "string"}},
                                         "required": ["width", "height"]}}}
    assert t.call({"width": 2, "height": 3}) == "6 m^2"
    assert "no argument 'depth'" in t.call({"width": 1, "height": 1, "depth": 2})
    assert "needs the argument 'height'" in t.call({"width": 1})


@pytest.mark.parametrize("expr,want", [("(12 + 3) * 4 / 5", "12"), ("2^10", "1024"), ("sqrt(16) + pi - pi", "4"),
                                       ("7 // 2 + 7 % 2", "4"), ("-3 * -3", "9"), ("1,000 * 3", "3000"),
                                       ("10 / 4", "2.5")])
def test_calculator(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("expr", ["__import__('os').system('id')", "().__class__", "open('/etc/passwd')",
                                  "9 ** 9 ** 9", "lambda: 1", "x + 1"])
def test_calculator_refuses_anything_but_arithmetic(expr):
    t = Tool.from_function(calculator)
    out = t.call(expr)
    assert out.startswith("Error:"), out


def test_search_and_lookup_tools():
    idx = KeywordIndex([("The Eiffel Tower is 330 metres tall.", "paris.md#1"),
                        ("Mount Fuji is 3776 metres high.", "japan.md#1")])
    assert "[japan.md#1]" in search_tool(idx).call({"query": "how high is Mount Fuji"})
    assert search_tool(idx).call("zebra") == "No documents match."
    lk = lookup_tool({"Paris": "2.1 million"})
    assert lk.call("paris") == "2.1 million"
    assert "known keys: paris" in lk.call("london")


@pytest.mark.parametrize("asked,used", [("lamps", "lamp price"), ("price of one lamp", "lamp price"),
                                        ("Lamp prices", "lamp price"), ("box of apples", "apples per box"),
                                        ("apple per box", "apples per box")])
def test_lookup_near_miss_uses_the_one_matching_key_and_says_so(asked, used):
    lk = lookup_tool({"lamp price": "30", "chair price": "45", "apples per box": "12"})
    value = {"lamp price": "30", "apples per box": "12"}[used]
    assert lk.call(asked) == f"{value} (there is no key {asked!r}; this is the value of {used!r})"


def test_lookup_ambiguous_miss_lists_the_closest_keys():
    lk = lookup_tool({"lamp price": "30", "chair price": "45", "apples per box": "12"})
    assert lk.call("price") == "Error: no key 'price'; the closest keys are: lamp price, chair price"
    assert lk.call("chair cost") == "Error: no key 'chair cost'; the closest keys are: chair price"
    assert lk.call("zebra").startswith("Error: no key 'zebra'; known keys: apples per box")
    assert lk.parameters["properties"]["key"]["enum"] == ["apples per box", "chair price", "lamp price"]
    assert "enum" not in lookup_tool({"a": 1, "b": 2}, enum_max=1).parameters["properties"]["key"]


# ---------------------------------------------------------------- the loop, with a scripted model
class Scripted:
    """A fake model: returns the next scripted output and records the prompts it saw."""

    def __init__(self, outputs):
        self.outputs, self.prompts = list(outputs), []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        return self.outputs.pop(0)


def tools():
    return [Tool.from_function(calculator), lookup_tool({"apples per box": "12", "boxes": "7"})]


def test_agent_solves_a_multi_step_task():
    model = Scripted([
        ' I need the number of apples per box.\nAction: lookup\nAction Input: "apples per box"',
        " Now the number of boxes.\nAction: lookup\nAction Input: boxes",
        ' Multiply.\nAction: calculator\nAction Input: {"expression": "12 * 7"}',
        " I know the answer.\nFinal Answer: 84",
    ])
    r = run_agent(model, "How many apples are in all the boxes?", tools(), max_steps=6, chat=False)
    assert r.stopped == "answer" and r.answer == "84"
    assert [s.observation for s in r.steps[:3]] == ["12", "7", "84"]
    # each prompt carries the previous observations; the tools are described in the first
    assert "calculator(expression: string)" in model.prompts[0] and "Observation: 12" in model.prompts[1]
    assert "Observation: 84" in model.prompts[3] and r.transcript.endswith("Final Answer: 84\n")


def test_agent_recovers_from_malformed_output_and_invented_tools():
    model = Scripted([
        " I will just guess",  # no Action: a parse error comes back as the observation
        " Use the web.\nAction: web_search\nAction Input: apples",  # an invented tool
        ' Fine.\nAction: calculator\nAction Input: {"expr": "1"}',  # a wrong argument name
        " Ok.\nAction: calculator\nAction Input: 2 + 2",
        "Final Answer: 4",
    ])
    r = run_agent(model, "2+2?", tools(), max_steps=6, chat=False)
    assert r.answer == "4" and r.stopped == "answer"
    assert r.steps[0].error and "No 'Action:'" in r.steps[0].observation
    assert r.steps[1].observation == "Error: there is no tool 'web_search'. The tools are: calculator, lookup."
    assert "no argument 'expr'" in r.steps[2].observation
    assert r.steps[3].observation == "4"
    assert "there is no tool 'web_search'" in model.prompts[2]


def test_agent_stops_at_the_step_limit():
    model = Scripted([" again\nAction: calculator\nAction Input: 1+1"] * 3)
    r = run_agent(model, "loop forever", tools(), max_steps=3, chat=False)
    assert r.stopped == "step_limit" and r.answer is None and len(r.steps) == 3
    with pytest.raises(LLMKitError, match="max_steps"):
        run_agent(model, "q", tools(), max_steps=0)


class Choosing:
    """A fake model that can score options: free text comes from `texts`, each choice from `picks`
    (an index), and every call is recorded."""

    def __init__(self, texts, picks):
        self.texts, self.picks, self.calls, self.options = list(texts), list(picks), [], []

    def __call__(self, prompt, stop=None):
        self.calls.append((prompt, stop))
        return self.texts.pop(0)

    def choose(self, prompt, options):
        self.options.append(options)
        return self.picks.pop(0)


def test_agent_takes_the_action_from_choose_when_the_completer_has_it():
    # the free text says "Action: lookup" inside the thought, but choose picks index 0 = calculator;
    # then the lookup with its key chosen from the enum (index 1 = "boxes"); then index 2 = Final Answer
    model = Choosing(texts=[" Add them. Action: lookup", ' {"expression": "2 + 3"}', " Now the boxes.", " done",
                            " 5 boxes"],
                     picks=[0, 1, 1, 2])
    r = run_agent(model, "2 + 3?", tools(), chat=False)
    assert r.answer == "5 boxes" and r.stopped == "answer"
    assert (r.steps[0].action, r.steps[0].observation) == ("calculator", "5")
    assert (r.steps[1].action, r.steps[1].action_input, r.steps[1].observation) == ("lookup", {"key": "boxes"}, "7")
    assert model.options[0] == ["Action: calculator", "Action: lookup", "Final Answer:"]
    assert model.options[2] == ['{"key": "apples per box"}', '{"key": "boxes"}']  # the table's keys, sorted
    # the thought is one line, cut before a field the model starts on its own
    assert model.calls[0][0].endswith("Question: 2 + 3?\nThought:") and "\n" in model.calls[0][1]
    assert model.calls[1][0].endswith("Thought: Add them.\nAction: calculator\nAction Input:")
    assert "Observation: 7\nThought: done\nFinal Answer:" in model.calls[4][0]
    assert r.transcript.endswith("Thought: done\nFinal Answer: 5 boxes\n")


def test_worked_examples_use_the_given_tools_names_and_arguments():
    def fetch(url: str) -> str:
        """Fetch a page"""
        return ""

    both = {t.name: t for t in tools()}
    p = react_prompt(both, "How much do 5 lamps cost?", chat=False)
    assert 'Action: lookup\nAction Input: {"key": "pen price"}' in p
    assert 'Action: calculator\nAction Input: {"expression": "3 * 2"}' in p
    assert p.endswith("Question: How much do 5 lamps cost?\n")
    assert "pen price" not in react_prompt(both, "q", chat=False, examples=0)
    calc = Tool.from_function(calculator)
    p = react_prompt({"calculator": calc}, "q", chat=False)
    assert "lookup" not in p and 'Action Input: {"expression": "80 * 15 / 100"}' in p
    other = Tool.from_function(fetch)
    p = react_prompt({"fetch": other}, "q", chat=False)  # no example fits: a skeleton with the real names
    assert 'Action: fetch\nAction Input: {"url": "..."}' in p and "calculator" not in p


def test_agent_with_chat_template_without_tools_uses_text_react():
    from _shared import byte_chat_tokenizer

    tok = byte_chat_tokenizer()
    assert not template_supports_tools(tok)
    model = Scripted(["Final Answer: yes"])
    r = run_agent(model, "ok?", tools(), tokenizer=tok)
    assert r.answer == "yes" and model.prompts[0].startswith("<|im_start|>system\nAnswer the question.")
    assert model.prompts[0].endswith("<|im_start|>assistant\nThought:")
    # the worked examples are earlier turns: user question, assistant trajectory
    assert "<|im_start|>user\nHow much do 3 pens cost?<|im_end|>\n<|im_start|>assistant\nThought:" in model.prompts[0]


HERMES = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'system' and tools %}"
          "{{ m.content }}\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% else %}{{ m.content }}"
          "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_agent_native_tool_calls_through_a_template_with_tools():
    from _shared import byte_chat_tokenizer

    tok = byte_chat_tokenizer()
    tok.chat_template = HERMES
    assert template_supports_tools(tok)
    model = Scripted(['<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>',
                      "<tool_call>{not json}</tool_call>",
                      "The product is 42."])
    r = run_agent(model, "6 times 7?", tools(), tokenizer=tok)
    assert r.answer == "The product is 42." and r.steps[0].observation == "42"
    assert '"name": "calculator"' in model.prompts[0]  # the schema went through the template
    assert "<|im_start|>tool\n42<|im_end|>" in model.prompts[1]
    assert "not valid JSON" in r.steps[1].observation
    assert parse_tool_calls("no calls") == []
    assert json.loads(json.dumps(r.to_dict()))["stopped"] == "answer"


def test_cli_agent_rejects_unknown_tools_before_loading(capsys):
    from llmkit.cli import main

    assert main(["agent", "--model", "unused", "--tools", "calc", "q"]) == 2
    assert "unknown tool 'calc' (did you mean 'calculator'?)" in capsys.readouterr().err
    assert main(["agent", "--model", "unused", "--tools", "lookup", "q"]) == 2
    assert "needs --table" in capsys.readouterr().err


def test_pal_extracts_and_runs_a_program():
    from llmkit.apps.pal import extract_code, run_program
    from llmkit.apps.sandbox import SandboxLimits

    lim = SandboxLimits(timeout_s=30)  # generous: a busy CI machine starts processes slowly

    text = "Here you go:\n```python\ndef solution():\n    return 48 + 48 / 2\n```\nDone."
    code = extract_code(text)
    assert code == "def solution():\n    return 48 + 48 / 2"
    ans, res = run_program(code, lim)
    assert ans == "72" and res.ok
    ans, res = run_program("def solution():\n    import os\n    return 1", lim)
    assert ans is None and res.reason == "blocked"
    assert extract_code("def solution():\n    return 1") == "def solution():\n    return 1"


def test_python_tool_reports_errors_as_text():
    from llmkit.apps.sandbox import SandboxLimits
    from llmkit.apps.tools import python_tool

    t = python_tool(SandboxLimits(timeout_s=30))
    assert t.call("print(2 ** 10)") == "1024"
    assert "blocked" in t.call("import subprocess")


def test_cli_agent_solves_a_two_step_task_with_smollm2(capsys, smollm2_gguf):
    """Dev task 2 of benchmarks/agent_suite.py through the CLI: a lookup, then a calculator call."""
    from pathlib import Path

    from llmkit.cli import main

    table = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "agent_table.json"
    rc = main(["agent", "--model", str(smollm2_gguf), "--tools", "calculator,lookup", "--table", str(table),
               "--max-new-tokens", "40", "--threads", "1", "How many apples are in 7 boxes?"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip() == "84", err
    assert 'Action: lookup\nAction Input: {"key": "apples per box"}\nObservation: 12' in err
