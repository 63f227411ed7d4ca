"""Reading an index: a directory anyone can open with numpy (format in docs/ARCHITECTURE.md).

Why this shape: vector shards are plain `.npy` (memory-mappable, no custom reader), each written
under a temporary name and renamed when complete, and the manifest — written last — lists every
shard with its row count and sha256. So an interrupted build never leaves a file that looks
complete, a corrupted shard is detected, and a finished shard can be trusted on resume.

This module reads; `index/writer.py` writes and names every file.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import numpy as np

from tracestar.errors import IndexStoreError, UserError
from tracestar.files import sha256_file
from tracestar.index.writer import (
    COMPRESSED_FORMS,
    DOCS,
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    MANIFEST_DIGEST,
    manifest_digest,
    shard_path,
)


def read_manifest(index_dir: str | Path) -> dict:
    path = Path(index_dir) / MANIFEST
    if not Path(index_dir).is_dir():
        raise IndexStoreError(f"{index_dir}: no such index directory")
    if not path.exists():
        raise IndexStoreError(f"{index_dir}: not a tracestar index (no {MANIFEST}; an unfinished build?)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise IndexStoreError(f"{path}: unreadable manifest ({exc.msg}); rerun the build to repair it") from None
    except UnicodeDecodeError:
        raise IndexStoreError(f"{path}: unreadable manifest (not UTF-8); rerun the build to repair it") from None
    if not isinstance(manifest, dict):
        raise IndexStoreError(f"{path}: unreadable manifest (not a JSON object); rerun the build to repair it")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexStoreError(f"{path}: format_version {version!r}, this tracestar reads {FORMAT_VERSION}")
    _check_digest(path, manifest)
    _check_paths(path, manifest)
    return manifest


def _check_digest(path: Path, manifest: dict) -> None:
    """Refuse a manifest whose content no longer matches its own sha256.

    Every manifest that lists `checksums` is written with its digest, so one without it has lost
    it (a flipped bit in the key's name) and is refused too; hand-made manifests of tests and
    older indexes list no checksums and are read as they are.
    """
    digest = manifest.get(MANIFEST_DIGEST)
    if digest is None and "checksums" not in manifest:
        return
    if digest != manifest_digest(manifest):
        raise IndexStoreError(f"{path}: checksum mismatch — the manifest is corrupted; rerun the build to repair it")


def _check_paths(path: Path, manifest: dict) -> None:
    """Refuse a manifest that names a file outside its index directory (`../x`, an absolute path).

    Reading such a file would vouch for another directory's bytes, and a repair deletes damaged
    files by these names; so neither reads nor deletes outside the index.
    """
    for field, rel in _named_paths(manifest):
        if not _inside(rel):
            raise IndexStoreError(f"{path}: {field} names {rel!r}, outside the index directory; refusing it")


def _named_paths(manifest: dict) -> Iterator[tuple[str, object]]:
    """(field, relative path) of every file name the manifest gives."""
    for i, info in enumerate(manifest.get("shards") or []):
        yield f"shards[{i}].name", info.get("name") if isinstance(info, dict) else info
    for rel in manifest.get("checksums") or {}:
        yield "checksums", rel
    for key, rel in (manifest.get("files") or {}).items():
        yield f"files.{key}", rel
    for form, entry in (manifest.get("compressed") or {}).items():
        if isinstance(entry, dict) and "path" in entry:
            yield f"compressed.{form}.path", entry["path"]
        for i, info in enumerate(entry.get("shards") or [] if isinstance(entry, dict) else []):
            yield f"compressed.{form}.shards[{i}].name", info.get("name") if isinstance(info, dict) else info


def _inside(rel: object) -> bool:
    """Whether `rel` is a relative path that stays inside the directory it is joined to."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    pure = PurePosixPath(rel)
    return not pure.is_absolute() and ".." not in pure.parts and not PureWindowsPath(rel).drive


@dataclass
class DocRow:
    """One row of docs.jsonl: a document, or with `--chunk-tokens` one window of it.

    chunk/start/end: the window's number in its document and its token positions [start, end)
    (None for a whole document). nonfinite: the row's gradient was NaN or inf, so its stored
    vectors are zeros (score 0 for every query) and R's statistics left it out.
    """

    row: int
    doc_id: str
    n_tokens: int
    truncated: bool
    chunk: int | None = None
    start: int | None = None
    end: int | None = None
    nonfinite: bool = False

    @property
    def key(self) -> str | tuple[str, int]:
        """What names this row in results and explanations: the doc id, or (doc id, chunk)."""
        return self.doc_id if self.chunk is None else (self.doc_id, self.chunk)

    def hit(self, score: float) -> dict:
        """A result entry: {"doc_id", "score"}, a chunk's with its span {"chunk", "start", "end"} too."""
        span = {} if self.chunk is None else {"chunk": self.chunk, "start": self.start, "end": self.end}
        return {"doc_id": self.doc_id, **span, "score": score}


def read_doc_table(index_dir: str | Path) -> list[DocRow]:
    rows = []
    with open(Path(index_dir) / DOCS, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            rows.append(DocRow(rec["row"], rec["doc_id"], rec["n_tokens"], rec["truncated"], rec.get("chunk"),
                               rec.get("start"), rec.get("end"), bool(rec.get("nonfinite", False))))
    return rows


#: How a refused file is named in the error (anything else in `checksums` is a sidecar or a "file").
_LISTED_WHAT = {"normalizer.safetensors": "normalizer (V)", "normalizer.json": "normalizer description",
                "preconditioner.safetensors": "preconditioner (R)", "preconditioner.json": "preconditioner description",
                DOCS: "doc table"}

def _nofile_limit() -> int:
    """The soft limit on open file descriptors (256 where the platform cannot say)."""
    try:
        import resource

        soft = int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return 256
    return soft if soft >= 0 else 1 << 20  # RLIM_INFINITY is -1


# Shard memory maps a store keeps open for `gather` (each holds a file descriptor). A re-rank
# gathers each query's rows shard by shard in row order, so an LRU of fewer maps than the shards
# one query touches drops every map before its next use: at 1M rows (245 shards, ~140 touched
# per query) 64 maps meant ~9,000 reopenings per batch of 64 queries, most of an int8 search's
# time. So: up to 1,024 maps, at most a quarter of the process's descriptor limit.
_MAPS_KEPT = max(64, min(1024, _nofile_limit() // 4))


class IndexStore:
    """Read access to a finished index: manifest, doc table, shards (memory-mapped, verified).

    Every read of stored rows goes through `load_shard` (a whole shard, streamed by the scans) or
    `gather` (given rows: re-scoring, explain, sampling), and every checksum through `verify_file`,
    which checks each file once per store; so a corrupted file is refused on whichever path reads
    it first, and never hashed twice.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._docs: list[DocRow] | None = None
        self._rows: dict[str | tuple[str, int], int] | None = None
        self._chunks: dict[str, int] | None = None
        # (file, sha256) checked against the manifest → the identity of the file that was checked
        self._verified: dict[tuple[str, str], tuple[int, int] | None] = {}
        self._maps: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()  # recently gathered shards
        self._maps_lock = threading.Lock()  # `gather` runs on several threads at once
        self.verify_listed()

    def verify_listed(self) -> None:
        """Check every file of the manifest's `checksums` (V, R, their descriptions, the doc table,
        the shards' sidecars) before anything reads one.

        These are small beside the shards (which are checked when a search first reads them), and
        V, R and the doc table are read whole by every query; a sidecar no query reads is still a
        damaged index, which is refused rather than half trusted.
        """
        for rel, sha in sorted((self.manifest.get("checksums") or {}).items()):
            self.verify_file(self.path / rel, sha, what=_LISTED_WHAT.get(rel, "shard sidecar" if "/" in rel else "file"),
                             remedy="rerun the `tracestar index` command that built it to repair it")

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

    @property
    def chunked(self) -> bool:
        """Whether rows are token windows of documents (`--chunk-tokens`)."""
        return self.manifest.get("chunking") is not None

    def row_of(self, doc_id: str, chunk: int | None = None) -> int | None:
        """The row holding `doc_id` (its window `chunk` in a chunked index), or None; a dict built
        once per store. A document that is a single window is found without its chunk number."""
        if self._rows is None:
            self._rows = {d.key: d.row for d in self.docs}
            self._rows.update({d.doc_id: d.row for d in self.docs if d.chunk == 0 and (d.doc_id, 1) not in self._rows})
        return self._rows.get(doc_id if chunk is None else (doc_id, chunk))

    def chunks_of(self, doc_id: str) -> int:
        """How many rows (windows) hold `doc_id`: 1 for a document not split, 0 when absent."""
        if self._chunks is None:
            self._chunks = {}
            for d in self.docs:
                self._chunks[d.doc_id] = self._chunks.get(d.doc_id, 0) + 1
        return self._chunks.get(doc_id, 0)

    @property
    def shards(self) -> list[dict]:
        return list(self.manifest["shards"])

    @property
    def shard_starts(self) -> np.ndarray:
        """[S] int64 first global row of each shard (ascending)."""
        return np.array([int(s["start"]) for s in self.manifest["shards"]], dtype=np.int64)

    def has_kind(self, kind: str) -> bool:
        return all(s.get(f"{kind}_sha256") for s in self.shards)

    def require_kind(self, kind: str) -> None:
        """Refuse a search of `kind` shards the index does not have (saying why when they were dropped)."""
        if not self.has_kind(kind):
            dropped = (self.manifest.get("compressed") or {}).get("exact_dropped")
            why = " (dropped by `tracestar compress --drop-exact`; search the compressed form)" if dropped else ""
            raise IndexStoreError(f"{self.path}: no {kind}/ shards in this index{why}")

    def stored_dtype(self, kind: str) -> str:
        """How `kind` rows are stored: raw rows as --raw-dtype kept them (float32 before it existed);
        final vectors the manifest's dtype."""
        if kind == "raw":
            return str(self.manifest.get("raw_dtype", "float32"))
        return str(self.manifest.get("dtype", "float16"))

    def check_queries(self, queries: np.ndarray) -> np.ndarray:
        """Query vectors as every search reads them: C-contiguous float32 [Q, D] (one vector → Q = 1)."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(f"query vectors have shape {tuple(q.shape)}, the index has dim {self.dim}")
        if not np.isfinite(q).all():
            raise UserError("query vectors contain NaN or inf")
        return q

    def compressed_forms(self) -> list[str]:
        """The compressed forms this index has ("int8", "pq"), in `COMPRESSED_FORMS` order."""
        comp = self.manifest.get("compressed") or {}
        return [f for f in COMPRESSED_FORMS if f in comp]

    def default_form(self) -> str | None:
        """The compressed form a search uses unless told otherwise: the manifest's default, else the first."""
        forms = self.compressed_forms()
        if not forms:
            return None
        default = (self.manifest.get("compressed") or {}).get("default")
        return default if default in forms else forms[0]

    def search_form(self, *, exact: bool = False, rerank: int | None = None) -> tuple[str, bool]:
        """(form, exact scores) that `tracestar query` searches with these options.

        form: "exact" (the full-precision `vectors/` scan) or the compressed form it scans for
        candidates, "int8" or "pq" (the manifest's default one). exact scores: whether the returned
        scores are exact — always for "exact"; for a compressed form when its candidates are
        re-scored from `vectors/` (present, and `rerank` is not 0). `index.search.search` decides
        with this.
        """
        form = self.default_form()
        if exact or form is None:
            return "exact", True
        return form, rerank != 0 and self.has_kind("vectors")

    def verify_file(self, path: Path, sha256: str, *, what: str, remedy: str) -> None:
        """Check one file the manifest lists against its sha256, once per store.

        what: the file as the error names it ("shard", "compressed shard"…); remedy: how to
        repair it. A missing file and a mismatch each raise one line naming the path.
        """
        key = (str(path), sha256)
        if key in self._verified:
            return
        if not path.exists():
            raise IndexStoreError(f"{path}: missing {what} listed in the manifest")
        checked = _identity(path)
        if sha256_file(path) != sha256:
            raise IndexStoreError(f"{path}: checksum mismatch — the {what} is corrupted; {remedy}")
        self._verified[key] = checked
        self.check_unchanged(path, sha256)

    def check_unchanged(self, path: Path, sha256: str) -> None:
        """Refuse a verified file that has since been replaced (a build rewriting the index in
        place): what was read is then not what was checked. tracestar replaces a file only by a
        rename, so the same inode is the file that was checked."""
        if _identity(path) != self._verified.get((str(path), sha256)):
            raise IndexStoreError(f"{path}: replaced while this index was read (a build is writing it); query again")

    def verify_shard(self, kind: str, shard_no: int) -> None:
        """Checksum one shard against the manifest (once per store)."""
        sha = self.shards[shard_no][f"{kind}_sha256"]
        self.verify_file(shard_path(self.path, kind, shard_no), sha, what="shard", remedy="rebuild it")

    def load_shard(self, kind: str, shard_no: int, *, verify: bool = True, mmap: bool = True) -> np.ndarray:
        """[rows, D] array of one shard; fp16 or float32, bf16 stored as uint16 (see `as_float32`)."""
        if verify:
            self.verify_shard(kind, shard_no)
        arr = np.load(shard_path(self.path, kind, shard_no), mmap_mode="r" if mmap else None, allow_pickle=False)
        info = self.shards[shard_no]
        if verify:  # after the open: the bytes mapped are the ones checked, or the file was replaced
            self.check_unchanged(shard_path(self.path, kind, shard_no), info[f"{kind}_sha256"])
        if arr.shape != (info["rows"], self.dim):
            raise IndexStoreError(
                f"{shard_path(self.path, kind, shard_no)}: shape {arr.shape}, manifest says ({info['rows']}, {self.dim})"
            )
        return arr

    def _mapped(self, kind: str, shard_no: int, verify: bool) -> np.ndarray:
        """One shard's memory map, kept for the next `gather` (opening one costs ~0.1 ms, as much
        as gathering a hundred rows from it); at most `_MAPS_KEPT`, least recently used dropped."""
        if verify:
            self.verify_shard(kind, shard_no)
        key = (kind, shard_no)
        with self._maps_lock:
            arr = self._maps.get(key)
            if arr is not None:
                self._maps.move_to_end(key)
                return arr
        arr = self.load_shard(kind, shard_no, verify=False)
        with self._maps_lock:
            self._maps[key] = arr
            while len(self._maps) > _MAPS_KEPT:
                self._maps.popitem(last=False)
        return arr

    def gather(self, kind: str, rows: np.ndarray, *, verify: bool = True) -> np.ndarray:
        """[n, D] the stored rows at global row numbers `rows` [n] (any order, repeats allowed).

        Stored encoding, as `load_shard` gives it (fp16 / float32; bf16 as uint16 bit patterns:
        decode with `as_float32`). Sorted rows read each shard's pages in order. Raises
        IndexError for a row outside the index.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            bad = int(rows.min()) if rows.min() < 0 else int(rows.max())
            raise IndexError(f"{self.path}: row {bad} is outside the index's {self.n_rows} rows")
        starts = self.shard_starts
        shard_of = np.searchsorted(starts, rows, side="right") - 1  # [n]
        used = np.unique(shard_of)
        if used.size <= 1:  # the common case: one fancy-index read, no copy into `out`
            s = int(used[0]) if used.size else 0
            return self._mapped(kind, s, verify)[rows - starts[s]]
        first = self._mapped(kind, int(used[0]), verify)
        out = np.empty((rows.size, self.dim), dtype=first.dtype)
        for s in used.tolist():
            sel = shard_of == s
            out[sel] = self._mapped(kind, s, verify)[rows[sel] - starts[s]]
        return out

    def iter_shards(self, kind: str = "vectors", *, verify: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, array) per shard, in row order."""
        for shard_no, info in enumerate(self.shards):
            yield int(info["start"]), self.load_shard(kind, shard_no, verify=verify)

    def verify(self) -> None:
        for kind in KINDS:
            if self.has_kind(kind):
                for shard_no in range(len(self.shards)):
                    self.verify_shard(kind, shard_no)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a file: another when a rename replaces it; None when it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


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
