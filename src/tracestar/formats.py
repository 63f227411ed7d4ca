"""Raw records from a corpus or query file in any supported format, one at a time.

JSONL (plain, gzip or zstd, decompressed as a stream), Parquet (a file or a directory of them,
read batch by batch from one row group at a time with only the needed columns) and `datasets`
`save_to_disk` directories (memory-mapped Arrow). Formats are told apart by their first bytes
where the content says (gzip, zstd and Parquet magic), so a gzip file named `.jsonl` still reads; a
directory is a `datasets` directory if it holds `state.json`, `dataset_info.json` or
`dataset_dict.json`, else a Parquet dataset if it holds `*.parquet` files (read in sorted path
order; names starting with `_` or `.`, such as Spark's `_temporary/` and `_SUCCESS`, are skipped).

A record is yielded with its file and line (JSONL) or row within its file (columnar formats), so
`corpus.py`, which checks the fields, can name all three in an `InputError`. Damage to the
container itself (bad UTF-8, bad JSON, a cut-off compressed stream, an unreadable Parquet file)
is reported here.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from tracestar.errors import InputError

#: What `corpus_format` returns (the manifest records it).
FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf")

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PARQUET_MAGIC = b"PAR1"
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_BATCH_ROWS = 1024  # rows per Parquet / datasets batch: the unit of memory for columnar formats


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


def records(path: Path, columns: list[str] | None = None) -> Iterator[tuple[Path, int, Any]]:
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
