"""Writing files so that a reader sees the old file or the new one, never half of one; sha256 of a file.

Every module that writes (index shards and sidecars, manifests, V and R, doc tables, results,
training logs, metrics) goes through `replacing`: the bytes go to a temporary name beside the
target (`<name>.tmp-<pid>`, the one convention, so a resumed build can find and clear what a
killed writer left), are synced to disk, and are renamed over the target in one `os.replace`.
A writer that raises removes its temporary file, so an error leaves nothing half-written behind.

`before_replace` is the one seam for simulating faults (a full disk, a kill between write and
rename): tests set it to a function of (temporary path, target) that raises.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

#: The marker in every temporary name: `<name>.tmp-<pid>`.
TMP_MARK = ".tmp-"


def _no_fault(tmp: Path, target: Path) -> None:
    return None


#: Called with (temporary path, target) after the bytes are synced and before the rename.
#: Tests replace it to inject a fault; whatever it raises propagates after the temp is removed.
before_replace: Callable[[Path, Path], None] = _no_fault


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (one name per process)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is synced and renamed over `path`.

    For writers that take a file name (safetensors, faiss). On any exception the temporary
    file is removed and `path` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        before_replace(tmp, target)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename in (None, str(tmp)):  # a full disk fails in write() or fsync(), which name no file
            raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """An open file whose contents replace `path` when the block ends without an error.

    Text modes write UTF-8 with "\\n" line ends on every platform, so equal inputs give equal bytes.
    """
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    with replacing(path) as tmp, open(tmp, mode, **text) as fh:
        yield fh


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_json(path: str | Path, obj: Any, *, ensure_ascii: bool = True) -> None:
    """Indented JSON and a final newline (the layout of every JSON file tracestar writes)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=ensure_ascii) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """One JSON object per line, non-ASCII kept as is; `records` may be a generator (streamed)."""
    with atomic_open(path, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_npy(path: str | Path, array: np.ndarray) -> str:
    """One `.npy` (no pickles); returns its sha256, which callers record as a checksum."""
    with atomic_open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
    return sha256_file(path)


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """`tensors` ({name: torch.Tensor}) as one safetensors file, the same bytes on every write.

    safetensors writes its metadata map in hash order, so a map of two or more keys gives
    different bytes from one write to the next (and a checksum that no rerun reproduces). The
    metadata is therefore stored as one key, `tracestar`, holding the map as sorted JSON.
    """
    from safetensors.torch import save_file

    folded = {"tracestar": json.dumps(metadata, sort_keys=True)} if metadata else None
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=folded)


def remove_temporaries(root: str | Path, name: str = "*") -> int:
    """Delete the temporary files (of targets matching `name`) that killed writers left anywhere
    under `root`; returns how many.

    Only for places where no other writer of `root` runs (a command's start), so every temporary
    file there is a dead process's: a file is finished only under its final name, and without
    this its temporaries would stay forever.
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    leftovers = [p for p in root.rglob(f"{name}{TMP_MARK}*") if p.is_file()]
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks (memory independent of its size)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
