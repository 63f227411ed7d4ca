"""Corpora and query files: JSONL (plain, gzip or zstd), Parquet and HF `datasets` directories.

Every problem with the input is reported as an `InputError` naming the file, the line (1-based,
for JSONL; the row within its file for columnar formats) and the field, so a user can fix a
10-million-line file without bisecting it.

Documents and queries are built from the raw records of `formats.py`, which reads every format
as a stream (one line, or one batch of rows, at a time), so memory does not grow with the corpus.
The one thing kept per document is an 8-byte hash of its id for the duplicate check (`_SeenIds`:
8 MB per million documents).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from tracestar.errors import InputError, UserError
from tracestar.files import write_jsonl  # noqa: F401 (re-exported: corpora, queries and results are written atomically)
from tracestar.formats import FORMATS, corpus_format, records  # noqa: F401 (re-exported)

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
    for index, (file, line, rec) in enumerate(records(path, [text_field, id_field])):
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
    for index, (file, line, rec) in enumerate(records(p)):
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
