"""`llmkit agent`: a ReAct agent with tools (calculator, python in the sandbox, document search, key-value lookup).

    llmkit agent --model smollm2-135m-instruct --tools calculator,lookup --table facts.json "question"
    llmkit agent --model M --tools search --docs notes/ "What does the README say about X?"
"""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    from ..apps.tools import TOOL_NAMES

    p = sub.add_parser("agent", help="answer a question with a ReAct agent and tools",
                       description=f"Tools: {', '.join(TOOL_NAMES)}. Thought / Action / Observation steps are "
                       "printed as they happen; each Action is chosen among the tools (and Final Answer) by the model's "
                       "log-probability, a lookup key among the table's keys; models whose chat template supports "
                       "tools get native tool calls.")
    p.add_argument("question")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF dir or llmkit checkpoint")
    p.add_argument("--tools", default="calculator", help="comma-separated: " + ", ".join(TOOL_NAMES))
    p.add_argument("--docs", help="folder of .txt/.md documents for the search tool")
    p.add_argument("--table", help="JSON object file of key -> value for the lookup tool")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=200, help="per step")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-chat", action="store_true", help="plain text prompt instead of the chat template")
    p.add_argument("--json", action="store_true", help="print the result and transcript as JSON")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=run)


def build_tools(names: str, docs: str | None, table: str | None) -> list:
    from ..apps.tools import TOOL_NAMES, KeywordIndex, Tool, calculator, load_table, lookup_tool, python_tool, search_tool
    from ..errors import LLMKitError, closest

    out = []
    for n in [x.strip() for x in names.split(",") if x.strip()]:
        if n == "calculator":
            out.append(Tool.from_function(calculator))
        elif n == "python":
            out.append(python_tool())
        elif n == "search":
            if not docs:
                raise LLMKitError("the search tool needs --docs FOLDER")
            out.append(search_tool(KeywordIndex.from_dir(docs)))
        elif n == "lookup":
            if not table:
                raise LLMKitError("the lookup tool needs --table FILE.json")
            out.append(lookup_tool(load_table(table)))
        else:
            raise LLMKitError(f"unknown tool {n!r}{closest(n, TOOL_NAMES)}; choose from {', '.join(TOOL_NAMES)}")
    if not out:
        raise LLMKitError(f"no tools given; choose from {', '.join(TOOL_NAMES)}")
    return out


def run(args) -> int:
    from ..apps.agent import model_completer, run_agent
    from ..errors import LLMKitError

    if args.max_steps < 1:
        raise LLMKitError(f"--max-steps must be >= 1, got {args.max_steps}")
    tools = build_tools(args.tools, args.docs, args.table)  # bad tool options fail before the model loads
    import torch

    torch.set_num_threads(max(1, args.threads))
    from .generate import load

    model, tok = load(args.model, args)
    complete = model_completer(model, tok, args.max_new_tokens, args.temperature)

    def show(step):
        if args.json:
            return
        if step.final_answer is not None:
            return
        print(step.raw.strip() if step.error else f"Thought: {step.thought}\nAction: {step.action}\n"
              f"Action Input: {json.dumps(step.action_input)}", file=sys.stderr)
        print(f"Observation: {step.observation}", file=sys.stderr)

    res = run_agent(complete, args.question, tools, tokenizer=tok, max_steps=args.max_steps, chat=not args.no_chat,
                    on_step=show)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    elif res.answer is not None:
        print(res.answer)
    else:
        print(f"no answer within {args.max_steps} steps", file=sys.stderr)
        return 1
    return 0
