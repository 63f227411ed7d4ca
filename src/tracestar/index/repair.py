"""A rerun on a finished index: verify every file its manifest lists, and repair what is damaged.

Every listed file is hashed against the manifest. A damaged one is removed together with what was
computed from it, and the manifest goes first, so that until the repair finishes a reader finds an
unfinished build, never a finished index with a hole. The build or refit then resumes and
recomputes only what is missing, to the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from tracestar import dist, files
from tracestar.errors import IndexStoreError
from tracestar.index.writer import (
    KINDS,
    MANIFEST,
    NORMALIZER,
    NORMALIZER_INFO,
    PRECONDITIONER,
    PRECONDITIONER_INFO,
    RAW,
    VECTORS,
    compressed_files,
)
from tracestar.progress import loop_bars, say


def start_repair(out: Path, quiet: bool) -> dict | None:
    """Verify a finished index against its manifest. None when every listed file matches.

    Otherwise the damaged files and everything derived from them are removed, and so is the
    manifest (until the repair finishes the index is an unfinished build, which resumes); the
    build then recomputes what is missing. Returns the old manifest ({} if it was unreadable).
    """
    previous = damaged = None
    n_files = 0
    if dist.rank() == 0:
        previous, damaged, n_files = _verify_built(out, quiet)
        if damaged:
            say(quiet, f"{out}: damaged: {', '.join(f'{rel} ({problem})' for rel, problem in damaged)}; repairing")
            _remove_damaged(out, previous, damaged, quiet)
    previous, damaged, n_files = dist.broadcast_object((previous, damaged, n_files))
    dist.barrier()
    if not damaged:
        say(quiet, f"{out}: already built with these arguments; {n_files} files verified; nothing to do")
        return None
    return previous


def _verify_built(out: Path, quiet: bool) -> tuple[dict, list[tuple[str, str]], int]:
    """(manifest, [(relative path, problem)], number of files checked) for every file it lists."""
    from tracestar.index.store import (
        read_manifest,  # the reader's checks (format version, JSON)
    )

    try:
        manifest = read_manifest(out)
        listed = _listed_files(out, manifest)
    except (IndexStoreError, KeyError, TypeError, ValueError):
        return {}, [(MANIFEST, "unreadable")], 1
    damaged = []
    for rel, sha in loop_bars(quiet, unit="file")(listed, "verifying"):
        path = out / rel
        if not path.is_file():
            damaged.append((rel, "missing"))
        elif files.sha256_file(path) != sha:
            damaged.append((rel, "checksum mismatch"))
    return manifest, damaged, len(listed)


def _listed_files(out: Path, manifest: dict) -> list[tuple[str, str]]:
    """(relative path, sha256) of every file a manifest vouches for: shards, sidecars, V, R, the
    doc table, compressed forms. Manifests written before `checksums` existed list the shards only."""
    listed = []
    for info in manifest["shards"]:
        if info.get("raw_sha256"):  # None when built with --raw-dtype none
            listed.append((f"{RAW}/{info['name']}.npy", info["raw_sha256"]))
        if info.get("vectors_sha256"):  # None once `compress --drop-exact` removed them
            listed.append((f"{VECTORS}/{info['name']}.npy", info["vectors_sha256"]))
    listed += sorted((manifest.get("checksums") or {}).items())
    listed += [(rel, sha) for _, rel, sha in compressed_files(out, manifest)]
    return listed


def _remove_damaged(out: Path, manifest: dict, damaged: list[tuple[str, str]], quiet: bool) -> None:
    """Delete each damaged file and what is computed from it, so the resumed build redoes them.

    raw shard → it and its final vectors (R is refitted only if its sample read that shard, see
    `finalize._r_inputs`); final vectors → them; V → everything; R → R (vectors follow if it
    changes); doc table → nothing (always rewritten); a compressed form → the form.
    """
    doomed: set[str] = set()
    forms = {rel: form for form, rel, _ in compressed_files(out, manifest)} if manifest else {}
    v_and_r = {NORMALIZER, NORMALIZER_INFO, PRECONDITIONER, PRECONDITIONER_INFO}
    for rel, _ in damaged:
        top, _, name = rel.partition("/")
        if top in KINDS:
            stem = name.split(".")[0]
            for kind in ((RAW, VECTORS) if top == RAW else (VECTORS,)):
                doomed |= {f"{kind}/{stem}.npy", f"{kind}/{stem}.json"}
        elif rel in (NORMALIZER, NORMALIZER_INFO):
            doomed |= v_and_r
            doomed |= {str(p.relative_to(out)) for kind in KINDS for p in (out / kind).glob("shard-*")}
        elif rel in (PRECONDITIONER, PRECONDITIONER_INFO):
            doomed |= {PRECONDITIONER, PRECONDITIONER_INFO}
        elif rel in forms:
            form = forms[rel]
            doomed |= {r for r, f in forms.items() if f == form}
            manifest.get("compressed", {}).pop(form, None)
            say(quiet, f"{out}: compressed form {form} dropped; run `tracestar compress --index {out} --kind {form}` again")
    (out / MANIFEST).unlink(missing_ok=True)  # first: from here on a reader finds an unfinished build
    for rel in sorted(doomed):
        (out / rel).unlink(missing_ok=True)
