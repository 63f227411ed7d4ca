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
        epochs=1, d_model=32, n_layer=1, n_head=2, vocab_size=600, max_minutes=1.0,
    )
    assert log["steps"] > 0 and not log["cached"]
    assert 0.0 <= log["first_token_accuracy"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None
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
        epochs=1, d_model=32, n_layer=1, n_head=2, vocab_size=600, max_minutes=1.0,
    )
    assert again["cached"]
