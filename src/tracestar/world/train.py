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

Training is measured in seeded steps, never in seconds: the batches, the learning-rate schedule
and the number of steps follow from the config and the corpus alone, so a busy machine takes
longer but ends with the same model as an idle one. It runs on one intra-op thread by default:
at this model size a second thread gains little on an idle machine, and on a busy one a thread
pool that waits for a descheduled partner made each step up to seven times slower (measured on 2 cores).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from tracestar.batching import encode_document
from tracestar.files import sha256_file, write_json
from tracestar.options import DEFAULT_TRAIN_EPOCHS

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
    # Full world, one thread, ~10 steps per CPU second: 12 epochs = 1,572 steps, 156 CPU s, 87.9%
    # first-token accuracy; 10 epochs 85.9%; 20 epochs 89.5% in 255 CPU s (measured).
    epochs: int = DEFAULT_TRAIN_EPOCHS
    batch_size: int = 32
    lr: float = 0.05
    warmup_frac: float = 0.04
    final_lr_frac: float = 0.05

    def planned_steps(self, n_docs: int) -> int:
        """Optimizer steps of a full run: every epoch is one pass in batches of `batch_size`."""
        return self.epochs * math.ceil(n_docs / self.batch_size)


#: Intra-op threads for training unless the caller says otherwise (see the module docstring).
DEFAULT_TRAIN_THREADS = 1


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
    model = GPT2LMHeadModel(gpt_config)
    # transformers derives the loss from the class name; "GPT2LMHeadModel" matches no entry, so it
    # would warn on the first loss and fall back to the causal-LM loss. Name that loss outright.
    model.loss_type = "ForCausalLM"
    return model


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`: linear warmup, then
    cosine decay to `final_lr_frac` of the peak. A function of step counts only, never of time."""
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
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

    Why it matters: attribution asks which documents taught the model a fact, so a model that has
    not learned the facts has nothing to attribute, and the evaluation's figures say little.
    Queries are encoded exactly as the index encodes them (`batching.encode_query`: the prompt
    with the tokenizer's own specials, cut from the left to the model's window, then the target),
    so this works for any causal LM, not only the trainer's. `tokenizer` may be None (loaded from
    the model directory); `queries` a path or a list. Prompts are grouped by token length, so no
    padding (and no position shift) is involved. NaN for no queries.
    """
    from tracestar.batching import encode_query
    from tracestar.model import load_model, model_window

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer or loaded_tokenizer
    pairs = _load_queries(queries)
    if not pairs:
        return float("nan")
    window = model_window(model) or 1 << 30
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    by_length: dict[int, list[tuple[list[int], int]]] = {}
    for row, (prompt, target) in enumerate(pairs):
        ex = encode_query(tokenizer, prompt, target, row, window)
        if len(ex.ids) > ex.loss_from:  # an empty target has no first token: counted as a miss
            by_length.setdefault(ex.loss_from, []).append((ex.ids[: ex.loss_from], ex.ids[ex.loss_from]))
    correct = 0
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i: i + batch_size]
            ids = torch.tensor([p for p, _ in chunk], device=device)  # [n, prompt length]
            logits = model(input_ids=ids).logits[:, -1, :]  # [n, vocab]
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
    model, optimizer, docs: list[list[int]], config: TrainConfig, pad_id: int, verbose: bool = False
) -> dict:
    """The training loop: `config.epochs` seeded passes over `docs`, every planned step taken.

    The batch order comes from `random.Random(config.seed)` and the learning rate from the step
    number, so two runs with the same config and corpus take the same steps in the same order.
    """
    rng = random.Random(config.seed)
    lengths = [len(d) for d in docs]
    total = config.planned_steps(len(docs))
    start = time.monotonic()
    step, epoch_losses, lr = 0, [], 0.0
    model.train()
    for epoch in range(config.epochs):
        losses = []
        for batch in length_bucketed_batches(lengths, config.batch_size, rng):
            lr = lr_at(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model(**collate([docs[i] for i in batch], pad_id)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        epoch_losses.append(sum(losses) / len(losses))
        if verbose:
            print(f"epoch {epoch + 1}/{config.epochs}  step {step}/{total}  loss {epoch_losses[-1]:.4f}  lr {lr:.4g}  "
                  f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return {"steps": step, "planned_steps": total, "epochs_run": len(epoch_losses),
            "epoch_losses": [round(x, 4) for x in epoch_losses], "final_loss": epoch_losses[-1], "final_lr": lr}


def train_model(
    corpus_path: str | Path,
    out_dir: str | Path,
    *,
    queries_path: str | Path | None = None,
    seed: int = 0,
    threads: int | None = None,
    force: bool = False,
    verbose: bool = False,
    **overrides: Any,
) -> dict:
    """Train a small GPT-2 on a JSONL corpus with Adafactor and save it to `out_dir`.

    Runs every planned step (`epochs` passes); `threads` are torch intra-op threads while training
    (default `DEFAULT_TRAIN_THREADS`; the caller's setting is restored afterwards). `verbose` prints
    one line per epoch to stderr. `overrides` set any `TrainConfig` field (d_model, n_layer, epochs,
    lr, ...). Returns the training log (also written to `train_log.json`): steps, per-epoch loss,
    learning rate, seconds, and, with `queries_path`, the first-token accuracy on those queries.
    With the same arguments and corpus bytes as a finished run in `out_dir`, returns that run's log
    (`"cached": true`).
    """
    config = TrainConfig(seed=seed, **overrides)
    out = Path(out_dir)
    key = {"config": asdict(config), "corpus_sha256": sha256_file(corpus_path),
           "queries_sha256": sha256_file(queries_path) if queries_path else None}
    if not force and (cached := _cached_log(out, key)) is not None:
        return {**cached, "cached": True}

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or DEFAULT_TRAIN_THREADS)
    try:
        return _train(config, key, corpus_path, out, queries_path, verbose)
    finally:
        torch.set_num_threads(saved_threads)


def _train(config: TrainConfig, key: dict, corpus_path: str | Path, out: Path, queries_path: str | Path | None,
           verbose: bool) -> dict:
    """Tokenizer, model, the training loop, then the saved files and log (see `train_model`)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars for a one-file model are noise

    start, cpu_start = time.monotonic(), time.process_time()
    texts = _read_texts(corpus_path)
    tokenizer = train_tokenizer(texts, config.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    docs = [encode_document(tokenizer, t, i, config.max_length).ids for i, t in enumerate(texts)]  # as the index sees them
    model = build_model(config, tokenizer)
    optimizer = torch.optim.Adafactor(model.parameters(), lr=config.lr)
    stats = _run_epochs(model, optimizer, docs, config, tokenizer.pad_token_id, verbose)
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
    write_json(out / _LOG, log)
    return {**log, "cached": False}
