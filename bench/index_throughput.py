"""Indexing throughput vs. a training step, side by side in one run, and peak memory vs. corpus size.

For each GPT-2-style model (random weights, built from a config), the same length-bucketed batches
are run through
  (a) a plain forward + backward with weight gradients (what one training step costs, minus the
      optimizer), and
  (b) tracestar's factored capture (per-example projected, corrected gradients; no weight
      gradients),
alternating (a) and (b) per round so that both see the same machine state. Prints tokens/s of each
and the ratio (b)/(a). Then, unless --no-memory, builds real indexes of N and 10·N documents in
fresh processes and prints each build's peak RSS: memory must not grow with the corpus.

    python bench/index_throughput.py                      # ~2M and ~20M models, default dimension
    python bench/index_throughput.py --sizes 20m --proj-dim 16384 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tracestar.batching import Example, bucketed, collate, forward_loss
from tracestar.capture import FactoredCapture
from tracestar.model import coverage, tracked_matrices
from tracestar.normalizer import identity
from tracestar.projection import DEFAULT_DIM, make_layout

SIZES = {  # name: (n_layer, n_embd, vocab)
    "2m": (2, 192, 4096),
    "20m": (6, 448, 8192),
}


def gpt2_model(size: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=n_embd, n_layer=n_layer, n_head=max(1, n_embd // 64),
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def synthetic_examples(n_docs: int, vocab: int, seed: int = 0, lo: int = 32, hi: int = 256) -> list[Example]:
    rng = random.Random(seed)
    return [Example(row=i, ids=[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))], loss_from=1) for i in range(n_docs)]


def training_pass(model, batches) -> int:
    for p in model.parameters():
        p.requires_grad_(True)
    tokens = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        forward_loss(model, batch).sum().backward()
        tokens += batch.n_tokens
    model.zero_grad(set_to_none=True)
    return tokens


def indexing_pass(capture: FactoredCapture, batches) -> int:
    tokens = 0
    for batch in batches:
        capture.vectors(batch)
        tokens += batch.n_tokens
    return tokens


def throughput(size: str, proj_dim: int, n_docs: int, batch_tokens: int, rounds: int) -> dict:
    model = gpt2_model(size)
    tracked = tracked_matrices(model)
    blocks = make_layout(tracked, kind="paper", dim=proj_dim)
    capture = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0)
    examples = synthetic_examples(n_docs, model.config.vocab_size)
    batches = [collate(g, 0) for g in bucketed(examples, batch_tokens)]
    training_pass(model, batches[:2])  # warm up both paths
    indexing_pass(capture, batches[:2])
    t_train = t_index = 0.0
    tok_train = tok_index = 0
    for _ in range(rounds):
        t = time.perf_counter()
        tok_train += training_pass(model, batches)
        t_train += time.perf_counter() - t
        t = time.perf_counter()
        tok_index += indexing_pass(capture, batches)
        t_index += time.perf_counter() - t
    train_tps, index_tps = tok_train / t_train, tok_index / t_index
    return {
        "model": size,
        "params": coverage(model, tracked)["n_params"],
        "coverage": round(coverage(model, tracked)["share"], 4),
        "dim": capture.dim,
        "k": sorted({b.k for b in blocks}),
        "train_tok_s": round(train_tps),
        "index_tok_s": round(index_tps),
        "ratio": round(index_tps / train_tps, 3),
    }


# --- memory: real builds of N and 10N documents in fresh processes ------------------------------


def _memory_child(model_dir: str, corpus: str, out: str, proj_dim: int) -> None:
    import resource

    from tracestar.api import build_index

    build_index(model_dir, corpus, out, proj_dim=proj_dim, preconditioner="train", shard_docs=256, quiet=True)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _save_model_with_tokenizer(size: str, path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = gpt2_model(size)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for i in range(model.config.vocab_size - 3):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>").save_pretrained(path)


def memory(size: str, n_docs: int, proj_dim: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _save_model_with_tokenizer(size, root / "model")
        vocab = SIZES[size][2] - 3
        for n in (n_docs, 10 * n_docs):
            corpus = root / f"corpus-{n}.jsonl"
            rng = random.Random(n)
            with open(corpus, "w") as fh:
                for i in range(n):
                    words = " ".join(f"w{rng.randrange(vocab)}" for _ in range(rng.randint(16, 96)))
                    fh.write(json.dumps({"id": str(i), "text": words}) + "\n")
            cmd = [sys.executable, __file__, "--memory-child", str(root / "model"), str(corpus), str(root / f"idx-{n}"), str(proj_dim)]
            t = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append({"docs": n, "seconds": round(time.perf_counter() - t, 1), **json.loads(out)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2m,20m")
    ap.add_argument("--proj-dim", type=int, default=DEFAULT_DIM)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--memory-docs", type=int, default=200, help="memory check: N and 10·N documents")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        model_dir, corpus, out, dim = args.memory_child
        _memory_child(model_dir, corpus, out, int(dim))
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, requested dim {args.proj_dim}")
    print(f"{'model':>6} {'params':>11} {'cover':>6} {'dim':>6} {'k':>10} {'train tok/s':>12} {'index tok/s':>12} {'ratio':>6}")
    for size in args.sizes.split(","):
        r = throughput(size, args.proj_dim, args.docs, args.batch_tokens, args.rounds)
        print(f"{r['model']:>6} {r['params']:>11,} {r['coverage']:>6.1%} {r['dim']:>6} {str(r['k']):>10} "
              f"{r['train_tok_s']:>12,} {r['index_tok_s']:>12,} {r['ratio']:>5.2f}x")
    if not args.no_memory:
        size = args.sizes.split(",")[0]
        for row in memory(size, args.memory_docs, args.proj_dim):
            print(f"memory ({size}): {row['docs']:>6} docs  peak RSS {row['peak_rss_mb']:8.0f} MB  ({row['seconds']} s)")


if __name__ == "__main__":
    main()
