"""Indexing throughput vs. a training step, side by side in one run, and peak memory vs. corpus size.

For each model (a GPT-2 or Llama shape with random weights built from a config, or a real local HF
directory with `--model`), the same length-bucketed batches are run through
  (a) a plain forward + backward with weight gradients (what one training step costs, minus the
      optimizer), and
  (b) tracestar's factored capture (per-example projected, corrected gradients; no weight
      gradients),
interleaved batch by batch (the order swapped every round) so that both see the same machine state.
Prints tokens/s of each from every batch's best time over the rounds, the ratio (b)/(a), and the
ratio of median times and of process CPU seconds as checks. Then, unless --no-memory, builds real
indexes in fresh processes and prints each build's peak RSS: memory must not grow with the corpus.

    python bench/index_throughput.py                      # ~2M and ~20M models, default dimension
    python bench/index_throughput.py --sizes 20m --proj-dim 16384 --rounds 3
    python bench/index_throughput.py --autocast bfloat16 --no-memory  # both passes under bf16 autocast
    python bench/index_throughput.py --arch llama --preset 8b --device cuda --dtype bfloat16 --no-memory
    python bench/index_throughput.py --arch llama --preset smollm2 --threads 2 --autocast none,bfloat16 \\
        --docs 300 --min-len 16 --max-len 48 --no-memory     # SmolLM2's shape, short documents
    python bench/index_throughput.py --model smollm2 --corpus world/corpus.jsonl --docs 300 --threads 2 \\
        --autocast none,bfloat16          # a real HF directory (python bench/smollm2.py --out smollm2)
    python bench/index_throughput.py --arch llama --preset smollm2 --groups 8,30 \\
        --reference-capture before.py     # two layouts and another revision's capture.py, same rounds

Documents are synthetic token ids (lengths uniform in [--min-len, --max-len]) unless `--corpus`
names a corpus (JSONL, Parquet or a datasets directory), whose first `--docs` documents are
tokenized with `--model`'s tokenizer as `tracestar index` does. `--autocast` takes a comma list
(`none,bfloat16`): each setting is measured in turn on the same batches.

The machine may be shared: each measurement prints the load average before and after and the
share of the requested threads this process got (its CPU seconds ÷ wall seconds ÷ threads); a
share well below 1 means other jobs took cores and the absolute tok/s are low, while the ratio,
measured interleaved, stays comparable. Peak RSS is measured per pass (Linux: the kernel's
high-water mark, reset before each pass; it includes the model). With `--model` and `--corpus`, the memory check instead builds a real index of the
same documents in a fresh process (`tracestar index` defaults: V estimated, R_train) and prints its
peak RSS, wall time and per-phase breakdown (manifest["timings"]).

`--act` picks the GPT-2 MLP activation: `gelu_new` (GPT-2's own, eight element-wise ops each way)
or `gelu_pytorch_tanh` (the same function as one fused kernel). The capture always runs a tanh-GELU
as the fused kernel (`model.fused_activations`); the training pass runs the model as configured.
Under bf16 autocast on a CPU, capture also runs short batches' attention as the math kernel
(`capture.attention_kernel`). So that these swaps are not mistaken for a smaller per-token cost, a
third pass, "train (fused)", trains with the same kernels. The `vs fused` column is the ratio
against that pass. Where nothing is swapped both training passes are the same. `--profile N` prints the N costliest
torch operators of one batch of each pass (torch.profiler, self CPU time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tracestar.batching import (
    Example,
    bucketed,
    collate,
    encode_document,
    forward_loss,
    pad_id,
)
from tracestar.capture import FactoredCapture, attention_kernel
from tracestar.model import coverage, fused_activations, tracked_matrices
from tracestar.normalizer import identity
from tracestar.projection import DEFAULT_DIM, PAPER_GROUPS, make_layout

SIZES = {  # name: (n_layer, n_embd, vocab)
    "2m": (2, 192, 4096),
    "20m": (6, 448, 8192),
}


LLAMA = {  # name: (layers, hidden, intermediate, heads, kv heads, vocab, tied embedding / head)
    "tiny": (2, 64, 176, 4, 2, 1024, False),
    "smollm2": (30, 576, 1536, 9, 3, 49152, True),  # SmolLM2-135M's shape
    "8b": (32, 4096, 14336, 32, 8, 128256, False),  # Llama-3-8B shape
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

    n_layer, hidden, inter, heads, kv, vocab, tied = LLAMA[preset]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layer,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=1, pad_token_id=0)
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


def corpus_examples(corpus: str | Path, tokenizer, n_docs: int, max_len: int) -> list[Example]:
    """The first `n_docs` documents of a corpus, encoded as `tracestar index` encodes them."""
    from tracestar.corpus import iter_documents

    out = []
    for i, doc in enumerate(iter_documents(corpus)):
        if i == n_docs:
            break
        out.append(encode_document(tokenizer, doc.text, i, max_len))
    return out


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


def build_model(size: str, *, arch: str, device: str, dtype: torch.dtype, act: str = "gelu_new",
                model_dir: str | None = None):
    """(model, tokenizer or None): a preset with random weights, or a local HF directory."""
    if model_dir is not None:
        from tracestar.model import load_model

        model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
        return model, tokenizer
    if arch == "gpt2":
        return gpt2_model(size, act).to(device, dtype), None
    return llama_model(size, device, dtype), None


def throughput(size: str, proj_dim: int, n_docs: int, batch_tokens: int, rounds: int, *, arch: str = "gpt2",
               device: str = "cpu", dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None,
               act: str = "gelu_new", max_len: int = 256, min_len: int = 32, model_dir: str | None = None,
               corpus: str | None = None, model=None, tokenizer=None, profile: int = 0,
               groups: tuple[int, ...] = (PAPER_GROUPS,), reference: str | None = None) -> dict:
    """Interleaved training-step and indexing tok/s on the same batches (see the module docstring).

    `model`/`tokenizer` reuse an already built model (several autocast settings in one run).
    `groups`: the paper layout's most layer groups; each count is its own capture, timed in the
    same interleaved rounds, and reported in `layouts` (the top-level figures are the first's).
    `reference`: a capture.py from another revision, timed in the same rounds on the first layout
    (a before/after that a busy machine cannot skew: `reference_*`)."""
    if model is None:
        model, tokenizer = build_model(size, arch=arch, device=device, dtype=dtype, act=act, model_dir=model_dir)
    tracked = tracked_matrices(model)
    layouts = {n: make_layout(tracked, kind="paper", dim=proj_dim, max_groups=n) for n in dict.fromkeys(groups)}
    captures = {n: FactoredCapture(model, tracked, blocks, identity(tracked), seed=0, device=device, autocast=autocast)
                for n, blocks in layouts.items()}
    first = next(iter(layouts))
    blocks, capture = layouts[first], captures[first]
    if reference is not None:
        module = _load_reference(reference)
        captures["reference"] = module.FactoredCapture(model, tracked, blocks, identity(tracked), seed=0,
                                                       device=device, autocast=autocast)
    if corpus is not None:
        if tokenizer is None:
            raise SystemExit("--corpus needs --model (a tokenizer)")
        examples = corpus_examples(corpus, tokenizer, n_docs, max_len)
        pad = pad_id(tokenizer)
    else:
        examples = synthetic_examples(n_docs, model.config.vocab_size, lo=min(min_len, max_len), hi=max_len)
        pad = 0
    batches = [collate(g, pad).to(device) for g in bucketed(examples, batch_tokens)]
    training_pass(model, batches[:2], device, autocast)  # warm up both paths
    for c in captures.values():
        indexing_pass(c, batches[:2], device)
    if profile:
        _profile(model, capture, batches[0], device, autocast, profile)
    # Interleaved per batch (train step, index step, order swapped every round) and each batch's
    # best time over the rounds: on a shared machine a burst of other work then hits both passes
    # alike instead of whichever pass happened to be running.
    def train_fused(b):  # with the kernels capture swaps in: tanh-GELU, and attention (bf16, CPU)
        with fused_activations(model), attention_kernel(torch.device(device), autocast, b.input_ids.shape[1]):
            return training_pass(model, [b], device, autocast)

    run = {"train": lambda b: training_pass(model, [b], device, autocast),
           **{_index_key(n, first): (lambda b, c=c: indexing_pass(c, [b], device)) for n, c in captures.items()}}
    with fused_activations(model) as n_swapped:
        pass
    swaps_attention = any(not isinstance(attention_kernel(torch.device(device), autocast, b.input_ids.shape[1]),
                                         contextlib.nullcontext) for b in batches)
    if n_swapped or swaps_attention:  # otherwise both training passes are the same: don't run it twice
        run["train_fused"] = train_fused
    times = {name: [[] for _ in batches] for name in run}
    cpu = {name: 0.0 for name in run}  # process CPU seconds: less sensitive to other jobs on the cores
    rss = {name: 0.0 for name in run}  # peak RSS while the pass ran (the kernel's high-water mark, reset before)
    load_before, wall0, cpu0 = os.getloadavg(), time.perf_counter(), time.process_time()
    for r in range(rounds):
        for i, batch in enumerate(batches):
            for name in (list(run) if (r + i) % 2 == 0 else list(run)[::-1]):
                _reset_peak_rss()
                t, c = time.perf_counter(), time.process_time()
                run[name](batch)
                times[name][i].append(time.perf_counter() - t)
                cpu[name] += time.process_time() - c
                rss[name] = max(rss[name], _peak_rss_now_mb())
    wall, cpu_all = time.perf_counter() - wall0, time.process_time() - cpu0
    tokens = sum(b.n_tokens for b in batches)
    best = {n: sum(min(ts) for ts in times[n]) for n in times}
    median = {n: sum(sorted(ts)[len(ts) // 2] for ts in times[n]) for n in times}
    train_tps, index_tps = tokens / best["train"], tokens / best["index"]
    cov = coverage(model, tracked)
    per_layout = [{"groups": n, "blocks": len(layouts[n]), "dim": captures[n].dim, "k": sorted({b.k for b in layouts[n]}),
                   "index_tok_s": round(tokens / best[_index_key(n, first)]),
                   "ratio": round(best["train"] / best[_index_key(n, first)], 3),
                   "ratio_median": round(median["train"] / median[_index_key(n, first)], 3),
                   "ratio_cpu": round(cpu["train"] / cpu[_index_key(n, first)], 3)} for n in layouts]
    ref = {} if reference is None else {
        "reference_tok_s": round(tokens / best["index@reference"]),
        "ratio_reference": round(best["train"] / best["index@reference"], 3),
        "ratio_reference_median": round(median["train"] / median["index@reference"], 3)}
    return {
        "model": Path(model_dir).name if model_dir else size,
        "params": cov["n_params"],
        "coverage": round(cov["share"], 4),
        "dim": capture.dim,
        "k": sorted({b.k for b in blocks}),
        "docs": len(examples),
        "tokens": tokens,
        "batches": len(batches),
        "train_tok_s": round(train_tps),
        "index_tok_s": round(index_tps),
        "ratio": round(index_tps / train_tps, 3),
        "ratio_vs_fused": round(best.get("train_fused", best["train"]) / best["index"], 3),
        "ratio_median": round(median["train"] / median["index"], 3),
        "ratio_cpu": round(cpu["train"] / cpu["index"], 3),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "thread_share": round(cpu_all / max(wall, 1e-9) / torch.get_num_threads(), 3),
        "peak_rss_mb": round(_peak_rss_mb()),
        "train_rss_mb": round(rss["train"]),
        "index_rss_mb": round(rss["index"]),
        "layouts": per_layout,
        **ref,
    }


def _load_reference(path: str):
    """A capture module from a file (another revision's src/tracestar/capture.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_capture", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--reference-capture: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _index_key(groups: int, first: int) -> str:
    """The timing key of the capture with `groups` layer groups ("index" for the first)."""
    return "index" if groups == first else f"index@{groups}"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux: /proc/self/clear_refs, "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss_now_mb() -> float:
    """VmHWM (peak RSS since the last reset) in MB; the process's lifetime peak where unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_rss_mb()


def _profile(model, capture: FactoredCapture, batch, device: str, autocast, rows: int) -> None:
    """The costliest operators of one batch of each pass, by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for name, fn in (("train", lambda: training_pass(model, [batch], device, autocast)),
                     ("index", lambda: indexing_pass(capture, [batch], device))):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        print(f"--- profile: {name}, one batch {tuple(batch.input_ids.shape)} ---")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                                 max_name_column_width=40, max_shapes_column_width=60))


# --- memory: real builds in fresh processes ------------------------------------------------------


def _memory_child(model_dir: str, corpus: str, out: str, proj_dim: int, preconditioner: str) -> None:
    from tracestar.api import build_index
    from tracestar.index import writer
    from tracestar.index.store import read_manifest

    t = time.perf_counter()
    build_index(model_dir, corpus, out, proj_dim=proj_dim, preconditioner=preconditioner, shard_docs=256, quiet=True)
    manifest = read_manifest(out)
    sizes = {kind: sum(f.stat().st_size for f in (Path(out) / kind).glob("*.npy")) for kind in writer.KINDS}
    sizes["preconditioner"] = (Path(out) / writer.PRECONDITIONER).stat().st_size
    print(json.dumps({"peak_rss_mb": _peak_rss_mb(), "build_s": time.perf_counter() - t,
                      "timings": manifest.get("timings"), "bytes": sizes}))


def _run_child(model_dir: Path, corpus: Path, out: Path, proj_dim: int, preconditioner: str = "train") -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(model_dir), str(corpus), str(out), str(proj_dim), preconditioner]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"memory check failed:\n{res.stderr[-2000:]}")
    return {"seconds": round(time.perf_counter() - t, 1), **json.loads(res.stdout.strip().splitlines()[-1])}


def _save_model_with_tokenizer(size: str, path: Path) -> None:
    save_with_word_tokenizer(gpt2_model(size, "gelu_new"), path)


def save_with_word_tokenizer(model, path: Path) -> None:
    """`model` (random weights) saved with a word-level tokenizer over its whole vocabulary (w0, w1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

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
            rows.append({"docs": n, **_run_child(root / "model", corpus, root / f"idx-{n}", proj_dim)})
    return rows


def memory_model(model_dir: str, corpus: str, n_docs: int, proj_dim: int) -> dict:
    """One real build of the first `n_docs` documents of `corpus` with a real model."""
    from tracestar.corpus import iter_documents

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subset, written = root / "corpus.jsonl", 0
        with open(subset, "w") as fh:
            for doc in iter_documents(corpus):
                if written == n_docs:
                    break
                fh.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
                written += 1
        return {"docs": written, **_run_child(Path(model_dir), subset, root / "idx", proj_dim)}


def _print_build(label: str, row: dict) -> None:
    mb = {k: v / 2**20 for k, v in row["bytes"].items()}
    print(f"memory ({label}): {row['docs']:>6} docs  peak RSS {row['peak_rss_mb']:8.0f} MB  ({row['seconds']} s; "
          f"raw {mb['raw']:.1f} MB, vectors {mb['vectors']:.1f} MB, preconditioner {mb['preconditioner']:.1f} MB)")
    if row.get("timings"):
        print("  phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in row["timings"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    ap.add_argument("--sizes", default="2m,20m", help="gpt2: " + ",".join(SIZES))
    ap.add_argument("--preset", default=None, help="llama: " + ",".join(LLAMA) + " (overrides --sizes)")
    ap.add_argument("--model", default=None, help="a local HF model directory (overrides --arch and --sizes)")
    ap.add_argument("--corpus", default=None, help="documents to run (needs --model); default synthetic token ids")
    ap.add_argument("--act", default="gelu_new", help="gpt2 activation: gelu_new or gelu_pytorch_tanh")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="model weights: float32 or bfloat16")
    ap.add_argument("--autocast", default=None, help="comma list of none / bfloat16: both passes under autocast (each measured)")
    ap.add_argument("--min-len", type=int, default=32, help="shortest synthetic document (tokens)")
    ap.add_argument("--max-len", type=int, default=256, help="longest synthetic document (tokens); --corpus: truncation")
    ap.add_argument("--proj-dim", type=int, default=DEFAULT_DIM)
    ap.add_argument("--reference-capture", default=None, metavar="FILE",
                    help="another revision's capture.py (git show REV:src/tracestar/capture.py > FILE), "
                         "timed in the same rounds: a before/after on a busy machine")
    ap.add_argument("--groups", default=str(PAPER_GROUPS),
                    help="comma list: the paper layout's most layer groups, each its own capture in the same rounds "
                         "(default %(default)s)")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest operators of each pass")
    ap.add_argument("--memory-docs", type=int, default=200, help="memory check: N and 10·N documents")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        model_dir, corpus, out, dim, precond = args.memory_child
        _memory_child(model_dir, corpus, out, int(dim), precond)
        return
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 projections of a bf16 model
    dtype = getattr(torch, args.dtype)
    groups = tuple(int(g) for g in args.groups.split(","))
    settings = [None if a in ("none", "off", "") else getattr(torch, a) for a in (args.autocast or "none").split(",")]
    if args.model:
        sizes, label = [Path(args.model).name], f"model {args.model}"
    elif args.arch == "llama":
        sizes, label = (args.preset or "tiny").split(","), "arch llama"
    else:
        sizes, label = args.sizes.split(","), f"arch gpt2 ({args.act})"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {label}, "
          f"weights {args.dtype}, requested dim {args.proj_dim}, "
          f"{'corpus ' + args.corpus if args.corpus else f'synthetic documents of {args.min_len}-{args.max_len} tokens'}")
    print(f"{'model':>8} {'autocast':>8} {'params':>13} {'cover':>6} {'dim':>6} {'k':>8} {'tokens':>7} {'train tok/s':>11} "
          f"{'index tok/s':>11} {'ratio':>6} {'median':>7} {'cpu-s':>6} {'vs fused':>8} {'threads':>7} {'load 1m':>12} {'RSS train/index MB':>18}")
    for size in sizes:
        model, tokenizer = build_model(size, arch=args.arch, device=args.device, dtype=dtype, act=args.act, model_dir=args.model)
        for autocast in settings:
            r = throughput(size, args.proj_dim, args.docs, args.batch_tokens, args.rounds, arch=args.arch,
                           device=args.device, dtype=dtype, autocast=autocast, act=args.act, max_len=args.max_len,
                           min_len=args.min_len, model_dir=args.model, corpus=args.corpus, model=model,
                           tokenizer=tokenizer, profile=args.profile, groups=groups,
                           reference=args.reference_capture)
            ac = "bf16" if autocast is torch.bfloat16 else ("off" if autocast is None else str(autocast))
            print(f"{r['model']:>8} {ac:>8} {r['params']:>13,} {r['coverage']:>6.1%} {r['dim']:>6} {str(r['k']):>8} {r['tokens']:>7,} "
                  f"{r['train_tok_s']:>11,} {r['index_tok_s']:>11,} {r['ratio']:>5.2f}x {r['ratio_median']:>6.2f}x "
                  f"{r['ratio_cpu']:>5.2f}x {r['ratio_vs_fused']:>7.2f}x {r['thread_share']:>7.0%} "
                  f"{r['load_before'][0]:>5.1f}->{r['load_after'][0]:<5.1f} {r['train_rss_mb']:>8,}/{r['index_rss_mb']:<8,}", flush=True)
            if len(r["layouts"]) > 1:
                for lay in r["layouts"]:
                    print(f"{'':>8} {ac:>8}   at most {lay['groups']:>3} layer groups: {lay['blocks']:>3} blocks, dim {lay['dim']:>6}, "
                          f"k {str(lay['k']):>8}, index tok/s {lay['index_tok_s']:>7,}, ratio {lay['ratio']:.2f}x, "
                          f"median {lay['ratio_median']:.2f}x, cpu-s {lay['ratio_cpu']:.2f}x", flush=True)
            if args.reference_capture:
                print(f"{'':>8} {ac:>8}   reference capture {args.reference_capture}: index tok/s {r['reference_tok_s']:>7,}, "
                      f"ratio {r['ratio_reference']:.2f}x, median {r['ratio_reference_median']:.2f}x", flush=True)
        del model
    if args.no_memory or args.device != "cpu":
        return
    if args.model and args.corpus:
        _print_build(Path(args.model).name, memory_model(args.model, args.corpus, args.docs, args.proj_dim))
    elif args.arch == "gpt2" and not args.model:
        size = args.sizes.split(",")[0]
        for row in memory(size, args.memory_docs, args.proj_dim):
            _print_build(size, row)


if __name__ == "__main__":
    main()
