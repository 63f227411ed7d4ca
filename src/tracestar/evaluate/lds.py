"""The linear datamodeling score (LDS): do the scores predict what retraining actually does?

Attribution (MRR) asks whether the top documents *state* a fact; tail-patch asks whether one step
on them raises the target. LDS is the counterfactual check the field uses for both, at the level
of whole training sets:

1. draw M random subsets S_1..S_M of the corpus (each a `fraction` of it), retrain the model from
   scratch on each, and record every query's target log-probability log p(target | prompt);
2. for each query q and a score matrix τ(i, q) computed once on the FULL-corpus model, predict
   each subset's outcome as Σ_{i∈S} τ(i, q);
3. LDS = mean over queries of the Spearman correlation, over the M subsets, between predicted and
   actual log-probabilities; a bootstrap over queries gives its confidence interval.

Signs: τ is a dot product of loss gradients, so a positive τ means a step on i lowers q's loss,
i.e. raises its log-probability. A higher LDS is better; random scores give 0 ± ~1/√(M·Q).

Runs are seeded (subset m is drawn from (seed, m) alone, so a larger M keeps the first ones), cached
one JSON file per run (written atomically, keyed by everything that decides its result), resumable
(a killed job loses at most the run in progress) and shared between torchrun ranks (run m belongs to
rank m mod world). Every subset model starts from the same initialization and uses the full model's
tokenizer, so the runs differ only in their data: noise from the seed would only blur the
correlation.

Out directory::

    model/               the full-corpus model (tracestar.world.train_model)
    runs/run-0000.json   {"key", "subset", "docs_in", "logprobs" [Q], "seconds"}
    indexes/<variant>/   one index per rung of the ladder, built on model/
    lds.json             {"<method>": {"lds", "ci", "mrr", "recall@10", "per_query"}, "_settings": {...}}
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tracestar.corpus import Query, read_queries
from tracestar.errors import OptionError, UserError, check_float, check_int
from tracestar.evaluate.lds_runs import SubsetTrainer, collect_runs, target_logprobs  # noqa: F401 (re-exported)
from tracestar.files import write_text

#: The model LDS retrains M times: the trainer's GPT-2 at d_model 128 with a 2,048-token vocabulary.
#: On the `small` world (653 documents) a full run takes ~14 s on one thread and reaches ~73%
#: first-token accuracy (12 epochs); a half-corpus run ~7 s (measured on the 2-core CPU).
LDS_TRAIN: dict[str, Any] = {"d_model": 128, "vocab_size": 2048}
#: Score sets besides index variants: BM25 over the text, seeded Gaussian noise, and the fact-stating
#: documents themselves (τ = 1 for a document stating q's fact: predicts by counting them in S).
BASELINES = ("bm25", "random", "relevant")
#: `exact`: dot products of full per-example loss gradients (no projection, no V, no R).
EXACT = "exact"
DEFAULT_BOOT = 1000


# --- the math --------------------------------------------------------------------------------------


def subset_masks(n_docs: int, subsets: int, fraction: float, seed: int = 0) -> np.ndarray:
    """[M, N] bool: row m holds exactly round(fraction · N) documents drawn from (seed, m) alone."""
    size = round(fraction * n_docs)
    masks = np.zeros((subsets, n_docs), dtype=bool)
    for m in range(subsets):
        rng = np.random.default_rng([seed, m, 0x1D5])
        masks[m, rng.choice(n_docs, size=size, replace=False)] = True
    return masks


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, ties sharing the mean of the ranks they span (Spearman's convention)."""
    _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse].astype(np.float64)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two equal-length vectors; NaN when either is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else float("nan")


def per_query_lds(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """[Q] Spearman over subsets of predicted [M, Q] against actual [M, Q].

    A method whose prediction is the same for every subset (BM25 with no matching word) carries no
    information about the query: it scores 0 there, not NaN, so every method is averaged over the
    same queries.
    """
    out = np.array([spearman(predicted[:, q], actual[:, q]) for q in range(actual.shape[1])])
    return np.nan_to_num(out, nan=0.0)


def bootstrap_ci(values: np.ndarray, *, n_boot: int = DEFAULT_BOOT, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `values` over `n_boot` resamples (with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng([seed, 0xB007])
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)  # [n_boot]
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def lds(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, *, n_boot: int = DEFAULT_BOOT,
        seed: int = 0) -> dict[str, Any]:
    """LDS of a score matrix: scores [Q, N] τ(i, q), masks [M, N], actual [M, Q] log-probs."""
    predicted = masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T  # [M, Q] Σ_{i∈S} τ(i, q)
    per_q = per_query_lds(predicted, actual)
    lo, hi = bootstrap_ci(per_q, n_boot=n_boot, seed=seed)
    return {"lds": float(per_q.mean()), "ci": [lo, hi], "per_query": [round(float(x), 4) for x in per_q]}


def rank_metrics(scores: np.ndarray, relevant_rows: Sequence[Sequence[int]], k: int = 10) -> dict[str, float]:
    """Full-rank MRR and recall@k of a score matrix [Q, N] against each query's relevant rows.

    A query's rank is 1 + the number of documents scored strictly above its best relevant one;
    queries without relevant rows are skipped.
    """
    rr, hit = [], []
    for q, rows in enumerate(relevant_rows):
        if not rows:
            continue
        best = scores[q, list(rows)].max()
        rank = 1 + int((scores[q] > best).sum())
        rr.append(1.0 / rank)
        hit.append(rank <= k)
    return {"mrr": float(np.mean(rr)) if rr else float("nan"), f"recall@{k}": float(np.mean(hit)) if hit else float("nan")}


def top_results(scores: np.ndarray, doc_ids: Sequence[str], queries: Sequence[Query], k: int = 10) -> list[dict[str, Any]]:
    """tracestar-shaped result lists (top-k proponents per query) from a score matrix [Q, N]."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [{"query_id": q.id, "proponents": [{"doc_id": doc_ids[int(i)], "score": float(scores[qi, i])} for i in order[qi]],
             "opponents": []} for qi, q in enumerate(queries)]


# --- score matrices --------------------------------------------------------------------------------


def index_scores(index_dir: str | Path, queries: Sequence[Query], model_dir: str | Path | None = None) -> np.ndarray:
    """[Q, N] τ(i, q) of a built index: final query vectors · stored document vectors."""
    from tracestar.api import open_index
    from tracestar.index.store import as_float32

    idx = open_index(index_dir)
    q = idx.query_vectors(list(queries), model_dir).astype(np.float64)  # [Q, D]
    out = np.empty((len(queries), idx.store.n_rows))
    dtype = str(idx.manifest.get("dtype", "float16"))
    for start, block in idx.store.iter_shards("vectors"):
        x = as_float32(block, dtype).astype(np.float64)  # [rows, D]
        out[:, start:start + x.shape[0]] = q @ x.T
    return out


def exact_gradient_scores(model_dir: str | Path, texts: Sequence[str], queries: Sequence[Query], *,
                          max_length: int = 512) -> np.ndarray:
    """[Q, N] dot products of full per-example loss gradients (every parameter, no projection).

    The reference attribution for small problems: Q query gradients are held ([Q, P] float32), each
    document's gradient is formed once and dotted with them.
    """
    import torch

    from tracestar.batching import (
        collate,
        encode_document,
        encode_query,
        forward_loss,
        pad_id,
    )
    from tracestar.model import load_model, model_window

    model, tok = load_model(model_dir)
    window = min(max_length, model_window(model) or max_length)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad(example) -> torch.Tensor:  # [P]
        model.zero_grad(set_to_none=True)
        forward_loss(model, collate([example], pad_id(tok))).sum().backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])

    gq = torch.stack([grad(encode_query(tok, q.prompt, q.target, i, window)) for i, q in enumerate(queries)])  # [Q, P]
    out = np.empty((len(queries), len(texts)))
    for i, t in enumerate(texts):
        out[:, i] = (gq @ grad(encode_document(tok, t, i, window))).double().numpy()
    return out


def bm25_scores(texts: Sequence[str], queries: Sequence[Query]) -> np.ndarray:
    """[Q, N] BM25 scores (query = prompt + target); documents sharing no word score 0."""
    from tracestar.evaluate.bm25 import BM25Retriever, query_text

    ids = [str(i) for i in range(len(texts))]
    hits = BM25Retriever(ids, list(texts)).search([query_text(q) for q in queries], top_k=len(texts))
    out = np.zeros((len(queries), len(texts)))
    for qi, h in enumerate(hits):
        for d, s in h:
            out[qi, int(d)] = s
    return out


def baseline_scores(name: str, texts: Sequence[str], queries: Sequence[Query], relevant_rows: Sequence[Sequence[int]],
                    seed: int = 0) -> np.ndarray:
    """[Q, N] scores of a baseline of `BASELINES`."""
    if name == "bm25":
        return bm25_scores(texts, queries)
    if name == "random":
        return np.random.default_rng([seed, 0x5EED]).standard_normal((len(queries), len(texts)))
    if name == "relevant":
        out = np.zeros((len(queries), len(texts)))
        for qi, rows in enumerate(relevant_rows):
            out[qi, list(rows)] = 1.0
        return out
    raise ValueError(f"unknown baseline {name!r}")


# --- the command -----------------------------------------------------------------------------------


def check_lds_options(subsets: int, fraction: float, variants: Sequence[str], max_queries: int | None, proj_dim: int,
                      seed: int = 0) -> None:
    """Range checks before anything is trained or written (each error names the option).

    Why: a Spearman correlation over fewer than 3 subsets is ±1 or undefined; a subset must hold some
    but not all documents for the subsets to differ.
    """
    from tracestar.options import VARIANTS

    check_int("--subsets", subsets, minimum=3, why=" (a rank correlation over fewer subsets is ±1 or undefined)")
    check_float("--fraction", fraction, above=0.0, maximum=1.0)
    if fraction >= 1.0:
        raise OptionError("--fraction", "must be below 1 (every subset would be the whole corpus)")
    known = [*VARIANTS, EXACT, *BASELINES]
    for v in variants:
        if v not in known:
            raise OptionError("--variants", f"unknown {v!r}; choose from {', '.join(known)}")
    check_int("--max-queries", max_queries, minimum=1, optional=True)
    check_int("--proj-dim", proj_dim, minimum=1)
    check_int("--seed", seed, minimum=0)


def world_files(world: str | Path) -> tuple[Path, Path]:
    """(corpus.jsonl, queries.jsonl) of a `tracestar world` directory, or a UserError naming the missing one."""
    w = Path(world)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (w / name).is_file():
            raise UserError(f"{w / name}: not found (--world expects a `tracestar world` directory)")
    return w / "corpus.jsonl", w / "queries.jsonl"


@dataclass
class LdsData:
    """What every method is scored against: the world, the full model, the subsets and their outcomes."""

    corpus: Path
    queries_path: Path
    model_dir: Path
    queries: list[Query]
    texts: list[str]
    doc_ids: list[str]
    relevant: list[list[int]]  # per query, the rows of the documents stating its fact
    masks: np.ndarray  # [M, N] bool
    actual: np.ndarray  # [M, Q] log p(target | prompt) after training on each subset


def prepare_lds(world: str | Path, out: str | Path, *, subsets: int = 64, fraction: float = 0.5, seed: int = 0,
                max_queries: int | None = None, train: Mapping[str, Any] | None = None,
                quiet: bool = False) -> LdsData | None:
    """Train (or find cached) the full model and the M subset runs; None on a torchrun rank other than 0."""
    from tracestar import dist
    from tracestar.corpus import iter_documents
    from tracestar.files import sha256_file
    from tracestar.world import train_model
    from tracestar.world.train import TrainConfig

    corpus, queries_path = world_files(world)
    queries = read_queries(queries_path)[:max_queries]
    docs = list(iter_documents(corpus))
    texts, row_of = [d.text for d in docs], {d.id: i for i, d in enumerate(docs)}
    relevant = [[row_of[r] for r in q.extra.get("relevant", ()) if r in row_of] for q in queries]
    train_cfg = {**LDS_TRAIN, **(train or {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dist.init_from_env("cpu")

    model_dir = out / "model"
    if dist.rank() == 0:
        log = train_model(corpus, model_dir, queries_path=queries_path, seed=seed, **train_cfg)
        _say(quiet, f"lds: full model {model_dir} ({log['first_token_accuracy']:.1%} first-token accuracy)")
    dist.barrier()
    masks = subset_masks(len(texts), subsets, fraction, seed)
    base_key = {"train": asdict(TrainConfig(seed=seed, **train_cfg)), "corpus": sha256_file(corpus),
                "queries": [[q.prompt, q.target] for q in queries],
                "tokenizer": sha256_file(model_dir / "tokenizer.json")}
    trainer = SubsetTrainer(model_dir, texts, queries, train_cfg, seed)
    actual = collect_runs(out / "runs", masks, base_key, len(queries), trainer, rank=dist.rank(), world=dist.world(), quiet=quiet)
    dist.barrier()
    if dist.rank() != 0:
        return None
    if actual is None:  # another rank died before its runs were written: finish them here
        actual = collect_runs(out / "runs", masks, base_key, len(queries), trainer, quiet=quiet)
    return LdsData(corpus, queries_path, model_dir, queries, texts, [d.id for d in docs], relevant, masks, actual)


def run_lds(
    world: str | Path,
    out: str | Path,
    *,
    subsets: int = 64,
    fraction: float = 0.5,
    variants: Sequence[str] = ("dot", "opt", "opt-norm", "train-r", "trackstar", "bm25", "random", "relevant"),
    seed: int = 0,
    proj_dim: int = 4096,
    max_queries: int | None = None,
    train: Mapping[str, Any] | None = None,
    build: Mapping[str, Any] | None = None,
    n_boot: int = DEFAULT_BOOT,
    quiet: bool = False,
) -> dict[str, Any]:
    """`tracestar lds`: train the full model and M subset models, score every method, write lds.json.

    `variants`: rungs of the ladder (indexes built on the full model at `proj_dim`), `exact`, and
    baselines. `train`: TrainConfig overrides (default `LDS_TRAIN`); `build`: extra BuildOptions for
    every index. `max_queries`: the first N queries only (cheaper exact gradients). Returns
    {method: {"lds", "ci", "per_query", "mrr", "recall@10"}, "_settings": {...}} ({} off rank 0).
    """
    check_lds_options(subsets, fraction, variants, max_queries, proj_dim, seed)
    data = prepare_lds(world, out, subsets=subsets, fraction=fraction, seed=seed, max_queries=max_queries,
                       train=train, quiet=quiet)
    if data is None:
        return {}
    out = Path(out)
    results: dict[str, Any] = {}
    for name in variants:
        scores = method_scores(data, name, out / "indexes", proj_dim=proj_dim, seed=seed, build=build or {})
        results[name] = score_summary(data, scores, n_boot=n_boot, seed=seed)
        _say(quiet, f"lds: {name:<10} LDS {results[name]['lds']:+.3f}  MRR {results[name]['mrr']:.3f}")
    results["_settings"] = {"subsets": subsets, "fraction": fraction, "seed": seed, "proj_dim": proj_dim,
                            "n_queries": len(data.queries), "n_docs": len(data.texts), "train": {**LDS_TRAIN, **(train or {})},
                            "build": dict(build or {}), "n_boot": n_boot, "world": str(world)}
    write_text(out / "lds.json", json.dumps(results) + "\n")  # compact: per-query lists are long
    return results


def score_summary(data: LdsData, scores: np.ndarray, *, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> dict[str, Any]:
    """LDS with its CI and per-query values, beside full-rank MRR and recall@10, of one score matrix."""
    return {**lds(scores, data.masks, data.actual, n_boot=n_boot, seed=seed), **rank_metrics(scores, data.relevant)}


def method_scores(data: LdsData, name: str, index_root: Path, *, proj_dim: int, seed: int = 0,
                  build: Mapping[str, Any] | None = None, index_name: str | None = None) -> np.ndarray:
    """[Q, N] τ of one method: a ladder rung (index built once under `index_root`), exact, or a baseline."""
    from tracestar.api import build_index
    from tracestar.options import VARIANTS

    if name in VARIANTS:
        d = index_root / (index_name or name)
        build_index(data.model_dir, data.corpus, d, variant=name, eval_queries=str(data.queries_path), proj_dim=proj_dim,
                    optimizer_state=str(data.model_dir / "optimizer.pt"), seed=seed, quiet=True, **(build or {}))
        return index_scores(d, data.queries, data.model_dir)
    if name == EXACT:
        return exact_gradient_scores(data.model_dir, data.texts, data.queries)
    return baseline_scores(name, data.texts, data.queries, data.relevant, seed)


def format_lds_table(results: Mapping[str, Any]) -> str:
    """A Markdown table: method, LDS [95% CI], full-rank MRR, recall@10."""
    lines = ["| method | LDS [95% CI] | MRR | R@10 |", "|---|---|---|---|"]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        lines.append(f"| {name} | {r['lds']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {r['mrr']:.3f} | {r['recall@10']:.3f} |")
    return "\n".join(lines)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
