"""A tiny GPT-2-style trainer for the fact world: a model whose facts we can then trace.

Why it looks the way it does:
- The tokenizer is a byte-level BPE trained on the corpus itself, so entity names are few tokens
  and the vocabulary (hence the embedding, the biggest matrix) stays small.
- The optimizer is `torch.optim.Adafactor`, as for the paper's models; its factored second moment
  (`row_var`, `col_var` in `optimizer.pt`) is what TrackStar's optimizer correction reads.
- On a CPU, padding is the main waste, so batches hold documents of similar length. Dropout is
  off: the point is to memorize facts seen a handful of times.
- Documents are tokenized as `text + eos`, with no BOS; queries as `prompt`, then `target` (which
  starts with a space), tokenized separately. `train_log.json` records this as `doc_format`.

Output directory: HF `save_pretrained` files (safetensors) and tokenizer, `optimizer.pt` (the
optimizer's `state_dict()`, parameter order = `model.parameters()`) and `train_log.json`.
A second call with the same arguments and the same corpus bytes returns the saved log instead of
training again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from tracestar.batching import encode_document

EOS = "<|endoftext|>"
PAD = "<|pad|>"
DOC_FORMAT = "text + eos (no bos); queries: prompt, then target tokenized separately"
_LOG = "train_log.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained model (together with the corpus bytes)."""

    seed: int = 0
    vocab_size: int = 4096
    d_model: int = 192
    n_layer: int = 2
    n_head: int = 4
    max_length: int = 96
    epochs: int = 20  # full world: 89% first-token accuracy at 20 epochs (measured)
    batch_size: int = 32
    lr: float = 0.05
    warmup_frac: float = 0.04
    final_lr_frac: float = 0.05
    max_minutes: float = 6.0


def corpus_hash(path: str | Path) -> str:
    """sha256 of the corpus file: the cache key's data half."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_threads() -> int:
    """One intra-op thread per core this process may use (oversubscription is very costly)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# --- tokenizer ------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE fitted to the corpus, wrapped so `AutoTokenizer` can load it offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD)


# --- batches --------------------------------------------------------------------------------------


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of documents of near-equal length, in random order.

    A random tie-break before the length sort changes which documents share a batch from epoch
    to epoch; sorting by length keeps padding close to zero.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(seqs: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on padding, so it never counts)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- model and schedule ---------------------------------------------------------------------------


def build_model(config: TrainConfig, tokenizer):
    """A GPT-2 with tied embeddings and no dropout, initialized from the seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    gpt_config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.max_length, n_embd=config.d_model,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(gpt_config)


def lr_at(progress: float, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `final_lr_frac` of the peak; `progress` runs 0 -> 1."""
    progress = min(1.0, max(0.0, progress))
    if progress < config.warmup_frac:
        return config.lr * max(progress / config.warmup_frac, 0.01)
    decay = (progress - config.warmup_frac) / max(1e-9, 1 - config.warmup_frac)
    floor = config.final_lr_frac
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * decay)))


# --- evaluation -----------------------------------------------------------------------------------


def _load_queries(queries: Any) -> list[tuple[str, str]]:
    """(prompt, target) pairs from a path, dicts, or objects with `.prompt`/`.target`."""
    if isinstance(queries, (str, Path)):
        from tracestar.corpus import read_queries

        queries = read_queries(queries)
    pairs = []
    for q in queries:
        if isinstance(q, dict):
            pairs.append((q["prompt"], q["target"]))
        else:
            pairs.append((q.prompt, q.target))
    return pairs


@torch.no_grad()
def first_token_accuracy(model_dir_or_model: Any, tokenizer: Any, queries: Any, *, batch_size: int = 256) -> float:
    """Share of queries whose greedy next token after the prompt is the target's first token.

    `tokenizer` may be None (loaded from the model directory); `queries` a path or a list.
    Prompts are grouped by token length, so no padding (and no position shift) is involved.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir_or_model, local_files_only=True)
    pairs = _load_queries(queries)
    if not pairs:
        return float("nan")
    was_training = model.training
    model.eval()
    by_length: dict[int, list[tuple[list[int], int]]] = {}
    for prompt, target in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        by_length.setdefault(len(p), []).append((p, t[0]))
    correct = 0
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i: i + batch_size]
            logits = model(input_ids=torch.tensor([p for p, _ in chunk])).logits[:, -1, :]
            guesses = logits.argmax(-1).tolist()
            correct += sum(int(g == t) for g, (_, t) in zip(guesses, chunk))
    model.train(was_training)
    return correct / len(pairs)


# --- training -------------------------------------------------------------------------------------


def _cached_log(out: Path, key: dict) -> dict | None:
    """The saved log if `out` holds a finished model trained with exactly these inputs."""
    log_path = out / _LOG
    if not (log_path.exists() and (out / "model.safetensors").exists() and (out / "optimizer.pt").exists()):
        return None
    try:
        log = json.loads(log_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return log if log.get("cache_key") == key else None


def _read_texts(corpus_path: str | Path) -> list[str]:
    from tracestar.corpus import iter_documents

    return [d.text for d in iter_documents(corpus_path)]


def _run_epochs(
    model, optimizer, docs: list[list[int]], config: TrainConfig, pad_id: int, budget: float, verbose: bool = False
) -> dict:
    """The training loop, bounded by `epochs` and by `budget` seconds, whichever comes first.

    The schedule's progress is the larger of the step fraction and the time fraction, so a run
    that the clock cuts short (a slow or busy machine) has still annealed its learning rate.
    """
    rng = random.Random(config.seed)
    lengths = [len(d) for d in docs]
    total = config.epochs * math.ceil(len(docs) / config.batch_size)
    budget = max(budget, 1e-3)
    start = time.monotonic()
    step, epoch_losses, stopped_early, lr = 0, [], False, 0.0
    model.train()
    for _ in range(config.epochs):
        losses = []
        for batch in length_bucketed_batches(lengths, config.batch_size, rng):
            time_frac = (time.monotonic() - start) / budget
            if time_frac >= 1.0:
                stopped_early = True
                break
            lr = lr_at(max(step / total, time_frac), config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model(**collate([docs[i] for i in batch], pad_id)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        if losses:
            epoch_losses.append(sum(losses) / len(losses))
            if verbose:
                print(f"epoch {len(epoch_losses)}/{config.epochs}  loss {epoch_losses[-1]:.4f}  lr {lr:.4g}  "
                      f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        if stopped_early:
            break
    return {"steps": step, "planned_steps": total, "epochs_run": len(epoch_losses),
            "epoch_losses": [round(x, 4) for x in epoch_losses], "final_loss": epoch_losses[-1],
            "final_lr": lr, "stopped_early": stopped_early}


def train_model(
    corpus_path: str | Path,
    out_dir: str | Path,
    *,
    queries_path: str | Path | None = None,
    seed: int = 0,
    max_minutes: float = 6.0,
    threads: int | None = None,
    force: bool = False,
    verbose: bool = False,
    **overrides: Any,
) -> dict:
    """Train a small GPT-2 on a JSONL corpus with Adafactor and save it to `out_dir`.

    `verbose` prints one line per epoch to stderr. `overrides` set any `TrainConfig` field (d_model, n_layer, epochs, lr, ...). Returns the
    training log (also written to `train_log.json`): steps, learning rate, final loss, seconds,
    and, with `queries_path`, the first-token accuracy on those queries. With the same arguments
    and corpus bytes as a finished run in `out_dir`, returns that run's log (`"cached": true`).
    """
    from transformers import AutoTokenizer

    config = TrainConfig(seed=seed, max_minutes=max_minutes, **overrides)
    out = Path(out_dir)
    key = {"config": asdict(config), "corpus_sha256": corpus_hash(corpus_path),
           "queries_sha256": corpus_hash(queries_path) if queries_path else None}
    if not force and (cached := _cached_log(out, key)) is not None:
        return {**cached, "cached": True}

    torch.set_num_threads(threads or default_threads())
    start, cpu_start = time.monotonic(), time.process_time()
    texts = _read_texts(corpus_path)
    tokenizer = train_tokenizer(texts, config.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    docs = [encode_document(tokenizer, t, i, config.max_length).ids for i, t in enumerate(texts)]  # as the index sees them
    model = build_model(config, tokenizer)
    optimizer = torch.optim.Adafactor(model.parameters(), lr=config.lr)
    budget = config.max_minutes * 60 - (time.monotonic() - start)
    stats = _run_epochs(model, optimizer, docs, config, tokenizer.pad_token_id, budget, verbose)
    train_seconds = time.monotonic() - start

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    torch.save(optimizer.state_dict(), out / "optimizer.pt")
    accuracy = first_token_accuracy(model, tokenizer, queries_path) if queries_path else None
    log = {
        **stats,
        "first_token_accuracy": accuracy,
        "peak_lr": config.lr,
        "seconds": round(time.monotonic() - start, 2),
        "train_seconds": round(train_seconds, 2),
        "cpu_seconds": round(time.process_time() - cpu_start, 2),
        "n_docs": len(docs),
        "n_tokens": sum(len(d) for d in docs),
        "n_params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "optimizer": "torch.optim.Adafactor",
        "doc_format": DOC_FORMAT,
        "corpus": str(corpus_path),
        "queries": str(queries_path) if queries_path else None,
        "cache_key": key,
    }
    tmp = out / (_LOG + ".tmp")
    tmp.write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / _LOG)
    return {**log, "cached": False}
