"""Corpora and query files: JSONL, Parquet and HF `datasets` directories.

Every problem with the input is reported as an `InputError` naming the file, the line (1-based,
for JSONL; the row for columnar formats) and the field, so a user can fix a 10-million-line file
without bisecting it. Readers are generators: a corpus is never held in memory whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tracestar.errors import InputError


@dataclass(frozen=True)
class Document:
    """One training document: its id, its text, and where it came from (for error messages)."""

    id: str
    text: str
    line: int


@dataclass(frozen=True)
class Query:
    """A (prompt, target) pair: the target is scored given the prompt; prompt tokens carry no loss."""

    id: str
    prompt: str
    target: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    where: str | None = field(default=None, compare=False, repr=False)  # "path:line", for error messages

    def describe(self) -> str:
        """Where the query came from, for a one-line error: `path:line` or `query 'id'`."""
        return self.where or f"query {self.id!r}"


def corpus_format(path: str | Path) -> str:
    """'jsonl', 'parquet' or 'hf' (a directory written by `datasets.Dataset.save_to_disk`)."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, None, None, "no such file or directory")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            return "hf"
        raise InputError(p, None, None, "a directory, but not one written by datasets' save_to_disk")
    if p.suffix == ".parquet":
        return "parquet"
    return "jsonl"


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line/row number, record) pairs of any supported format; records are dicts when well formed."""
    kind = corpus_format(path)
    if kind == "jsonl":
        yield from _jsonl_records(path)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for an unreadable file
            raise InputError(path, None, None, f"not a readable Parquet file ({_first_line(exc)})") from None
        row = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    else:
        yield from _hf_records(path)


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    # Bytes, decoded line by line: a bad byte is reported with its line, not as a bare traceback.
    with open(path, "rb") as fh:
        for lineno, data in enumerate(fh, start=1):
            raw = _decode_line(path, lineno, data).rstrip("\r\n")  # columns count within the line
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InputError(path, lineno, None, f"not valid JSON ({_json_problem(exc)})") from None
            yield lineno, rec


def _decode_line(path: Path, lineno: int, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is not content
    except UnicodeDecodeError as exc:
        byte = data[exc.start]
        raise InputError(path, lineno, None, f"not valid UTF-8 (byte 0x{byte:02x} at column {exc.start + 1})") from None


def _json_problem(exc: json.JSONDecodeError) -> str:
    """The decoder's message with its column: some messages already end in "at" (e.g.
    "Unterminated string starting at"), so the column is appended without a second "at"."""
    msg = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg
    return f"{msg} at column {exc.colno}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hf_records(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError(path, None, None, "reading a datasets directory needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise InputError(path, None, None, f"holds splits {sorted(ds)}; point at one split's directory")
        ds = next(iter(ds.values()))
    for row, rec in enumerate(ds, start=1):
        yield row, rec


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
    return value


def iter_documents(path: str | Path, *, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Documents in file order. A missing id defaults to the 0-based record number as a string."""
    p = Path(path)
    seen: set[str] = set()
    for index, (line, rec) in enumerate(_records(p)):
        text = _string_field(p, line, rec, text_field, required=True)
        doc_id = _string_field(p, line, rec, id_field, required=False)
        if doc_id is None:
            doc_id = str(index)
        if doc_id in seen:
            raise InputError(p, line, id_field, f"duplicate id {doc_id!r}")
        seen.add(doc_id)
        yield Document(id=doc_id, text=text, line=line)


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
    """Queries with `id`, `prompt`, `target`; other keys (e.g. `relevant`, `bucket`) go to `extra`."""
    p = Path(path)
    queries: list[Query] = []
    seen: set[str] = set()
    for index, (line, rec) in enumerate(_records(p)):
        prompt = _string_field(p, line, rec, "prompt", required=True, allow_empty=True)
        target = _string_field(p, line, rec, "target", required=True)
        qid = _string_field(p, line, rec, "id", required=False) or str(index)
        if qid in seen:
            raise InputError(p, line, "id", f"duplicate id {qid!r}")
        seen.add(qid)
        extra = {k: v for k, v in rec.items() if k not in ("id", "prompt", "target")}
        queries.append(Query(id=qid, prompt=prompt or "", target=target, extra=extra, where=f"{p}:{line}"))
    if not queries:
        raise InputError(p, None, None, "no queries")
    return queries


def write_jsonl(path: str | Path, records: list[dict] | Iterator[dict]) -> None:
    """Write records atomically: a crash leaves the old file or none, never half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(p)
