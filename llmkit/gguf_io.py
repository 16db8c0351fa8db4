"""Open GGUF files (llama.cpp's format) and read their metadata: the one GGUF reader in llmkit.

The weight loader (`llmkit.checkpoint.gguf`: config and tensors) and the tokenizer
(`llmkit.tokenizer.gguf`: vocabulary, merges, chat template) both read through here, so a missing,
foreign or corrupt file gives the same one-line error whichever asks. The parsing itself is done by
the `gguf` package (the reference Python reader that ships with llama.cpp).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .errors import LLMKitError


def open_gguf(path: str | Path):
    """GGUFReader over `path` (it memory-maps the file: tensors are read when touched), with a plain
    error for a missing file, a file that is not GGUF, and a corrupt or truncated one."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise LLMKitError(f"GGUF file {p} does not exist")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LLMKitError(f"{p} is not a GGUF file (bad magic)")
    try:
        return GGUFReader(os.fspath(p))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on corrupt files
        msg = str(e).splitlines()[0] if str(e) else ""
        raise LLMKitError(f"{p} is not a readable GGUF file: corrupt or truncated "
                          f"({type(e).__name__}: {msg})") from None


def metadata(reader, prefixes: tuple[str, ...] | None = None) -> dict:
    """The metadata fields of an open GGUF file as Python values (`field.contents()`: numbers,
    strings, lists such as tokenizer.ggml.tokens), only the keys starting with one of `prefixes` if given."""
    out = {}
    for key, field in reader.fields.items():
        if prefixes is not None and not key.startswith(prefixes):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # pragma: no cover - exotic field types
            continue
    return out


def read_metadata(path: str | Path, prefixes: tuple[str, ...] | None = None) -> dict:
    """`metadata` of the GGUF file at `path`, remembered per file path, size and mtime (parsing takes
    seconds on a 100 MB file, and a tokenizer is often loaded again from the same file)."""
    p = Path(path)
    if not p.is_file():
        raise LLMKitError(f"GGUF file {p} does not exist")
    st = p.stat()
    return dict(_read_metadata(p, str(p.resolve()), st.st_size, st.st_mtime_ns, prefixes))


@functools.lru_cache(maxsize=2)
def _read_metadata(path: Path, resolved: str, size: int, mtime_ns: int, prefixes: tuple[str, ...] | None) -> dict:
    return metadata(open_gguf(path), prefixes)
