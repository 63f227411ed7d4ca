"""Whole-process cost of `tracestar index` against one training pass over the same corpus, per phase.

The in-loop rate (`index_throughput.py`) is only part of a build: V, R statistics, the
eigendecompositions, the final vectors and the writes come on top, and on a small model with many
short documents at a large dimension they dominate. This bench, in one run:

  1. writes a ~2M-parameter GPT-2 (random weights) and a synthetic corpus of short documents;
  2. times one training pass over that corpus in this process: tokenization, length-bucketed
     batches, forward + backward + an AdamW step per batch (the work a training epoch does);
  3. builds the index in a fresh process for each `--raw-dtype` (`tracestar index` defaults
     otherwise: V estimated, R_train) and prints its wall time, each phase (manifest["timings"]),
     its peak RSS and the bytes it wrote (raw vectors, final vectors, preconditioner).

    OMP_NUM_THREADS=1 python bench/fixed_costs.py --docs 3000 --proj-dim 65536 --threads 1 \\
        --raw-dtype float32,bfloat16,none

`--raw-dtype` values other than float32 need a tracestar that has the option. `--v-only MODEL`
times V estimation alone (no optimizer state: the mean squared gradient of `--docs` documents):

    OMP_NUM_THREADS=1 python bench/fixed_costs.py --v-only smollm2 --docs 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from index_throughput import SIZES, _peak_rss_mb, _save_model_with_tokenizer

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


def _build_child(model_dir: str, corpus: str, out: str, proj_dim: int, raw_dtype: str, batch_tokens: int) -> None:
    """Runs in a fresh process: one build, then one JSON line with its costs."""
    from tracestar.api import build_index
    from tracestar.index import writer
    from tracestar.index.store import read_manifest

    kw = {} if raw_dtype == "float32" else {"raw_dtype": raw_dtype}
    t0 = time.perf_counter()
    build_index(model_dir, corpus, out, proj_dim=proj_dim, batch_tokens=batch_tokens, quiet=True, **kw)
    wall = time.perf_counter() - t0
    manifest = read_manifest(out)
    sizes = {kind: sum(f.stat().st_size for f in (Path(out) / kind).glob("*.npy")) for kind in writer.KINDS}
    sizes["preconditioner"] = (Path(out) / writer.PRECONDITIONER).stat().st_size
    print(json.dumps({"wall_s": wall, "peak_rss_mb": _peak_rss_mb(), "timings": manifest.get("timings") or {},
                      "bytes": sizes, "dim": manifest["dim"],
                      "n_ranges": manifest["preconditioner"].get("n_ranges")}))


def build(model_dir: Path, corpus: Path, out: Path, proj_dim: int, raw_dtype: str, batch_tokens: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model_dir), str(corpus), str(out), str(proj_dim), raw_dtype,
           str(batch_tokens), "--threads", str(threads)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"build with --raw-dtype {raw_dtype} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


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
        if model in SIZES:
            _save_model_with_tokenizer(model, root / "model")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2m", choices=tuple(SIZES))
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--min-words", type=int, default=16)
    ap.add_argument("--max-words", type=int, default=48)
    ap.add_argument("--proj-dim", type=int, default=65536)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--raw-dtype", default="float32", help="comma list of float32 / bfloat16 / none, each built")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--v-only", default=None, metavar="MODEL",
                    help="only time V estimation on --docs documents: 2m (GPT-2) or a Llama preset (smollm2)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.v_only:
        v_only(args.v_only, args.docs, args.min_words, args.max_words)
        return
    if args.child:
        model_dir, corpus, out, dim, raw_dtype, batch_tokens = args.child
        _build_child(model_dir, corpus, out, int(dim), raw_dtype, int(batch_tokens))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _save_model_with_tokenizer(args.size, root / "model")
        corpus = root / "corpus.jsonl"
        write_corpus(corpus, args.docs, SIZES[args.size][2] - 3, args.min_words, args.max_words)
        n_params = sum(p.numel() for p in __import__("tracestar.model", fromlist=["load_model"]).load_model(
            root / "model")[0].parameters())
        train = training_pass(root / "model", corpus, args.batch_tokens, 512)
        print(f"torch {torch.__version__}, {args.threads} thread(s); gpt2 {args.size} ({n_params:,} parameters), "
              f"{args.docs:,} documents of {args.min_words}-{args.max_words} words ({train['tokens']:,} tokens), "
              f"--proj-dim {args.proj_dim}")
        print(f"training pass (tokenize + forward + backward + AdamW step): {train['seconds']:.1f} s")
        for raw_dtype in args.raw_dtype.split(","):
            r = build(root / "model", corpus, root / f"idx-{raw_dtype}", args.proj_dim, raw_dtype, args.batch_tokens,
                      args.threads)
            mb = {k: v / 2**20 for k, v in r["bytes"].items()}
            after = sum(r["timings"].get(p, 0.0) for p in ("R statistics", "eigendecomposition", "final vectors"))
            print(f"index --raw-dtype {raw_dtype}: {r['wall_s']:.1f} s = {r['wall_s'] / train['seconds']:.2f}x the "
                  f"training pass; after the corpus pass {after:.1f} s; peak RSS {r['peak_rss_mb']:,.0f} MB; "
                  f"written: raw {mb['raw']:.1f} MB, vectors {mb['vectors']:.1f} MB, preconditioner "
                  f"{mb['preconditioner']:.1f} MB (dim {r['dim']:,}, {r['n_ranges']} R ranges)")
            print("  phases: " + ", ".join(f"{k} {r['timings'][k]:.1f} s" for k in PHASES if k in r["timings"]))
        if "float32" in args.raw_dtype.split(","):
            for raw_dtype in [d for d in args.raw_dtype.split(",") if d != "float32"]:
                cos = _cosines(root / "idx-float32", root / f"idx-{raw_dtype}")
                print(f"final vectors, --raw-dtype {raw_dtype} vs float32: cosine per document min {cos.min():.6f}, "
                      f"median {float(np.median(cos)):.6f}")


def _cosines(a: Path, b: Path) -> np.ndarray:
    """[N] cosine between the two indexes' final vectors of each document."""
    from tracestar.api import open_index
    from tracestar.index.store import as_float32

    def vectors(path: Path) -> np.ndarray:
        idx = open_index(path)
        return np.concatenate([as_float32(v, idx.manifest["dtype"]) for _, v in idx.store.iter_shards()])

    va, vb = vectors(a), vectors(b)
    return (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))


if __name__ == "__main__":
    main()
