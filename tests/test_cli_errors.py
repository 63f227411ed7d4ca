"""Bad input through the command line: exit 2, ONE line on stderr naming the file:line, the field or
the option, and nothing written (the output does not exist, or is unchanged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny
from tracestar.cli import main


def _run(capsys, *args: str) -> tuple[int, list[str], str]:
    """(exit code, stderr lines, stdout) of `tracestar ARGS` run in this process."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def _refused(capsys, *args: str) -> str:
    """The single stderr line of a refused command (asserting exit 2 and exactly one line)."""
    code, err, _ = _run(capsys, *args)
    assert code == 2, err
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under `path` with its bytes (None when `path` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def index_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "index"
    code = main(["index", "--model", str(world["model"]), "--corpus", str(world["corpus"]), "--out", str(out),
                 "--optimizer-state", str(world["optimizer"]), "--proj-dim", "256", "--shard-docs", "4", "--quiet"])
    assert code == 0
    return out


def _index_args(world, out: Path, *extra: str, corpus: Path | None = None) -> list[str]:
    return ["index", "--model", world["model"], "--corpus", corpus or world["corpus"], "--out", out,
            "--optimizer-state", world["optimizer"], "--proj-dim", "256", "--quiet", *extra]


# --- input files ---------------------------------------------------------------------------------


def test_non_utf8_corpus_names_file_and_line(world, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"id": "a", "text": "the city"}\n{"id": "b", "text": "the \xff river"}\n')
    out = tmp_path / "index"
    line = _refused(capsys, *_index_args(world, out, corpus=corpus))
    assert f"{corpus}:2:" in line and "UTF-8" in line and "0xff" in line
    assert not out.exists()


def test_non_utf8_query_file_names_file_and_line(index_dir, tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    queries.write_bytes(b'{"id": "q0", "prompt": "the capital of france is", "target": " paris"}\n'
                        b'{"id": "q1", "prompt": "the \xc3( city", "target": " rome"}\n')
    results = tmp_path / "r.jsonl"
    line = _refused(capsys, "query", "--index", index_dir, "--queries", queries, "--out", results)
    assert f"{queries}:2:" in line and "UTF-8" in line
    assert not results.exists()


def test_json_error_reads_once(world, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "the city}\n')
    line = _refused(capsys, *_index_args(world, tmp_path / "index", corpus=corpus))
    assert f"{corpus}:1:" in line and "Unterminated string starting at column 21" in line
    assert "at at" not in line


# --- an index that is not there ------------------------------------------------------------------


COMMANDS_ON_AN_INDEX = {
    "query": lambda ix, t, w: ["query", "--index", ix, "--queries", w["queries"], "--out", t / "r.jsonl"],
    "explain": lambda ix, t, w: ["explain", "--index", ix, "--doc-id", "d0", "--prompt", "the", "--target", " city"],
    "compress": lambda ix, t, w: ["compress", "--index", ix, "--kind", "int8"],
    "eval": lambda ix, t, w: ["eval", "--index", ix, "--queries", w["queries"], "--out", t / "eval"],
    "refit": lambda ix, t, w: ["refit", "--index", ix, "--out", t / "refit", "--preconditioner", "none"],
    "report": lambda ix, t, w: ["report", "--results", t / "results.jsonl", "--index", ix, "--out", t / "report.html"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS_ON_AN_INDEX))
@pytest.mark.parametrize("what", ["missing", "not-an-index"])
def test_every_command_refuses_a_missing_index(world, tmp_path, capsys, command, what):
    (tmp_path / "results.jsonl").write_text(json.dumps({"query_id": "q0", "proponents": [{"doc_id": "d0", "score": 1.0}]}) + "\n")
    index = tmp_path / "nope"
    if what == "not-an-index":
        index.mkdir()
        (index / "notes.txt").write_text("not an index\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _refused(capsys, *COMMANDS_ON_AN_INDEX[command](index, tmp_path, world))
    assert str(index) in line
    assert ("no such index directory" if what == "missing" else "not a tracestar index") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no results, report, eval or refit output


def test_missing_input_file_is_one_line(world, index_dir, tmp_path, capsys):
    line = _refused(capsys, "report", "--results", tmp_path / "none.jsonl", "--index", index_dir, "--out", tmp_path / "r.html")
    assert str(tmp_path / "none.jsonl") in line
    line = _refused(capsys, "query", "--index", index_dir, "--queries", tmp_path / "none.jsonl", "--out", tmp_path / "r.jsonl")
    assert str(tmp_path / "none.jsonl") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- options out of range ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, option, says",
    [
        (["--max-length", "0"], "--max-length", "at least 2"),
        (["--max-length", "1"], "--max-length", "at least 2"),
        (["--proj-dim", "0"], "--proj-dim", "at least 1"),
        (["--proj-dim", "-5"], "--proj-dim", "at least 1"),
        (["--proj-dim", "3"], "--proj-dim", "at least 5 for this model"),  # 5 blocks in the tiny GPT-2's layout
        (["--batch-tokens", "0"], "--batch-tokens", "at least 1"),
        (["--shard-docs", "0"], "--shard-docs", "at least 1"),
        (["--fit-docs", "0"], "--fit-docs", "at least 1"),
        (["--seed", "-1"], "--seed", "at least 0"),
        (["--damping", "0"], "--damping", "greater than 0"),
        (["--damping", "nan"], "--damping", "finite"),
        (["--lambda", "5", "--preconditioner", "mixed", "--eval-queries", "Q"], "--lambda", "between 0 and 1"),
        (["--lambda", "-0.1", "--preconditioner", "mixed", "--eval-queries", "Q"], "--lambda", "between 0 and 1"),
        (["--lambda", "0.5", "--preconditioner", "train"], "--lambda", "mixed preconditioner"),
    ],
)
def test_index_options_are_range_checked_before_anything_is_written(world, tmp_path, capsys, extra, option, says):
    extra = [str(world["queries"]) if e == "Q" else e for e in extra]
    out = tmp_path / "deep" / "index"
    line = _refused(capsys, *_index_args(world, out, *extra))
    assert line.startswith(f"tracestar: error: {option}: ") and says in line, line
    assert not (tmp_path / "deep").exists()


def test_corrected_rerun_after_a_refusal_builds(world, tmp_path, capsys):
    out = tmp_path / "index"
    _refused(capsys, *_index_args(world, out, "--max-length", "0"))
    code, err, _ = _run(capsys, *_index_args(world, out, "--max-length", "32"))
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["max_length"] == 32


def test_existing_empty_out_dir_stays_empty_after_a_refusal(world, tmp_path, capsys):
    out = tmp_path / "index"
    out.mkdir()
    _refused(capsys, *_index_args(world, out, "--proj-dim", "3"))
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize(
    "extra, option",
    [(["--top-k", "0"], "--top-k"), (["--top-k", "-1"], "--top-k"), (["--rerank", "-1"], "--rerank")],
)
def test_query_options_are_range_checked(index_dir, world, tmp_path, capsys, extra, option):
    results = tmp_path / "r.jsonl"
    line = _refused(capsys, "query", "--index", index_dir, "--queries", world["queries"], "--out", results, *extra)
    assert line.startswith(f"tracestar: error: {option}: must be at least")
    assert not results.exists()


def test_refit_options_are_range_checked(index_dir, world, tmp_path, capsys):
    for extra, option in ((["--lambda", "2", "--eval-queries", world["queries"]], "--lambda"),
                          (["--damping", "-1"], "--damping"), (["--fit-docs", "0"], "--fit-docs")):
        line = _refused(capsys, "refit", "--index", index_dir, "--out", tmp_path / "refit", *extra)
        assert line.startswith(f"tracestar: error: {option}: "), line
        assert not (tmp_path / "refit").exists()


def test_compress_options_are_range_checked(index_dir, tmp_path, capsys):
    before = _snapshot(index_dir)
    for extra, option in ((["--m", "0"], "--m"), (["--nbits", "0"], "--nbits"), (["--nbits", "17"], "--nbits"),
                          (["--nlist", "-1"], "--nlist")):
        line = _refused(capsys, "compress", "--index", index_dir, "--kind", "pq", *extra)
        assert line.startswith(f"tracestar: error: {option}: "), line
    assert _snapshot(index_dir) == before


def test_eval_options_are_range_checked(index_dir, world, tmp_path, capsys):
    for extra, option in ((["--lr", "0"], "--lr"), (["--lr", "-0.001"], "--lr"), (["--max-queries", "0"], "--max-queries"),
                          (["--k", "0,3"], "--k")):
        line = _refused(capsys, "eval", "--index", index_dir, "--queries", world["queries"], "--out", tmp_path / "ev", *extra)
        assert line.startswith(f"tracestar: error: {option}: "), line
    assert not (tmp_path / "ev").exists()


def test_usage_mistakes_are_one_line(index_dir, world, tmp_path, capsys):
    line = _refused(capsys, "query", "--index", index_dir, "--queries", world["queries"], "--out", tmp_path / "r", "--top-k", "ten")
    assert "--top-k" in line and "invalid int value" in line
    line = _refused(capsys, "index", "--model", world["model"])
    assert "required" in line and "--corpus" in line


# --- the model's window --------------------------------------------------------------------------


def test_a_document_longer_than_the_window_is_truncated_and_the_clamp_recorded(world, tmp_path, capsys):
    corpus = tmp_path / "long.jsonl"
    long_text = " ".join(["the"] * 76)  # 76 tokens + eos = 77 > the tiny model's 64 positions
    tiny.write_corpus(corpus, [long_text, *tiny.FACTS])
    out = tmp_path / "index"
    args = [a for a in _index_args(world, out, corpus=corpus) if a != "--quiet"]
    code, err, stdout = _run(capsys, *args)  # default --max-length 512
    assert code == 0, err
    assert "--max-length 512 is longer than the model's window of 64 positions" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert (m["max_length"], m["max_length_requested"], m["model_window"]) == (64, 512, 64)
    assert m["n_truncated"] == 1
    docs = [json.loads(line) for line in (out / "docs.jsonl").read_text().splitlines()]
    assert (docs[0]["n_tokens"], docs[0]["truncated"]) == (64, True)


def test_query_longer_than_the_window_is_cut_from_the_left(index_dir, tmp_path, capsys):
    """75 prompt tokens + 1 target token in a 64-position model: the prompt's first 12 tokens go, so
    the query scores exactly like one whose prompt is those last 63 tokens."""
    words = ["the"] * 70 + ["capital", "of", "france", "is"]
    queries = tmp_path / "q.jsonl"
    tiny.write_queries(queries, [(" ".join(words), " paris"), (" " + " ".join(words[-63:]), " paris")])
    results = tmp_path / "r.jsonl"
    code, err, _ = _run(capsys, "query", "--index", index_dir, "--queries", queries, "--out", results, "--top-k", "3")
    assert code == 0, err
    long, cut = [json.loads(line) for line in results.read_text().splitlines()]
    assert [p["doc_id"] for p in long["proponents"]] == [p["doc_id"] for p in cut["proponents"]]
    assert [p["score"] for p in long["proponents"]] == pytest.approx([p["score"] for p in cut["proponents"]], abs=1e-5)
    assert long["proponents"][0]["score"] > 1e-3  # a real gradient, not a vector of zeros


def test_query_whose_target_cannot_fit_is_refused(index_dir, tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    tiny.write_queries(queries, [("the capital of france is", " paris"), ("the", " " + " ".join(["city"] * 64))])
    results = tmp_path / "r.jsonl"
    line = _refused(capsys, "query", "--index", index_dir, "--queries", queries, "--out", results)
    assert f"{queries}:2: field 'target': 64 tokens do not fit in 64 positions" in line
    assert not results.exists()


def test_eval_query_target_that_cannot_fit_is_refused_before_the_build(world, tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    tiny.write_queries(queries, [("the", " " + " ".join(["city"] * 70))])
    out = tmp_path / "index"
    line = _refused(capsys, *_index_args(world, out, "--eval-queries", queries))
    assert f"{queries}:1: field 'target'" in line
    assert not out.exists()
