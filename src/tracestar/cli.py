"""Command line: a thin argparse layer over `tracestar.api` and friends.

Each subcommand has one `_add_<name>(sub)` that declares its arguments and one `_run_<name>(args)`
that calls the library. Errors that are the user's fault (`tracestar.errors.UserError`) print one
line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from tracestar.errors import UserError
from tracestar.optionargs import add_fields, chosen
from tracestar.options import (
    DEFAULT_TRAIN_EPOCHS,
    MAX_NEW_TOKENS_LIMIT,
    BuildOptions,
    CompressOptions,
    EvalOptions,
    ExplainOptions,
    LdsOptions,
    QueryOptions,
    ServeOptions,
    TraceOptions,
)


DESCRIPTION = """\
Find the training documents that taught a language model what it says (TrackStar attribution).
Build an index of a corpus for a model once (`index`), then ask which documents support or
oppose a completion (`query`), let the model answer a prompt and trace its answer (`trace`, or
the local web app `serve`), see which tokens of a document matter (`explain`), browse the
results (`report`), or measure the ranking against ground truth (`eval`). `demo` runs the whole
pipeline on a built-in world of facts.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (like every other error) and exit 2."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


class _UsageError(Exception):
    pass


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tracestar", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


# --- subcommands (each block: _add_X declares, _run_X calls the library) ---------------------------

# === world / train (tracestar.world) ===


def _add_world(sub) -> None:
    p = sub.add_parser("world", help="write the built-in fact world (corpus, queries, facts)")
    p.add_argument("--out", required=True, help="directory for corpus.jsonl, queries.jsonl, facts.jsonl")
    p.add_argument("--seed", type=int, default=0,
                   help="world seed: the same seed writes the same files (default %(default)s)")
    p.add_argument("--scale", choices=["full", "small"], default="full", help="world size (default %(default)s)")
    p.set_defaults(func=_run_world)


def _run_world(args) -> int:
    import json
    from pathlib import Path

    from tracestar.world import make_world

    paths = make_world(args.out, seed=args.seed, scale=args.scale)
    n_docs = len(Path(paths.corpus).read_text(encoding="utf-8").splitlines())
    relations = [json.loads(line)["relation"] for line in Path(paths.queries).read_text(encoding="utf-8").splitlines()]
    print(f"corpus   {paths.corpus}  ({n_docs} documents)")
    print(f"queries  {paths.queries}  ({len(relations)} queries, {len(set(relations))} relations)")
    print(f"facts    {paths.facts}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a tiny GPT-2 on a corpus with Adafactor (saves optimizer state)")
    p.add_argument("--corpus", required=True, help="JSONL corpus to train on (as written by `tracestar world`)")
    p.add_argument("--out", required=True, help="model directory (HF format + optimizer.pt + train_log.json)")
    p.add_argument("--queries", default=None, help="queries to report first-token accuracy on")
    p.add_argument("--seed", type=int, default=0,
                   help="training seed: the same seed trains the same model (default %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the corpus (default {DEFAULT_TRAIN_EPOCHS}); every planned step is taken, so a "
                        "busy machine takes longer but trains the same model")
    p.add_argument("--force", action="store_true", help="retrain even if OUT holds the same finished run")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from tracestar.world import train_model

    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs: expected a positive integer, got {args.epochs}")
    extra = {} if args.epochs is None else {"epochs": args.epochs}
    log = train_model(args.corpus, args.out, queries_path=args.queries, seed=args.seed,
                      force=args.force, verbose=True, **extra)
    state = "cached" if log["cached"] else "done"
    print(f"model    {args.out}  ({log['n_params']:,} parameters, {state})")
    print(f"steps    {log['steps']} of {log['planned_steps']}, {log['epochs_run']} epochs, final loss {log['final_loss']:.3f}")
    if log["first_token_accuracy"] is not None:
        print(f"accuracy {log['first_token_accuracy']:.1%} first-token on {args.queries}")
    print(f"time     {log['seconds']:.0f} s")
    return 0


# === index / query / refit (tracestar.api) ===


#: The BuildOptions fields `index` offers, in the order its help lists them.
_INDEX_OPTIONS = (
    "optimizer_state", "estimate_v_if_missing", "proj_dim", "blocks", "max_length", "chunk_tokens", "chunk_stride",
    "batch_tokens", "seed",
    "optimizer_correction", "unit_norm", "preconditioner", "eval_queries", "lam", "fit_docs", "damping", "variant",
    "r_factor", "dtype", "raw_dtype", "shard_docs", "text_field", "id_field", "device", "autocast", "overwrite", "quiet",
)


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="build a TrackStar index of a corpus for a model")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--corpus", required=True, help="JSONL, Parquet, or a datasets save_to_disk directory")
    p.add_argument("--out", required=True, help="index directory to write")
    add_fields(p, BuildOptions, _INDEX_OPTIONS)
    p.set_defaults(func=_run_index)


def _run_index(args) -> int:
    from tracestar.api import build_index

    opts = BuildOptions(**chosen(args, BuildOptions, _INDEX_OPTIONS))
    build_index(args.model, args.corpus, args.out, opts)
    return 0


def _add_query(sub) -> None:
    p = sub.add_parser("query", help="top-k proponents and opponents for (prompt, target) queries")
    p.add_argument("--index", required=True, help="index directory written by `tracestar index`")
    p.add_argument("--queries", required=True, help="JSONL with id, prompt, target")
    p.add_argument("--out", required=True, help="RESULTS.jsonl")
    add_fields(p, QueryOptions)
    p.set_defaults(func=_run_query)


def _run_query(args) -> int:
    from tracestar.api import check_search_options, open_index, query_file

    check_search_options(args.top_k, args.rerank)  # before the index is opened, as query_file does
    index = open_index(args.index)  # opened once: its files are verified once
    results = query_file(index, args.queries, args.out, top_k=args.top_k, model_dir=args.model, exact=args.exact, rerank=args.rerank,
                         by_doc=args.by_doc)
    searched = _searched(index.store, exact=args.exact, rerank=args.rerank)
    print(f"{len(results)} queries → {args.out}; searched: {searched}")
    return 0


#: The BuildOptions fields `refit` offers; each defaults to the source index's value, hence this help.
_REFIT_OPTIONS = {
    "eval_queries": "QUERIES.jsonl for R_eval (mixed preconditioner)",
    "preconditioner": None,  # None: the field's own help
    "lam": "mixing weight of R_eval in [0, 1], mixed only (default: spectrum matching)",
    "fit_docs": "documents sampled for R_train (default: the index's)",
    "damping": "added to R's spectrum, times its mean eigenvalue; > 0 (default: the index's)",
    "r_factor": "how R is factored: eigh (R^-1/2) or cholesky (the same scores, 5-7x faster; default: the index's)",
}


def _searched(store, *, exact: bool, rerank: int | None) -> str:
    """Which form a search reads, in words (`query` and `trace` print it)."""
    form, exact_scores = store.search_form(exact=exact, rerank=rerank)
    if form == "exact":
        return "exact (full-precision vectors)"
    return f"{form} ({'candidates re-scored exactly' if exact_scores else 'approximate scores'})"


def _add_refit(sub) -> None:
    p = sub.add_parser("refit", help="a new index with another preconditioner, from an index's stored raw vectors")
    p.add_argument("--index", required=True, help="index directory whose raw vectors are reused")
    p.add_argument("--out", required=True, help="directory for the new index")
    add_fields(p, BuildOptions, _REFIT_OPTIONS, help=_REFIT_OPTIONS, inherit_defaults=False)
    p.add_argument("--model", help="model directory, for the eval queries' gradients (default: the manifest's)")
    add_fields(p, BuildOptions, ("overwrite", "quiet"), help={"overwrite": "replace an existing directory at --out"})
    p.set_defaults(func=_run_refit)


def _run_refit(args) -> int:
    from tracestar.api import refit

    options = chosen(args, BuildOptions, (*_REFIT_OPTIONS, "overwrite", "quiet"))
    refit(args.index, args.out, model_dir=args.model, **options)
    return 0


# === eval / demo (tracestar.evaluate) ===


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="the paper's evaluation: MRR / recall@k per bucket, BM25, tail-patch")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--queries", required=True, help="queries JSONL with `relevant` (and `bucket`) per query")
    p.add_argument("--out", required=True, help="report directory (metrics.json, report.md, PNG plots)")
    add_fields(p, EvalOptions)
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from tracestar.evaluate.run import evaluate, format_table

    opts = EvalOptions(**chosen(args, EvalOptions))
    params = {k: v for k, v in dataclasses.asdict(opts).items() if k != "k"}
    metrics = evaluate(args.index, args.queries, args.out, ks=opts.ks(), **params)
    print(format_table(metrics))
    print(f"report: {args.out}/report.md (metrics.json, PNG plots beside it)")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="world -> train -> index (mixed R) -> eval with BM25 and tail-patch, cached")
    p.add_argument("--out", default="tracestar-demo", help="working directory (default %(default)s)")
    p.add_argument("--scale", default="full", choices=("small", "full"), help="world size (default %(default)s)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from tracestar.evaluate.demo import run_demo

    run_demo(args.out, scale=args.scale)
    return 0


def _add_lds(sub) -> None:
    p = sub.add_parser("lds", help="linear datamodeling score: retrain on random subsets, correlate predicted and actual change")
    p.add_argument("--world", required=True, help="a `tracestar world` directory (corpus.jsonl, queries.jsonl)")
    p.add_argument("--out", required=True, help="working directory: model/, runs/ (cached, resumable), indexes/, lds.json")
    add_fields(p, LdsOptions)
    p.set_defaults(func=_run_lds)


def _run_lds(args) -> int:
    from tracestar.evaluate.lds import format_lds_table, run_lds

    results = run_lds(args.world, args.out, **chosen(args, LdsOptions))
    if results:  # torchrun: rank 0 reports
        print(format_lds_table(results))
        print(f"lds: {args.out}/lds.json")
    return 0


# === compress (tracestar.index.compress) ===


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="write an int8 or FAISS-PQ compressed form beside the exact vectors")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--kind", required=True, choices=["int8", "pq"],
                   help="int8: one byte per coordinate (a quarter of float32), near-exact scores; pq: FAISS product "
                        "quantization, --m × --nbits bits per document (from 16,384 dims: one sign bit per coordinate), approximate scores")
    add_fields(p, CompressOptions)
    p.set_defaults(func=_run_compress)


def _run_compress(args) -> int:
    from tracestar.index.compress import compress

    entry = compress(args.index, args.kind, m=args.m, nbits=args.nbits, nlist=args.nlist, drop_exact=args.drop_exact)
    extra = f", form={entry.get('form', 'pq')} m={entry['m']} nbits={entry['nbits']}" + (f" nlist={entry['nlist']}" if entry.get("nlist") else "") if args.kind == "pq" else ""
    print(f"{args.index}: {args.kind} written, {entry['bytes_per_doc']} bytes/doc{extra} ({entry['seconds']:.1f} s)")
    if args.drop_exact:
        print(f"{args.index}: vectors/ shards dropped; search scores are now approximate")
    return 0


# === explain / report (tracestar.explain, tracestar.report) ===


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="exact per-token contributions of one document to its score for a query")
    p.add_argument("--index", required=True, help="index directory written by `tracestar index`")
    p.add_argument("--doc-id", required=True, help="the document to explain (its id in the corpus)")
    add_fields(p, ExplainOptions)
    p.set_defaults(func=_run_explain)


def _run_explain(args) -> int:
    import json

    from tracestar.corpus import Query
    from tracestar.explain import explain

    query = None
    if args.prompt is not None or args.target is not None:
        if args.target is None:
            raise UserError("--prompt needs --target")
        query = Query("cli", args.prompt or "", args.target)
    att = explain(args.index, args.doc_id, query=query, queries_path=args.queries, query_id=args.query_id, model_dir=args.model,
                  chunk=args.chunk)
    print(json.dumps(att.to_json(), ensure_ascii=False) if args.json else att.to_text())
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report of proponents and opponents")
    p.add_argument("--results", required=True, help="RESULTS.jsonl written by `tracestar query`")
    p.add_argument("--index", required=True, help="index directory (its manifest names the corpus)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--eval", dest="eval_dir", default=None, help="eval report directory to embed (plots, metrics)")
    p.add_argument("--no-explain", dest="explain", action="store_false",
                   help="skip per-token heat maps (faster; plain document text)")
    p.add_argument("--model", dest="model_dir", default=None, help="model directory for per-token explanations")
    p.add_argument("--quiet", action="store_true", help="no progress bar while explaining")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from tracestar.report import build_report

    out = build_report(args.results, args.index, args.out, eval_dir=args.eval_dir,
                       explain=args.explain, model_dir=args.model_dir, quiet=args.quiet)
    print(out)
    return 0


# === trace / serve (tracestar.trace, tracestar.serve) ===


def _add_trace(sub) -> None:
    p = sub.add_parser("trace", help="let the model answer a prompt (greedy), then find the documents behind the answer")
    p.add_argument("--index", required=True, help="index directory written by `tracestar index`")
    p.add_argument("--prompt", required=True, help="the prompt the model answers")
    add_fields(p, TraceOptions)
    p.set_defaults(func=_run_trace)


def _run_trace(args) -> int:
    import json

    from tracestar.api import check_search_options, open_index
    from tracestar.errors import check_int
    from tracestar.trace import format_trace, trace

    check_search_options(args.top_k, None)
    check_int("--max-new-tokens", args.max_new_tokens, minimum=1, maximum=MAX_NEW_TOKENS_LIMIT)
    index = open_index(args.index)
    index.tracer(args.model)  # loads the model, refused if its fingerprint differs from the index's
    result = trace(index, args.prompt, target=args.target, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                   per_target_token=args.per_target_token, explain=args.explain)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    searched = _searched(index.store, exact=False, rerank=None)
    print(format_trace(result, searched=searched))
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a local web app: type a prompt, see the answer and the documents behind it")
    p.add_argument("--index", required=True, help="index directory written by `tracestar index`")
    add_fields(p, ServeOptions)
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from tracestar.errors import check_int

    check_int("--port", args.port, minimum=0, maximum=65535)
    check_int("--max-new-tokens", args.max_new_tokens, minimum=1, maximum=MAX_NEW_TOKENS_LIMIT)
    check_int("--top-k", args.top_k, minimum=1, maximum=100)
    if not args.host.strip():
        raise UserError("--host: empty; give an address such as 127.0.0.1")
    from tracestar.serve import serve

    try:
        serve(args.index, host=args.host, port=args.port, model_dir=args.model, max_new_tokens=args.max_new_tokens,
              top_k=args.top_k)
    except KeyboardInterrupt:
        pass
    return 0


_COMMANDS: list = [
    _add_world, _add_train, _add_index, _add_query, _add_refit, _add_explain, _add_trace, _add_serve, _add_report, _add_compress,
    _add_eval, _add_demo, _add_lds,
]


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except _UsageError as exc:
        print(_one_line(str(exc)), file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"tracestar: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):  # output piped into `head` and the like: not an error
            sys.stdout = open(os.devnull, "w")
            return 0
        # A path the user gave that cannot be read or written (missing, a directory, no permission).
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"tracestar: error: {where}{_one_line(exc.strerror or str(exc))}", file=sys.stderr)
        return 2


def _one_line(message: str) -> str:
    """Errors are one line: a library message that spans several is joined."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
