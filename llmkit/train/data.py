"""Token data for pretraining: `prepare` a corpus into memory-mapped shards, and a resumable loader.

On disk (`llmkit data prepare --out DIR`):
    DIR/manifest.json        token counts, bytes, dtype, tokenizer fingerprint, shard list
    DIR/tokenizer/           the tokenizer the ids came from
    DIR/train_000000.bin ... raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    DIR/val_000000.bin ...

Each document is followed by EOS, so documents are separated by EOS. The split is by document:
document i goes to val when floor((i+1)·f) > floor(i·f), an exact, streaming, deterministic f.

The loader cuts each split into windows of T+1 tokens (stride T, offset by a per-epoch shift) and
visits them in a per-epoch permutation drawn from (seed, epoch). Its whole state is (epoch, cursor),
so a resumed run reads exactly the batches the uninterrupted run would have read. Every rank
computes the same permutation and reads only its own rows of each global batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import LLMKitError
from ..io import atomic_dir, check_output_dir

MANIFEST = "manifest.json"
SUFFIXES = (".txt", ".jsonl", ".parquet")


# ---------------------------------------------------------------- reading a corpus
def list_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand files and directories (recursively: *.txt, *.jsonl, *.parquet), sorted per directory."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise LLMKitError(f"directory {p} holds no .txt, .jsonl or .parquet files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise LLMKitError(f"{p}: unsupported file type {p.suffix or '(none)'} (use .txt, .jsonl, .parquet)")
            files.append(p)
        else:
            raise LLMKitError(f"input {p} does not exist")
    if not files:
        raise LLMKitError("no input files given")
    return files


def _txt_pieces(p: Path, block: int = 1 << 20) -> Iterator[str]:
    """One .txt file = one document, read in ~1 MB pieces cut after a newline (streams large files);
    invalid UTF-8 becomes U+FFFD with a warning naming the file and line (llmkit/text.py)."""
    from ..text import read_pieces

    tail = ""
    for chunk in read_pieces(p, block):
        chunk = tail + chunk
        cut = chunk.rfind("\n") + 1 or len(chunk)
        tail = chunk[cut:]
        if chunk[:cut]:
            yield chunk[:cut]
    if tail:
        yield tail


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[Iterator[str]]:
    """Yield documents, each an iterator of text pieces: a .txt file, a .jsonl line, a parquet row."""
    for p in files:
        try:
            if p.suffix == ".txt":
                yield _txt_pieces(p)
            elif p.suffix == ".jsonl":
                from ..text import clean

                # bad bytes arrive as lone surrogates and become U+FFFD with a warning naming the line
                with open(p, encoding="utf-8", errors="surrogateescape") as f:
                    for n, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            text = json.loads(line)[text_field]
                        except (ValueError, KeyError, TypeError):
                            raise LLMKitError(f"{p}:{n}: not a JSON object with a {text_field!r} string") from None
                        if not isinstance(text, str):
                            raise LLMKitError(f"{p}:{n}: field {text_field!r} is not a string")
                        yield iter((clean(text, f"{p}:{n}"),))
            else:
                try:
                    import pyarrow.parquet as pq
                except ImportError:
                    raise LLMKitError(f"{p}: reading parquet needs pyarrow (pip install pyarrow)") from None
                pf = pq.ParquetFile(p)
                if text_field not in pf.schema_arrow.names:
                    raise LLMKitError(f"{p}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
                for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                    for text in batch.column(0).to_pylist():
                        if text is not None:
                            yield iter((str(text),))
        except UnicodeDecodeError as e:
            raise LLMKitError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason})") from None


# ---------------------------------------------------------------- writing shards
def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class _ShardWriter:
    """Appends token ids to <split>_NNNNNN.bin files of at most `shard_tokens` tokens each."""

    def __init__(self, out: Path, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")  # little-endian on disk whatever the host
        self.shards: list[dict] = []
        self._f = None
        self._in_shard = 0
        self.tokens = 0
        self.bytes = 0
        self.documents = 0

    def write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while arr.size:
            if self._f is None or self._in_shard >= self.shard_tokens:
                self._open()
            take = min(arr.size, self.shard_tokens - self._in_shard)
            self._f.write(arr[:take].tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            self.tokens += take
            arr = arr[take:]

    def _open(self):
        self.close()
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._f = open(self.out / name, "wb")
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0})

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def prepare(inputs: list[str | Path], tokenizer, out_dir: str | Path, val_fraction: float = 0.0,
            val_inputs: list[str | Path] | None = None, shard_tokens: int = 100_000_000, text_field: str = "text",
            force: bool = False, progress: bool = True) -> dict:
    """Tokenise a corpus into train/val shards under `out_dir` (written atomically); returns the manifest.

    `val_inputs`, when given, go wholly to the val split (e.g. a held-out file); otherwise a fraction
    `val_fraction` of the documents does.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LLMKitError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    eos = tokenizer.eos_id
    if eos is None:
        raise LLMKitError("the tokenizer has no EOS token to separate documents")
    files = list_inputs(inputs)
    val_files = list_inputs(val_inputs) if val_inputs else []
    check_output_dir(out_dir, force, files + val_files)  # before the tokenising
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    from ..progress import progress_bar

    total_bytes = sum(p.stat().st_size for p in files + val_files)
    bar = progress_bar(total_bytes, unit="B", unit_scale=True, desc="tokenising", enabled=progress)
    with atomic_dir(out_dir, force=force, owns=("train_*.bin", "val_*.bin", MANIFEST, "tokenizer")) as tmp:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}

        def add(doc: Iterator[str], split: str):
            w = writers[split]
            n_bytes = 0
            for piece in doc:
                b = len(piece.encode("utf-8"))
                n_bytes += b
                w.write(tokenizer.encode(piece, add_bos=False))
                bar.update(b)
            w.write([eos])
            w.bytes += n_bytes
            w.documents += 1

        i = 0
        for doc in iter_documents(files, text_field):
            to_val = not val_files and math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)
            add(doc, "val" if to_val else "train")
            i += 1
        for doc in iter_documents(val_files, text_field):
            add(doc, "val")
        bar.close()
        for w in writers.values():
            w.close()
        tr, va = writers["train"], writers["val"]
        if tr.bytes == 0:
            raise LLMKitError("the corpus is empty: no text in the training documents")
        if (val_fraction > 0 or val_files) and va.tokens == 0:
            raise LLMKitError(f"the validation split is empty: {i} document(s) with --val-fraction {val_fraction}; "
                              "give more documents, a larger fraction, or 0")
        manifest = {
            "format": "llmkit-tokens", "version": 1, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "eos_id": eos, "tokenizer_fingerprint": tokenizer.fingerprint(), "val_fraction": val_fraction,
            "splits": {s: {"tokens": w.tokens, "bytes": w.bytes, "documents": w.documents, "shards": w.shards}
                       for s, w in writers.items()},
            "inputs": [str(p) for p in files], "val_inputs": [str(p) for p in val_files],
        }
        tokenizer.save(tmp / "tokenizer")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------- reading shards
def read_manifest(data_dir: str | Path) -> dict:
    p = Path(data_dir) / MANIFEST
    if not p.is_file():
        raise LLMKitError(f"{data_dir} is not a prepared data directory (no {MANIFEST}; run `llmkit data prepare`)")
    try:
        m = json.loads(p.read_text())
    except ValueError as e:
        raise LLMKitError(f"{p} is not valid JSON ({e})") from None
    if m.get("format") != "llmkit-tokens":
        raise LLMKitError(f"{p} is not an llmkit token manifest")
    return m


class TokenShards:
    """The shards of one split, memory-mapped read-only (nothing is loaded until indexed)."""

    def __init__(self, data_dir: str | Path, split: str):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise LLMKitError(f"{data_dir}: no split {split!r}")
        info = self.manifest["splits"][split]
        self.split = split
        self.n_tokens = info["tokens"]
        self.n_bytes = info["bytes"]
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.shards = []
        for s in info["shards"]:
            f = self.dir / s["file"]
            if not f.is_file() or f.stat().st_size != s["tokens"] * dtype.itemsize:
                raise LLMKitError(f"shard {f} is missing or has the wrong size (re-run `llmkit data prepare`)")
            self.shards.append(np.memmap(f, dtype=dtype, mode="r") if s["tokens"] else np.zeros(0, dtype))

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, self.n_tokens)

    def tokens(self) -> np.ndarray:
        """All ids of the split concatenated (loads them; for tests and small corpora)."""
        return np.concatenate([np.asarray(s) for s in self.shards]) if self.shards else np.zeros(0, np.int64)


@dataclass
class LoaderState:
    epoch: int = 0
    cursor: int = 0  # windows of this epoch already handed out (global, all ranks)


class BatchLoader:
    """Global batches of `batch_size` windows (x, y) of `seq_len` tokens; this rank gets its rows.

    x[b] = tokens[o : o+T], y[b] = tokens[o+1 : o+T+1] for window offset o. With shuffle=False the
    windows come in order with no shift (for evaluation).
    """

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world: int = 1, shuffle: bool = True):
        if batch_size % world:
            raise LLMKitError(f"global batch {batch_size} is not divisible by the world size {world}")
        longest = max((len(s) for s in shards.shards), default=0)
        if longest < seq_len + 1:
            raise LLMKitError(f"the {shards.split} split is shorter than one sequence: {longest} tokens in its "
                              f"largest shard, need seq_len + 1 = {seq_len + 1}")
        self.shards, self.T, self.B = shards, seq_len, batch_size
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.state = LoaderState()
        self._epoch_index: tuple[int, np.ndarray, np.ndarray] | None = None

    def _windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, offsets) of this epoch's windows in visiting order."""
        if self._epoch_index is not None and self._epoch_index[0] == epoch:
            return self._epoch_index[1], self._epoch_index[2]
        T = self.T
        rng = np.random.default_rng([self.seed, epoch])
        shift = int(rng.integers(0, T)) if self.shuffle else 0
        sid, off = [], []
        for i, s in enumerate(self.shards.shards):
            start = shift if len(s) - shift >= T + 1 else 0
            o = np.arange(start, len(s) - T, T, dtype=np.int64)  # every o has o + T + 1 <= len(s)
            sid.append(np.full(o.size, i, dtype=np.int64))
            off.append(o)
        sid, off = np.concatenate(sid), np.concatenate(off)
        if self.shuffle:
            perm = rng.permutation(sid.size)
            sid, off = sid[perm], off[perm]
        self._epoch_index = (epoch, sid, off)
        return sid, off

    @property
    def windows_per_epoch(self) -> int:
        return int(self._windows(0)[0].size)

    def next_global_indices(self) -> list[tuple[int, int]]:
        """Advance by one global batch; returns the (shard, offset) of every row (all ranks)."""
        rows = []
        while len(rows) < self.B:
            sid, off = self._windows(self.state.epoch)
            take = min(self.B - len(rows), sid.size - self.state.cursor)
            c = self.state.cursor
            rows.extend(zip(sid[c:c + take].tolist(), off[c:c + take].tolist()))
            self.state.cursor += take
            if self.state.cursor >= sid.size:
                self.state.epoch += 1
                self.state.cursor = 0
        return rows

    def read(self, rows: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        buf = np.stack([np.asarray(self.shards.shards[s][o:o + self.T + 1], dtype=np.int64) for s, o in rows])
        t = torch.from_numpy(buf)  # (B, T+1)
        return t[:, :-1], t[:, 1:]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next global batch: x, y of shape (B / world, T)."""
        rows = self.next_global_indices()
        per = self.B // self.world
        return self.read(rows[self.rank * per:(self.rank + 1) * per])

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "cursor": self.state.cursor, "seed": self.seed, "seq_len": self.T,
                "batch_size": self.B}

    def load_state_dict(self, d: dict) -> None:
        if d.get("seq_len", self.T) != self.T or d.get("batch_size", self.B) != self.B:
            raise LLMKitError(f"cannot resume the data position: checkpoint was made with seq_len={d.get('seq_len')}, "
                              f"batch_size={d.get('batch_size')}, this run uses {self.T}, {self.B}")
        self.state = LoaderState(int(d["epoch"]), int(d["cursor"]))


def eval_windows(shards: TokenShards, seq_len: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """The fixed windows used for validation: all of them, or `max_windows` spread evenly over the
    split (the first few alone would be a biased sample: a text's opening is rarely typical)."""
    loader = BatchLoader(shards, seq_len, 1, shuffle=False)
    sid, off = loader._windows(0)
    if max_windows is not None and max_windows < sid.size:
        pick = np.linspace(0, sid.size - 1, max_windows).round().astype(np.int64)
        sid, off = sid[pick], off[pick]
    return list(zip(sid.tolist(), off.tolist()))
