"""The on-disk index: a directory anyone can open with numpy (format in docs/ARCHITECTURE.md).

Why this shape: vector shards are plain `.npy` (memory-mappable, no custom reader), each written
under a temporary name and renamed when complete, and the manifest — written last — lists every
shard with its row count and sha256. So an interrupted build never leaves a file that looks
complete, a corrupted shard is detected, and a finished shard can be trusted on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tracestar.errors import IndexStoreError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCS = "docs.jsonl"
KINDS = ("raw", "vectors")
COMPRESSED_FORMS = ("int8", "pq")  # as `compress.FORMS` lists them; the first is the fallback default


def shard_name(shard_no: int) -> str:
    return f"shard-{shard_no:05d}"


def shard_path(index_dir: str | Path, kind: str, shard_no: int) -> Path:
    return Path(index_dir) / kind / f"{shard_name(shard_no)}.npy"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_array(path: Path, array: np.ndarray) -> str:
    """Write one `.npy` atomically; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def write_shard(index_dir: str | Path, kind: str, shard_no: int, array: np.ndarray) -> str:
    """Write `kind/shard-NNNNN.npy`; returns its sha256 for the manifest."""
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r}")
    return write_array(shard_path(index_dir, kind, shard_no), array)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_manifest(index_dir: str | Path, manifest: dict) -> None:
    manifest = dict(manifest)
    manifest.setdefault("format_version", FORMAT_VERSION)
    write_json(Path(index_dir) / MANIFEST, manifest)


def read_manifest(index_dir: str | Path) -> dict:
    path = Path(index_dir) / MANIFEST
    if not Path(index_dir).is_dir():
        raise IndexStoreError(f"{index_dir}: no such index directory")
    if not path.exists():
        raise IndexStoreError(f"{index_dir}: not a tracestar index (no {MANIFEST}; an unfinished build?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexStoreError(f"{path}: unreadable manifest ({exc.msg})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexStoreError(f"{path}: format_version {version!r}, this tracestar reads {FORMAT_VERSION}")
    return manifest


@dataclass
class DocRow:
    row: int
    doc_id: str
    n_tokens: int
    truncated: bool


def read_doc_table(index_dir: str | Path) -> list[DocRow]:
    rows = []
    with open(Path(index_dir) / DOCS, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            rows.append(DocRow(rec["row"], rec["doc_id"], rec["n_tokens"], rec["truncated"]))
    return rows


class IndexStore:
    """Read access to a finished index: manifest, doc table, shards (memory-mapped, verified)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._docs: list[DocRow] | None = None
        self._rows: dict[str, int] | None = None
        self._verified: set[tuple[str, int]] = set()

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_docs"])

    @property
    def docs(self) -> list[DocRow]:
        if self._docs is None:
            self._docs = read_doc_table(self.path)
        return self._docs

    @property
    def doc_ids(self) -> list[str]:
        return [d.doc_id for d in self.docs]

    def row_of(self, doc_id: str) -> int | None:
        """The row holding `doc_id` (a dict built once per store), or None."""
        if self._rows is None:
            self._rows = {d.doc_id: d.row for d in self.docs}
        return self._rows.get(doc_id)

    @property
    def shards(self) -> list[dict]:
        return list(self.manifest["shards"])

    def has_kind(self, kind: str) -> bool:
        return all(s.get(f"{kind}_sha256") for s in self.shards)

    def search_form(self, *, exact: bool = False, rerank: int | None = None) -> tuple[str, bool]:
        """(form, exact scores) that `tracestar query` searches with these options.

        form: "exact" (the full-precision `vectors/` scan) or the compressed form it scans for
        candidates, "int8" or "pq" (the manifest's default one). exact scores: whether the returned
        scores are exact — always for "exact"; for a compressed form when its candidates are
        re-scored from `vectors/` (present, and `rerank` is not 0). Mirrors `compress.search`.
        """
        comp = self.manifest.get("compressed") or {}
        forms = [f for f in COMPRESSED_FORMS if f in comp]
        if exact or not forms:
            return "exact", True
        form = comp.get("default") if comp.get("default") in forms else forms[0]
        return form, rerank != 0 and self.has_kind("vectors")

    def verify_shard(self, kind: str, shard_no: int) -> None:
        """Checksum one shard against the manifest (once per process)."""
        if (kind, shard_no) in self._verified:
            return
        info = self.shards[shard_no]
        path = shard_path(self.path, kind, shard_no)
        if not path.exists():
            raise IndexStoreError(f"{path}: missing shard listed in the manifest")
        if sha256_file(path) != info[f"{kind}_sha256"]:
            raise IndexStoreError(f"{path}: checksum mismatch — the shard is corrupted; rebuild it")
        self._verified.add((kind, shard_no))

    def load_shard(self, kind: str, shard_no: int, *, verify: bool = True, mmap: bool = True) -> np.ndarray:
        """[rows, D] array of one shard; fp16 or float32, bf16 stored as uint16 (see `as_float32`)."""
        if verify:
            self.verify_shard(kind, shard_no)
        arr = np.load(shard_path(self.path, kind, shard_no), mmap_mode="r" if mmap else None, allow_pickle=False)
        info = self.shards[shard_no]
        if arr.shape != (info["rows"], self.dim):
            raise IndexStoreError(
                f"{shard_path(self.path, kind, shard_no)}: shape {arr.shape}, manifest says ({info['rows']}, {self.dim})"
            )
        return arr

    def iter_shards(self, kind: str = "vectors", *, verify: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, array) per shard, in row order."""
        for shard_no, info in enumerate(self.shards):
            yield int(info["start"]), self.load_shard(kind, shard_no, verify=verify)

    def verify(self) -> None:
        for kind in KINDS:
            if self.has_kind(kind):
                for shard_no in range(len(self.shards)):
                    self.verify_shard(kind, shard_no)


def as_float32(block: np.ndarray, stored_dtype: str) -> np.ndarray:
    """Decode a stored block to float32 (bf16 is kept as uint16 bit patterns, the top half of fp32)."""
    if stored_dtype == "bfloat16":
        return (np.asarray(block, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(block, dtype=np.float32)


def encode_dtype(block: np.ndarray, dtype: str) -> np.ndarray:
    """float32 → stored dtype (round-to-nearest-even for bf16)."""
    block = np.ascontiguousarray(block, dtype=np.float32)
    if dtype == "float16":
        return block.astype(np.float16)
    if dtype == "float32":
        return block
    if dtype == "bfloat16":
        bits = block.view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return ((bits + rounding) >> 16).astype(np.uint16)
    raise ValueError(f"unknown dtype {dtype!r}")
