"""`tracestar trace`: greedy generation with the index's model, attributed like a `query` target."""

from __future__ import annotations

import json
import re

import pytest
import torch

import tiny
from tracestar.api import build_index, open_index
from tracestar.cli import main
from tracestar.corpus import Query, read_queries
from tracestar.errors import UserError
from tracestar.trace import Continuation, one_token, snippet, trace, whole


@pytest.fixture(scope="module")
def index_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "index"
    return build_index(world["model"], world["corpus"], out, optimizer_state=world["optimizer"], proj_dim=4096,
                       r_block=512, eval_queries=world["queries"], quiet=True)


@pytest.fixture(scope="module")
def idx(index_dir):
    return open_index(index_dir)


def _same_hits(got: list[dict], want: list[dict]) -> None:
    """The same documents in the same order with the same scores (up to float32 rounding)."""
    assert [h["doc_id"] for h in got] == [h["doc_id"] for h in want]
    for g, w in zip(got, want):
        assert abs(g["score"] - w["score"]) <= 1e-6 + 1e-5 * abs(w["score"]), (g, w)


def _generate_ids(idx, prompt: str, n: int) -> list[int]:
    """model.generate, greedy, without the end-of-sequence token it may stop on."""
    tracer = idx.tracer()
    ids = torch.tensor([tracer.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = tracer.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                    pad_token_id=tracer.pad)
    new = out[0, ids.shape[1]:].tolist()
    eos = tracer.tokenizer.eos_token_id
    return new[: new.index(eos)] if eos in new else new


# --- the library ---------------------------------------------------------------------------------


def test_a_given_target_gives_exactly_the_query_results(world, idx):
    for q in read_queries(world["queries"])[:3]:
        got = trace(idx, q.prompt, target=q.target, top_k=4, explain=False)
        want = idx.query([q], top_k=4)[0]
        assert (got["prompt"], got["target"]) == (q.prompt, q.target)
        _same_hits(got["proponents"], want["proponents"])
        _same_hits(got["opponents"], want["opponents"])
        assert got["generation"]["source"] == "target" and got["generation"]["stopped"] is None
        assert "".join(t["token"] for t in got["generation"]["tokens"]) == q.target


@pytest.mark.parametrize("prompt", ["the capital of spain is", "in the east a", "the"])
def test_generation_is_greedy_and_is_what_gets_traced(idx, prompt):
    tok = idx.tracer().tokenizer
    for n in (1, 6):
        got = trace(idx, prompt, max_new_tokens=n, top_k=3, explain=False)
        gen = got["generation"]
        want = _generate_ids(idx, prompt, n)
        assert [t["id"] for t in gen["tokens"]] == want
        assert gen["text"] == got["target"] == tok.decode(want)
        assert gen["stopped"] == ("max_new_tokens" if len(want) == n else "eos")
        assert [t["position"] for t in gen["tokens"]] == list(range(len(want)))
        # the continuation is the target: the same documents as `query` for (prompt, what was said)
        # (the test tokenizer splits the decoded text back into the same ids)
        _same_hits(got["proponents"], idx.query([Query("q", prompt, gen["text"])], top_k=3)[0]["proponents"])


def test_on_token_sees_each_token_as_it_is_produced(idx):
    seen = []
    got = trace(idx, "the capital of spain is", max_new_tokens=6, top_k=2, explain=False,
                on_token=lambda i, tid, text: seen.append((i, tid, text)))
    assert seen == [(t["position"], t["id"], t["token"]) for t in got["generation"]["tokens"]] and seen


def test_per_target_token_mode_traces_each_token_after_its_prefix(idx):
    prompt = "the capital of spain is"
    got = trace(idx, prompt, max_new_tokens=4, top_k=3, per_target_token=True, explain=False)
    tokens = got["generation"]["tokens"]
    assert len(tokens) >= 2 and len(got["per_token"]) == len(tokens)
    for i, (res, tok) in enumerate(zip(got["per_token"], tokens)):
        prefix = prompt + "".join(t["token"] for t in tokens[:i])
        assert res["position"] == i and res["target"] == tok["token"] and res["prompt"] == prefix
        assert res["query_id"] == f"trace/{i}"
        _same_hits(res["proponents"], idx.query([Query("q", prefix, tok["token"])], top_k=3)[0]["proponents"])
    # the whole continuation is a different target from any one of its tokens
    assert [h["score"] for h in got["proponents"]] != [h["score"] for h in got["per_token"][0]["proponents"]]


def test_explained_hits_carry_heat_maps_that_add_up_and_a_snippet(idx):
    got = trace(idx, "the capital of spain is", target=" madrid", top_k=3)
    for key in ("proponents", "opponents"):
        for h in got[key]:
            total = sum(t["score"] for t in h["tokens"])  # exact; the listed score is from the float16 vector
            assert abs(total - h["score"]) <= 1e-3 * abs(h["score"]) + 1e-5, (total, h["score"])
            assert [t["position"] for t in h["tokens"]] == list(range(len(h["tokens"])))
            assert "**" in h["snippet"] and "<eos>" not in h["snippet"]
    # the proponent's snippet marks its strongest token
    best = got["proponents"][0]
    top = max((t for t in best["tokens"] if not t["special"]), key=lambda t: t["score"])
    assert any(top["token"].strip() in span for span in re.findall(r"\*\*(.+?)\*\*", best["snippet"])), best["snippet"]


def test_a_long_prompt_is_cut_from_the_left_to_fit_the_window(idx):
    window = idx.tracer().window
    prompt = " ".join(["the river"] * window)
    got = trace(idx, prompt, max_new_tokens=5, top_k=2, explain=False)
    gen = got["generation"]
    assert gen["prompt_tokens_cut"] > 0 and gen["prompt_tokens"] + 5 == window


def test_snippet_marks_the_strongest_tokens_and_hides_special_ones():
    toks = [("the", 0.1), (" capital", 0.5), (" of", -0.2), (" paris", 0.9), ("<eos>", 0.3)]
    special = [False, False, False, False, True]
    assert snippet(toks, special, marks=2) == "the **capital** of **paris**"
    assert snippet(toks, special, sign=-1.0) == "the capital **of** paris"
    glued = [(" Port", 0.0), (" Moresby", 0.5), (".", 0.4), (" Papua", 0.3), (" is", 0.2)]
    assert snippet(glued, marks=3) == "Port **Moresby.** **Papua** is"  # glued neighbours share their marks
    long = [(f" w{i}", 1.0 if i == 30 else 0.0) for i in range(60)]
    assert snippet(long, before=2, after=3) == "… w28 w29 **w30** w31 w32 …"


def test_nothing_to_trace_is_refused(idx):
    cont = Continuation("the", [5], [], [], "", "greedy", "eos")
    with pytest.raises(UserError, match="end-of-sequence"):
        whole(cont, 64)
    cont = Continuation("the", [5], [7, 8], [" a", " b"], " a b", "greedy", "max_new_tokens")
    with pytest.raises(UserError, match="position"):
        one_token(cont, 2, 64)
    assert one_token(cont, 1, 64).example.ids == [5, 7, 8] and one_token(cont, 1, 64).example.loss_from == 2


# --- the command line ----------------------------------------------------------------------------


def _run(capsys, *args) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def test_cli_json_has_the_query_shape_plus_the_generation(index_dir, idx, capsys):
    code, out, err = _run(capsys, "trace", "--index", index_dir, "--prompt", "the capital of spain is",
                          "--max-new-tokens", "3", "--top-k", "2", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert set(res) == {"query_id", "prompt", "target", "proponents", "opponents", "generation"}
    assert len(res["proponents"]) == 2 and len(res["opponents"]) == 2
    assert set(res["proponents"][0]) == {"doc_id", "score", "snippet", "tokens"}
    assert set(res["generation"]) >= {"text", "tokens", "source", "stopped"}
    assert res["generation"]["text"] == res["target"] == idx.tracer().tokenizer.decode(
        _generate_ids(idx, "the capital of spain is", 3))
    code, out, err = _run(capsys, "trace", "--index", index_dir, "--prompt", "the capital of spain is",
                          "--max-new-tokens", "3", "--top-k", "2", "--json", "--per-target-token", "--no-explain")
    res = json.loads(out)
    assert len(res["per_token"]) == len(res["generation"]["tokens"])
    assert set(res["per_token"][0]) == {"query_id", "prompt", "target", "position", "proponents", "opponents"}
    assert set(res["proponents"][0]) == {"doc_id", "score"}


def test_cli_text_prints_the_generation_then_marked_snippets(index_dir, capsys):
    code, out, err = _run(capsys, "trace", "--index", index_dir, "--prompt", "the capital of spain is",
                          "--target", " madrid", "--top-k", "2", "--per-target-token")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1] == "generation  ' madrid'  (1 tokens, given as --target)"
    assert lines[2] == "searched    exact (full-precision vectors)"
    hits = [ln for ln in lines if ln[:5].strip().isdigit()]
    assert len(hits) == 2 + 2 + 2  # proponents, opponents, then token 0's proponents
    assert all("**" in ln and ("+" in ln or "-" in ln) for ln in hits)
    assert "token 0: ' madrid' after 'the capital of spain is'" in out


@pytest.mark.parametrize("extra, says", [
    (["--max-new-tokens", "0"], "--max-new-tokens: must be between 1 and 1024, got 0"),
    (["--max-new-tokens", "64"], "--max-new-tokens: must be between 1 and 63, got 64 (the index scores 64 positions"),
    (["--top-k", "0"], "--top-k: must be at least 1, got 0"),
    (["--target", ""], "--target: empty"),
])
def test_cli_refusals_are_one_line(index_dir, capsys, extra, says):
    code, out, err = _run(capsys, "trace", "--index", index_dir, "--prompt", "the", *extra)
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert out == ""


def test_cli_refuses_a_model_that_is_not_the_index_model(index_dir, tmp_path, capsys):
    other = tiny.save(tiny.gpt2(seed=7), tmp_path / "other")
    code, out, err = _run(capsys, "trace", "--index", index_dir, "--prompt", "the", "--model", other)
    assert code == 2 and len(err) == 1 and "fingerprint" in err[0] and str(other) in err[0]


@pytest.mark.parametrize("command", ["trace", "serve"])
def test_cli_refuses_a_missing_index(tmp_path, capsys, command):
    extra = ["--prompt", "the"] if command == "trace" else ["--port", "0"]
    code, out, err = _run(capsys, command, "--index", tmp_path / "nope", *extra)
    assert code == 2 and len(err) == 1 and "no such index directory" in err[0], err


@pytest.mark.parametrize("extra, says", [
    (["--port", "70000"], "--port: must be between 0 and 65535, got 70000"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be between 1 and 1024, got 0"),
    (["--top-k", "101"], "--top-k: must be between 1 and 100, got 101"),
    (["--host", " "], "--host: empty"),
])
def test_cli_serve_options_are_range_checked_before_loading(tmp_path, capsys, extra, says):
    code, out, err = _run(capsys, "serve", "--index", tmp_path / "nope", *extra)
    assert code == 2 and len(err) == 1 and says in err[0], err
