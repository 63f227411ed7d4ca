"""Latency of `tracestar serve` on a real index: one request after another, over HTTP.

    python bench/serve_latency.py --demo tracestar-demo            # the demo's index and its query prompts
    python bench/serve_latency.py --index DIR --prompts Q.jsonl --n 30

The server runs in this process (as `tracestar serve` runs it: model and index loaded once), on a
free port of 127.0.0.1. Each of N prompts is sent to /api/trace (greedy generation, attribution of
the continuation, heat maps of every listed document, BM25), then its first generated token to
/api/token (that token's own proponents). Prints p50 and p95 of the wall time the client saw and
of each step the server timed; the step "attribute" is what a query costs once the model and the
index are loaded: one forward and backward pass of prompt + continuation, and one scan.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def post(port: int, path: str, body: dict) -> tuple[float, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    seconds = time.perf_counter() - t
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"{path}: HTTP {resp.status}: {payload.get('error')}")
    return seconds, payload


def prompts_from(path: Path, n: int) -> list[str]:
    """n distinct prompts spread evenly over the file."""
    prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in path.open(encoding="utf-8") if line.strip()))
    step = max(1, len(prompts) // n)
    return prompts[::step][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", help="a `tracestar demo` directory (its index/ and world/queries.jsonl)")
    ap.add_argument("--index", help="index directory")
    ap.add_argument("--prompts", help="JSONL with a `prompt` field per line")
    ap.add_argument("--n", type=int, default=30, help="prompts timed (default 30)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per prompt (default 8)")
    ap.add_argument("--top-k", type=int, default=10, help="documents per list (default 10)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="torch threads (default: OMP_NUM_THREADS, else 1)")
    args = ap.parse_args()
    if args.demo:
        args.index = args.index or str(Path(args.demo) / "index")
        args.prompts = args.prompts or str(Path(args.demo) / "world" / "queries.jsonl")
    if not args.index or not args.prompts:
        ap.error("give --demo DIR, or --index and --prompts")

    import torch

    from tracestar.serve import BackgroundServer, Engine, create_app

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    engine = Engine(args.index, max_new_tokens=args.max_new_tokens, top_k=args.top_k)
    load_s = time.perf_counter() - t
    prompts = prompts_from(Path(args.prompts), args.n)
    walls: dict[str, list[float]] = {"trace (client)": [], "token click (client)": []}
    steps: dict[str, list[float]] = {}
    with BackgroundServer(create_app(engine), port=0) as server:
        post(server.port, "/api/trace", {"prompt": prompts[0], "max_new_tokens": args.max_new_tokens})  # warm-up
        for prompt in prompts:
            seconds, res = post(server.port, "/api/trace", {"prompt": prompt, "max_new_tokens": args.max_new_tokens})
            walls["trace (client)"].append(seconds)
            for key, value in res["timings"].items():
                steps.setdefault(key.removesuffix("_s"), []).append(value)
            if res["generation"]["tokens"]:
                seconds, _ = post(server.port, "/api/token", {"trace_id": res["trace_id"], "position": 0})
                walls["token click (client)"].append(seconds)
    info = engine.info()
    print(f"index {args.index}: {info['n_docs']:,} documents, dimension {info['dim']:,}, model {info['model']} "
          f"({info['n_params']:,} parameters); {len(prompts)} prompts, {args.max_new_tokens} new tokens, "
          f"top-k {args.top_k}, {args.threads} torch thread(s); loading took {load_s:.1f} s")
    print(f"{'step':<22} {'p50 s':>8} {'p95 s':>8} {'mean s':>8}")
    for name, values in {**walls, **steps}.items():
        if values:
            print(f"{name:<22} {percentile(values, 0.5):>8.3f} {percentile(values, 0.95):>8.3f} "
                  f"{statistics.fmean(values):>8.3f}")


if __name__ == "__main__":
    main()
