"""What `--chunk-tokens` costs: one corpus of long documents built truncated and chunked.

    python bench/chunking.py [--docs 200] [--max-length 64]

A tiny GPT-2 with random weights (nothing is downloaded) and a corpus of 20–400 random words a
document. Prints rows, tokens indexed, truncated documents, wall time and indexed tokens per
second for each build; the rate, not the wall time, is what compares across machines.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import tiny  # the tests' tiny models and tokenizer

from tracestar.build import build_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    n = args.max_length
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = tiny.save(tiny.gpt2(seed=0), root / "model")
        rng = random.Random(0)
        texts = [" ".join(rng.choice(tiny.WORDS) for _ in range(rng.randint(20, 400))) for _ in range(args.docs)]
        corpus = tiny.write_corpus(root / "long.jsonl", texts)
        builds = [("one row per document", {}), (f"--chunk-tokens {n}", {"chunk_tokens": n}),
                  (f"--chunk-tokens {n} --chunk-stride {3 * n // 4}", {"chunk_tokens": n, "chunk_stride": 3 * n // 4})]
        # one small build first, so no timed build pays for first-use costs (imports, kernels)
        build_index(model, tiny.write_corpus(root / "warm.jsonl", texts[:8]), root / "warm", proj_dim=4096, max_length=n,
                    quiet=True, device="cpu", optimizer_correction=False)
        for i, (name, kw) in enumerate(builds):
            start = time.perf_counter()
            out = build_index(model, corpus, root / f"index{i}", proj_dim=4096, max_length=n, quiet=True, device="cpu",
                              optimizer_correction=False, **kw)
            wall = time.perf_counter() - start
            m = json.loads((out / "manifest.json").read_text())
            print(f"{name:40s} rows {m['n_docs']:6,d}  tokens {m['n_tokens']:8,d}  truncated {m['n_truncated']:4d}  "
                  f"{wall:6.1f} s  {m['n_tokens'] / wall:8,.0f} tok/s")


if __name__ == "__main__":
    main()
