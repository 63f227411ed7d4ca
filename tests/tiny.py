"""Tiny random models and tokenizers built from a config: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the capital of is city country river mountain paris france berlin germany rome italy madrid spain "
    "lisbon portugal vienna austria a an and in on was born lives language speaks currency euro "
    "population large small north south east west"
).split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault("Ġ" + w, len(vocab))
        vocab.setdefault(w, len(vocab))
    for ch in ".,:;!?'-0123456789":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault("Ġ" + ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def gpt2(seed: int = 0, vocab_size: int | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size or len(make_tokenizer()), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def llama(seed: int = 0, vocab_size: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(make_tokenizer()), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def save(model, path: Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


FACTS = [
    "the capital of france is paris .",
    "the capital of germany is berlin .",
    "the capital of italy is rome .",
    "the capital of spain is madrid .",
    "the capital of portugal is lisbon .",
    "the capital of austria is vienna .",
]
FILLER = [
    "the river in the north was large .",
    "a small mountain lives on in the south .",
    "the population of the city was small and the language is euro .",
    "in the east a large river and a small mountain .",
]


def train_steps(model, texts: list[str], steps: int = 60, lr: float = 3e-2, seed: int = 0):
    """A few full-batch Adafactor steps so the tiny model knows the facts; returns the optimizer."""
    from tracestar.batching import collate, encode_document, forward_loss

    torch.manual_seed(seed)
    tok = make_tokenizer()
    batch = collate([encode_document(tok, t, i, 64) for i, t in enumerate(texts)], tok.pad_token_id)
    opt = torch.optim.Adafactor(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = forward_loss(model, batch).sum() / batch.loss_mask.sum()
        loss.backward()
        opt.step()
    model.eval()
    return opt


def write_corpus(path: Path, texts: list[str], prefix: str = "d") -> Path:
    import json

    with open(path, "w") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n")
    return path


def write_queries(path: Path, pairs: list[tuple[str, str]]) -> Path:
    import json

    with open(path, "w") as fh:
        for i, (p, t) in enumerate(pairs):
            fh.write(json.dumps({"id": f"q{i}", "prompt": p, "target": t}) + "\n")
    return path


def trained_world(root: Path) -> dict:
    """A tiny GPT-2 trained on FACTS + FILLER, saved with its Adafactor state, plus corpus and queries."""
    root = Path(root)
    model = gpt2(seed=1)
    opt = train_steps(model, FACTS + FILLER)
    mdir = save(model, root / "model")
    torch.save(opt.state_dict(), mdir / "optimizer.pt")
    corpus = write_corpus(root / "corpus.jsonl", FACTS + FILLER)
    pairs = [(f.rsplit(" is ", 1)[0] + " is", " " + f.rsplit(" is ", 1)[1].split()[0]) for f in FACTS]
    queries = write_queries(root / "queries.jsonl", pairs)
    return {"model": mdir, "corpus": corpus, "queries": queries, "optimizer": mdir / "optimizer.pt"}


def cli(*args: str):
    """`python -m tracestar ARGS` in a child process, as a user runs it: (returncode, stdout, stderr)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tracestar", *args], capture_output=True, text=True)


def all_vectors(idx):
    """An open index's final vectors, every shard in row order, as float32 [N, D]."""
    import numpy as np

    from tracestar.index.store import as_float32

    return np.concatenate([as_float32(a, idx.manifest["dtype"]) for _, a in idx.store.iter_shards()])


def chance_mrr(n: int, relevant: int) -> float:
    """Expected 1/rank of the first of `relevant` documents when `n` documents are ranked at random:
    the floor an attribution MRR must clear to mean anything."""
    import math

    return sum(math.comb(n - k, relevant - 1) / math.comb(n, relevant) / k for k in range(1, n - relevant + 2))
