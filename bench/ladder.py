"""The paper's ablation ladder on one trained model: what each part of TrackStar buys.

Builds one index per rung — dot (TRAK-like) → opt (+ optimizer correction) → opt-norm (+ unit
norm) → train-r (+ R_train) → trackstar (+ mixed R) — over the same corpus and model, and
evaluates them side by side (MRR, recall@10 per bucket against fact-stating documents; optionally
tail-patch). Uses a `tracestar demo` directory (world + model) by default:

    tracestar demo --out tracestar-demo
    python bench/ladder.py --demo tracestar-demo [--tail-patch 100] [--proj-dim 4096]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tracestar.api import build_index
from tracestar.options import VARIANTS
from tracestar.evaluate.run import evaluate, format_table
from tracestar.index.store import read_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="tracestar-demo", help="a tracestar demo directory (world/ and model/)")
    ap.add_argument("--out", help="where the ladder's indexes and report go (default DEMO/ladder)")
    ap.add_argument("--proj-dim", type=int, default=4096)
    ap.add_argument("--tail-patch", type=int, default=0, help="tail-patch this many queries per rung (0: attribution only)")
    args = ap.parse_args()
    demo = Path(args.demo)
    corpus, queries, model = demo / "world" / "corpus.jsonl", demo / "world" / "queries.jsonl", demo / "model"
    out = Path(args.out) if args.out else demo / "ladder"
    dirs = []
    for variant in VARIANTS:
        d = out / variant
        build_index(model, corpus, d, variant=variant, eval_queries=str(queries), optimizer_state=str(model / "optimizer.pt"),
                    proj_dim=args.proj_dim, quiet=True)
        dirs.append(d)
        pre = read_manifest(d)["preconditioner"]
        lam = f", λ = {pre['lambda']:.4f} (component {pre.get('component_index_used')})" if pre.get("lambda") is not None else ""
        print(f"built {variant}: preconditioner {pre['kind']}{lam}")
    metrics = evaluate(dirs[-1], queries, out / "eval", bm25=True, tail_patch=args.tail_patch > 0,
                       variants=[str(d) for d in dirs[:-1]], model_dir=model, max_queries=args.tail_patch or None, quiet=True)
    print(format_table(metrics))
    print(f"report: {out / 'eval' / 'report.md'}")


if __name__ == "__main__":
    main()
