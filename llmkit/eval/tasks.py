"""Benchmark tasks: documents, prompts and few-shot examples.

A multiple-choice document becomes an `MCExample`: one (context, continuation) pair per choice;
the harness scores log p(continuation | context). Prompts follow lm-evaluation-harness:
- jsonl `{"query","choices","gold"}` (../shared/data/multiple_choice, from llm-foundry): the text
  is query + delimiter + choice; delimiter "\\nAnswer: " for arc_*, piqa, boolq, " " otherwise;
- winogrande `{"context_options","continuation","gold"}`: the same continuation after each context;
- mmlu (57 subjects, csv): "letter" asks for " A".." D" after the lettered options (lm-eval's
  `mmlu`), "cloze" scores the answer text after "Question: ...\\nAnswer:" (lm-eval's
  `mmlu_continuation`); k-shot examples are the first k of the subject's dev split;
- gsm8k: generative, "Question: ...\\nAnswer: <chain of thought> #### N", k-shot from train;
- svamp: generative like gsm8k (its shots from GSM8K train).
Tasks without a dev split draw k-shot examples from the same file, never the example itself.
--limit N takes the first N documents (of each subject for mmlu).

Where the data comes from, per file: the full copy in the shared data folder ($LLMKIT_SHARED_DATA,
or ../shared/data beside a source checkout) when it has the file, else the small subset packaged in
llmkit/eval/data (the first rows of each file; SOURCE.md there names sources and licenses), so a
pip-installed llmkit evaluates out of the box. The subset's first N documents are the full set's
first N, so zero-shot scores with --limit <= N agree; k-shot examples drawn from a smaller pool differ.
Tasks whose license does not allow redistribution (piqa, openbook_qa) are not packaged.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import LLMKitError, closest

MC_DELIMITERS = {"arc_easy": "\nAnswer: ", "arc_challenge": "\nAnswer: ", "piqa": "\nAnswer: ",
                 "boolq": "\nAnswer: ", "commonsense_qa": " ", "openbook_qa": " ", "winogrande": " "}
FEWSHOT_SEP = "\n\n"
FEWSHOT_SEED = 1234


def data_dir() -> Path:
    """The shared data folder: $LLMKIT_SHARED_DATA, or ../shared/data beside the checkout."""
    env = os.environ.get("LLMKIT_SHARED_DATA")
    p = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    return p


def packaged_data_dir() -> Path:
    """The task subsets shipped inside the package (llmkit/eval/data, see its SOURCE.md)."""
    return Path(str(resources.files("llmkit.eval").joinpath("data")))


def find_data(rel: str, task: str, root: Path | None = None) -> Path:
    """The file or folder `rel` (e.g. multiple_choice/arc_easy.jsonl) of a task: in `root` if given,
    else the shared folder's full copy, else the packaged subset."""
    roots = [root] if root is not None else [data_dir(), packaged_data_dir()]
    for r in roots:
        if (r / rel).exists():
            return r / rel
    where = " or ".join(str(r) for r in roots)
    raise LLMKitError(f"no data for task {task}: {rel} is not in {where} (set LLMKIT_SHARED_DATA to a folder "
                      "that has it, or give the examples with --task-file FILE.jsonl)")


@dataclass
class MCExample:
    contexts: list[str]  # one per choice (equal except for winogrande)
    continuations: list[str]  # one per choice
    gold: int
    norm_lens: list[int]  # characters of each choice, for acc_norm (lm-eval divides by len(choice))


@dataclass
class GenExample:
    prompt: str
    target: str  # the gold answer (a number for gsm8k)


@dataclass
class Task:
    name: str
    kind: str  # "mc" or "gen"
    docs: list  # test documents (raw)
    to_example: callable  # (doc, fewshot_prefix) -> MCExample | GenExample
    shot_text: callable  # doc -> the doc with its answer, as shown in a k-shot prompt
    fewshot_pool: list | None = None  # dev split; None: the docs themselves minus the current one
    default_shots: int = 0
    description: str = ""  # prepended once before the shots (mmlu)
    subjects: list[str] = field(default_factory=list)
    source: str = ""  # the file or folder the documents were read from
    question: callable = None  # gen tasks: doc -> the bare question, for `--prompting` (llmkit.apps.prompting)

    def select(self, limit: int | None) -> list[int]:
        """Indices of the documents to score: the first `limit` (per subject for mmlu, as lm-eval)."""
        if limit is None:
            return list(range(len(self.docs)))
        if not self.subjects:
            return list(range(min(limit, len(self.docs))))
        seen: dict[str, int] = {}
        out = []
        for i, d in enumerate(self.docs):
            if seen.get(d["subject"], 0) < limit:
                seen[d["subject"]] = seen.get(d["subject"], 0) + 1
                out.append(i)
        return out

    def fewshot_prefix(self, i: int, k: int) -> str:
        if k <= 0:
            return self.description
        if self.fewshot_pool is not None:
            if len(self.fewshot_pool) < k:
                raise LLMKitError(f"task {self.name} has only {len(self.fewshot_pool)} few-shot examples, asked for {k}")
            shots = self.fewshot_pool[:k] if self.name.startswith("mmlu") else \
                random.Random(FEWSHOT_SEED + i).sample(self.fewshot_pool, k)
        else:
            others = [j for j in range(len(self.docs)) if j != i]
            if len(others) < k:
                raise LLMKitError(f"task {self.name} has {len(self.docs)} examples, too few for {k} shots")
            shots = [self.docs[j] for j in random.Random(FEWSHOT_SEED + i).sample(others, k)]
        return self.description + FEWSHOT_SEP.join(self.shot_text(d) for d in shots) + FEWSHOT_SEP


# ---------------------------------------------------------------- readers
def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise LLMKitError(f"file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LLMKitError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise LLMKitError(f"{path}: line {n} is not a JSON object")
            out.append(row | {"_line": n})
    return out


def validate_mc(docs: list[dict], path) -> None:
    """Each doc is {"query": str, "choices": [str, ...], "gold": int} or the winogrande schema."""
    for d in docs:
        n = d.get("_line", "?")
        if "context_options" in d:
            ok = (isinstance(d["context_options"], list) and len(d["context_options"]) >= 2
                  and all(isinstance(c, str) for c in d["context_options"]) and isinstance(d.get("continuation"), str))
            nchoice = len(d["context_options"]) if ok else 0
        else:
            ok = (isinstance(d.get("query"), str) and isinstance(d.get("choices"), list) and len(d["choices"]) >= 2
                  and all(isinstance(c, str) for c in d["choices"]))
            nchoice = len(d["choices"]) if ok else 0
        if not ok:
            raise LLMKitError(f"{path}: line {n} is not a task example: need {{\"query\": str, \"choices\": "
                              "[at least 2 str], \"gold\": int}")
        g = d.get("gold")
        if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < nchoice:
            raise LLMKitError(f"{path}: line {n}: gold must be an integer in 0..{nchoice - 1}, got {g!r}")


def mc_jsonl_task(name: str, path: Path, delimiter: str | None = None) -> Task:
    docs = read_jsonl(path)
    validate_mc(docs, path)
    delim = delimiter if delimiter is not None else MC_DELIMITERS.get(name, " ")

    def to_example(d, prefix):
        if "context_options" in d:  # winogrande: partial scoring of the shared continuation
            return MCExample([prefix + c for c in d["context_options"]],
                             [d["continuation"]] * len(d["context_options"]), d["gold"],
                             [len(d["continuation"])] * len(d["context_options"]))
        ctx = prefix + d["query"].rstrip() + delim
        return MCExample([ctx] * len(d["choices"]), list(d["choices"]), d["gold"], [len(c) for c in d["choices"]])

    def shot_text(d):
        if "context_options" in d:
            return d["context_options"][d["gold"]] + " " + d["continuation"]
        return d["query"].rstrip() + delim + d["choices"][d["gold"]]

    return Task(name, "mc", docs, to_example, shot_text, source=str(path))


def _read_mmlu(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{"question": r["question"], "choices": [r[f"choice{k}"] for k in range(4)], "gold": int(r["answer"])}
            for r in rows]


def mmlu_task(folder: Path, style: str, subjects: list[str] | None = None) -> Task:
    """All subjects concatenated; each doc carries its subject (its description and dev shots).
    folder: the one holding SUBJECT_{dev,test}.csv."""
    all_subjects = sorted(p.name[:-len("_test.csv")] for p in folder.glob("*_test.csv"))
    if not all_subjects:
        raise LLMKitError(f"no MMLU csv files in {folder}")
    subjects = subjects or all_subjects
    docs, dev = [], {}
    for s in subjects:
        for d in _read_mmlu(folder / f"{s}_test.csv"):
            docs.append({**d, "subject": s})
        dev[s] = _read_mmlu(folder / f"{s}_dev.csv")
    letters = "ABCD"

    def body(d):
        if style == "letter":
            opts = "".join(f"\n{letters[k]}. {c.strip()}" for k, c in enumerate(d["choices"]))
            return d["question"].strip() + opts + "\nAnswer:"
        return "Question: " + d["question"].strip() + "\nAnswer:"

    def answer(d, k):
        return letters[k] if style == "letter" else d["choices"][k].strip()

    def describe(s):
        what = "multiple choice questions" if style == "letter" else "questions"
        return f"The following are {what} (with answers) about {s.replace('_', ' ')}.\n\n"

    def to_example(d, prefix):
        ctx = prefix + body(d) + " "
        conts = [answer(d, k) for k in range(4)]
        return MCExample([ctx] * 4, conts, d["gold"], [len(c) for c in conts])

    task = Task("mmlu" if style == "letter" else "mmlu_cloze", "mc", docs, to_example,
                lambda d: body(d) + " " + answer(d, d["gold"]), subjects=subjects, source=str(folder))
    # shots and description depend on the doc's subject: replace the generic prefix builder
    def prefix(i, k):
        pool = dev[docs[i]["subject"]]
        if k > len(pool):
            raise LLMKitError(f"MMLU {docs[i]['subject']} has {len(pool)} dev examples, asked for {k} shots")
        return describe(docs[i]["subject"]) + "".join(body(x) + " " + answer(x, x["gold"]) + FEWSHOT_SEP
                                                       for x in pool[:k])

    task.fewshot_prefix = prefix
    return task


# ---------------------------------------------------------------- gsm8k
def gsm8k_task(root: Path | None = None) -> Task:
    path = find_data("math/gsm8k_test.jsonl", "gsm8k", root)
    test = read_jsonl(path)
    train = read_jsonl(find_data("math/gsm8k_train.jsonl", "gsm8k", root))

    def to_example(d, prefix):
        return GenExample(prefix + "Question: " + d["question"].strip() + "\nAnswer:",
                          extract_number(d["answer"].split("####")[-1]) or "")

    return Task("gsm8k", "gen", test, to_example,
                lambda d: "Question: " + d["question"].strip() + "\nAnswer: " + d["answer"].strip(),
                fewshot_pool=train, default_shots=5, source=str(path), question=lambda d: d["question"].strip())


def svamp_task(root: Path | None = None) -> Task:
    """SVAMP (Patel et al. 2021) as a generative task like gsm8k: "Question: ...\nAnswer:", k-shot worked
    solutions from GSM8K train (SVAMP has no train split of its own here)."""
    path = find_data("math/svamp.jsonl", "svamp", root)
    docs = read_jsonl(path)
    train = read_jsonl(find_data("math/gsm8k_train.jsonl", "svamp", root))

    def to_example(d, prefix):
        return GenExample(prefix + "Question: " + str(d["input"]).strip() + "\nAnswer:",
                          extract_number(str(d["target"])) or "")

    return Task("svamp", "gen", docs, to_example,
                lambda d: "Question: " + d["question"].strip() + "\nAnswer: " + d["answer"].strip(),
                fewshot_pool=train, default_shots=5, source=str(path), question=lambda d: str(d["input"]).strip())


def extract_number(text: str) -> str | None:
    """The number after '####' if present, else the last number in the text; commas and a
    trailing '.' removed ('1,000.' -> '1000')."""
    import re

    if "####" in text:
        text = text.split("####")[-1]
        found = re.findall(r"-?[\d,]*\.?\d+", text)
        num = found[0] if found else None
    else:
        found = re.findall(r"-?[\d,]*\.?\d+", text)
        num = found[-1] if found else None
    if num is None:
        return None
    num = num.replace(",", "").rstrip(".")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num


# ---------------------------------------------------------------- registry
BUILTIN = ["arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "commonsense_qa", "openbook_qa",
           "mmlu", "mmlu_cloze", "gsm8k", "svamp"]


def get_task(name: str, root: Path | None = None) -> Task:
    """A built-in task; its data from `root` if given, else as the module docstring says."""
    if name not in BUILTIN and not name.startswith(("mmlu_cloze:", "mmlu:")):
        raise LLMKitError(f"unknown task {name!r}{closest(name, BUILTIN)}; known tasks: {', '.join(BUILTIN)} "
                          "(mmlu:SUBJECT and mmlu_cloze:SUBJECT pick one subject; or use --task-file)")
    if root is not None and not root.is_dir():
        raise LLMKitError(f"data folder not found: {root} (set LLMKIT_SHARED_DATA)")
    if name == "gsm8k":
        return gsm8k_task(root)
    if name == "svamp":
        return svamp_task(root)
    if name.startswith("mmlu"):
        style = "cloze" if name.startswith("mmlu_cloze") else "letter"
        subject = name.split(":", 1)[1] if ":" in name else None
        folder = find_data("multiple_choice/mmlu", name, root)
        if subject and not (folder / f"{subject}_test.csv").is_file():
            subs = sorted(p.name[:-9] for p in folder.glob("*_test.csv"))
            raise LLMKitError(f"unknown MMLU subject {subject!r}{closest(subject, subs)}")
        t = mmlu_task(folder, style, [subject] if subject else None)
        t.name = name
        return t
    return mc_jsonl_task(name, find_data(f"multiple_choice/{name}.jsonl", name, root))


def task_from_file(path: str | Path, delimiter: str = " ") -> Task:
    p = Path(path)
    return mc_jsonl_task(p.stem, p, delimiter)
