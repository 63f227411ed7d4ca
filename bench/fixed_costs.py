"""Whole-process cost of `tracestar index` against one training pass over the same corpus, per phase.

The in-loop rate (`index_throughput.py`) is only part of a build: V, R statistics, the
eigendecompositions, the final vectors and the writes come on top, and on a small model with many
short documents at a large dimension they dominate. This bench, in one run:

  1. writes a ~2M-parameter GPT-2 (random weights) and a synthetic corpus of short documents
     (and, with `--eval-queries N`, N synthetic queries, so that R is mixed);
  2. times one training pass over that corpus in this process: tokenization, length-bucketed
     batches, forward + backward + an AdamW step per batch (the work a training epoch does);
  3. builds the index in a fresh process for each build asked for (`tracestar index` defaults
     otherwise: V estimated, R_train or mixed) and prints its wall time, each phase
     (manifest["timings"]), its peak RSS and the bytes it wrote (raw vectors, final vectors,
     preconditioner): with `--before SRC` first one with another tracestar source tree (the code
     before a change, e.g. `git archive HEAD~3 src | tar -x -C /tmp/before`), then one per
     `--raw-dtype`, then one per `--r-factor` other than eigh;
  4. compares the builds: the bytes and per-document cosine of the final vectors against the
     default build, and for another factor (another basis) every document-document score and
     top-10; with `--eigh32`, the float32 eigendecomposition the factor replaces, fitted in this
     process on the default build's raw rows, timed range by range beside float64 `eigh`,
     `eigvalsh` and Cholesky.

    OMP_NUM_THREADS=1 python bench/fixed_costs.py --docs 3000 --proj-dim 65536 --threads 1 \\
        --raw-dtype float32,bfloat16,none
    OMP_NUM_THREADS=1 python bench/fixed_costs.py --docs 3000 --proj-dim 65536 --threads 1 \\
        --r-factor eigh,cholesky --eval-queries 32 --before /tmp/before/src --eigh32

`--raw-dtype` values other than float32 need a tracestar that has the option. `--v-only MODEL`
times V estimation alone (no optimizer state: the mean squared gradient of `--docs` documents):

    OMP_NUM_THREADS=1 python bench/fixed_costs.py --v-only smollm2 --docs 128 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

PHASES = ("load", "V", "verify", "corpus pass", "R statistics", "eigendecomposition", "final vectors", "writes")


def write_corpus(path: Path, n_docs: int, vocab: int, lo: int, hi: int) -> None:
    """`n_docs` documents of `lo`–`hi` random words of the bench tokenizer's vocabulary (seeded)."""
    rng = random.Random(n_docs)
    with open(path, "w") as fh:
        for i in range(n_docs):
            words = " ".join(f"w{rng.randrange(vocab)}" for _ in range(rng.randint(lo, hi)))
            fh.write(json.dumps({"id": str(i), "text": words}) + "\n")


def training_pass(model_dir: Path, corpus: Path, batch_tokens: int, max_length: int) -> dict:
    """Wall seconds of one epoch: read and tokenize the corpus, then per length-bucketed batch a
    forward, backward with weight gradients and an AdamW step (what `tracestar index`'s corpus
    pass is compared with)."""
    from tracestar.batching import (
        bucketed,
        collate,
        encode_document,
        forward_loss,
        pad_id,
    )
    from tracestar.corpus import iter_documents
    from tracestar.model import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    model.train()
    examples = [encode_document(tokenizer, d.text, i, max_length) for i, d in enumerate(iter_documents(corpus))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    tokens = 0
    for group in bucketed(examples, batch_tokens):
        batch = collate(group, pad_id(tokenizer))
        optimizer.zero_grad(set_to_none=True)
        forward_loss(model, batch).mean().backward()
        optimizer.step()
        tokens += batch.n_tokens
    return {"seconds": time.perf_counter() - t0, "tokens": tokens}


def write_queries(path: Path, n: int, vocab: int) -> None:
    """`n` queries of a 6-word prompt and a 1-word target from the bench vocabulary (seeded)."""
    rng = random.Random(n + 1)
    with open(path, "w") as fh:
        for i in range(n):
            prompt = " ".join(f"w{rng.randrange(vocab)}" for _ in range(6))
            fh.write(json.dumps({"id": f"q{i}", "prompt": prompt, "target": f" w{rng.randrange(vocab)}"}) + "\n")


def _build_child(model_dir: str, corpus: str, out: str, kw_json: str) -> None:
    """Runs in a fresh process: one build with the keyword arguments `kw_json`, then one JSON line
    with its costs (and which tracestar source it ran)."""
    import tracestar
    from tracestar.api import build_index
    from tracestar.index import writer
    from tracestar.index.store import read_manifest

    kw = json.loads(kw_json)
    t0 = time.perf_counter()
    build_index(model_dir, corpus, out, quiet=True, **kw)
    wall = time.perf_counter() - t0
    manifest = read_manifest(out)
    sizes = {kind: sum(f.stat().st_size for f in (Path(out) / kind).glob("*.npy")) for kind in writer.KINDS}
    sizes["preconditioner"] = (Path(out) / writer.PRECONDITIONER).stat().st_size
    print(json.dumps({"wall_s": wall, "peak_rss_mb": _peak_rss_mb(), "timings": manifest.get("timings") or {},
                      "bytes": sizes, "dim": manifest["dim"], "lambda": manifest["preconditioner"].get("lambda"),
                      "n_ranges": manifest["preconditioner"].get("n_ranges"),
                      "src": str(Path(tracestar.__file__).parent)}))


def build(model_dir: Path, corpus: Path, out: Path, kw: dict, threads: int, src: str | None = None) -> dict:
    """One build in a fresh process (with `src` first on its path: another tracestar tree)."""
    cmd = [sys.executable, __file__, "--child", str(model_dir), str(corpus), str(out), json.dumps(kw), "--threads",
           str(threads)]
    env = {**os.environ, "PYTHONPATH": src} if src else None
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"build {kw} failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if src and not r["src"].startswith(str(Path(src).resolve())):
        raise SystemExit(f"the build meant to run {src} ran {r['src']}")
    return r


def _save_llama_with_tokenizer(preset: str, path: Path) -> None:
    """A Llama preset of `index_throughput.py` (random weights) with a word-level tokenizer."""
    from index_throughput import llama_model, save_with_word_tokenizer

    save_with_word_tokenizer(llama_model(preset, "cpu", torch.float32), path)


def v_only(model: str, n_docs: int, lo: int, hi: int) -> None:
    """Time V estimation alone (`Tracer.normalizer` on `n_docs` documents, as a build without an
    optimizer state runs it) on `model`: "2m" (GPT-2) or a Llama preset such as "smollm2"."""
    from tracestar.corpus import iter_documents
    from tracestar.options import BuildOptions
    from tracestar.tracer import Tracer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if model in _throughput().SIZES:
            _throughput()._save_model_with_tokenizer(model, root / "model")
        else:
            _save_llama_with_tokenizer(model, root / "model")
        tracer = Tracer(root / "model")
        write_corpus(root / "corpus.jsonl", n_docs, tracer.model.config.vocab_size - 3, lo, hi)
        docs = list(iter_documents(root / "corpus.jsonl"))
        _reset = __import__("index_throughput")._reset_peak_rss
        _reset()
        t0 = time.perf_counter()
        tracer.normalizer(BuildOptions(quiet=True), docs)
        wall = time.perf_counter() - t0
        rss = __import__("index_throughput")._peak_rss_now_mb()
        print(f"V estimate, {model} ({tracer.coverage['n_params']:,} parameters), {n_docs} documents of {lo}-{hi} "
              f"words: {wall:.1f} s ({wall / n_docs * 1000:.0f} ms per document), peak RSS {rss:,.0f} MB")


def _throughput():
    """`index_throughput.py`, imported by the parent process only: a build child may run another
    tracestar tree (`--before`), which that bench's own imports need not match."""
    import index_throughput

    return index_throughput


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # [--child MODEL CORPUS OUT KW --threads N], from `build`
        torch.set_num_threads(int(sys.argv[-1]))
        _build_child(*sys.argv[2:6])
        return
    SIZES = _throughput().SIZES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2m", choices=tuple(SIZES))
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--min-words", type=int, default=16)
    ap.add_argument("--max-words", type=int, default=48)
    ap.add_argument("--proj-dim", type=int, default=65536)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--raw-dtype", default="float32", help="comma list of float32 / bfloat16 / none, each built")
    ap.add_argument("--r-factor", default="eigh", help="comma list of eigh / cholesky, each built (float32 raw)")
    ap.add_argument("--eval-queries", type=int, default=0, metavar="N", help="N synthetic eval queries: mixed R")
    ap.add_argument("--before", default=None, metavar="SRC",
                    help="a tracestar source tree (the directory holding tracestar/) to build with first")
    ap.add_argument("--eigh32", action="store_true",
                    help="also fit R with float32 eigh on the default build's raw rows and compare")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--v-only", default=None, metavar="MODEL",
                    help="only time V estimation on --docs documents: 2m (GPT-2) or a Llama preset (smollm2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.v_only:
        v_only(args.v_only, args.docs, args.min_words, args.max_words)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _throughput()._save_model_with_tokenizer(args.size, root / "model")
        corpus = root / "corpus.jsonl"
        vocab = SIZES[args.size][2] - 3
        write_corpus(corpus, args.docs, vocab, args.min_words, args.max_words)
        base: dict = {"proj_dim": args.proj_dim, "batch_tokens": args.batch_tokens}
        if args.eval_queries:
            write_queries(root / "queries.jsonl", args.eval_queries, vocab)
            base["eval_queries"] = str(root / "queries.jsonl")
        n_params = sum(p.numel() for p in __import__("tracestar.model", fromlist=["load_model"]).load_model(
            root / "model")[0].parameters())
        train = training_pass(root / "model", corpus, args.batch_tokens, 512)
        print(f"torch {torch.__version__}, {args.threads} thread(s), load average {_load()}; gpt2 {args.size} "
              f"({n_params:,} parameters), {args.docs:,} documents of {args.min_words}-{args.max_words} words "
              f"({train['tokens']:,} tokens), --proj-dim {args.proj_dim}, "
              f"{'mixed R, ' + str(args.eval_queries) + ' eval queries' if args.eval_queries else 'R_train'}")
        print(f"training pass (tokenize + forward + backward + AdamW step): {train['seconds']:.1f} s")
        runs: list[tuple[str, dict, str | None]] = []
        if args.before:
            runs.append(("before", base, args.before))
        runs += [(f"--raw-dtype {d}", {**base, **({} if d == "float32" else {"raw_dtype": d})}, None)
                 for d in args.raw_dtype.split(",")]
        runs += [(f"--r-factor {f}", {**base, "r_factor": f}, None) for f in args.r_factor.split(",") if f != "eigh"]
        dirs = {}
        for label, kw, src in runs:
            dirs[label] = out = root / f"idx-{len(dirs)}"
            r = build(root / "model", corpus, out, kw, args.threads, src)
            mb = {k: v / 2**20 for k, v in r["bytes"].items()}
            after = sum(r["timings"].get(p, 0.0) for p in ("R statistics", "eigendecomposition", "final vectors"))
            lam = f"; λ {r['lambda']!r}" if r["lambda"] is not None else ""
            print(f"index {label}: {r['wall_s']:.1f} s = {r['wall_s'] / train['seconds']:.2f}x the training pass; "
                  f"after the corpus pass {after:.1f} s; peak RSS {r['peak_rss_mb']:,.0f} MB; written: raw "
                  f"{mb['raw']:.1f} MB, vectors {mb['vectors']:.1f} MB, preconditioner {mb['preconditioner']:.1f} MB "
                  f"(dim {r['dim']:,}, {r['n_ranges']} R ranges){lam}; load average {_load()}")
            print("  phases: " + ", ".join(f"{k} {r['timings'][k]:.1f} s" for k in PHASES if k in r["timings"]))
        ref = dirs.get("--raw-dtype float32")
        for label, out in dirs.items():
            if ref is None or out == ref:
                continue
            if label.startswith("--r-factor"):
                print(f"scores, {label} vs eigh: {_score_agreement(ref, out)}")
                continue
            cos = _cosines(ref, out)
            same = _vector_sha(ref) == _vector_sha(out)
            print(f"final vectors, {label} vs --raw-dtype float32: {'identical bytes' if same else 'bytes differ'}, "
                  f"cosine per document min {cos.min():.9f}, median {float(np.median(cos)):.9f}")
        if args.eigh32 and ref is not None:
            _eigh32_check(ref, args.threads)


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _vector_sha(index: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted((index / "vectors").glob("*.npy")):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def _score_agreement(a: Path, b: Path, n: int = 256) -> str:
    """Every score of the first `n` documents against all, in both indexes: the largest difference,
    how many of the n top-10 lists (self excluded) are the same in order and as sets."""
    va, vb = _vectors(a), _vectors(b)
    same, same_set = _top10_same(va, vb, n)
    n = min(n, len(va))
    diff = np.abs(va[:n] @ va.T - vb[:n] @ vb.T)
    return (f"max |Δ score| {diff.max():.2e} (scores up to {np.abs(va[:n] @ va.T).max():.3f}); the top-10 of {same} "
            f"of {n} documents in the same order, {same_set} as the same set; largest per-document vector change "
            f"{np.abs(va - vb).max():.3f} (another basis)")


def _eigh32_check(index: Path, threads: int) -> None:
    """R_train fitted on the default build's raw rows (all of them, as the build's sample) per range
    with float64 eigh, float32 eigh, float64 eigvalsh and Cholesky, timed range by range; the final
    vectors of the float32 eigh against the float64 one after fp16 storage."""
    from tracestar.index import writer
    from tracestar.index.store import read_manifest
    from tracestar.preconditioner import (
        Preconditioner,
        RStats,
        chol_whitener,
        inv_sqrt,
        r_ranges,
    )
    from tracestar.projection import Block
    from tracestar.tracer import finalize_vectors

    manifest = read_manifest(index)
    ranges = r_ranges([Block.from_json(b) for b in manifest["projection"]["blocks"]])
    raw = torch.from_numpy(np.concatenate([writer.load_raw(index, s, "float32") for s in range(len(manifest["shards"]))]))
    stats = RStats(ranges)
    stats.update(raw)
    damping = manifest["preconditioner"]["damping"]
    ways = {"eigh float64": lambda r: inv_sqrt(r, damping), "eigh float32": lambda r: _inv_sqrt32(r, damping),
            "eigvalsh float64": torch.linalg.eigvalsh, "cholesky float64": lambda r: chol_whitener(r, damping)}
    took = dict.fromkeys(ways, 0.0)
    mats: dict[str, list] = {k: [] for k in ways}
    torch.set_num_threads(1)
    for i in range(len(ranges)):
        r = stats.mean(i)
        for name, fn in ways.items():
            t0 = time.perf_counter()
            res = fn(r)
            took[name] += time.perf_counter() - t0
            if name.startswith("eigh"):  # only these two are compared below
                mats[name].append(res)
    torch.set_num_threads(threads)
    print(f"R_train's {len(ranges)} ranges, one thread, side by side (load average {_load()}): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()))
    out = {}
    for name in ("eigh float64", "eigh float32"):
        pre = Preconditioner("train", ranges, mats[name], None, damping)
        out[name] = finalize_vectors(raw, pre, True).numpy().astype(np.float16)
    a, b = out["eigh float64"].astype(np.float32), out["eigh float32"].astype(np.float32)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    differ = float((out["eigh float64"] != out["eigh float32"]).mean())
    order, sets = _top10_same(a, b)
    print(f"final vectors (fp16), float32 eigh vs float64: {differ:.2%} of the stored numbers differ; cosine per "
          f"document min {cos.min():.7f}, median {float(np.median(cos)):.7f}; top-10 of {min(256, len(a))} "
          f"documents: {order} in the same order, {sets} as the same set")


def _inv_sqrt32(r: torch.Tensor, damping: float) -> torch.Tensor:
    """`inv_sqrt` in float32 (the eigendecomposition and the product): what float32 would give."""
    evals, evecs = torch.linalg.eigh(r.float())
    evals = evals.clamp(min=0.0)
    shift = damping * float(evals.mean()) if float(evals.mean()) > 0 else 1e-12
    return (evecs * (evals + shift).rsqrt()[None, :]) @ evecs.T


def _top10_same(va: np.ndarray, vb: np.ndarray, n: int = 256) -> tuple[int, int]:
    """Of the first `n` documents, how many have the same top-10 (self excluded) in both, in order
    and as a set."""
    n = min(n, len(va))
    tops = []
    for v in (va, vb):
        s = v[:n] @ v.T  # [n, N]
        s[np.arange(n), np.arange(n)] = -np.inf
        tops.append(np.argsort(-s, axis=1)[:, :10])
    order = int((tops[0] == tops[1]).all(axis=1).sum())
    sets = sum(set(x) == set(y) for x, y in zip(*tops))
    return order, sets


def _vectors(path: Path) -> np.ndarray:
    """[N, D] float32: an index's final vectors, every shard in row order."""
    from tracestar.api import open_index
    from tracestar.index.store import as_float32

    idx = open_index(path)
    return np.concatenate([as_float32(v, idx.manifest["dtype"]) for _, v in idx.store.iter_shards()])


def _cosines(a: Path, b: Path) -> np.ndarray:
    """[N] cosine between the two indexes' final vectors of each document."""
    va, vb = _vectors(a), _vectors(b)
    return (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))


if __name__ == "__main__":
    main()
