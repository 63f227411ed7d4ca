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
from pathlib import Path
from typing import Any

from tracestar.errors import UserError
from tracestar.index.store import sha256_file, write_json

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


def _run_demo(out: Path, cfg: dict[str, Any], *, scale: str, seed: int, proj_dim: int, tail_patch_queries: int,
              lr: float | None, quiet: bool) -> dict[str, Any]:
    """The four steps of `run_demo`, each skipped when cached."""
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    cached: dict[str, bool] = {}
    seconds: dict[str, float] = {}
    t_all = time.time()

    # 1. the world -------------------------------------------------------------------------------
    from tracestar.world.facts import WorldPaths, make_world

    t0 = time.time()
    wdir = out / "world"
    paths = WorldPaths(wdir / "corpus.jsonl", wdir / "queries.jsonl", wdir / "facts.jsonl")
    stamp = wdir / "demo_world.json"
    key = {"seed": seed, "scale": scale}
    prev = _read_json(stamp)
    files = (paths.corpus, paths.queries, paths.facts)
    if (prev and prev.get("key") == key and all(p.exists() for p in files)
            and prev.get("sha256") == {"corpus": sha256_file(paths.corpus), "queries": sha256_file(paths.queries)}):
        cached["world"] = True
    else:
        say(f"[1/4] world: generating the fact world (scale={scale}, seed={seed}) ...")
        paths = make_world(wdir, seed=seed, scale=scale)
        write_json(stamp, {"key": key, "sha256": {"corpus": sha256_file(paths.corpus), "queries": sha256_file(paths.queries)}})
        cached["world"] = False
    n_docs = sum(1 for _ in open(paths.corpus, encoding="utf-8"))
    n_queries = sum(1 for _ in open(paths.queries, encoding="utf-8"))
    seconds["world"] = round(time.time() - t0, 1)
    say(f"[1/4] world: {n_docs:,} documents, {n_queries:,} queries -> {wdir}" + (" (cached)" if cached["world"] else ""))

    # 2. the model -------------------------------------------------------------------------------
    from tracestar.world.train import TrainConfig, train_model

    t0 = time.time()
    model_dir = out / "model"
    if not quiet and not (model_dir / "train_log.json").exists():
        tcfg = TrainConfig(seed=seed, **cfg["train"])
        say(f"[2/4] train: a tiny GPT-2 with Adafactor, {tcfg.epochs} epochs = {tcfg.planned_steps(n_docs):,} "
            f"seeded steps ...")
    log = train_model(paths.corpus, model_dir, queries_path=paths.queries, seed=seed, **cfg["train"])
    cached["train"] = bool(log.get("cached"))
    seconds["train"] = round(time.time() - t0, 1)
    acc = log.get("first_token_accuracy")
    say(f"[2/4] train: {log.get('n_params', 0):,} parameters, {log.get('steps')} steps, final loss "
        f"{log.get('final_loss', float('nan')):.3f}, first-token accuracy on the queries "
        f"{'–' if acc is None else f'{acc:.1%}'} -> {model_dir}" + (" (cached)" if cached["train"] else ""))

    # 3. the index -------------------------------------------------------------------------------
    from tracestar.api import build_index

    t0 = time.time()
    index_dir = out / "index"
    manifest_path = index_dir / "manifest.json"
    before = manifest_path.stat().st_mtime_ns if manifest_path.exists() else None
    kw = dict(eval_queries=str(paths.queries), preconditioner="mixed", optimizer_state=str(model_dir / "optimizer.pt"),
              proj_dim=proj_dim, max_length=_model_window(model_dir), quiet=quiet)
    if before is None:
        say(f"[3/4] index: TrackStar vectors (dim {proj_dim:,}, Adafactor correction, mixed R) ...")
    try:
        build_index(model_dir, paths.corpus, index_dir, **kw)
    except UserError as exc:
        if "different arguments" not in str(exc):
            raise
        say(f"[3/4] index: {index_dir} was built from other inputs; rebuilding")
        build_index(model_dir, paths.corpus, index_dir, overwrite=True, **kw)
    after = manifest_path.stat().st_mtime_ns if manifest_path.exists() else None
    cached["index"] = before is not None and before == after
    seconds["index"] = round(time.time() - t0, 1)
    say(f"[3/4] index: -> {index_dir}" + (" (cached)" if cached["index"] else ""))

    # 4. the evaluation --------------------------------------------------------------------------
    from tracestar.evaluate.run import evaluate, format_table

    t0 = time.time()
    eval_dir = out / "eval"
    ekey = {"version": EVAL_VERSION, "manifest_sha256": sha256_file(manifest_path),
            "queries_sha256": sha256_file(paths.queries), "ks": list(KS),
            "bm25": True, "tail_patch": True, "max_queries": tail_patch_queries, "lr": lr}
    estamp = eval_dir / "demo_eval.json"
    prev = _read_json(estamp)
    metrics = _read_json(eval_dir / "metrics.json") if prev and prev.get("key") == ekey else None
    if metrics is not None:
        cached["eval"] = True
    else:
        say(f"[4/4] eval: attribution over {n_queries:,} queries (tracestar, BM25); tail-patch over "
            f"{tail_patch_queries} of them ...")
        metrics = evaluate(index_dir, paths.queries, eval_dir, bm25=True, tail_patch=True, ks=KS,
                           model_dir=model_dir, lr=lr, max_queries=tail_patch_queries, quiet=quiet)
        write_json(estamp, {"key": ekey})
        cached["eval"] = False
    seconds["eval"] = round(time.time() - t0, 1)
    seconds["total"] = round(time.time() - t_all, 1)

    if not quiet:
        print()
        print(format_table(metrics))
        tps = (metrics.get("_settings") or {}).get("tailpatch") or {}
        if tps:
            print(f"\ntail-patch: one {tps.get('optimizer')} step at lr={tps.get('lr'):g} per proponent, "
                  f"{tps.get('n_queries')} queries; Δlogp / Δp = mean increase of the target's log-probability / probability")
        print(f"\nreport: {eval_dir / 'report.md'} (metrics.json, attribution_by_bucket.png, tailpatch.png beside it)")
        print("steps (s): " + ", ".join(f"{k} {v}" + (" cached" if cached.get(k) else "") for k, v in seconds.items()))
        sys.stdout.flush()
    demo = {"cached": cached, "seconds": seconds, "scale": scale, "threads": DEMO_THREADS,
            "train": {k: log.get(k) for k in ("n_params", "steps", "epochs_run", "final_loss", "first_token_accuracy",
                                             "threads", "seconds")},
            "paths": {"world": str(wdir), "model": str(model_dir), "index": str(index_dir), "eval": str(eval_dir)}}
    write_json(out / "demo.json", demo)
    return {**metrics, "_demo": demo}
