"""The command line's options are generated from the option dataclasses: defaults, types and flags."""

from __future__ import annotations

import dataclasses

import pytest

from tracestar.cli import _INDEX_OPTIONS, _REFIT_OPTIONS, _build_parser, main
from tracestar.optionargs import chosen
from tracestar.options import (
    BuildOptions,
    CompressOptions,
    EvalOptions,
    ExplainOptions,
    LdsOptions,
    QueryOptions,
    ServeOptions,
    TraceOptions,
)

REQUIRED = {
    "index": ["--model", "m", "--corpus", "c", "--out", "o"],
    "query": ["--index", "i", "--queries", "q", "--out", "o"],
    "compress": ["--index", "i", "--kind", "int8"],
    "eval": ["--index", "i", "--queries", "q", "--out", "o"],
    "explain": ["--index", "i", "--doc-id", "d"],
    "lds": ["--world", "w", "--out", "o"],
    "trace": ["--index", "i", "--prompt", "p"],
    "serve": ["--index", "i"],
}


def _parse(command: str, *extra: str):
    return _build_parser().parse_args([command, *REQUIRED[command], *extra])


def test_index_defaults_are_the_dataclass_defaults():
    args = _parse("index")
    assert BuildOptions(**chosen(args, BuildOptions, _INDEX_OPTIONS)) == BuildOptions()
    # the fields without help are not offered
    assert set(_INDEX_OPTIONS) == {f.name for f in dataclasses.fields(BuildOptions)} - {"r_block", "normalizer_docs",
                                                                                         "padding_side"}


def test_index_flags_types_and_switches():
    args = _parse("index", "--proj-dim", "256", "--lambda", "0.25", "--no-unit-norm", "--no-optimizer-correction",
                  "--estimate-v-if-missing", "--blocks", "module", "--fit-docs", "7")
    opts = BuildOptions(**chosen(args, BuildOptions, _INDEX_OPTIONS))
    assert (opts.proj_dim, opts.lam, opts.fit_docs, opts.blocks) == (256, 0.25, 7, "module")
    assert opts.unit_norm is False and opts.optimizer_correction is False and opts.estimate_v_if_missing is True
    assert isinstance(opts.proj_dim, int) and isinstance(opts.lam, float)


def test_refit_defaults_to_the_source_index():
    args = _build_parser().parse_args(["refit", "--index", "i", "--out", "o"])
    assert chosen(args, BuildOptions, _REFIT_OPTIONS) == dict.fromkeys(_REFIT_OPTIONS)  # all None
    assert args.overwrite is False and args.quiet is False and args.model is None


@pytest.mark.parametrize(("command", "cls"), [("query", QueryOptions), ("compress", CompressOptions),
                                              ("eval", EvalOptions), ("explain", ExplainOptions), ("lds", LdsOptions),
                                              ("trace", TraceOptions), ("serve", ServeOptions)])
def test_other_commands_default_to_their_dataclass(command, cls):
    assert cls(**chosen(_parse(command), cls)) == cls()


def test_named_flags_and_parsed_values():
    args = _parse("eval", "--model", "M", "--k", "1,5", "--variants", "a", "b", "--tail-patch", "--lr", "0.5")
    opts = EvalOptions(**chosen(args, EvalOptions))
    assert (opts.model_dir, opts.ks(), list(opts.variants)) == ("M", (1, 5), ["a", "b"])
    assert opts.tail_patch is True and opts.lr == 0.5 and opts.bm25 is False
    assert EvalOptions().ks() == (1, 3, 5, 10)
    assert _parse("trace", "--no-explain").explain is False and _parse("trace").max_new_tokens == 32
    assert _parse("serve").port == 8765 and _parse("serve", "--port", "0").port == 0


def test_help_shows_the_field_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("padded tokens per batch (default 4096)", "(Σ k² over blocks; default 65536)", "(default 0.1)",
                 "--no-unit-norm", "--lambda LAM", "{paper,module}", "{dot,opt,opt-norm,train-r,trackstar}"):
        assert text in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default 1,3,5,10)" in out and "--variants [DIR ...]" in out and "--model MODEL_DIR" in out


def test_report_quiet_reaches_build_report(monkeypatch, capsys):
    import tracestar.report

    seen = {}

    def fake(results, index, out, **kw):
        seen.update(kw)
        return out

    monkeypatch.setattr(tracestar.report, "build_report", fake)
    base = ["report", "--results", "r.jsonl", "--index", "i", "--out", "o.html"]
    assert main(base) == 0 and seen["quiet"] is False and seen["explain"] is True
    assert main([*base, "--quiet", "--no-explain"]) == 0 and seen["quiet"] is True and seen["explain"] is False
    assert capsys.readouterr().out.split() == ["o.html", "o.html"]


def test_r_factor_default_is_cholesky_and_an_unrecorded_one_is_eigh():
    """New builds whiten with Cholesky and record it; a build.json without `r_factor` (every index
    built before the option existed) reads back as eigh, so refit and resume keep its bytes."""
    opts = BuildOptions()
    assert opts.r_factor == "cholesky" and opts.identity()["r_factor"] == "cholesky"
    assert "r_factor" not in BuildOptions(r_factor="eigh").identity()
    old = BuildOptions(r_factor="eigh").identity()
    assert BuildOptions.from_json(old).r_factor == "eigh"
    assert BuildOptions.from_json(opts.identity()).r_factor == "cholesky"
    assert BuildOptions.from_json(old, r_factor="cholesky").r_factor == "cholesky"
