"""Indexing throughput vs. a training step, side by side in one run, and peak memory vs. corpus size.

For each GPT-2-style model (random weights, built from a config), the same length-bucketed batches
are run through
  (a) a plain forward + backward with weight gradients (what one training step costs, minus the
      optimizer), and
  (b) tracestar's factored capture (per-example projected, corrected gradients; no weight
      gradients),
interleaved batch by batch (the order swapped every round) so that both see the same machine state.
Prints tokens/s of each from every batch's best time over the rounds, the ratio (b)/(a), and the
ratio of median times and of process CPU seconds as checks. Then, unless --no-memory, builds real indexes of N and 10·N documents in
fresh processes and prints each build's peak RSS: memory must not grow with the corpus.

    python bench/index_throughput.py                      # ~2M and ~20M models, default dimension
    python bench/index_throughput.py --sizes 20m --proj-dim 16384 --rounds 3
    python bench/index_throughput.py --autocast bfloat16 --no-memory  # both passes under bf16 autocast
    python bench/index_throughput.py --arch llama --preset 8b --device cuda --dtype bfloat16 --no-memory

`--act` picks the GPT-2 MLP activation: `gelu_new` (GPT-2's own, eight element-wise ops each way)
or `gelu_pytorch_tanh` (the same function as one fused kernel). The capture always runs a tanh-GELU
as the fused kernel (`model.fused_activations`); the training pass runs the model as configured.
So that this optimisation is not mistaken for a smaller per-token cost, a third pass, "train
(fused)", trains with the fused kernel too. The `vs fused` column is the ratio against that pass.
With `gelu_pytorch_tanh` both training passes are the same.
"""

from __future__ import annotations

import argparse
import contextlib
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
from tracestar.model import coverage, fused_activations, tracked_matrices
from tracestar.normalizer import identity
from tracestar.projection import DEFAULT_DIM, make_layout

SIZES = {  # name: (n_layer, n_embd, vocab)
    "2m": (2, 192, 4096),
    "20m": (6, 448, 8192),
}


LLAMA = {  # name: (layers, hidden, intermediate, heads, kv heads, vocab)
    "tiny": (2, 64, 176, 4, 2, 1024),
    "8b": (32, 4096, 14336, 32, 8, 128256),  # Llama-3-8B shape
}


def gpt2_model(size: str, act: str = "gelu_new"):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=n_embd, n_layer=n_layer, n_head=max(1, n_embd // 64),
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function=act,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama_model(preset: str, device: str, dtype: torch.dtype):
    """Random weights, built directly on the device in the given dtype (an 8B model never touches the CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n_layer, hidden, inter, heads, kv, vocab = LLAMA[preset]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layer,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str, dtype: torch.dtype | None):
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def synthetic_examples(n_docs: int, vocab: int, seed: int = 0, lo: int = 32, hi: int = 256) -> list[Example]:
    rng = random.Random(seed)
    return [Example(row=i, ids=[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))], loss_from=1) for i in range(n_docs)]


def training_pass(model, batches, device: str = "cpu", autocast: torch.dtype | None = None) -> int:
    """A plain training step minus the optimizer: the model's forward, the loss, backward with
    weight gradients."""
    for p in model.parameters():
        p.requires_grad_(True)
    tokens = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        with _autocast(device, autocast):
            forward_loss(model, batch).sum().backward()
        tokens += batch.n_tokens
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    _sync(device)
    return tokens


def indexing_pass(capture: FactoredCapture, batches, device: str = "cpu") -> int:
    tokens = 0
    for batch in batches:
        capture.vectors(batch)
        tokens += batch.n_tokens
    _sync(device)
    return tokens


def throughput(size: str, proj_dim: int, n_docs: int, batch_tokens: int, rounds: int, *, arch: str = "gpt2",
               device: str = "cpu", dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None,
               act: str = "gelu_new", max_len: int = 256) -> dict:
    model = gpt2_model(size, act).to(device, dtype) if arch == "gpt2" else llama_model(size, device, dtype)
    tracked = tracked_matrices(model)
    blocks = make_layout(tracked, kind="paper", dim=proj_dim)
    capture = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0, device=device, autocast=autocast)
    examples = synthetic_examples(n_docs, model.config.vocab_size, hi=max_len)
    batches = [collate(g, 0).to(device) for g in bucketed(examples, batch_tokens)]
    training_pass(model, batches[:2], device, autocast)  # warm up both paths
    indexing_pass(capture, batches[:2], device)
    # Interleaved per batch (train step, index step, order swapped every round) and each batch's
    # best time over the rounds: on a shared machine a burst of other work then hits both passes
    # alike instead of whichever pass happened to be running.
    def train_fused(b):
        with fused_activations(model):
            return training_pass(model, [b], device, autocast)

    run = {"train": lambda b: training_pass(model, [b], device, autocast),
           "index": lambda b: indexing_pass(capture, [b], device)}
    with fused_activations(model) as n_swapped:
        pass
    if n_swapped:  # otherwise both training passes are the same: don't run it twice
        run["train_fused"] = train_fused
    times = {name: [[] for _ in batches] for name in run}
    cpu = {name: 0.0 for name in run}  # process CPU seconds: less sensitive to other jobs on the cores
    for r in range(rounds):
        for i, batch in enumerate(batches):
            for name in (list(run) if (r + i) % 2 == 0 else list(run)[::-1]):
                t, c = time.perf_counter(), time.process_time()
                run[name](batch)
                times[name][i].append(time.perf_counter() - t)
                cpu[name] += time.process_time() - c
    tokens = sum(b.n_tokens for b in batches)
    best = {n: sum(min(ts) for ts in times[n]) for n in times}
    median = {n: sum(sorted(ts)[len(ts) // 2] for ts in times[n]) for n in times}
    train_tps, index_tps = tokens / best["train"], tokens / best["index"]
    return {
        "model": size,
        "params": coverage(model, tracked)["n_params"],
        "coverage": round(coverage(model, tracked)["share"], 4),
        "dim": capture.dim,
        "k": sorted({b.k for b in blocks}),
        "train_tok_s": round(train_tps),
        "index_tok_s": round(index_tps),
        "ratio": round(index_tps / train_tps, 3),
        "ratio_vs_fused": round(best.get("train_fused", best["train"]) / best["index"], 3),
        "ratio_median": round(median["train"] / median["index"], 3),
        "ratio_cpu": round(cpu["train"] / cpu["index"], 3),
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

    model = gpt2_model(size, "gelu_new")
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
    ap.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    ap.add_argument("--sizes", default="2m,20m", help="gpt2: " + ",".join(SIZES))
    ap.add_argument("--preset", default=None, help="llama: " + ",".join(LLAMA) + " (overrides --sizes)")
    ap.add_argument("--act", default="gelu_new", help="gpt2 activation: gelu_new or gelu_pytorch_tanh")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="model weights: float32 or bfloat16")
    ap.add_argument("--autocast", default=None, help="e.g. bfloat16: both passes under autocast (reported apart)")
    ap.add_argument("--max-len", type=int, default=256, help="longest synthetic document (tokens)")
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
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 projections of a bf16 model
    dtype = getattr(torch, args.dtype)
    autocast = getattr(torch, args.autocast) if args.autocast else None
    sizes = (args.preset or "tiny").split(",") if args.arch == "llama" else args.sizes.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, arch {args.arch}"
          + (f" ({args.act})" if args.arch == "gpt2" else "")
          + f", weights {args.dtype}, autocast {args.autocast or 'off'}, requested dim {args.proj_dim}")
    print(f"{'model':>6} {'params':>14} {'cover':>6} {'dim':>6} {'k':>10} {'train tok/s':>12} {'index tok/s':>12} {'ratio':>6} {'median':>7} {'cpu-s':>6} {'vs fused':>9}")
    for size in sizes:
        r = throughput(size, args.proj_dim, args.docs, args.batch_tokens, args.rounds, arch=args.arch,
                       device=args.device, dtype=dtype, autocast=autocast, act=args.act, max_len=args.max_len)
        print(f"{r['model']:>6} {r['params']:>14,} {r['coverage']:>6.1%} {r['dim']:>6} {str(r['k']):>10} "
              f"{r['train_tok_s']:>12,} {r['index_tok_s']:>12,} {r['ratio']:>5.2f}x {r['ratio_median']:>6.2f}x {r['ratio_cpu']:>5.2f}x {r['ratio_vs_fused']:>8.2f}x")
    if not args.no_memory and args.arch == "gpt2" and args.device == "cpu":
        size = args.sizes.split(",")[0]
        for row in memory(size, args.memory_docs, args.proj_dim):
            print(f"memory ({size}): {row['docs']:>6} docs  peak RSS {row['peak_rss_mb']:8.0f} MB  ({row['seconds']} s)")


if __name__ == "__main__":
    main()
