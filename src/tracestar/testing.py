"""Synthetic indexes for the tests and the benches: vectors written straight into the index format.

Search, compression and their benches need many indexes of known vectors, and building them from
a model would make every check slow and every recall figure depend on a model. These helpers
write the same files `tracestar index` writes (shards with their checksums, the doc table, the
manifest, through `index/writer.py`), from an array or from blocks made one shard at a time, so a
bench can write an index larger than memory. One copy here serves both, so a test and a bench
measure the same kind of data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from tracestar import files
from tracestar.index import writer
from tracestar.index.store import IndexStore, encode_dtype


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 [n, d]."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, n_q: int, *, seed: int = 0, clusters: int = 64, noise: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """(x [n, d], q [n_q, d]), unit float32 rows: documents around `clusters` random centres, and
    queries that are noisy copies of random documents — data where nearest neighbours are not a
    coin toss, so recall and rank figures mean something. Drawn in float32 (a bench draws millions)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = unit(centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d), dtype=np.float32))
    q = unit(x[rng.integers(0, n, n_q)] + 0.5 * rng.standard_normal((n_q, d), dtype=np.float32))
    return x, q


def random_unit_blocks(n: int, d: int, rows_per_block: int, *, seed: int = 0) -> Iterator[np.ndarray]:
    """n random unit rows [*, d] in blocks of `rows_per_block`, drawn one block at a time."""
    rng = np.random.default_rng(seed)
    for lo in range(0, n, rows_per_block):
        yield unit(rng.standard_normal((min(rows_per_block, n - lo), d), dtype=np.float32))


def write_index(path: str | Path, x: np.ndarray | Iterable[np.ndarray], dtype: str = "float16", shard_docs: int = 100) -> IndexStore:
    """An index at `path` whose final vectors are `x` [n, d] (cut into shards of `shard_docs` rows),
    or one shard per block when `x` is an iterable of blocks. Rows are stored as given (not
    normalized), in `dtype`; document `i` is called `doc{i}`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    whole = isinstance(x, np.ndarray)
    blocks = (x[lo : lo + shard_docs] for lo in range(0, len(x), shard_docs)) if whole else x
    shards, n, d = [], 0, None
    for s, block in enumerate(blocks):
        if block.ndim != 2 or (d is not None and block.shape[1] != d):
            raise ValueError(f"block {s} has shape {block.shape}; expected [rows, {d or 'd'}]")
        d = block.shape[1]
        sha = writer.write_shard(path, writer.VECTORS, s, encode_dtype(block, dtype))
        shards.append({"name": writer.shard_name(s), "start": n, "rows": len(block), "raw_sha256": None, "vectors_sha256": sha})
        n += len(block)
    if d is None:
        raise ValueError("no vectors to write")
    files.write_jsonl(path / writer.DOCS, ({"row": i, "doc_id": f"doc{i}", "n_tokens": 5, "truncated": False} for i in range(n)))
    writer.write_manifest(path, {"dim": d, "dtype": dtype, "unit_norm": True, "n_docs": n,
                                 "shard_docs": shard_docs if whole else shards[0]["rows"], "shards": shards})
    return IndexStore(path)
