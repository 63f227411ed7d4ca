"""Scale: a large synthetic corpus through a tiny model, then the index's size and query latency.

    python bench/scale.py --docs 1000000 --pq-rows 0 --keep IDX --out scale.json  # the issue's size: 20-25 min here
    python bench/scale.py --measure-only IDX --forms ""  # the queries again on a kept index (no build, no compress)
    python bench/scale.py --extrapolate scale.json --keep IDX   # an earlier run's figures carried to 2^16 again
    python bench/scale.py --pq-only --pq-rows 4096       # only PQ at 2^16 dims on a synthetic index
    python bench/scale.py --probe-only scale.json --docs 1000 --pq-rows 0       # the 2^16 build estimate

Steps, each printed as it ends:

1. A synthetic corpus of `--docs` documents (16–64 random words of a 500-word vocabulary) and a
   tiny GPT-2 (2 layers, width 32, random weights, saved with a word-level tokenizer).
2. Tokenizer alone over the first documents: the floor any build is compared to.
3. `build_index` in a child process at `--proj-dim` (default 2^10): docs/s, tokens/s, the ratio
   to the tokenizer's docs/s, and the child's peak RSS (`resource.getrusage(RUSAGE_CHILDREN)`);
   the load average during the build, and the corpus pass by quarter of the corpus in docs/s and
   in docs per CPU second of the build process (the second does not move with the machine's load).
   Two further small builds (`--probe-docs`, at `--proj-dim` and at 2^16) measure how the build
   rate changes with the dimension, for the extrapolation.
4. Index bytes per directory (raw/, vectors/, compressed/).
5. `compress` int8 and PQ (parameters from `pq_params`), then `--queries` query vectors (stored
   rows plus noise, unit norm) searched top-10 exactly, from int8 and from PQ (both re-ranked
   exactly): latency per query, its ratio to the exact scan's, and the top-10 overlap with exact.
6. PQ at 2^16 dims on a synthetic clustered index of `--pq-rows` rows: training and encoding
   time per row, query latency ratio to exact, overlap.
7. The figures extrapolated to 2^16 dims: bytes scale with D (fp16 vectors 2·D, raw float32
   4·D per document); the exact and int8 scans read every byte, so their latency scales with
   D × rows (also checked against step 6's exact scan at 2^16); PQ's cost per query grows at most
   linearly with the rows it scans, and IVF probing scans 1/16 of 1M: step 6's latency ×
   max(1, 62,500 / its rows) bounds it from above. The build time is the large build's
   per-document phases (corpus pass, final vectors, writes) divided by the probes' corpus-pass
   rate ratio (2^16 ÷ `--proj-dim`), plus the 2^16 probe's fixed phases and its R statistics
   scaled to the 10,000 documents R reads.

The machine may be shared, so every latency is also printed as a ratio to a reference measured in
the same run; the absolute seconds are for orientation only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HIGH_DIM = 1 << 16
VOCAB = 500


# --- corpus and model ----------------------------------------------------------------------------


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> int:
    """`n_docs` JSONL documents of 16–64 random words, streamed to `path`; returns the word count."""
    rng = random.Random(seed)
    words = 0
    with open(path, "w") as fh:
        for i in range(n_docs):
            n = rng.randint(16, 64)
            words += n
            fh.write(json.dumps({"id": f"d{i}", "text": " ".join(f"w{rng.randrange(VOCAB)}" for _ in range(n))}) + "\n")
    return words


def save_tiny_model(path: Path, width: int = 32) -> None:
    """A 2-layer GPT-2 `width` wide with random weights and a word-level tokenizer of VOCAB words
    (w0, w1, ...: the words of `write_corpus`)."""
    import torch
    from index_throughput import save_with_word_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB + 3, n_positions=128, n_embd=width, n_layer=2, n_head=2,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    save_with_word_tokenizer(GPT2LMHeadModel(cfg), path)  # <pad>, <eos>, <unk>, then the words


def tokenizer_rate(model_dir: Path, corpus: Path, n_docs: int) -> dict:
    """docs/s and tokens/s of the tokenizer alone (batches of 1,024) over the first `n_docs` documents."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = []
    with open(corpus) as fh:
        for line in fh:
            if len(texts) == n_docs:
                break
            texts.append(json.loads(line)["text"])
    t, tokens = time.perf_counter(), 0
    for lo in range(0, len(texts), 1024):
        tokens += sum(len(ids) for ids in tok(texts[lo : lo + 1024])["input_ids"])
    s = time.perf_counter() - t
    return {"docs": len(texts), "docs_per_s": len(texts) / s, "tokens_per_s": tokens / s}


# --- the build, in a child process ---------------------------------------------------------------


SHARD_DOCS = 4096


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _build_child(model_dir: str, corpus: str, out: str, proj_dim: int) -> None:
    """The build, with (finished raw shards, this process's CPU seconds) sampled every 5 s: CPU time
    per document does not depend on what else the machine runs, wall time does."""
    from tracestar.build import build_index

    samples: list[tuple[int, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(5.0):
            samples.append((len(list((Path(out) / "raw").glob("shard-*.json"))), _cpu_s()))

    sampler = threading.Thread(target=sample, daemon=True)
    t = time.perf_counter()
    sampler.start()
    build_index(model_dir, corpus, out, proj_dim=proj_dim, preconditioner="train", shard_docs=SHARD_DOCS, quiet=True)
    stop.set()
    sampler.join()
    print(json.dumps({"build_s": time.perf_counter() - t, "cpu_s": _cpu_s(), "cpu_samples": samples,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def docs_per_cpu_s_by_part(samples: list[tuple[int, float]], n_docs: int, parts: int = 4) -> list[float]:
    """Corpus-pass documents per CPU second of the build process in `parts` consecutive runs of
    shards, from the child's samples (from the first finished shard on, so loading is left out).
    Flat parts: no cost that grows with the corpus."""
    samples = [(min(n * SHARD_DOCS, n_docs), cpu) for n, cpu in samples if n >= 1]
    if len(samples) < 2 * parts:
        return []
    cuts = np.linspace(samples[0][0], samples[-1][0], parts + 1)
    at = [next(i for i, (n, _) in enumerate(samples) if n >= c) for c in cuts]
    return [(samples[b][0] - samples[a][0]) / (samples[b][1] - samples[a][1])
            for a, b in zip(at[:-1], at[1:]) if samples[b][1] > samples[a][1]]


class LoadSampler:
    """The 1-minute load average, sampled every `every` seconds while a build runs (the machine may
    be shared: a slower stretch of the build shows up here rather than as a property of the index)."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples = every, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"mean": float(np.mean(self.samples)), "max": float(np.max(self.samples)), "n": len(self.samples)}


def pass_rate_by_part(index: Path, parts: int = 4) -> list[float]:
    """docs/s of the corpus pass in `parts` consecutive runs of raw shards, from the times their
    sidecars were written (each marks a finished shard). A rate that falls from part to part while
    the load stays flat would be cost growing with the corpus; a flat one says it does not."""
    sides = sorted((index / "raw").glob("shard-*.json"))
    if len(sides) < 2 * parts:
        return []
    times = [p.stat().st_mtime for p in sides]
    rows = [json.loads(p.read_text())["rows"] for p in sides]
    cuts = np.linspace(0, len(sides) - 1, parts + 1).round().astype(int)
    return [sum(rows[a + 1 : b + 1]) / (times[b] - times[a]) for a, b in zip(cuts[:-1], cuts[1:])]


def build(model_dir: Path, corpus: Path, out: Path, proj_dim: int) -> dict:
    """Build in a fresh process; docs/s, tokens/s (tokens as docs.jsonl counts them), peak RSS, the
    load average during the build and the corpus pass's rate in four parts."""
    cmd = [sys.executable, __file__, "--build-child", str(model_dir), str(corpus), str(out), str(proj_dim)]
    with LoadSampler() as load:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"build failed:\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    docs = tokens = 0
    with open(out / "docs.jsonl") as fh:
        for line in fh:
            docs += 1
            tokens += json.loads(line)["n_tokens"]
    timings = json.loads((out / "manifest.json").read_text()).get("timings")
    return {**row, "docs": docs, "tokens": tokens, "docs_per_s": docs / row["build_s"],
            "tokens_per_s": tokens / row["build_s"], "timings": timings, "load_average": load.summary(),
            "pass_docs_per_s_by_quarter": pass_rate_by_part(out),
            "pass_docs_per_cpu_s_by_quarter": docs_per_cpu_s_by_part(row.pop("cpu_samples", []), docs)}


def tree_bytes(index: Path) -> dict:
    """Bytes per top-level entry of an index directory, and the total."""
    out = {}
    for p in sorted(index.iterdir()):
        out[p.name] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    out["total"] = sum(out.values())
    return out


# --- queries -------------------------------------------------------------------------------------


def query_vectors(store, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unit query vectors near `n` random stored rows (row + noise of the same norm), those rows)."""
    from tracestar.index.store import as_float32
    from tracestar.testing import unit

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(store.n_rows, size=n, replace=False))
    x = as_float32(store.gather("vectors", rows), store.stored_dtype("vectors"))
    return unit(x + rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(x.shape[1])), rows


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(s)) / len(s) for r, s in zip(a, b)]))


def latencies(index: Path, q: np.ndarray, source: np.ndarray, k: int = 10) -> dict:
    """Per-query seconds of exact / int8 / PQ search (best of 2, after one warm-up), overlap with
    exact, and how often the row each query was drawn from is in the top k (on near-isotropic
    vectors the rest of the exact top 10 is close to a coin toss; the source row is not)."""
    from tracestar.index.search import search, search_compressed
    from tracestar.index.store import IndexStore

    store = IndexStore(index)
    runs = {"exact": lambda: search(store, q, k, exact=True)}
    for form in store.compressed_forms():
        runs[form] = lambda form=form: search_compressed(store, q, k, form=form)
    out, ref = {}, None
    for name, fn in runs.items():
        res = fn()
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        ref = res if name == "exact" else ref
        out[name] = {"s_per_query": best / len(q), "top10_overlap": overlap(res.prop_rows, ref.prop_rows),
                     "opp_overlap": overlap(res.opp_rows, ref.opp_rows),
                     "source_in_top10": float(np.mean([s in r for s, r in zip(source, res.prop_rows)]))}
    for row in out.values():
        row["vs_exact"] = row["s_per_query"] / out["exact"]["s_per_query"]
    return out


def compress_all(index: Path, kinds: tuple[str, ...] = ("int8", "pq")) -> dict:
    from tracestar.index.compress import compress

    out = {}
    for kind in kinds:
        e = compress(index, kind)
        out[kind] = {k: e.get(k) for k in ("seconds", "train_seconds", "bytes_per_doc", "m", "nlist", "nprobe", "train_rows")}
    return out


def measure(index: Path, n_docs: int, n_queries: int, kinds: tuple[str, ...] = ("int8", "pq")) -> dict:
    """Compress `index` (the forms in `kinds`), then its bytes and the query latencies, printed."""
    from tracestar.index.store import IndexStore

    comp = compress_all(index, kinds)
    sizes = tree_bytes(index)
    print("bytes/doc: " + ", ".join(f"{k} {v / n_docs:.0f}" for k, v in sizes.items()), flush=True)
    print("compress: " + "; ".join(f"{k} {v['seconds']:.0f} s, {v['bytes_per_doc']} B/doc" for k, v in comp.items()), flush=True)
    q, source = query_vectors(IndexStore(index), n_queries)
    lat = latencies(index, q, source)
    for name, row in lat.items():
        print(f"query {name:>5}: {row['s_per_query'] * 1e3:8.2f} ms/query  ×{row['vs_exact']:.3f} of exact  "
              f"top-10 overlap {row['top10_overlap']:.3f}  opponents {row['opp_overlap']:.3f}  "
              f"source row in top 10 {row['source_in_top10']:.3f}", flush=True)
    return {"compress": comp, "bytes": sizes, "latency": lat}


# --- PQ at 2^16 on a synthetic index -------------------------------------------------------------


def pq_high_dim(root: Path, rows: int, n_q: int, dim: int = HIGH_DIM) -> dict:
    """Compress and search a synthetic clustered index of `rows` × `dim` (fp16), PQ vs exact."""
    from tracestar.index.compress import compress
    from tracestar.testing import clustered, write_index

    def blocks():
        for lo in range(0, rows, 1024):
            yield clustered(min(1024, rows - lo), dim, 1, seed=lo, clusters=64)[0]

    path = root / f"pq-{dim}"
    write_index(path, blocks(), "float16")
    # queries: noisy copies of stored rows, as in `query_vectors`
    from tracestar.index.store import IndexStore

    q, source = query_vectors(IndexStore(path), n_q, seed=1)
    t = time.perf_counter()
    e = compress(path, "pq")
    return {"rows": rows, "dim": dim, "compress_s": time.perf_counter() - t,
            **{k: e.get(k) for k in ("form", "train_seconds", "train_rows", "m", "nlist", "nprobe", "bytes_per_doc")},
            "encode_s_per_row": (e["seconds"] - e["train_seconds"]) / rows, "search": latencies(path, q, source)}


# --- report --------------------------------------------------------------------------------------


PER_DOC_PHASES = ("corpus pass", "final vectors", "writes")  # grow with the documents; the rest is fixed
R_FIT_DOCS = 10_000  # R statistics read at most this many documents (`--fit-docs` default)


def _pass_rate_ratio(lo: dict, hi: dict) -> float:
    """Corpus-pass docs/s at 2^16 ÷ at the small dimension, from the probes' manifest timings."""
    return lo["timings"]["corpus pass"] / hi["timings"]["corpus pass"]


def build_at_high_dim(built: dict, probe: dict) -> dict:
    """A 1M-document build at 2^16 dims: the large build's per-document phases at the small
    dimension ÷ the probes' corpus-pass ratio, plus the 2^16 probe's fixed phases (load, V,
    eigendecomposition) and its R statistics scaled to R_FIT_DOCS documents."""
    t, hi = built["timings"], probe["hi_timings"]
    per_doc_lo = sum(t.get(k, 0.0) for k in PER_DOC_PHASES) / built["docs"]
    fixed_hi = sum(v for k, v in hi.items() if k not in PER_DOC_PHASES + ("R statistics", "total"))
    r_stats_hi = hi.get("R statistics", 0.0) * min(1_000_000, R_FIT_DOCS) / probe["docs"]
    per_doc_hi = per_doc_lo / probe["pass_ratio"]
    seconds = fixed_hi + r_stats_hi + per_doc_hi * 1_000_000
    return {"build_docs_per_s_2^16": 1_000_000 / seconds, "build_hours_1M_2^16": seconds / 3600}


def extrapolate(n_docs: int, dim: int, built: dict, sizes: dict, lat: dict, probe: dict, hi: dict | None) -> dict:
    """The measured figures at `dim` carried to HIGH_DIM dims and 1M rows (rules in the module docstring)."""
    f = HIGH_DIM / dim
    rows = 1_000_000 / n_docs
    out = {
        "index_bytes_1M_2^16": {k: v * f * rows for k, v in sizes.items() if k in ("raw", "vectors")},
        "exact_s_per_query_1M_2^16": lat["exact"]["s_per_query"] * f * rows,
        "int8_s_per_query_1M_2^16": lat.get("int8", {}).get("s_per_query", float("nan")) * f * rows,
    }
    out.update(build_at_high_dim(built, probe))
    if hi:
        # measured at 2^16 on hi["rows"] rows: the exact scan grows with the rows; PQ's cost per query is
        # at most linear in the rows it scans (an upper bound: its tables and the re-rank do not grow
        # with the rows). IVF-PQ scans 1/IVF_PROBE_SHARE of 1M; the binary form (the default at 2^16)
        # has no inverted file and scans every row.
        from tracestar.index.compress import IVF_PROBE_SHARE

        share = 1 if hi.get("form") == "binary" else IVF_PROBE_SHARE
        out["exact_s_per_query_1M_2^16_from_measured_2^16"] = hi["search"]["exact"]["s_per_query"] * 1_000_000 / hi["rows"]
        out["pq_s_per_query_1M_2^16_at_most"] = hi["search"]["pq"]["s_per_query"] * max(1.0, 1_000_000 / share / hi["rows"])
        out["pq_encode_hours_1M_2^16"] = hi["encode_s_per_row"] * 1_000_000 / 3600
    return out


def print_extrapolation(report: dict) -> dict:
    """The extrapolation of a report with a large build (`extrapolate`), printed."""
    ext = extrapolate(report["docs"], report["dim"], report["build"], report["bytes"], report["latency"],
                      report["probe"], report.get("pq_2^16"))
    print(f"extrapolated from {report['docs']} docs at {report['dim']} dims to 1M docs at 2^16 dims: "
          + ", ".join(f"{k} {v:.3g}" if not isinstance(v, dict) else
                      f"{k} " + " ".join(f"{kk} {vv / 1e9:.0f} GB" for kk, vv in v.items()) for k, v in ext.items()),
          flush=True)
    return ext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--proj-dim", type=int, default=1 << 10)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--probe-docs", type=int, default=1000, help="documents of the two builds that compare dimensions")
    ap.add_argument("--pq-rows", type=int, default=8192, help="rows of the synthetic 2^16-dim PQ index (0: skip)")
    ap.add_argument("--pq-only", action="store_true")
    ap.add_argument("--probe-only", type=Path, metavar="OUT.json",
                    help="only the two probe builds, extrapolating the large build of an earlier --out")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--keep", type=Path, help="build the large index here and keep it (default: a temporary directory)")
    ap.add_argument("--measure-only", type=Path, metavar="INDEX",
                    help="no build: compress a kept index again (the forms in --forms) and measure its queries")
    ap.add_argument("--forms", default="int8,pq", help="with --measure-only: the forms to (re)compress first")
    ap.add_argument("--extrapolate", type=Path, metavar="OUT.json",
                    help="only the extrapolation of an earlier --out (its index's dimension from --keep if the "
                         "report has none)")
    ap.add_argument("--build-child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_child:
        _build_child(a.build_child[0], a.build_child[1], a.build_child[2], int(a.build_child[3]))
        return
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f}", flush=True)
    report: dict = {"docs": a.docs, "proj_dim": a.proj_dim}
    if a.extrapolate:
        old = json.loads(a.extrapolate.read_text())
        if "dim" not in old:
            old["dim"] = json.loads((a.keep / "manifest.json").read_text())["dim"]
        _dump(a.out, {**old, "extrapolated": print_extrapolation(old)})
        return
    if a.measure_only:
        n_docs = json.loads((a.measure_only / "manifest.json").read_text())["n_docs"]
        kinds = tuple(k for k in a.forms.split(",") if k)
        _dump(a.out, {"docs": n_docs, "load_average": os.getloadavg()[0], **measure(a.measure_only, n_docs, a.queries, kinds)})
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if a.pq_rows:
            hi = pq_high_dim(root, a.pq_rows, min(a.queries, a.pq_rows))
            report["pq_2^16"] = hi
            s = hi["search"]
            print(f"PQ at 2^16 dims, {hi['rows']} rows: m={hi['m']} nlist={hi['nlist']}, train {hi['train_seconds']:.1f} s on "
                  f"{hi['train_rows']} rows, encode {hi['encode_s_per_row'] * 1e3:.2f} ms/row; query PQ÷exact "
                  f"{s['pq']['vs_exact']:.2f}, top-10 overlap {s['pq']['top10_overlap']:.3f}, source row in top 10 "
                  f"{s['pq']['source_in_top10']:.3f} (exact {s['exact']['source_in_top10']:.3f})", flush=True)
            import shutil

            shutil.rmtree(root / f"pq-{HIGH_DIM}")
        if a.pq_only:
            _dump(a.out, report)
            return
        save_tiny_model(root / "model")
        corpus = root / "corpus.jsonl"
        words = write_corpus(corpus, a.docs)
        tok = tokenizer_rate(root / "model", corpus, min(a.docs, 50_000))
        print(f"corpus: {a.docs} docs, {words} words; tokenizer alone {tok['docs_per_s']:.0f} docs/s", flush=True)
        probe_corpus = root / "probe.jsonl"
        write_corpus(probe_corpus, a.probe_docs, seed=1)
        lo = build(root / "model", probe_corpus, root / "probe-lo", a.proj_dim)
        hi_b = build(root / "model", probe_corpus, root / "probe-hi", HIGH_DIM)
        probe = {"docs": a.probe_docs, "lo_docs_per_s": lo["docs_per_s"], "hi_docs_per_s": hi_b["docs_per_s"],
                 "lo_timings": lo["timings"], "hi_timings": hi_b["timings"], "pass_ratio": _pass_rate_ratio(lo, hi_b),
                 "rate_ratio": hi_b["docs_per_s"] / lo["docs_per_s"], "hi_peak_rss_mb": hi_b["peak_rss_mb"]}
        print(f"probe builds ({a.probe_docs} docs): 2^16 ÷ {a.proj_dim} docs/s = {probe['rate_ratio']:.3f} whole build, "
              f"{probe['pass_ratio']:.3f} corpus pass", flush=True)
        print(f"probe: 2^16 build {probe['hi_docs_per_s']:.1f} docs/s, peak RSS {probe['hi_peak_rss_mb']:.0f} MB", flush=True)
        if a.probe_only:  # the large build's figures from an earlier --out
            old = json.loads(a.probe_only.read_text())
            ext = build_at_high_dim(old["build"], probe)
            print(f"1M docs at 2^16 from {old['docs']} docs at {old['proj_dim']}: {ext['build_docs_per_s_2^16']:.0f} docs/s, "
                  f"{ext['build_hours_1M_2^16']:.2f} h", flush=True)
            _dump(a.out, {"probe": probe, "extrapolated": ext})
            return
        index = a.keep or root / "index"
        built = build(root / "model", corpus, index, a.proj_dim)
        tok_after = tokenizer_rate(root / "model", corpus, min(a.docs, 50_000))
        load = built["load_average"]
        print(f"build: {built['docs']} docs, {built['tokens']} tokens in {built['build_s']:.0f} s: {built['docs_per_s']:.0f} docs/s "
              f"({built['docs_per_s'] / tok['docs_per_s']:.3f} × tokenizer alone), {built['tokens_per_s']:.0f} tokens/s; "
              f"peak RSS {built['peak_rss_mb']:.0f} MB (children's max {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB); "
              f"load average {load['mean']:.1f} (max {load['max']:.1f})", flush=True)
        print("corpus pass by quarter of the corpus: docs/s " + ", ".join(f"{r:.0f}" for r in built["pass_docs_per_s_by_quarter"])
              + "; docs per CPU second " + ", ".join(f"{r:.0f}" for r in built["pass_docs_per_cpu_s_by_quarter"])
              + f"; build {built['docs'] / built['cpu_s']:.0f} docs per CPU second in all"
              + f"; tokenizer alone before/after the build {tok['docs_per_s']:.0f}/{tok_after['docs_per_s']:.0f} docs/s", flush=True)
        report.update({"tokenizer": tok, "tokenizer_after_build": tok_after, "probe": probe, "build": built})
        _dump(a.out, report)  # a failure below keeps the build's figures
        measured = measure(index, a.docs, a.queries)
        report["dim"] = json.loads((index / "manifest.json").read_text())["dim"]  # Σ k², near --proj-dim
        report.update(measured)
        report["extrapolated"] = print_extrapolation(report)
    _dump(a.out, report)


def _dump(path: Path | None, report: dict) -> None:
    if path:
        path.write_text(json.dumps(report, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
