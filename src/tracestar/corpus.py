"""Corpora and query files: JSONL (plain, gzip or zstd), Parquet and HF `datasets` directories.

Every problem with the input is reported as an `InputError` naming the file, the line (1-based,
for JSONL; the row within its file for columnar formats) and the field, so a user can fix a
10-million-line file without bisecting it.

Readers are generators that hold one line (JSONL) or one batch of rows (Parquet, `datasets`) at a
time, so memory does not grow with the corpus: compressed JSONL is decompressed as a stream,
Parquet is read batch by batch from one row group at a time with only the needed columns, and a
`datasets` directory is memory-mapped Arrow. The one thing kept per document is an 8-byte hash of
its id for the duplicate check (`_SeenIds`: 8 MB per million documents).

Formats are told apart by content where the content says (gzip, zstd and Parquet magic bytes), so
a gzip file named `.jsonl` still reads; a directory is a `datasets` directory if it holds
`state.json`, `dataset_info.json` or `dataset_dict.json`, else a Parquet dataset if it holds
`*.parquet` files (read in sorted path order; names starting with `_` or `.`, such as Spark's
`_temporary/` and `_SUCCESS`, are skipped).
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from tracestar.errors import InputError, UserError
from tracestar.files import write_jsonl  # noqa: F401 (re-exported: corpora, queries and results are written atomically)

#: What `corpus_format` returns (the manifest records it).
FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf")

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PARQUET_MAGIC = b"PAR1"
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_BATCH_ROWS = 1024  # rows per Parquet / datasets batch: the unit of memory for columnar formats
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape them ("\ud800"); UTF-8 cannot hold them


@dataclass(frozen=True)
class Document:
    """One training document: its id, its text, and where it came from (for error messages)."""

    id: str
    text: str
    line: int  # the line (JSONL) or the row within its file (Parquet, datasets), 1-based


@dataclass(frozen=True)
class Query:
    """A (prompt, target) pair: the target is scored given the prompt; prompt tokens carry no loss."""

    id: str
    prompt: str
    target: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    where: str | None = field(default=None, compare=False, repr=False)  # "path:line", for error messages

    def __post_init__(self) -> None:
        # A query built in Python skips the file checks; the tokenizer would fail with a traceback
        # on these, so they are refused here, named by the query.
        for name in ("prompt", "target"):
            value = getattr(self, name)
            problem = f"expected a string, got {type(value).__name__}" if not isinstance(value, str) else _surrogate(value)
            if problem:
                raise UserError(f"{self.describe()}: field '{name}': {problem}")

    def describe(self) -> str:
        """Where the query came from, for a one-line error: `path:line` or `query 'id'`."""
        return self.where or f"query {self.id!r}"


# --- which format ---------------------------------------------------------------------------------


def corpus_format(path: str | Path) -> str:
    """One of `FORMATS`: 'jsonl', 'jsonl.gz', 'jsonl.zst', 'parquet' (a file or a directory of
    them) or 'hf' (a directory written by `datasets.Dataset.save_to_disk`)."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, None, None, "no such file or directory")
    if p.is_dir():
        if any((p / marker).exists() for marker in _HF_MARKERS):
            return "hf"
        if _parquet_files(p):
            return "parquet"
        raise InputError(p, None, None, "a directory, but neither one written by datasets' save_to_disk "
                                        "nor one holding *.parquet files")
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head.startswith(_GZIP_MAGIC):
        return "jsonl.gz"
    if head.startswith(_ZSTD_MAGIC):
        return "jsonl.zst"
    if head.startswith(_PARQUET_MAGIC) or p.suffix == ".parquet":
        return "parquet"
    if p.suffix in (".gz", ".zst", ".zstd"):
        kind = "gzip" if p.suffix == ".gz" else "zstd"
        raise InputError(p, None, None, f"named {p.suffix} but does not start like {kind} data")
    return "jsonl"


def _parquet_files(directory: Path) -> list[Path]:
    """The directory's Parquet files in sorted path order, skipping `_x` / `.x` names at any depth
    (writers' temporary and marker files)."""
    found = []
    for f in directory.rglob("*.parquet"):
        parts = f.relative_to(directory).parts
        if f.is_file() and not any(part.startswith(("_", ".")) for part in parts):
            found.append(f)
    return sorted(found, key=lambda f: f.relative_to(directory).as_posix())


def _records(path: Path, columns: list[str] | None = None) -> Iterator[tuple[Path, int, Any]]:
    """(file, line or row, record) of any supported format; records are dicts when well formed.

    `columns`: the fields the caller reads (columnar formats read only those; None reads all).
    """
    kind = corpus_format(path)
    if kind.startswith("jsonl"):
        yield from _jsonl_records(path, kind)
    elif kind == "parquet":
        for file in _parquet_files(path) if path.is_dir() else [path]:
            yield from _parquet_records(file, columns)
    else:
        yield from _hf_records(path, columns)


# --- JSONL, plain or compressed ---------------------------------------------------------------------


def _jsonl_records(path: Path, kind: str) -> Iterator[tuple[Path, int, Any]]:
    # Bytes, decoded line by line: a bad byte is reported with its line, not as a bare traceback.
    for lineno, data in _lines(path, kind):
        raw = _decode_line(path, lineno, data).rstrip("\r\n")  # columns count within the line
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(path, lineno, None, f"not valid JSON ({_json_problem(exc)})") from None
        except RecursionError:
            raise InputError(path, lineno, None, "JSON nested too deeply to read") from None
        except ValueError as exc:  # e.g. an integer beyond Python's digit limit
            raise InputError(path, lineno, None, f"not valid JSON ({_first_line(exc)})") from None
        yield path, lineno, rec


def _lines(path: Path, kind: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a JSONL file; a truncated or corrupt compressed stream is an
    `InputError` naming the line it broke off in, never a silently shorter corpus."""
    with _open_binary(path, kind) as fh:
        lineno = 0
        try:
            for data in fh:
                lineno += 1
                yield lineno, data
        except Exception as exc:  # noqa: BLE001 - gzip's OSError/EOFError, zlib.error, zstd's own: no common base
            what = {"jsonl.gz": "gzip", "jsonl.zst": "zstd"}.get(kind, "file")
            raise InputError(path, lineno + 1, None, f"truncated or corrupt {what} data ({_first_line(exc)})") from None


def _open_binary(path: Path, kind: str) -> BinaryIO:
    if kind == "jsonl.gz":
        return gzip.open(path, "rb")
    if kind == "jsonl.zst":
        return _open_zstd(path)
    return open(path, "rb")


def _open_zstd(path: Path) -> BinaryIO:
    """A zstd stream: the standard library's reader on Python ≥ 3.14, else the `zstandard` package."""
    try:
        from compression import zstd  # Python ≥ 3.14

        return zstd.open(path, "rb")  # pragma: no cover - depends on the Python version
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise InputError(path, None, None, "reading zstd needs the zstandard package "
                                           "(pip install 'tracestar[zstd]') or Python 3.14+") from None
    return io.BufferedReader(_ZstdFrames(open(path, "rb"), zstandard), buffer_size=1 << 20)


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of every frame in a zstd file, read in chunks. `zstandard`'s own stream
    reader ends quietly where a file was cut off; this raises `EOFError` instead, as gzip does."""

    CHUNK = 1 << 20

    def __init__(self, raw: BinaryIO, zstandard: Any):
        self._raw, self._zstd = raw, zstandard
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""  # decompressed, not yet returned
        self._mid_frame = False  # bytes of a frame were fed and its end not seen

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._raw.read(self.CHUNK)
            if not chunk:
                if self._mid_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._pending = self._feed(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _feed(self, chunk: bytes) -> bytes:
        """Decompress `chunk`, starting a new frame wherever one ends inside it."""
        out = []
        while chunk:
            out.append(self._obj.decompress(chunk))
            self._mid_frame = not self._obj.eof
            chunk = self._obj.unused_data if self._obj.eof else b""
            if self._obj.eof:
                self._obj = self._zstd.ZstdDecompressor().decompressobj()
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _decode_line(path: Path, lineno: int, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is not content
    except UnicodeDecodeError as exc:
        byte = data[exc.start]
        raise InputError(path, lineno, None, f"not valid UTF-8 (byte 0x{byte:02x} at column {exc.start + 1})") from None


def _json_problem(exc: json.JSONDecodeError) -> str:
    """The decoder's message with its column: some messages already end in "at" (e.g.
    "Unterminated string starting at"), so the column is appended without a second "at"."""
    msg = exc.msg.removesuffix(" at")
    return f"{msg} at column {exc.colno}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- columnar formats -----------------------------------------------------------------------------


def _parquet_records(file: Path, columns: list[str] | None) -> Iterator[tuple[Path, int, Any]]:
    """Rows of one Parquet file, `_BATCH_ROWS` at a time, reading only `columns` (when given)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for an unreadable file
        raise InputError(file, None, None, f"not a readable Parquet file ({_first_line(exc)})") from None
    wanted = None if columns is None else [c for c in columns if c in names]
    if wanted == []:  # none of the fields: the first row shows what is missing
        if parquet.metadata.num_rows:
            yield file, 1, {}
        return
    row, batches = 0, parquet.iter_batches(batch_size=_BATCH_ROWS, columns=wanted)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - a corrupt page or row group
            raise InputError(file, row + 1, None, f"unreadable Parquet data ({_first_line(exc)})") from None
        for rec in batch.to_pylist():
            row += 1
            yield file, row, rec


def _hf_records(path: Path, columns: list[str] | None) -> Iterator[tuple[Path, int, Any]]:
    """Rows of a `save_to_disk` directory (memory-mapped Arrow), `_BATCH_ROWS` at a time."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError(path, None, None, "reading a datasets directory needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - missing or damaged files, each its own error type
        raise InputError(path, None, None, f"not a readable datasets directory ({_first_line(exc)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise InputError(path, None, None, f"holds splits {sorted(ds)}; point at one split's directory")
        ds = next(iter(ds.values()))
    wanted = None if columns is None else [c for c in columns if c in ds.column_names]
    if wanted == []:
        if ds.num_rows:
            yield path, 1, {}
        return
    if wanted is not None:
        ds = ds.select_columns(wanted)
    row = 0
    for batch in ds.iter(batch_size=_BATCH_ROWS):  # {column: [values]}
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            row += 1
            yield path, row, dict(zip(keys, values))


# --- fields and ids -------------------------------------------------------------------------------


def _string_field(path: Path, line: int, rec: Any, name: str, *, required: bool, allow_empty: bool = False) -> str | None:
    if not isinstance(rec, dict):
        raise InputError(path, line, None, f"expected a JSON object, got {type(rec).__name__}")
    if name not in rec or rec[name] is None:
        if required:
            raise InputError(path, line, name, "missing")
        return None
    value = rec[name]
    if isinstance(value, (int,)) and not isinstance(value, bool) and name != "text":
        value = str(value)
    if not isinstance(value, str):
        raise InputError(path, line, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputError(path, line, name, "empty")
    problem = _surrogate(value)
    if problem:
        raise InputError(path, line, name, problem)
    return value


def _surrogate(value: str) -> str | None:
    """Why `value` cannot be text (a lone surrogate, which JSON can escape but UTF-8 cannot hold)."""
    bad = None if value.isascii() else _SURROGATE.search(value)
    if bad is None:
        return None
    return f"holds a lone surrogate (\\u{ord(bad.group()):04x} at character {bad.start() + 1}), which no UTF-8 text can"


class _SeenIds:
    """Ids read so far, as 64-bit hashes: the latest `FLUSH` in a set, the rest in one sorted
    uint64 array — 8 bytes an id, so a million ids take 8 MB rather than the ~100 MB of a set of
    strings. An id costs one set lookup; every `FLUSH` ids the batch is checked against the array
    at once. Two ids can share a hash, so a hit is only a suspect: the caller confirms it by
    reading the file again (a hit is an error, or very rarely a collision)."""

    FLUSH = 8192

    def __init__(self) -> None:
        self._recent: set[int] = set()
        self._older = np.empty(0, dtype=np.uint64)  # sorted

    def add(self, key: str) -> bool:
        """Whether `key`'s hash is among the ids since the last flush (then it is not added)."""
        h = _hash(key)
        if h in self._recent:
            return True
        self._recent.add(h)
        return False

    @property
    def full(self) -> bool:
        return len(self._recent) >= self.FLUSH

    def flush(self) -> set[int]:
        """Move the batch into the array; the batch's hashes that the array already held."""
        fresh = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        self._recent = set()  # freed before the copy below, which is the peak
        at = np.minimum(np.searchsorted(self._older, fresh), max(len(self._older) - 1, 0))
        suspects = {int(h) for h in fresh[self._older[at] == fresh]} if len(self._older) else set()
        merged = np.concatenate([self._older, fresh])  # 16 bytes an id while both exist
        merged.sort(kind="stable")  # a sorted run and a short one: timsort merges them
        self._older = merged
        return suspects


def _hash(key: str) -> int:
    return hash(key) & 0xFFFF_FFFF_FFFF_FFFF  # stable within a process, which is all a pass needs


def _documents(path: Path, text_field: str, id_field: str) -> Iterator[tuple[Path, Document]]:
    """(file, document) in file order, without the duplicate check."""
    for index, (file, line, rec) in enumerate(_records(path, [text_field, id_field])):
        text = _string_field(file, line, rec, text_field, required=True)
        doc_id = _string_field(file, line, rec, id_field, required=False)
        yield file, Document(id=str(index) if doc_id is None else doc_id, text=text, line=line)


def iter_documents(path: str | Path, *, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Documents in file order. A missing id defaults to the 0-based record number as a string.

    A duplicate id raises naming both lines; one whose first copy is more than `_SeenIds.FLUSH`
    documents back is found up to that many documents late (`validate_corpus` reads to the end
    before anything is built, so a build never sees one).
    """
    p = Path(path)
    seen = _SeenIds()
    count = 0
    for file, doc in _documents(p, text_field, id_field):
        count += 1
        if seen.add(doc.id):
            _raise_duplicate(p, text_field, id_field, {_hash(doc.id)}, count)
        if seen.full:
            _raise_duplicate(p, text_field, id_field, seen.flush(), count)
        yield doc
    _raise_duplicate(p, text_field, id_field, seen.flush(), count)


def _raise_duplicate(path: Path, text_field: str, id_field: str, suspects: set[int], upto: int) -> None:
    """Read the first `upto` documents again and raise on the first id among `suspects` hashes
    that repeats; return if none does (the hashes collided)."""
    if not suspects:
        return
    first: dict[str, tuple[Path, int]] = {}
    for index, (file, doc) in enumerate(_documents(path, text_field, id_field)):
        if index >= upto:
            return
        if _hash(doc.id) not in suspects:
            continue
        if doc.id in first:
            at_file, at_line = first[doc.id]
            where = at_line if at_file == file else f"{at_file}:{at_line}"
            raise InputError(file, doc.line, id_field, f"duplicate id {doc.id!r} (first at {where})")
        first[doc.id] = (file, doc.line)


def validate_corpus(path: str | Path, *, text_field: str = "text", id_field: str = "id") -> int:
    """Read the whole corpus once, raising on the first bad record; returns the document count.

    Done before anything is written, so bad input never leaves a half-built index behind.
    """
    n = 0
    for _ in iter_documents(path, text_field=text_field, id_field=id_field):
        n += 1
    if n == 0:
        raise InputError(Path(path), None, None, "no documents")
    return n


def read_queries(path: str | Path) -> list[Query]:
    """Queries with `id`, `prompt`, `target`; other keys (e.g. `relevant`, `bucket`) go to `extra`.

    Any corpus format is accepted; queries are few, so they are returned as a list."""
    p = Path(path)
    queries: list[Query] = []
    seen: dict[str, str] = {}
    for index, (file, line, rec) in enumerate(_records(p)):
        prompt = _string_field(file, line, rec, "prompt", required=True, allow_empty=True)
        target = _string_field(file, line, rec, "target", required=True)
        qid = _string_field(file, line, rec, "id", required=False) or str(index)
        if qid in seen:
            raise InputError(file, line, "id", f"duplicate id {qid!r} (first at {seen[qid]})")
        seen[qid] = f"{file}:{line}"
        extra = {k: v for k, v in rec.items() if k not in ("id", "prompt", "target")}
        queries.append(Query(id=qid, prompt=prompt or "", target=target, extra=extra, where=f"{file}:{line}"))
    if not queries:
        raise InputError(p, None, None, "no queries")
    return queries


def texts_by_id(path: str | Path, ids: Iterable[str], *, text_field: str = "text", id_field: str = "id",
                allow_missing: bool = False) -> dict[str, str]:
    """doc_id -> text for the wanted ids: one streaming pass that stops once all are found.

    The one lookup of document texts (evaluation, explain, the report and the web app use it). An
    id that the file does not hold means the corpus changed since it was indexed: that is an
    error naming the file and the first missing ids, never a silently shorter answer, unless the
    caller reports each document on its own (`allow_missing`, as `explain_pairs` does).
    """
    wanted = {str(i) for i in ids}
    found: dict[str, str] = {}
    if wanted:
        for doc in iter_documents(path, text_field=text_field, id_field=id_field):
            if doc.id in wanted:
                found[doc.id] = doc.text
                if len(found) == len(wanted):
                    break
    missing = wanted - found.keys()
    if missing and not allow_missing:
        raise UserError(f"{path}: {len(missing)} document id(s) not in the corpus, e.g. {sorted(missing)[:3]}")
    return found


def indexed_texts(spec: dict, index_dir: str | Path, ids: Iterable[str], *, allow_missing: bool = False) -> dict[str, str]:
    """`texts_by_id` on the corpus an index's manifest names (`spec` = manifest["corpus"]).

    A relative corpus path is also tried beside the index, so an index moved with its corpus
    still finds it.
    """
    path = Path(spec["path"])
    if not path.exists() and (Path(index_dir) / path).exists():
        path = Path(index_dir) / path
    if not path.exists():
        raise UserError(f"{path}: the index's corpus is missing (document texts are read from it)")
    kw = {k: spec[k] for k in ("text_field", "id_field") if spec.get(k)}
    return texts_by_id(path, ids, allow_missing=allow_missing, **kw)
