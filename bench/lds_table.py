"""LDS, MRR and tail-patch side by side: every rung of the ladder and every setting, on one retrained world.

One world (default: `tracestar world --scale small`, 653 documents, 150 queries) and one tiny model
(`tracestar.evaluate.lds.LDS_TRAIN`) trained on it; M models retrained on random halves of the
corpus give the counterfactual ground truth (LDS); the fact-stating documents give attribution
(full-rank MRR, recall@10); one Adafactor step per proponent gives influence (tail-patch, on a
bucket-stratified sample of queries). Rows:

- ladder: dot / opt / opt-norm / train-r / trackstar at the base dimension, beside exact full
  gradients (no projection, no V, no R), BM25, the fact-stating documents and random scores;
- damping 0.001 … 1 (train-r and trackstar), R range 512 … 4,096 and one full matrix per block,
  automatic λ against fixed values, R_eval from fewer queries, paper against module blocks,
  dimension 2^12 … 2^16;
- with --bergson: bergson's `trackstar` beside tracestar at 2^12, 2^14 and 2^16 (bergson's 8 × k²
  per-module layout matched to tracestar's module blocks of about the same total), and tracestar's
  defaults moved one setting at a time toward bergson's (blocks, one full R, λ, V, unit norm), then
  all at once, to find which difference costs attribution.

Everything is cached under --out (the model, each run, each index), so a killed bench resumes:

    OMP_NUM_THREADS=1 python bench/lds_table.py --out lds-bench --subsets 64
    OMP_NUM_THREADS=1 python bench/lds_table.py --out lds-bench --subsets 64 --bergson /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tracestar.api import build_index, refit
from tracestar.corpus import write_jsonl
from tracestar.evaluate.lds import (
    EXACT,
    LdsData,
    baseline_scores,
    exact_gradient_scores,
    index_scores,
    prepare_lds,
    score_summary,
    top_results,
)

#: (section, row label, how to make its scores). Index rows: "variant" at "dim" with build options
#: "build", or a refit of the base index of "variant" with "refit" options.
BASE_DIM = 1 << 14


def rows(dim: int, bergson: bool = False, bergson_dims: tuple[int, ...] = (12, 14),
         toward_dims: tuple[int, ...] = ()) -> list[tuple[str, str, dict[str, Any]]]:
    out: list[tuple[str, str, dict[str, Any]]] = []
    for v in ("dot", "opt", "opt-norm", "train-r", "trackstar"):
        out.append(("ladder", v, {"variant": v, "dim": dim}))
    for b in (EXACT, "bm25", "relevant", "random"):
        out.append(("ladder", b, {"baseline": b}))
    for d in (0.001, 0.01, 0.1, 0.3, 1.0):
        for v in ("train-r", "trackstar"):
            out.append(("damping", f"{v} damping {d:g}", {"variant": v, "dim": dim, "refit": {"damping": d}}))
    for r in (512, 1024, 2048, 4096):
        out.append(("R range", f"trackstar R range {r}", {"variant": "trackstar", "dim": dim, "build": {"r_block": r}}))
    out.append(("R range", "trackstar R full per block", {"variant": "trackstar", "dim": dim, "build": {"r_block": 1 << 20}}))
    for lam in (None, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        label = "trackstar λ auto" if lam is None else f"trackstar λ {lam:g}"
        out.append(("λ", label, {"variant": "trackstar", "dim": dim, "refit": {"lam": lam}}))
    for n in (25, 50):
        out.append(("R_eval queries", f"trackstar R_eval from {n} queries", {"variant": "trackstar", "dim": dim, "refit": {"eval_n": n}}))
    for blocks in ("paper", "module"):
        for v in ("opt-norm", "trackstar"):
            out.append(("blocks", f"{v} {blocks} blocks", {"variant": v, "dim": dim, "build": {"blocks": blocks}}))
    for d in (1 << 12, 1 << 14, 1 << 16):
        for v in ("opt-norm", "train-r", "trackstar"):
            out.append(("dim", f"{v} dim 2^{d.bit_length() - 1}", {"variant": v, "dim": d}))
    if bergson:
        for e in bergson_dims:
            out += bergson_rows(1 << e)
    for e in toward_dims:
        out += toward_bergson_rows(1 << e, bergson)
    return out


def bergson_k(dim: int) -> int:
    """bergson's per-module k for `dim`: it projects each of the 8 block matrices to k × k (it leaves
    the tied embedding out), so 8 k² ≤ dim is the closest it comes from below."""
    return math.isqrt(dim // 8)


def bergson_rows(dim: int) -> list[tuple[str, str, dict[str, Any]]]:
    """bergson's `trackstar` beside tracestar at one dimension: the closest layout tracestar has to
    bergson's (one block per weight matrix, no V, since bergson cannot read Adafactor's V), the same
    with V, and tracestar's defaults; each ΔLDS is paired against bergson's row."""
    e, k = dim.bit_length() - 1, bergson_k(dim)
    sec, ref = f"bergson 2^{e}", f"bergson trackstar 8 × {k}², no V"
    return [
        (sec, ref, {"bergson": k}),
        (sec, f"trackstar 2^{e} module blocks, no V", {"variant": None, "dim": dim, "ref": ref, "build": {
            "blocks": "module", "optimizer_correction": False, "preconditioner": "mixed"}}),
        (sec, f"trackstar 2^{e} module blocks", {"variant": "trackstar", "dim": dim, "ref": ref, "build": {"blocks": "module"}}),
        (sec, f"trackstar 2^{e} paper blocks (default)", {"variant": "trackstar", "dim": dim, "ref": ref}),
    ]


#: What bergson's `trackstar` (2.5.1) does where tracestar's defaults differ; its damping is the same
#: (δ = 0.1 times the mean eigenvalue, 1/(σ + δ) on the query against tracestar's 1/√(σ + δ) on both sides).
BERGSON_SETTINGS: dict[str, Any] = {"blocks": "module", "r_block": 1 << 20, "optimizer_correction": False,
                                    "unit_norm": False, "preconditioner": "mixed"}


#: Above this dimension the one-full-R rows are left out: one R per block means 10 eigendecompositions
#: of 6,400² (module blocks) or 5 of 13,107² (paper blocks) at 2^16, hours on a 2-core CPU.
FULL_R_MAX_DIM = 1 << 14


def toward_bergson_rows(dim: int, bergson: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """tracestar's default trackstar at `dim`, then one of bergson's settings at a time, then all of
    them (with and without unit norm). Each row's ΔLDS is paired against the first. bergson's λ comes
    from its own run at this dimension (component 1,000 of its pooled spectra, not scaled to the
    dimension) when --bergson is given, else the 0.91 it chose on the fact world."""
    e = dim.bit_length() - 1
    sec, base = f"toward bergson 2^{e}", f"trackstar 2^{e} (tracestar defaults)"
    lam: Any = ("bergson", bergson_k(dim)) if bergson else 0.91
    lam_label = "bergson's λ" if bergson else "λ 0.91"
    mixed = {"variant": None, "dim": dim, "ref": base}
    full_r = dim <= FULL_R_MAX_DIM
    bs = dict(BERGSON_SETTINGS) if full_r else {k: v for k, v in BERGSON_SETTINGS.items() if k != "r_block"}
    but = "" if full_r else " (R ranges of 2,048)"
    out = [
        (sec, base, {"variant": "trackstar", "dim": dim}),
        (sec, f"2^{e} + module blocks", {"variant": "trackstar", "dim": dim, "ref": base, "build": {"blocks": "module"}}),
    ]
    if full_r:
        out.append((sec, f"2^{e} + one full R per block", {"variant": "trackstar", "dim": dim, "ref": base,
                                                           "build": {"r_block": 1 << 20}}))
    return out + [
        (sec, f"2^{e} + {lam_label}", {"variant": "trackstar", "dim": dim, "ref": base, "refit": {"lam": lam}}),
        (sec, f"2^{e} + no V", {**mixed, "build": {"optimizer_correction": False, "preconditioner": "mixed"}}),
        (sec, f"2^{e} + raw lengths (no unit norm)", {**mixed, "build": {"unit_norm": False, "preconditioner": "mixed"}}),
        (sec, f"2^{e} all of bergson's settings{but}", {**mixed, "build": bs, "refit": {"lam": lam}}),
        (sec, f"2^{e} all of bergson's but unit norm{but}", {**mixed, "build": {**bs, "unit_norm": True}, "refit": {"lam": lam}}),
        (sec, f"2^{e} all of bergson's but λ (automatic){but}", {**mixed, "build": bs}),
        (sec, f"2^{e} + {lam_label} + raw lengths", {**mixed, "build": {"unit_norm": False, "preconditioner": "mixed"},
                                                     "refit": {"lam": lam}}),
    ]


def _index_dir(root: Path, spec: dict[str, Any]) -> Path:
    extra = "-".join(f"{k}{v}" for k, v in sorted(spec.get("build", {}).items()))
    return root / f"{spec['variant'] or 'custom'}-d{spec['dim']}{('-' + extra) if extra else ''}"


def _refit_dir(base: Path, refit_opts: dict[str, Any]) -> Path:
    return base.with_name(base.name + "-refit-" + "-".join(f"{k}{v}" for k, v in sorted(refit_opts.items())))


def _resolve_lam(root: Path, lam: Any) -> float | None:
    """A refit's λ: a number, None (automatic), or ("bergson", k): the λ bergson chose at k."""
    if isinstance(lam, tuple):
        path = root / f"bergson-k{lam[1]}" / "lambda.txt"
        if not path.exists():
            raise SystemExit(f"{path}: not found (--toward-dims needs bergson run at the same dimension: "
                             "--bergson PYTHON with that exponent in --bergson-dims)")
        return round(float(path.read_text()), 4)
    return lam


def index_for(data: LdsData, root: Path, spec: dict[str, Any], seed: int) -> Path:
    """The index of a row: built once (cached by its directory), then refitted when the row asks."""
    base = _index_dir(root, spec)
    build_index(data.model_dir, data.corpus, base, variant=spec["variant"], eval_queries=str(data.queries_path),
                proj_dim=spec["dim"], optimizer_state=str(data.model_dir / "optimizer.pt"), seed=seed, quiet=True,
                **spec.get("build", {}))
    if "refit" not in spec:
        return base
    opts = dict(spec["refit"])
    if "lam" in opts:
        opts["lam"] = _resolve_lam(root, opts["lam"])
    out = _refit_dir(base, opts)
    eval_q = str(data.queries_path)
    if "eval_n" in opts:
        eval_q = str(root / f"eval-queries-{opts['eval_n']}.jsonl")
        write_jsonl(eval_q, [{"id": q.id, "prompt": q.prompt, "target": q.target} for q in data.queries[: opts["eval_n"]]])
    mixed = spec["variant"] == "trackstar" or spec.get("build", {}).get("preconditioner") == "mixed"
    kind = "mixed" if mixed else "train"
    refit(base, out, eval_queries=eval_q if kind == "mixed" else None, preconditioner=kind, lam=opts.get("lam"),
          damping=opts.get("damping"), quiet=True)
    return out


def _lambda(index_dir: Path) -> float | None:
    pre = json.loads((index_dir / "manifest.json").read_text())["preconditioner"]
    return pre.get("lambda")


def row_scores(data: LdsData, root: Path, spec: dict[str, Any], seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """[Q, N] scores of one row, and what to print beside them (λ, dimension, seconds to build)."""
    if "bergson" in spec:
        k = spec["bergson"]
        work = root / f"bergson-k{k}"
        scores = bergson_scores(data, work, k)
        return scores, {"dim": 8 * k * k, "lambda": bergson_lambda(work), "build_s": float((work / "seconds.txt").read_text())}
    if "baseline" in spec:
        if spec["baseline"] == EXACT:
            cache = root / "exact-scores.npy"
            if not cache.exists():
                np.save(cache, exact_gradient_scores(data.model_dir, data.texts, data.queries))
            return np.load(cache), {}
        return baseline_scores(spec["baseline"], data.texts, data.queries, data.relevant, seed), {}
    d = index_for(data, root, spec, seed)
    manifest = json.loads((d / "manifest.json").read_text())
    t0 = time.monotonic()
    scores = index_scores(d, data.queries, data.model_dir)
    extra = {"lambda": _lambda(d), "dim": manifest["dim"], "score_s": round(time.monotonic() - t0, 2)}
    base = json.loads((_index_dir(root, spec) / "manifest.json").read_text())
    if "total" in base.get("timings", {}):
        extra["build_s"] = base["timings"]["total"]
    return scores, extra


#: Where a Python with bergson installed is (`--bergson`); bergson is not a dependency of tracestar.
BERGSON_PYTHON: str | None = None


def bergson_scores(data: LdsData, work: Path, k: int) -> np.ndarray:
    """[Q, N] scores from `bergson trackstar` (its own R mixing, λ and damping) on the same model and world.

    bergson reads a (prompt, completion) query through the tokenizer's chat template, so it runs on a
    copy of the model whose template is the bare concatenation: the same text the index scores.
    Its loader finds no second moment in torch's Adafactor state (row_var/col_var), so it runs
    without the optimizer correction. Scores come from its scores/scores.bin ([N] records of
    (score_q float32, written_q bool), described by scores/info.json).
    """
    import shutil
    import subprocess

    scores_bin = work / "run" / "scores" / "scores.bin"
    if not scores_bin.exists():
        model = work / "model"
        if not model.exists():
            shutil.copytree(data.model_dir, model)
            cfg_path = model / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
            cfg_path.write_text(json.dumps(cfg))
        write_jsonl(work / "corpus.jsonl", [{"text": t} for t in data.texts])
        write_jsonl(work / "queries.jsonl", [{"prompt": q.prompt, "completion": q.target} for q in data.queries])
        cmd = [BERGSON_PYTHON, "-m", "bergson", "trackstar", str(work / "run"), "--model", str(model),
               "--data.dataset", str(work / "corpus.jsonl"), "--query.dataset", str(work / "queries.jsonl"),
               "--query.prompt_column", "prompt", "--query.completion_column", "completion", "--projection_dim", str(k),
               "--auto_batch_size", "false", "--token_batch_size", "96", "--overwrite", "true"]
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
                       stdout=subprocess.DEVNULL)
        (work / "seconds.txt").write_text(f"{time.monotonic() - t0:.1f}\n")
    info = json.loads((work / "run" / "scores" / "info.json").read_text())
    rec = np.fromfile(scores_bin, dtype=np.dtype(info["dtype"]), count=info["num_rows"])
    return np.stack([rec[f"score_{q}"].astype(np.float64) for q in range(info["num_scores"])])  # [Q, N]


def bergson_lambda(work: Path) -> float | None:
    """The λ bergson mixed its Hessians with (its `compute_lambda` on the saved spectra), cached in lambda.txt."""
    import subprocess

    path = work / "lambda.txt"
    if not path.exists():
        if BERGSON_PYTHON is None:
            return None
        run = work / "run"
        code = ("import sys, torch; from bergson.utils.math import compute_lambda; "
                "ld = lambda p: torch.load(p, weights_only=False); "
                f"print(compute_lambda(ld('{run}/query_hessian/hessians_eigen.pth'), "
                f"ld('{run}/value_hessian/hessians_eigen.pth'), 1000))")
        out = subprocess.run([BERGSON_PYTHON, "-c", code], check=True, capture_output=True, text=True).stdout
        path.write_text(out.strip().splitlines()[-1] + "\n")
    return float(path.read_text())


def tail_patch_rows(data: LdsData, results: dict[str, list[dict]], n_queries: int) -> dict[str, dict[str, Any]]:
    """Δ log p(target) after one step on each row's top-1 and top-10 proponents, on one query sample."""
    from tracestar.evaluate.run import sample_queries
    from tracestar.evaluate.tailpatch import TailPatcher, tail_patch

    sample = sample_queries(data.queries, n_queries)
    keep = {q.id for q in sample}
    patcher = TailPatcher.from_dir(data.model_dir)
    texts = dict(zip(data.doc_ids, data.texts))
    sub = {name: [r for r in res if r["query_id"] in keep] for name, res in results.items()}
    return tail_patch(patcher, sample, sub, texts, ks=(1, 10), progress=True)


def format_table(table: list[dict[str, Any]], reference: str = "trackstar") -> str:
    """Markdown, one line per row; ΔLDS is paired (same queries, same runs) against the `reference`
    row, or the row's own "ref" (the first row of its section), with a bootstrap CI over queries:
    rows differ by less than their own CIs suggest. "build s": the index build (the base index of a
    refit), or bergson's whole pipeline."""
    from tracestar.evaluate.lds import bootstrap_ci

    per_query = {r["row"]: np.array(r["per_query"]) for r in table}
    lines = [(f"| section | row | λ | LDS [95% CI] | ΔLDS vs {reference} or the section's first row [95% CI] | MRR | R@10 | "
              "Δlog p @1 | Δlog p @10 | build s |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lam = f"{r['lambda']:.3f}" if r.get("lambda") is not None else ""
        tp = r.get("tailpatch") or {}
        t1 = f"{tp['1']['delta_logprob']:+.3f}" if "1" in tp else ""
        t10 = f"{tp['10']['delta_logprob']:+.3f}" if "10" in tp else ""
        ref = r.get("ref", reference)
        diff = ""
        if ref in per_query and r["row"] != ref:
            d = np.array(r["per_query"]) - per_query[ref]
            lo, hi = bootstrap_ci(d)
            diff = f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
        build = f"{r['build_s']:.1f}" if r.get("build_s") is not None else ""
        lines.append(f"| {r['section']} | {r['row']} | {lam} | {r['lds']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {diff} | "
                     f"{r['mrr']:.3f} | {r['recall@10']:.3f} | {t1} | {t10} | {build} |")
    return "\n".join(lines)


def _exponents(text: str) -> tuple[int, ...]:
    """"12,14,16" → (12, 14, 16); "" → ()."""
    return tuple(int(x) for x in text.split(",") if x.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", help="a `tracestar world` directory (default: the small world, written to OUT/world)")
    ap.add_argument("--out", default="lds-bench", help="working directory (cached, resumable)")
    ap.add_argument("--subsets", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--dim", type=int, default=BASE_DIM, help="base dimension of the ladder and settings rows")
    ap.add_argument("--tail-patch", type=int, default=50, help="queries to tail-patch (0: none)")
    ap.add_argument("--sections", help="comma-separated sections to run (default: all)")
    ap.add_argument("--rows", help="comma-separated pieces of row labels: only the rows whose label holds one "
                    "(default: all rows of the chosen sections)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bergson", metavar="PYTHON", help="a Python with bergson installed: adds bergson's trackstar "
                    "beside tracestar at each of --bergson-dims")
    ap.add_argument("--bergson-dims", default="12,14", help="exponents of 2 for the bergson rows (default %(default)s; "
                    "16 takes bergson over an hour on a 2-core CPU: 24 float64 eigendecompositions of 8,100²)")
    ap.add_argument("--toward-dims", default="14", help="exponents of 2 at which tracestar's defaults move one at a time "
                    "to bergson's settings (default %(default)s; empty: none)")
    ap.add_argument("--render", action="store_true", help="print OUT/table.json as Markdown and stop")
    args = ap.parse_args()
    if args.render:
        saved = json.loads((Path(args.out) / "table.json").read_text())
        print(format_table(saved["rows"]))
        print(json.dumps(saved["settings"]))
        return
    global BERGSON_PYTHON
    BERGSON_PYTHON = args.bergson
    out = Path(args.out)
    world = Path(args.world) if args.world else out / "world"
    if not args.world and not (world / "queries.jsonl").exists():
        from tracestar.world import make_world

        make_world(world, scale="small")
    t0 = time.monotonic()
    data = prepare_lds(world, out, subsets=args.subsets, fraction=args.fraction, seed=args.seed)
    if data is None:
        return
    print(f"runs: {data.masks.shape[0]} subsets of {int(data.masks[0].sum())}/{len(data.texts)} documents, "
          f"{len(data.queries)} queries ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    wanted = set(args.sections.split(",")) if args.sections else None
    table, lists, root = [], {}, out / "indexes"
    plan = rows(args.dim, bergson=bool(args.bergson), bergson_dims=_exponents(args.bergson_dims),
                toward_dims=_exponents(args.toward_dims))
    for section, label, spec in plan:
        if wanted and section not in wanted:
            continue
        if args.rows and not any(piece in label for piece in args.rows.split(",")):
            continue
        t1 = time.monotonic()
        scores, extra = row_scores(data, root, spec, args.seed)
        ref = {"ref": spec["ref"]} if "ref" in spec else {}
        table.append({"section": section, "row": label, **ref, **extra, **score_summary(data, scores, seed=args.seed)})
        lists[label] = top_results(scores, data.doc_ids, data.queries, k=10)
        r = table[-1]
        print(f"{section:>14} {label:<36} LDS {r['lds']:+.3f}  MRR {r['mrr']:.3f}  ({time.monotonic() - t1:.0f} s)",
              file=sys.stderr, flush=True)
        (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    if args.tail_patch:
        tp = tail_patch_rows(data, lists, args.tail_patch)
        for r in table:
            r["tailpatch"] = tp[r["row"]]
    settings = {"subsets": args.subsets, "fraction": args.fraction, "dim": args.dim, "tail_patch_queries": args.tail_patch,
                "n_queries": len(data.queries), "n_docs": len(data.texts), "seconds": round(time.monotonic() - t0)}
    (out / "table.json").write_text(json.dumps({"settings": settings, "rows": table}, indent=1) + "\n")
    md = format_table(table)
    (out / "table.md").write_text(md + "\n")
    print(md)
    print(json.dumps(settings))


if __name__ == "__main__":
    main()
