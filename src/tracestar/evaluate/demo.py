"""`tracestar demo`: the whole story on a laptop, from nothing, in a few minutes on 2 CPU cores.

    world (real GeoNames facts, exact ground truth)  ->  train a tiny GPT-2 with Adafactor
    ->  TrackStar index (optimizer correction, unit norm, mixed R from the eval queries)
    ->  evaluation: MRR / recall@k per frequency bucket, BM25 baseline, tail-patch influence

Every step is cached in `out_dir` and skipped when its output exists and was made from the same
inputs: the world by (seed, scale), the model by the trainer's own cache key (config + corpus
bytes), the index by `build_index`'s identity check (options + model fingerprint + corpus), the
evaluation by the hashes of the index manifest and the query file and the evaluation settings.

Nothing here watches the clock: the trainer takes a fixed number of seeded steps, so a busy
machine takes longer but prints the same figures as an idle one (up to the last digits of
floating-point sums).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracestar.errors import UserError
from tracestar.files import sha256_file, write_json
from tracestar.index.writer import MANIFEST

#: Per scale: projection dim, tail-patch queries, trainer overrides (see `TrainConfig`).
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"proj_dim": 4096, "tail_patch_queries": 200, "train": {}},
    "small": {"proj_dim": 1024, "tail_patch_queries": 40, "train": {"d_model": 96, "epochs": 30}},
}
KS = (1, 3, 5, 10)
#: torch intra-op threads for every step. On a busy 2-core machine two threads that wait for each
#: other made training steps about seven times slower and the index build 2.5 times slower than
#: one thread did (measured); on an idle one the second thread gains little at this size.
DEMO_THREADS = 1
#: Bumped when the evaluation's output changes shape, so older cached metrics are recomputed.
EVAL_VERSION = 2


def _model_window(model_dir: Path) -> int:
    """The trained model's context length: the demo indexes whole documents at exactly that window."""
    config = _read_json(Path(model_dir) / "config.json") or {}
    return int(config.get("n_positions") or config.get("max_position_embeddings") or 512)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def run_demo(
    out_dir: str | Path = "tracestar-demo",
    *,
    scale: str = "full",
    seed: int = 0,
    proj_dim: int | None = None,
    tail_patch_queries: int | None = None,
    lr: float | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """World -> train -> index (mixed R) -> evaluate (BM25, tail-patch); prints the table and where
    the report is. Returns the metrics (as in `metrics.json`) plus `"_demo"`: what was cached, seconds
    per step, the training summary and the paths."""
    import torch

    if scale not in DEMO_SETTINGS:
        raise UserError(f"unknown demo scale {scale!r}; choose from {', '.join(DEMO_SETTINGS)}")
    cfg = DEMO_SETTINGS[scale]
    proj_dim = cfg["proj_dim"] if proj_dim is None else proj_dim
    tail_patch_queries = cfg["tail_patch_queries"] if tail_patch_queries is None else tail_patch_queries
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)
    try:
        return _run_demo(Path(out_dir), cfg, scale=scale, seed=seed, proj_dim=proj_dim,
                         tail_patch_queries=tail_patch_queries, lr=lr, quiet=quiet)
    finally:
        torch.set_num_threads(saved_threads)


class _Steps:
    """The demo's four steps, each timed and reported as "[n/4] name: summary", with "(cached)" when
    it was skipped; `cached` and `seconds` go to demo.json."""

    def __init__(self, quiet: bool):
        self.say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
        self.cached: dict[str, bool] = {}
        self.seconds: dict[str, float] = {}

    def run(self, n: int, name: str, step: Callable[[Callable[[str], None]], tuple[Any, bool, str | None]]) -> Any:
        """`step(announce)` returns (result, whether it was cached, the summary line or None); it calls
        `announce(msg)` to print "[n/4] name: msg" before slow work starts."""
        t0 = time.time()
        result, cached, summary = step(lambda msg: self.say(f"[{n}/4] {name}: {msg}"))
        self.cached[name] = cached
        self.seconds[name] = round(time.time() - t0, 1)
        if summary is not None:
            self.say(f"[{n}/4] {name}: {summary}" + (" (cached)" if cached else ""))
        return result


def _stamped(stamp: Path, key: dict, load: Callable[[dict], Any], make: Callable[[], tuple[Any, dict]]) -> tuple[Any, bool]:
    """(result, cached): `load(stamp)` when `stamp` records `key` and `load` finds the outputs still
    there (not None), else `make()`, which returns (result, what the stamp records besides the key)."""
    prev = _read_json(stamp)
    if prev and prev.get("key") == key:
        result = load(prev)
        if result is not None:
            return result, True
    result, extra = make()
    write_json(stamp, {"key": key, **extra})
    return result, False


def _run_demo(out: Path, cfg: dict[str, Any], *, scale: str, seed: int, proj_dim: int, tail_patch_queries: int,
              lr: float | None, quiet: bool) -> dict[str, Any]:
    """The four steps of `run_demo`, each skipped when cached."""
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(quiet)
    t_all = time.time()
    wdir = out / "world"
    paths = steps.run(1, "world", lambda announce: _world_step(wdir, scale, seed, announce))
    n_queries = _count_lines(paths.queries)
    model_dir, log = steps.run(2, "train", lambda announce: _train_step(out / "model", paths, cfg, seed, quiet, announce))
    index_dir = steps.run(3, "index", lambda announce: _index_step(out / "index", model_dir, paths, proj_dim, quiet, announce))
    eval_dir = out / "eval"
    metrics = steps.run(4, "eval", lambda announce: _eval_step(eval_dir, index_dir, model_dir, paths, n_queries,
                                                               tail_patch_queries, lr, quiet, announce))
    steps.seconds["total"] = round(time.time() - t_all, 1)
    if not quiet:
        _print_summary(metrics, eval_dir, steps)
    demo = {"cached": steps.cached, "seconds": steps.seconds, "scale": scale, "threads": DEMO_THREADS,
            "train": {k: log.get(k) for k in ("n_params", "steps", "epochs_run", "final_loss", "first_token_accuracy",
                                             "threads", "seconds")},
            "paths": {"world": str(wdir), "model": str(model_dir), "index": str(index_dir),
                      "eval": str(eval_dir)}}
    write_json(out / "demo.json", demo)
    return {**metrics, "_demo": demo}


def _world_step(wdir: Path, scale: str, seed: int, announce: Callable[[str], None]):
    """The fact world, remade unless its stamp records this (seed, scale) and the files' hashes."""
    from tracestar.world.facts import WorldPaths, make_world

    paths = WorldPaths(wdir / "corpus.jsonl", wdir / "queries.jsonl", wdir / "facts.jsonl")

    def hashes(p: WorldPaths) -> dict:
        return {"corpus": sha256_file(p.corpus), "queries": sha256_file(p.queries)}

    def load(prev: dict):
        intact = all(p.exists() for p in (paths.corpus, paths.queries, paths.facts)) and prev.get("sha256") == hashes(paths)
        return paths if intact else None

    def make():
        announce(f"generating the fact world (scale={scale}, seed={seed}) ...")
        made = make_world(wdir, seed=seed, scale=scale)
        return made, {"sha256": hashes(made)}

    paths, cached = _stamped(wdir / "demo_world.json", {"seed": seed, "scale": scale}, load, make)
    summary = f"{_count_lines(paths.corpus):,} documents, {_count_lines(paths.queries):,} queries -> {wdir}"
    return paths, cached, summary


def _train_step(model_dir: Path, paths, cfg: dict[str, Any], seed: int, quiet: bool, announce: Callable[[str], None]):
    """The tiny GPT-2; the trainer keeps its own cache (config + corpus bytes)."""
    from tracestar.world.train import TrainConfig, train_model

    if not quiet and not (model_dir / "train_log.json").exists():
        tcfg = TrainConfig(seed=seed, **cfg["train"])
        announce(f"a tiny GPT-2 with Adafactor, {tcfg.epochs} epochs = {tcfg.planned_steps(_count_lines(paths.corpus)):,} "
                 f"seeded steps ...")
    log = train_model(paths.corpus, model_dir, queries_path=paths.queries, seed=seed, **cfg["train"])
    acc = log.get("first_token_accuracy")
    summary = (f"{log.get('n_params', 0):,} parameters, {log.get('steps')} steps, final loss "
               f"{log.get('final_loss', float('nan')):.3f}, first-token accuracy on the queries "
               f"{'–' if acc is None else f'{acc:.1%}'} -> {model_dir}")
    return (model_dir, log), bool(log.get("cached")), summary


def _index_step(index_dir: Path, model_dir: Path, paths, proj_dim: int, quiet: bool, announce: Callable[[str], None]):
    """The TrackStar index; `build_index`'s identity check is the cache (cached when the manifest is untouched)."""
    from tracestar.api import build_index

    manifest_path = index_dir / MANIFEST
    before = manifest_path.stat().st_mtime_ns if manifest_path.exists() else None
    kw = {"eval_queries": str(paths.queries), "preconditioner": "mixed", "optimizer_state": str(model_dir / "optimizer.pt"),
          "proj_dim": proj_dim, "max_length": _model_window(model_dir), "quiet": quiet}
    if before is None:
        announce(f"TrackStar vectors (dim {proj_dim:,}, Adafactor correction, mixed R) ...")
    try:
        build_index(model_dir, paths.corpus, index_dir, **kw)
    except UserError as exc:
        if "different arguments" not in str(exc):
            raise
        announce(f"{index_dir} was built from other inputs; rebuilding")
        build_index(model_dir, paths.corpus, index_dir, overwrite=True, **kw)
    after = manifest_path.stat().st_mtime_ns if manifest_path.exists() else None
    return index_dir, before is not None and before == after, f"-> {index_dir}"


def _eval_step(eval_dir: Path, index_dir: Path, model_dir: Path, paths, n_queries: int, tail_patch_queries: int,
               lr: float | None, quiet: bool, announce: Callable[[str], None]):
    """Attribution metrics (tracestar, BM25) and tail-patch, redone unless the stamp records the same
    manifest, queries and settings and metrics.json is readable."""
    from tracestar.evaluate.run import evaluate

    key = {"version": EVAL_VERSION, "manifest_sha256": sha256_file(index_dir / MANIFEST),
           "queries_sha256": sha256_file(paths.queries), "ks": list(KS),
           "bm25": True, "tail_patch": True, "max_queries": tail_patch_queries, "lr": lr}

    def make():
        announce(f"attribution over {n_queries:,} queries (tracestar, BM25); tail-patch over {tail_patch_queries} of them ...")
        return evaluate(index_dir, paths.queries, eval_dir, bm25=True, tail_patch=True, ks=KS, model_dir=model_dir,
                        lr=lr, max_queries=tail_patch_queries, quiet=quiet), {}

    metrics, cached = _stamped(eval_dir / "demo_eval.json", key, lambda _: _read_json(eval_dir / "metrics.json"), make)
    return metrics, cached, None  # the table printed next is the summary


def _print_summary(metrics: dict[str, Any], eval_dir: Path, steps: _Steps) -> None:
    from tracestar.evaluate.run import format_table

    print()
    print(format_table(metrics))
    tps = (metrics.get("_settings") or {}).get("tailpatch") or {}
    if tps:
        print(f"\ntail-patch: one {tps.get('optimizer')} step at lr={tps.get('lr'):g} per proponent, "
              f"{tps.get('n_queries')} queries; Δlogp / Δp = mean increase of the target's log-probability / probability")
    print(f"\nreport: {eval_dir / 'report.md'} (metrics.json, attribution_by_bucket.png, tailpatch.png beside it)")
    print("steps (s): " + ", ".join(f"{k} {v}" + (" cached" if steps.cached.get(k) else "") for k, v in steps.seconds.items()))
    sys.stdout.flush()


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh)
