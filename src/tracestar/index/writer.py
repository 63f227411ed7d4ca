"""The index as it is written: every file name, shard sidecars, resume, repair, the manifest.

An index directory (the format is in docs/ARCHITECTURE.md):

    build.json                         the options that fix the bytes, written first
    normalizer.safetensors + .json     V
    raw/shard-NNNNN.npy + .json        g per document (float32) and its sidecar
    preconditioner.safetensors + .json R^{-1/2}
    vectors/shard-NNNNN.npy + .json    the final vectors and their sidecar
    docs.jsonl                         the doc table
    compressed/int8/…, compressed/pq.faiss   compressed forms (`tracestar compress`)
    manifest.json                      written last: the index is finished when it exists

Why sidecars: each shard's `.json` is written after its `.npy` and holds the `.npy`'s sha256, so
a shard is done exactly when its sidecar exists and the bytes still match it (`done`). A killed
build therefore resumes to the same bytes, and a rerun on a finished index verifies every file
the manifest lists and removes the damaged ones and what was computed from them (`repair.py`).
Only the owner rank of a shard writes it or clears what an interrupted writer left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tracestar import dist, files
from tracestar.errors import IndexStoreError, UserError
from tracestar.progress import PhaseTimer, loop_bars, say

FORMAT_VERSION = 1
BUILD_FILE = "build.json"
MANIFEST = "manifest.json"
DOCS = "docs.jsonl"
RAW = "raw"
VECTORS = "vectors"
KINDS = (RAW, VECTORS)
NORMALIZER = "normalizer.safetensors"
NORMALIZER_INFO = "normalizer.json"
PRECONDITIONER = "preconditioner.safetensors"
PRECONDITIONER_INFO = "preconditioner.json"
COMPRESSED_DIR = "compressed"
INT8_DIR = f"{COMPRESSED_DIR}/int8"
PQ_FILE = f"{COMPRESSED_DIR}/pq.faiss"
COMPRESSED_FORMS = ("int8", "pq")  # the first is the fallback default


# --- names ---------------------------------------------------------------------------------------


def shard_name(shard_no: int) -> str:
    return f"shard-{shard_no:05d}"


def shard_path(index_dir: str | Path, kind: str, shard_no: int) -> Path:
    return Path(index_dir) / kind / f"{shard_name(shard_no)}.npy"


def sidecar_path(index_dir: str | Path, kind: str, shard_no: int) -> Path:
    return Path(index_dir) / kind / f"{shard_name(shard_no)}.json"


def int8_paths(index_dir: str | Path, shard_no: int) -> tuple[Path, Path]:
    """(codes, scales) of one shard's int8 form."""
    d = Path(index_dir) / INT8_DIR
    return d / f"shard-{shard_no:05d}.npy", d / f"scales-{shard_no:05d}.npy"


# --- shards and their sidecars -------------------------------------------------------------------


def write_shard(index_dir: str | Path, kind: str, shard_no: int, array: np.ndarray) -> str:
    """Write `kind/shard-NNNNN.npy`; returns its sha256 for the sidecar and the manifest."""
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r}")
    return files.write_npy(shard_path(index_dir, kind, shard_no), array)


def write_done_shard(index_dir: Path, kind: str, shard_no: int, array: np.ndarray, info: dict) -> None:
    """The `.npy` first, then the sidecar that marks it complete: `info` plus the `.npy`'s sha256."""
    sha = write_shard(index_dir, kind, shard_no, array)
    files.write_json(sidecar_path(index_dir, kind, shard_no), _with_sha(info, sha))


def _with_sha(info: dict, sha: str) -> dict:
    """The sidecar's keys in their historical order: raw {start, rows, sha256, docs}, vectors {sha256, …}."""
    head = {k: info[k] for k in ("start", "rows") if k in info}
    return {**head, "sha256": sha, **{k: v for k, v in info.items() if k not in head}}


def done(index_dir: Path, kind: str, shard_no: int, expect: dict | None = None) -> dict | None:
    """The sidecar of a finished shard whose bytes still match it (and its `expect` fields), else None."""
    side = sidecar_path(index_dir, kind, shard_no)
    npy = shard_path(index_dir, kind, shard_no)
    if not (side.exists() and npy.exists()):
        return None
    info = json.loads(side.read_text())
    if any(info.get(k) != v for k, v in (expect or {}).items()):
        return None
    return info if files.sha256_file(npy) == info["sha256"] else None


def read_sidecar(index_dir: Path, kind: str, shard_no: int) -> dict:
    return json.loads(sidecar_path(index_dir, kind, shard_no).read_text())


def clear_partial(index_dir: Path, kind: str, shard_no: int) -> None:
    """Remove what an interrupted writer of this shard left (only its owner rank calls this)."""
    for leftover in (index_dir / kind).glob(f"{shard_name(shard_no)}.*{files.TMP_MARK}*"):
        leftover.unlink(missing_ok=True)


def any_sidecar(out: Path, kind: str) -> bool:
    """Whether some shard of `kind` is finished: work worth keeping when a later step fails."""
    return (out / kind).is_dir() and any((out / kind).glob("shard-*.json"))


# --- raw shards as `--raw-dtype` keeps them ------------------------------------------------------
#
# float32 (the default, the bytes every index had), bfloat16 (uint16 bit patterns, half the bytes;
# R and the final vectors are computed from these rows) or none (float32 until the final vectors
# are written, then the .npy files are deleted; their sidecars stay, since the doc table and the
# shard layout are read from them, and the manifest lists no raw shard).


def encode_raw(raw: np.ndarray, raw_dtype: str) -> np.ndarray:
    """[N, D] float32 raw vectors as a raw shard stores them."""
    from tracestar.index.store import encode_dtype

    return encode_dtype(raw, "bfloat16") if raw_dtype == "bfloat16" else raw


def load_raw(out: Path, shard_no: int, raw_dtype: str, rows: np.ndarray | None = None) -> np.ndarray:
    """[N, D] float32 rows of one raw shard (all, or the local `rows` [N]), decoded from `raw_dtype`."""
    from tracestar.index.store import as_float32

    path = shard_path(out, RAW, shard_no)
    block = np.load(path) if rows is None else np.asarray(np.load(path, mmap_mode="r")[rows])  # a sample: mapped
    return as_float32(block, "bfloat16") if raw_dtype == "bfloat16" else np.asarray(block, dtype=np.float32)


def drop_raw(out: Path, shard_no: int) -> None:
    """Delete one raw shard's vectors (`--raw-dtype none`), keeping its sidecar."""
    shard_path(out, RAW, shard_no).unlink(missing_ok=True)


# --- the output directory ------------------------------------------------------------------------


def prepare_dir(out: Path, identity: dict, overwrite: bool) -> str:
    """Create or check the output directory: "new" (empty, build.json written), "resume" (an
    unfinished build with the same identity) or "built" (a manifest is there: verify it)."""
    build_file = out / BUILD_FILE
    if out.exists() and overwrite and dist.rank() == 0:
        shutil.rmtree(out)
    dist.barrier()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    # A build killed while it wrote build.json, its first file, never started. Rank 0 decides, so
    # that no rank looks after rank 0 has already cleared them.
    if dist.broadcast_object(dist.rank() == 0 and out.is_dir() and not build_file.exists() and _only_temporaries(out)):
        if dist.rank() == 0:
            files.remove_temporaries(out)
        dist.barrier()
    if out.exists() and any(out.iterdir()):
        if not build_file.exists():
            raise UserError(f"{out}: exists and is not a tracestar build; choose another --out or pass --overwrite")
        try:
            previous = json.loads(build_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{build_file}: unreadable; the build's arguments are unknown, so pass --overwrite") from None
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise UserError(
                f"{out}: holds a build with different arguments ({', '.join(changed)}); use another --out or --overwrite"
            )
        state = "built" if (out / MANIFEST).exists() else "resume"
        if dist.rank() == 0:
            files.remove_temporaries(out)  # what killed writers left; no rank writes before they are gone
        dist.barrier()
        return state
    dist.barrier()
    if dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        files.write_json(build_file, identity)
    dist.barrier()
    return "new"


def _only_temporaries(out: Path) -> bool:
    """Whether `out` holds files and all of them are temporaries (nothing finished)."""
    entries = list(out.iterdir())
    return bool(entries) and all(p.is_file() and files.TMP_MARK in p.name for p in entries)


@contextmanager
def undo_on_failure(out: Path, overwrite: bool, worth_keeping: Callable[[], bool]) -> Iterator[None]:
    """Remove what this invocation created in `out` when it fails before `worth_keeping()` is true.

    A build that stops on an error before finishing anything leaves nothing behind — a stray
    build.json would block the corrected rerun. Work worth resuming (a finished shard) is kept, as
    is anything that was there before: an interrupted earlier build is never deleted. Ctrl-C is
    not an error here: it keeps everything so the rerun resumes.
    """
    root = None if out.exists() else _first_missing(out)
    owned_contents = out.is_dir() and (overwrite or not any(out.iterdir()))
    try:
        yield
    except Exception:
        if dist.rank() == 0 and not worth_keeping():
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)
            elif owned_contents and out.is_dir():
                for child in out.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        raise


def _first_missing(path: Path) -> Path:
    """The outermost ancestor of `path` (or `path` itself) that does not exist yet."""
    path = path.absolute()
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def link_inputs(src: Path, out: Path) -> None:
    """A refit's inputs from `src`: V, the doc table and the raw shards with their sidecars,
    hard-linked (copied where links are impossible). Leftovers of a killed writer are skipped."""
    raw_files = [f"{RAW}/{p.name}" for p in sorted((src / RAW).iterdir()) if files.TMP_MARK not in p.name]
    for rel in [NORMALIZER, NORMALIZER_INFO, DOCS, *raw_files]:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            continue
        try:
            os.link(src / rel, dst)
        except OSError:
            shutil.copy2(src / rel, dst)


def verify_source_raw(src: Path, out: Path, manifest: dict, quiet: bool) -> None:
    """The raw shards a refit reads are the source index's: a damaged one is repaired there, not here."""
    for info in loop_bars(quiet, unit="shard")(manifest["shards"], "verifying raw shards"):
        path = out / RAW / f"{info['name']}.npy"
        if not path.is_file() or files.sha256_file(path) != info["raw_sha256"]:
            raise IndexStoreError(f"{src / RAW / path.name}: checksum mismatch; rerun the `tracestar index` command "
                                  f"that built {src} to repair it, then refit again")


# --- the manifest --------------------------------------------------------------------------------


#: The manifest's own checksum: nothing else vouches for the file that vouches for the others.
MANIFEST_DIGEST = "manifest_sha256"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content without its own digest (sorted compact JSON, so the
    layout on disk does not matter). A flipped bit anywhere in the file changes it."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(index_dir: str | Path, manifest: dict) -> None:
    manifest = dict(manifest)
    manifest.setdefault("format_version", FORMAT_VERSION)
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    files.write_json(Path(index_dir) / MANIFEST, manifest)


def finish(out: Path, base: dict, fields: dict, n_shards: int, *, previous: dict | None, timer: PhaseTimer,
           quiet: bool) -> tuple[int, int]:
    """Write the doc table and, last, the manifest: `base`, then when, `fields` (what the build
    chose: variant, unit_norm, dtype, preconditioner), then what the shards hold and the checksums.

    `previous`: the manifest being repaired; its `created`, `timings` and still-valid compressed
    forms carry over. Returns (tokens, truncated documents).
    """
    with timer.phase("writes"):
        shards, counts = _write_doc_table(out, n_shards)
        n_tokens, n_truncated = counts["tokens"], counts["truncated"]
        checksums = {name: files.sha256_file(out / name) for name in _checksummed_files(out, n_shards)}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = {
        **base,
        "created": (previous or {}).get("created", now),
        **fields,
        "n_tokens": n_tokens,
        "n_truncated": n_truncated,
        # only when some row's gradient was NaN or inf, so an index without one keeps its bytes
        **({"n_nonfinite": counts["nonfinite"], "nonfinite_first": counts["nonfinite_first"]}
           if counts["nonfinite"] else {}),
        "world_size": dist.world(),
        "shards": shards,
        "files": {"normalizer": NORMALIZER, "preconditioner": PRECONDITIONER, "docs": DOCS},
        "checksums": checksums,
    }
    # Wall seconds per phase of the build that wrote this index (not part of any checksum). A
    # repair keeps the original's, so that the repaired manifest differs only by `repaired`.
    timings = timer.snapshot() if previous is None else previous.get("timings")
    if timings is not None:
        manifest["timings"] = timings
    if previous is not None:
        manifest["repaired"] = now
        compressed = _carry_compressed(out, previous, shards, quiet)
        if compressed:
            manifest["compressed"] = compressed
    write_manifest(out, manifest)
    return n_tokens, n_truncated


#: How many ids of rows with a non-finite gradient the manifest and the build's last message name.
NONFINITE_SHOWN = 5


def doc_entry(doc_id: str, n_tokens: int, truncated: bool, extra: dict | None = None) -> list:
    """One row of a raw sidecar's `docs`: [doc_id, n_tokens, truncated], plus a dict of what only
    some rows have — a chunk's {"chunk", "start", "end"} (token positions in its document) and
    {"nonfinite": true} — so a row without them is written as before."""
    return [doc_id, n_tokens, truncated, extra] if extra else [doc_id, n_tokens, truncated]


def _write_doc_table(out: Path, n_shards: int) -> tuple[list[dict], dict]:
    """docs.jsonl streamed from the shards' sidecars (memory independent of corpus size); returns
    (the manifest's shard list, {tokens, truncated rows, nonfinite rows, the first nonfinite ids})."""
    shards: list[dict] = []
    counts: dict = {"tokens": 0, "truncated": 0, "nonfinite": 0, "nonfinite_first": []}

    def doc_rows():
        row = 0
        for shard_no in range(n_shards):
            raw_info = read_sidecar(out, RAW, shard_no)
            vec_info = read_sidecar(out, VECTORS, shard_no)
            kept = shard_path(out, RAW, shard_no).exists()  # not with --raw-dtype none: no raw shard is listed
            shards.append({"name": shard_name(shard_no), "start": raw_info["start"], "rows": raw_info["rows"],
                           "raw_sha256": raw_info["sha256"] if kept else None, "vectors_sha256": vec_info["sha256"]})
            for doc_id, toks, trunc, *extra in raw_info["docs"]:
                more = extra[0] if extra else {}
                yield {"row": row, "doc_id": doc_id, "n_tokens": toks, "truncated": trunc, **more}
                row += 1
                counts["tokens"] += toks
                counts["truncated"] += int(trunc)
                if more.get("nonfinite"):
                    counts["nonfinite"] += 1
                    if len(counts["nonfinite_first"]) < NONFINITE_SHOWN:
                        counts["nonfinite_first"].append(doc_id)

    files.write_jsonl(out / DOCS, doc_rows())
    return shards, counts


def _checksummed_files(out: Path, n_shards: int) -> list[str]:
    """Files besides the shards whose sha256 the manifest records (a rerun verifies them)."""
    names = [NORMALIZER, NORMALIZER_INFO, PRECONDITIONER, PRECONDITIONER_INFO, DOCS]
    for kind in KINDS:
        names += [f"{kind}/{shard_name(s)}.json" for s in range(n_shards)]
    return [n for n in names if (out / n).exists()]


def _carry_compressed(out: Path, previous: dict, shards: list[dict], quiet: bool) -> dict | None:
    """The old compressed forms if the final vectors they were made from are byte-identical;
    otherwise their files are deleted and None is returned."""
    comp = dict(previous.get("compressed") or {})
    if not any(f in comp for f in COMPRESSED_FORMS):
        return None
    old = {s["name"]: s.get("vectors_sha256") or s.get("vectors_sha256_dropped") for s in previous.get("shards", [])}
    if all(old.get(s["name"]) == s["vectors_sha256"] for s in shards):
        comp["exact_dropped"] = False  # the repair wrote the exact vectors again
        comp.pop("exact_dropped_at", None)
        return comp
    for _, rel, _ in compressed_files(out, previous):
        (out / rel).unlink(missing_ok=True)
    say(quiet, f"{out}: the final vectors changed, so the compressed forms made from them were dropped; "
               f"run `tracestar compress` again")
    return None


def compressed_files(out: Path, manifest: dict) -> list[tuple[str, str, str]]:
    """(form, relative path, sha256) of the compressed forms' files."""
    comp = manifest.get("compressed") or {}
    found = []
    if "int8" in comp:
        for shard_no, info in enumerate(comp["int8"]["shards"]):
            codes, scales = int8_paths(out, shard_no)
            found += [("int8", str(codes.relative_to(out)), info["codes_sha256"]),
                      ("int8", str(scales.relative_to(out)), info["scales_sha256"])]
    if "pq" in comp and comp["pq"].get("form") == "binary":  # per-shard files, as `index/pq.binary_paths` names them
        for shard_no, info in enumerate(comp["pq"]["shards"]):
            found += [("pq", f"{comp['pq']['path']}/codes-{shard_no:05d}.npy", info["codes_sha256"]),
                      ("pq", f"{comp['pq']['path']}/factors-{shard_no:05d}.npy", info["factors_sha256"])]
    elif "pq" in comp:
        found.append(("pq", comp["pq"]["path"], comp["pq"]["sha256"]))
    return found
