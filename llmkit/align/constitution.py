"""A constitution: the written principles of Constitutional AI (Bai et al. 2022, https://arxiv.org/abs/2212.08073).

A YAML list of principles, each a mapping

    - id: harmless                       a short name, unique; recorded in every row it shaped
      critique: Identify specific ways in which your last response is harmful ...
      revision: Rewrite your last response to remove ... Reply with the rewritten response only.
      preference: Which of these assistant responses is less harmful? ...   (optional)

`critique` and `revision` are the two requests of the supervised stage (SL-CAI: the model criticises its
own reply, then rewrites it); `preference` is the multiple-choice question of the RL stage's AI feedback
(RL-CAI / RLAIF: which of two replies is better). A principle without `preference` serves critique only.
The default (llmkit/align/constitution.yaml) adapts the paper's appendix C. Each use samples one
principle at random, as in the paper.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import LLMKitError

DEFAULT = Path(__file__).with_name("constitution.yaml")
FIELDS = ("id", "critique", "revision", "preference")
REQUIRED = ("id", "critique", "revision")


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str  # asks the model to criticise its last reply
    revision: str  # asks it to rewrite that reply according to the critique
    preference: str | None = None  # "which of these responses is ...?" for AI feedback


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    source: str

    def sample(self, rng: random.Random) -> Principle:
        return rng.choice(self.principles)

    def for_feedback(self) -> "Constitution":
        """The principles that carry a preference question (AI feedback needs one); none is an error."""
        keep = tuple(p for p in self.principles if p.preference)
        if not keep:
            raise LLMKitError(f"constitution {self.source}: no principle has a 'preference' question, which AI "
                              "feedback asks (e.g. 'Which of these assistant responses is less harmful?')")
        return Constitution(keep, self.source)


def load_constitution(path: str | Path | None = None) -> Constitution:
    """The constitution in `path` (YAML), or llmkit's default. Any problem is one LLMKitError line."""
    p = Path(path) if path is not None else DEFAULT
    if not p.is_file():
        raise LLMKitError(f"constitution file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LLMKitError(f"constitution {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and set(data) == {"principles"}:  # also accept {principles: [...]}
        data = data["principles"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise LLMKitError(f"constitution {p} must be a YAML list of principles (id, critique, revision, "
                          f"preference), got {type(data).__name__}")
    if not data:
        raise LLMKitError(f"constitution {p} has no principles")
    out, seen = [], set()
    for i, item in enumerate(data, 1):
        where = f"constitution {p}: principle {i}"
        if not isinstance(item, dict):
            raise LLMKitError(f"{where} must be a mapping with {', '.join(REQUIRED)}, got {type(item).__name__}")
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            from ..errors import closest

            raise LLMKitError(f"{where} has unknown key {unknown[0]!r}{closest(str(unknown[0]), FIELDS)} "
                              f"(keys: {', '.join(FIELDS)})")
        for key in FIELDS:
            value = item.get(key)
            if key in REQUIRED and value is None:
                raise LLMKitError(f"{where} has no {key!r}")
            if value is not None and (not isinstance(value, (str, int)) or not str(value).strip()):
                raise LLMKitError(f"{where}: {key!r} must be a non-empty string")
        pid = str(item["id"]).strip()
        if pid in seen:
            raise LLMKitError(f"{where}: id {pid!r} is used twice")
        seen.add(pid)
        pref = item.get("preference")
        out.append(Principle(pid, str(item["critique"]).strip(), str(item["revision"]).strip(),
                             str(pref).strip() if pref is not None else None))
    return Constitution(tuple(out), str(p))
