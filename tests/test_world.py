"""The built-in fact world (exact ground truth, determinism) and the tiny trainer (loadable output)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tracestar.world import RELATIONS, make_world
from tracestar.world.facts import BUCKETS, build_world


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    make_world(out, seed=0, scale="small")
    return out


def _states(text: str, sentence: str) -> bool:
    """Independent of the generator: the rendering begins the text or follows '. '."""
    return re.search(r"(?:^|(?<=\. ))" + re.escape(sentence), text) is not None


def test_same_seed_same_bytes_other_seed_differs(small_world, tmp_path):
    again = make_world(tmp_path / "again", seed=0, scale="small")
    other = make_world(tmp_path / "other", seed=1, scale="small")
    for name in ("corpus.jsonl", "queries.jsonl", "facts.jsonl"):
        assert (small_world / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert other.corpus.read_bytes() != (small_world / "corpus.jsonl").read_bytes()
    assert other.queries.read_bytes() != (small_world / "queries.jsonl").read_bytes()


def test_query_format(small_world):
    queries = _jsonl(small_world / "queries.jsonl")
    assert 120 <= len(queries) <= 200
    for q in queries:
        assert set(q) == {"id", "prompt", "target", "relevant", "bucket", "relation"}
        assert q["target"].startswith(" ") and not q["target"].startswith("  ")
        assert not q["prompt"].endswith(" ")
        assert q["relation"] in RELATIONS and q["bucket"] in BUCKETS
        lo, hi = BUCKETS[q["bucket"]]
        assert lo <= len(q["relevant"]) <= hi
    assert len({q["id"] for q in queries}) == len(queries)
    assert set(Counter(q["bucket"] for q in queries)) == set(BUCKETS)


def test_relevant_lists_are_exact(small_world):
    """Every listed document states the fact, and no other document does (by string check)."""
    docs = {d["id"]: d["text"] for d in _jsonl(small_world / "corpus.jsonl")}
    facts = {(f["relation"], f["query"]): f for f in _jsonl(small_world / "facts.jsonl") if f["query"]}
    for q in _jsonl(small_world / "queries.jsonl"):
        fact = facts[(q["relation"], q["id"])]
        relation = RELATIONS[q["relation"]]
        assert relation.prompt(fact["subject"]) == q["prompt"]
        assert " " + fact["object"] == q["target"]
        renderings = relation.sentences(fact["subject"], fact["object"])
        stating = sorted(i for i, text in docs.items() if any(_states(text, r) for r in renderings))
        assert stating == q["relevant"], q
        query_wording = q["prompt"] + q["target"] + "."
        assert any(query_wording in docs[i] for i in q["relevant"])


def test_hard_negatives_exist(small_world):
    docs = [d["text"] for d in _jsonl(small_world / "corpus.jsonl")]
    facts = _jsonl(small_world / "facts.jsonl")
    assert any(f["kind"] == "lookalike" for f in facts)
    echoes = [q["prompt"] for q in _jsonl(small_world / "queries.jsonl")
              if any(t.startswith(q["prompt"] + " ") and not t.startswith(q["prompt"] + q["target"]) for t in docs)]
    assert echoes, "expected prompt-echo distractors"


def test_full_scale_size():
    docs, facts, queries = build_world(seed=0, scale="full")
    assert len(queries) >= 1000
    assert len({q["relation"] for q in queries}) >= 5
    assert set(Counter(q["bucket"] for q in queries)) == set(BUCKETS)
    assert 3000 <= len(docs) <= 6000


def test_smoke_training_saves_loadable_model(small_world, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracestar.world import first_token_accuracy, train_model

    out = tmp_path / "model"
    log = train_model(
        small_world / "corpus.jsonl", out, queries_path=small_world / "queries.jsonl", seed=0,
        epochs=1, d_model=32, n_layer=1, n_head=2, vocab_size=600,
    )
    assert log["steps"] == log["planned_steps"] == -(-653 // 32) and not log["cached"]
    assert "stopped_early" not in log
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert log["first_token_accuracy"] < 0.05  # one epoch of a 32-wide model: no fact learned yet (measured: 0 of 150)
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (out / "model.safetensors").exists()

    state = torch.load(out / "optimizer.pt", weights_only=True)
    params = list(model.parameters())
    assert len(state["state"]) == len(params)
    matrix = next(i for i, p in enumerate(params) if p.dim() == 2)
    assert {"row_var", "col_var"} <= set(state["state"][matrix])

    acc = first_token_accuracy(out, None, small_world / "queries.jsonl")
    assert acc == pytest.approx(log["first_token_accuracy"])
    again = train_model(
        small_world / "corpus.jsonl", out, queries_path=small_world / "queries.jsonl", seed=0,
        epochs=1, d_model=32, n_layer=1, n_head=2, vocab_size=600,
    )
    assert again["cached"]


def test_first_token_accuracy_counts_greedy_first_tokens():
    """Every other target is the model's own greedy next token, found one prompt at a time; the
    rest are another word: the accuracy is exactly one half, whatever the prompts' lengths."""
    import tiny
    import torch

    from tracestar.world import first_token_accuracy

    model, tok = tiny.gpt2(seed=0), tiny.make_tokenizer()
    prompts = ["the capital of france is", "a small mountain", "the river in the north was", "berlin is a large",
               "the", "in the east a large river and", "the population of", "lisbon"]
    queries = []
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            guess = int(model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax())
        right = tok.decode([guess])
        wrong = next(w for w in (" paris", " rome") if tok(w, add_special_tokens=False)["input_ids"][0] != guess)
        target = right if i % 2 == 0 else wrong
        assert (tok(target, add_special_tokens=False)["input_ids"][0] == guess) == (i % 2 == 0), (prompt, right)
        queries.append({"prompt": prompt, "target": target})
    assert first_token_accuracy(model, tok, queries) == 0.5

# --- training is counted in seeded steps, never in seconds ---------------------------------------

TINY = dict(epochs=2, d_model=32, n_layer=1, n_head=2, vocab_size=600, batch_size=64)


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_same_seed_same_training_even_when_the_clock_races(small_world, tmp_path, monkeypatch):
    """Two runs with one seed give the same loss log and weights, even if every clock reading of the
    second run is an hour later than the one before (a machine 'too slow' for any time cap)."""
    import time

    import torch

    from tracestar.world import train_model

    corpus, queries = small_world / "corpus.jsonl", small_world / "queries.jsonl"
    first = train_model(corpus, tmp_path / "a", queries_path=queries, seed=3, **TINY)
    ticks = iter(range(10**9))
    monkeypatch.setattr(time, "monotonic", lambda: 3600.0 * next(ticks))
    second = train_model(corpus, tmp_path / "b", queries_path=queries, seed=3, **TINY)
    monkeypatch.undo()
    other = train_model(corpus, tmp_path / "c", queries_path=queries, seed=4, **TINY)

    assert first["steps"] == second["steps"] == first["planned_steps"] == 2 * -(-653 // 64)
    assert second["epochs_run"] == 2 and second["seconds"] > 3600  # the clock did race
    assert second["epoch_losses"] == pytest.approx(first["epoch_losses"], abs=1e-4)
    assert second["final_lr"] == pytest.approx(first["final_lr"], rel=1e-12)
    assert second["first_token_accuracy"] == pytest.approx(first["first_token_accuracy"], abs=0.01)
    wa, wb, wc = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    assert other["epoch_losses"] != first["epoch_losses"]
    assert any(not torch.allclose(wa[n], wc[n], atol=1e-3) for n in wa)


def test_schedule_depends_on_steps_only():
    from tracestar.world.train import TrainConfig, lr_at

    cfg = TrainConfig(lr=0.05, warmup_frac=0.04, final_lr_frac=0.05)
    total = cfg.planned_steps(4183)
    assert total == 12 * 131
    peak = round(0.04 * total)
    assert lr_at(0, total, cfg) == pytest.approx(0.05 * 0.01)  # warmup starts near zero
    assert lr_at(peak, total, cfg) == pytest.approx(0.05, rel=0.02)
    assert lr_at(total, total, cfg) == pytest.approx(0.05 * 0.05)  # anneals to final_lr_frac
    rates = [lr_at(s, total, cfg) for s in range(peak, total + 1)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # monotone decay after warmup
    assert not hasattr(cfg, "max_minutes")


def test_training_logs_no_loss_type_warning(small_world):
    """transformers warns "loss_type=None ... unrecognized" on the first loss of a model whose class
    name it does not map; the trainer's models name their loss, so nothing is printed."""
    import logging
    import math

    import torch

    from tracestar.world.train import TrainConfig, build_model, train_tokenizer

    texts = [json.loads(line)["text"] for line in (small_world / "corpus.jsonl").read_text().splitlines()[:50]]
    tokenizer = train_tokenizer(texts, 300)
    model = build_model(TrainConfig(d_model=16, n_layer=1, n_head=2, max_length=32), tokenizer)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers.modeling_utils")
    getattr(hf_logger.warning_once, "cache_clear", lambda: None)()  # warned earlier in this process?
    hf_logger.addHandler(handler)
    try:
        ids = torch.tensor([tokenizer(texts[0])["input_ids"][:16]])
        loss = model(input_ids=ids, labels=ids).loss
    finally:
        hf_logger.removeHandler(handler)
    # an untrained model predicts about uniformly: the mean token loss is ln(vocabulary size)
    loss = float(loss.detach())
    assert abs(loss - math.log(model.config.vocab_size)) < 0.1, (loss, model.config.vocab_size)
    assert not [m for m in seen if "loss_type" in m]
