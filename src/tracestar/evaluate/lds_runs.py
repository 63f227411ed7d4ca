"""The retraining runs behind LDS: one model per random subset, cached, resumable, shared by ranks.

Each run's result (every query's target log-probability) is one JSON file, written atomically and
keyed by everything that decides it, so a killed job loses at most the run in progress, a larger M
reuses the runs it already has, and torchrun ranks split the runs (run m belongs to rank m mod world).
Every subset model starts from the full model's initialization and tokenizer, so the runs differ only
in their data.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tracestar.corpus import Query
from tracestar.files import write_text


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _atomic_json(path: Path, obj: Any) -> None:
    """Compact JSON (run records hold long float lists) through the one atomic writer."""
    write_text(path, json.dumps(obj) + "\n")


def _cached_run(path: Path, key: str, n_queries: int) -> np.ndarray | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("key") != key or len(rec.get("logprobs", ())) != n_queries:
        return None
    return np.asarray(rec["logprobs"], dtype=np.float64)


def collect_runs(run_dir: str | Path, masks: np.ndarray, base_key: Mapping[str, Any], n_queries: int,
                 train_one: Callable[[int, np.ndarray], np.ndarray], *, rank: int = 0, world: int = 1,
                 quiet: bool = True) -> np.ndarray | None:
    """[M, Q] log-probs, training only the runs not already cached under `run_dir`.

    `train_one(m, mask)` trains on one subset and returns [Q] log-probs. This rank trains runs
    m ≡ rank (mod world); each is written as soon as it finishes, so a killed job resumes where it
    stopped. Returns None on a rank that cannot see every run yet (the caller waits at a barrier).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = np.full((masks.shape[0], n_queries), np.nan)
    t0, trained = time.monotonic(), 0
    for m, mask in enumerate(masks):
        path = run_dir / f"run-{m:04d}.json"
        key = _sha({**base_key, "subset": m, "mask": hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()})
        cached = _cached_run(path, key, n_queries)
        if cached is not None:
            out[m] = cached
            continue
        if m % world != rank:
            continue
        start = time.monotonic()
        lp = np.asarray(train_one(m, mask), dtype=np.float64)
        _atomic_json(path, {"key": key, "subset": m, "docs_in": int(mask.sum()), "logprobs": lp.tolist(),
                            "seconds": round(time.monotonic() - start, 2)})
        out[m] = lp
        trained += 1
        if not quiet:
            el = time.monotonic() - t0
            print(f"lds: run {m + 1}/{len(masks)} done ({el:.0f} s for {trained} trained this call)", file=sys.stderr, flush=True)
    return None if np.isnan(out).any() else out


class SubsetTrainer:
    """Retrains the full model's architecture on a subset: same config, initialization, tokenizer and
    batch-order seed as the full run; only the documents (and so the number of steps) differ."""

    def __init__(self, model_dir: str | Path, texts: Sequence[str], queries: Sequence[Query], train: Mapping[str, Any],
                 seed: int = 0, threads: int = 1):
        from transformers import AutoTokenizer

        from tracestar.batching import encode_document, encode_query
        from tracestar.world.train import TrainConfig

        self.config = TrainConfig(seed=seed, **train)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.docs = [encode_document(self.tokenizer, t, i, self.config.max_length).ids for i, t in enumerate(texts)]
        self.queries = [encode_query(self.tokenizer, q.prompt, q.target, i, self.config.max_length) for i, q in enumerate(queries)]
        self.threads = threads

    def __call__(self, m: int, mask: np.ndarray) -> np.ndarray:
        import torch

        saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            model = self._train([self.docs[i] for i in np.flatnonzero(mask)])
            return target_logprobs(model, self.queries, self.tokenizer)
        finally:
            torch.set_num_threads(saved)

    def _train(self, docs: list[list[int]]):
        """The trainer's loop (`tracestar.world.train`): seeded length-bucketed batches, warmup + cosine."""
        import torch

        from tracestar.world.train import (
            build_model,
            collate,
            length_bucketed_batches,
            lr_at,
        )

        cfg = self.config
        model = build_model(cfg, self.tokenizer)
        opt = torch.optim.Adafactor(model.parameters(), lr=cfg.lr)
        rng, total, step = random.Random(cfg.seed), cfg.planned_steps(len(docs)), 0
        lengths = [len(d) for d in docs]
        model.train()
        for _ in range(cfg.epochs):
            for batch in length_bucketed_batches(lengths, cfg.batch_size, rng):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, cfg)
                model(**collate([docs[i] for i in batch], self.tokenizer.pad_token_id)).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
        return model.eval()


def target_logprobs(model, examples: Sequence, tokenizer) -> np.ndarray:
    """[Q] Σ log p(target token | prefix) per encoded query (`batching.Example`), float64."""
    import torch

    from tracestar.batching import collate, forward_loss, pad_id

    out = np.zeros(len(examples))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    with torch.no_grad():
        for s in range(0, len(order), 64):
            chunk = [examples[i] for i in order[s:s + 64]]
            batch = collate(chunk, pad_id(tokenizer))
            out[[order[s + j] for j in range(len(chunk))]] = -forward_loss(model, batch).double().numpy()
    return out
