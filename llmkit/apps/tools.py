"""Tools for the agent: plain Python functions, each described by a JSON schema built from its signature.

    Tool.from_function(fn)     name, first docstring line and a JSON schema of the parameters from the type
                               hints ({"type": "object", "properties": ..., "required": ...}, the shape
                               chat templates and OpenAI-style tool calling expect)
    calculator(expression)     arithmetic by walking the AST (numbers, + - * / // % **, parentheses, a few
                               math functions): never eval, so "__import__('os')" is a syntax error, not code
    python_tool(limits)        a tool running code in the sandbox (llmkit/apps/sandbox.py), its stdout back
    search_tool(index)         search over any object with `search(query, k) -> [(text, source, score)]`;
                               `KeywordIndex` is a tiny stand-in (term overlap) when no RAG index is given
    lookup_tool(table)         key -> value lookup; a near miss uses the one matching key (and says so) or
                               lists the closest keys
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LLMKitError

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable

    @classmethod
    def from_function(cls, fn: Callable, name: str | None = None, description: str | None = None) -> "Tool":
        sig = inspect.signature(fn)
        hints = getattr(fn, "__annotations__", {})
        props, required = {}, []
        for p in sig.parameters.values():
            t = hints.get(p.name, str)
            if isinstance(t, str):  # postponed annotations: "str", "int", ...
                t = {"str": str, "int": int, "float": float, "bool": bool}.get(t, str)
            props[p.name] = {"type": _JSON_TYPES.get(t, "string")}
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
        doc = (description or inspect.getdoc(fn) or "").strip().splitlines()
        return cls(name or fn.__name__, doc[0] if doc else "", {"type": "object", "properties": props,
                                                                  "required": required}, fn)

    def schema(self) -> dict:
        """OpenAI / chat-template style: {"type": "function", "function": {name, description, parameters}}."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def signature(self) -> str:
        args = ", ".join(f"{k}: {v['type']}" for k, v in self.parameters["properties"].items())
        return f"{self.name}({args})"

    def call(self, arguments) -> str:
        """Run with a dict of arguments or a bare value (given to the only required parameter).
        Errors come back as text for the model to read; they never end the agent."""
        props = self.parameters["properties"]
        if not isinstance(arguments, dict):
            if len(props) == 0:
                arguments = {}
            else:
                first = (self.parameters["required"] or list(props))[0]
                arguments = {first: arguments}
        unknown = [k for k in arguments if k not in props]
        if unknown:
            return f"Error: {self.name} has no argument {unknown[0]!r}; its arguments are {', '.join(props) or 'none'}"
        missing = [k for k in self.parameters["required"] if k not in arguments]
        if missing:
            return f"Error: {self.name} needs the argument {missing[0]!r}"
        try:
            return str(self.fn(**arguments))
        except (LLMKitError, ValueError, TypeError, ArithmeticError, KeyError) as e:
            return f"Error: {e}"


# ---------------------------------------------------------------- calculator
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin,
          "cos": math.cos, "tan": math.tan, "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": round,
          "min": min, "max": max}
_CONSTS = {"pi": math.pi, "e": math.e}


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(b) > 1000 or abs(a) > 1e100):
            raise ValueError("exponent too large")
        if isinstance(node.op, ast.Mult) and max(abs(a), abs(b)) > 1e300:
            raise ValueError("number too large")
        return _BINOPS[type(node.op)](a, b)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        return _UNOPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords):
        return _FUNCS[node.func.id](*[_eval(a) for a in node.args])
    raise ValueError(f"not arithmetic: {ast.unparse(node)!r} (use numbers, + - * / // % **, parentheses, "
                     f"{', '.join(_FUNCS)}, pi, e)")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. (12 + 3) * 4 / 5"""
    expr = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/").rstrip("=").strip()
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)  # 1,000 -> 1000
    if len(expr) > 500:
        raise ValueError("expression too long (500 characters at most)")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r} as arithmetic") from None
    v = _eval(tree)
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        v = int(v)
    return str(round(v, 10) if isinstance(v, float) else v)


# ---------------------------------------------------------------- python (sandbox)
def python_tool(limits=None) -> Tool:
    from .sandbox import SandboxLimits, run_python

    lim = limits or SandboxLimits(timeout_s=5.0, memory_mb=256)

    def python(code: str) -> str:
        """Run Python code in a sandbox and return what it prints (only math-like modules can be imported)"""
        from .pal import extract_code

        res = run_python(extract_code(code) if "```" in code else code, lim)
        out = res.stdout.strip()
        if res.ok:
            return out[-2000:] or "(the program printed nothing; use print())"
        return (out[-1000:] + "\n" if out else "") + f"Error: {res.summary()}"

    return Tool.from_function(python)


# ---------------------------------------------------------------- document search
class KeywordIndex:
    """A minimal in-memory index: score = number of distinct query terms in the text / sqrt(text terms).
    A stand-in with the search(query, k) -> [(text, source, score)] shape of the RAG indexes."""

    def __init__(self, docs: list[tuple[str, str]]):
        self.docs = [(t, s, set(_terms(t))) for t, s in docs]

    @classmethod
    def from_dir(cls, folder: str | Path) -> "KeywordIndex":
        p = Path(folder)
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md") and f.is_file()) if p.is_dir() else []
        if not files:
            raise LLMKitError(f"no .txt or .md documents in {p}")
        docs = []
        for f in files:
            for i, para in enumerate(x for x in re.split(r"\n\s*\n", f.read_text(errors="replace")) if x.strip()):
                docs.append((para.strip(), f"{f.relative_to(p)}#{i + 1}"))
        return cls(docs)

    def search(self, query: str, k: int = 3) -> list[tuple[str, str, float]]:
        q = set(_terms(query))
        scored = [(len(q & terms) / math.sqrt(max(1, len(terms))), i) for i, (_, _, terms) in enumerate(self.docs)]
        scored = sorted((x for x in scored if x[0] > 0), key=lambda x: (-x[0], x[1]))[:k]
        return [(self.docs[i][0], self.docs[i][1], round(s, 4)) for s, i in scored]


_STOP = frozenset("a an the of in on at to is are was were what which who how many much for and or by with does "
                  "do did from as that this it its be".split())


def _terms(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP]


def search_tool(index) -> Tool:
    def search(query: str, k: int = 3) -> str:
        """Search the local documents; returns the best passages with their sources"""
        hits = index.search(query, int(k))
        if not hits:
            return "No documents match."
        return "\n".join(f"[{src}] {text[:500]}" for text, src, _ in hits)

    return Tool.from_function(search)


# ---------------------------------------------------------------- key-value lookup
def _stem(word: str) -> str:
    """Crude plural folding ("boxes" -> "box", "lamps" -> "lamp"): enough to match a key the model
    wrote in the plural or with its words reordered; not a linguistic stemmer."""
    if len(word) > 4 and word.endswith(("xes", "ches", "shes", "sses")):
        return word[:-2]
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _stems(text: str) -> frozenset[str]:
    return frozenset(_stem(w) for w in _terms(text))


def lookup_tool(table: dict[str, str], enum_max: int = 64) -> Tool:
    """Exact lookup, with a fallback for the near misses small models make ("lamps", "price of one lamp",
    "lamp prices" for the key "lamp price"): if exactly one key holds every word of the request or has
    all its words in the request (plurals folded), or exactly one key is close in spelling (difflib ratio >= 0.8), its value comes back with a
    note saying which key was used; otherwise the closest keys come back so the model can retry."""
    import difflib

    norm = {k.strip().lower(): str(v) for k, v in table.items()}
    stems = {k: _stems(k) for k in norm}

    def lookup(key: str) -> str:
        """Look up the value stored under a key (exact name)"""
        k = " ".join(str(key).strip().strip("'\"").lower().split())
        if k in norm:
            return norm[k]
        want = _stems(k)
        holding = [c for c in norm if want and (want <= stems[c] or stems[c] <= want)]
        # spelling similarity of every key, scored once (difflib.get_close_matches' ratio and order)
        scored = sorted(((difflib.SequenceMatcher(None, c, k).ratio(), c) for c in norm), reverse=True)[:3]
        close = [c for r, c in scored if r >= 0.8]
        unique = holding if len(holding) == 1 else close if len(close) == 1 and not holding else []
        if unique:
            return f"{norm[unique[0]]} (there is no key {key!r}; this is the value of {unique[0]!r})"
        near = holding[:3] or [c for r, c in scored if r >= 0.4]
        if near:
            return f"Error: no key {key!r}; the closest keys are: {', '.join(near)}"
        return f"Error: no key {key!r}; known keys: {', '.join(sorted(norm)[:20])}"

    tool = Tool.from_function(lookup)
    if len(norm) <= enum_max:
        # the keys as a JSON-schema enum: an agent that constrains arguments picks one of them instead of
        # writing a key (each value is one scored continuation, so only for small tables)
        tool.parameters["properties"]["key"]["enum"] = sorted(norm)
    return tool


def load_table(path: str | Path) -> dict[str, str]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LLMKitError(f"cannot read the lookup table {p}: {e}") from None
    if not isinstance(data, dict):
        raise LLMKitError(f"{p} must hold one JSON object of key -> value")
    return {str(k): str(v) for k, v in data.items()}


TOOL_NAMES = ("calculator", "python", "search", "lookup")
