"""What each command is asked to do: the options, their defaults and their help, in one place.

`BuildOptions` (with the ablation ladder) fixes an index's bytes, so the CLI, the Python API,
`refit` and the manifest must agree on it. `EvalOptions`, `QueryOptions`, `CompressOptions`,
`ExplainOptions`, `LdsOptions`, `TraceOptions` and `ServeOptions` are the other commands with many
options. The CLI generates its options from these fields (`_opt` puts the help text on them;
`tracestar.optionargs` reads it), so each default is written once.

Nothing here imports torch: the CLI reads this module before it knows which command runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracestar.errors import OptionError, UserError, check_float, check_int


#: Target dimension of the projected vectors (Σ k² over the projection blocks), the paper's 2^16.
DEFAULT_DIM = 1 << 16
#: Added to R's spectrum, times its mean eigenvalue, before R^{-1/2} is taken.
DEFAULT_DAMPING = 0.1
#: The most coordinates one R matrix covers: a larger projection block is split into ranges of this size.
DEFAULT_R_BLOCK = 2048

#: The paper's ablation ladder, each rung adding one thing.
VARIANTS: dict[str, dict] = {
    "dot": {"optimizer_correction": False, "unit_norm": False, "preconditioner": "none"},
    "opt": {"optimizer_correction": True, "unit_norm": False, "preconditioner": "none"},
    "opt-norm": {"optimizer_correction": True, "unit_norm": True, "preconditioner": "none"},
    "train-r": {"optimizer_correction": True, "unit_norm": True, "preconditioner": "train"},
    "trackstar": {"optimizer_correction": True, "unit_norm": True, "preconditioner": "mixed"},
}


PRECONDITIONERS = ("none", "train", "mixed")
DTYPES = ("float16", "bfloat16", "float32")
RAW_DTYPES = ("float32", "bfloat16", "none")
#: How R is factored into the whitener W (W Wᵀ = R^{-1}): the symmetric R^{-1/2} or a Cholesky L^{-T}.
R_FACTORS = ("eigh", "cholesky")
BLOCK_LAYOUTS = ("paper", "module")


def _opt(default: Any, help: str | None = None, **cli: Any) -> Any:
    """A field whose help text (and argparse extras: flag, choices) the CLI generates its option from.

    `help` may name the default as `%(default)s` (argparse fills it in), so the value is written
    once, here. A field without help is not a command-line option.
    """
    meta = {} if help is None else {"help": help, **cli}
    return field(default=default, metadata=meta)


@dataclass
class BuildOptions:
    """Every option of `build_index`, with its default and, for those the CLI offers, its help.

    `r_block`, `normalizer_docs` and `padding_side` are tuning knobs for the Python API and tests
    only: they carry no help, so `tracestar index` does not offer them.
    """

    optimizer_state: str | None = _opt(
        None, "the training run's optimizer state: a Trainer checkpoint-N/ or its optimizer.pt, an accelerate "
              "save_state directory (optimizer.bin), a torch.distributed.checkpoint directory, or any "
              "torch.save'd state_dict (AdamW/Adam, torch or HF Adafactor)")
    proj_dim: int = _opt(DEFAULT_DIM, "target vector dimension (Σ k² over blocks; default %(default)s)")
    blocks: str = _opt("paper", "projection blocks: the paper's layer groups, or one block per weight matrix "
                                "(default %(default)s)", choices=BLOCK_LAYOUTS)
    max_length: int = _opt(512, "documents longer than this many tokens are truncated (at least 2; at most the "
                                "model's context window, to which a larger value is lowered; default %(default)s)")
    chunk_tokens: int | None = _opt(None, "split each document into token windows of at most this many tokens, "
                                          "one row each (2 to --max-length; default: one row per document, "
                                          "truncated at --max-length)")
    chunk_stride: int | None = _opt(None, "tokens from one window's start to the next's, 1 to --chunk-tokens "
                                          "(default: --chunk-tokens, no overlap)")
    batch_tokens: int = _opt(4096, "padded tokens per batch (default %(default)s)")
    seed: int = _opt(0, "projection seed, ≥ 0 (default %(default)s)")
    optimizer_correction: bool = _opt(True, "do not divide by √V")  # the flag is --no-optimizer-correction
    unit_norm: bool = _opt(True, "keep raw lengths (dot products, not cosines)")  # --no-unit-norm
    preconditioner: str | None = _opt(None, "default: mixed with --eval-queries, else train", choices=PRECONDITIONERS)
    eval_queries: str | None = _opt(None, "QUERIES.jsonl whose gradients form R_eval")
    lam: float | None = _opt(None, "mixing weight of R_eval in [0, 1], mixed preconditioner only "
                                   "(default: spectrum matching)", flag="--lambda")
    fit_docs: int | None = _opt(None, "documents sampled for R_train (default: all, at most 10,000)")
    damping: float = _opt(DEFAULT_DAMPING,
                          "added to R's spectrum, times its mean eigenvalue; > 0 (default %(default)s)")
    r_block: int = _opt(DEFAULT_R_BLOCK)
    r_factor: str = _opt("cholesky", "how R is whitened: cholesky, W = L^-T with L L^T = R + damping, 5-7x less "
                                     "time than eigh at 2^16; or eigh, the symmetric R^-1/2 (an eigendecomposition "
                                     "per R range). Both give the same scores to float64 rounding; the stored "
                                     "vectors are in another basis (default %(default)s)",
                         choices=R_FACTORS)
    # float16, or float32 when vectors are not unit-normalized (`resolved`)
    dtype: str | None = _opt(None, "stored vector dtype (default float16)", choices=DTYPES)
    shard_docs: int = _opt(1024, "documents per shard (default %(default)s)")
    raw_dtype: str = _opt("float32", "how the raw (unpreconditioned) vectors are kept for refit and repair: float32; "
                                     "bfloat16, half the bytes, and R and the final vectors are then computed "
                                     "from the bf16 rows; or none, deleted once the final vectors are written "
                                     "(no refit; a repair recomputes them) (default %(default)s)",
                          choices=RAW_DTYPES)
    normalizer_docs: int = _opt(128)
    estimate_v_if_missing: bool = _opt(
        False, "when the optimizer state keeps no second moment (SGD, Lion), estimate V from the corpus "
               "instead of stopping (the manifest records it)")
    text_field: str = _opt("text", "corpus field holding the text (default %(default)s)")
    id_field: str = _opt("id", "corpus field holding the id (default: the record's number)")
    variant: str | None = _opt(None, "a rung of the paper's ablation ladder", choices=tuple(VARIANTS))
    padding_side: str = _opt("right")
    # bf16 pays on a GPU, or on CPUs with AVX512-BF16
    autocast: str | None = _opt(None, "run the model in bf16 (vectors are still summed in fp32)", choices=("bfloat16",))
    device: str | None = _opt(None, "cpu or cuda (default: cuda when available)")
    quiet: bool = _opt(False, "no progress bars or messages")
    overwrite: bool = _opt(False, "replace an existing index directory")

    def resolved(self) -> "BuildOptions":
        """Apply the variant shorthand and the defaults that depend on other options."""
        o = dataclasses.replace(self)
        if o.variant is not None:
            if o.variant not in VARIANTS:
                raise UserError(f"unknown --variant {o.variant!r}; choose from {', '.join(VARIANTS)}")
            for key, value in VARIANTS[o.variant].items():
                setattr(o, key, value)
        if o.preconditioner is None:
            o.preconditioner = "mixed" if o.eval_queries else "train"
        if o.preconditioner not in PRECONDITIONERS:
            raise UserError(f"unknown --preconditioner {o.preconditioner!r} (none, train or mixed)")
        if o.preconditioner == "mixed" and not o.eval_queries:
            raise UserError("a mixed preconditioner (and --variant trackstar) needs --eval-queries")
        if o.dtype is None:
            o.dtype = "float16" if o.unit_norm else "float32"
        if o.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {o.dtype!r} (float16, bfloat16 or float32)")
        if o.device is None:
            import torch

            o.device = "cuda" if torch.cuda.is_available() else "cpu"
        if o.autocast not in (None, "bfloat16"):
            raise UserError(f"unknown --autocast {o.autocast!r} (bfloat16)")
        if o.raw_dtype not in RAW_DTYPES:
            raise OptionError("--raw-dtype", f"unknown {o.raw_dtype!r} (float32, bfloat16 or none)")
        if o.r_factor not in R_FACTORS:
            raise OptionError("--r-factor", f"unknown {o.r_factor!r} (eigh or cholesky)")
        if o.blocks not in BLOCK_LAYOUTS:
            raise OptionError("--blocks", f"unknown layout {o.blocks!r} (paper or module)")
        if o.chunk_stride is not None and o.chunk_tokens is None:
            raise OptionError("--chunk-stride", "needs --chunk-tokens (the window the stride moves)")
        if o.chunk_tokens is not None and o.chunk_stride is None:
            o.chunk_stride = o.chunk_tokens
        o.validate()
        return o

    def validate(self) -> None:
        """Range-check every number before anything is read or written (an `OptionError` names it).

        Why these bounds: a document needs two tokens for one next-token loss, and a query one
        context token plus one target token, so `max_length` ≥ 2; R^{-1/2} divides by the damped
        spectrum, so `damping` must be > 0; λ mixes two matrices, so it lies in [0, 1]. The seed
        seeds numpy generators, which take no negative seed.
        """
        check_int("--proj-dim", self.proj_dim, minimum=1)
        check_int("--max-length", self.max_length, minimum=2, why=" (one token of context and one to predict)")
        check_int("--chunk-tokens", self.chunk_tokens, minimum=2, maximum=self.max_length, optional=True,
                  why=" (a window needs one token of context and one to predict, and fits in --max-length)")
        if self.chunk_tokens is not None:
            check_int("--chunk-stride", self.chunk_stride, minimum=1, maximum=self.chunk_tokens, optional=True,
                      why=" (a larger stride would skip tokens between windows)")
        check_int("--batch-tokens", self.batch_tokens, minimum=1)
        check_int("--seed", self.seed, minimum=0)
        check_int("--shard-docs", self.shard_docs, minimum=1)
        check_int("--fit-docs", self.fit_docs, minimum=1, optional=True)
        check_int("normalizer_docs", self.normalizer_docs, minimum=1)
        check_int("r_block", self.r_block, minimum=1)
        check_float("--damping", self.damping, above=0.0, why=" (R^-1/2 divides by the damped spectrum)")
        check_float("--lambda", self.lam, minimum=0.0, maximum=1.0, optional=True, why=" (the weight of R_eval in the mix)")
        if self.lam is not None and self.preconditioner != "mixed":
            raise OptionError("--lambda", f"weights R_eval in a mixed preconditioner; this one is {self.preconditioner!r}")

    @classmethod
    def from_json(cls, d: dict, **overrides: Any) -> "BuildOptions":
        """The options a build.json (`identity()` plus what the build added) records, with `overrides`.

        Keys that are not options (`model_fingerprint`, `corpus`) are skipped, so `refit` can start
        from the options an index was built with and change only the preconditioner's.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        recorded = {k: v for k, v in d.items() if k in names}
        recorded.setdefault("r_factor", "eigh")  # a build.json without it is eigh's (`identity`)
        return cls(**{**recorded, **overrides})

    def identity(self) -> dict:
        """The options that determine the index's bytes (a rerun with others is refused)."""
        skip = {"quiet", "overwrite", "device", "variant"}
        if self.chunk_tokens is None:  # an index without chunking records what it always did
            skip |= {"chunk_tokens", "chunk_stride"}
        if self.raw_dtype == "float32":  # likewise an index with the default raw vectors
            skip.add("raw_dtype")
        if self.r_factor == "eigh":  # and one whitened by R^-1/2, as every index was before Cholesky
            skip.add("r_factor")
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        for key in ("optimizer_state", "eval_queries"):
            if d[key]:
                d[key] = str(Path(d[key]).resolve())
        return d


# --- the other commands with many options -------------------------------------------------------

#: Default and largest continuation length of `tracestar trace` (the server has its own default).
DEFAULT_MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS_LIMIT = 1024
#: The k of recall@k and of tail-patch's top-k proponents.
DEFAULT_KS = (1, 3, 5, 10)
#: Passes over the corpus `tracestar train` makes unless told otherwise (`world.train.TrainConfig.epochs`).
DEFAULT_TRAIN_EPOCHS = 12


@dataclass
class EvalOptions:
    """What `tracestar eval` is asked besides the index, the queries and the report directory.

    The command runs BM25 and tail-patch only when asked (tail-patch takes minutes on a CPU);
    `evaluate` in Python runs both unless told not to. `k` is the command line's spelling of
    `evaluate`'s `ks`.
    """

    bm25: bool = _opt(False, "add the BM25 baseline (query = prompt + target)")
    tail_patch: bool = _opt(False, "measure influence: one training step per proponent, Δ log p(target | prompt)")
    k: str = _opt(",".join(map(str, DEFAULT_KS)), "comma-separated k for recall@k and tail-patch (default %(default)s)")
    variants: tuple[str, ...] = _opt((), "more index directories to compare", nargs="*", metavar="DIR")
    model_dir: str | None = _opt(None, "model directory (default: the index's model)", flag="--model")
    lr: float | None = _opt(None, "tail-patch learning rate, > 0 (default: the trainer's)")
    max_queries: int | None = _opt(None, "tail-patch at most N queries (a bucket-stratified sample); attribution "
                                         "uses all")

    def ks(self) -> tuple[int, ...]:
        """`k` as integers; a `UserError` names --k unless it lists positive integers."""
        try:
            ks = tuple(int(k) for k in self.k.split(",") if k.strip())
        except ValueError:
            raise UserError(f"--k: expected comma-separated integers, got {self.k!r}") from None
        if not ks or min(ks) < 1:
            raise UserError(f"--k: expected positive integers, got {self.k!r}")
        return ks


@dataclass
class QueryOptions:
    """What `tracestar query` is asked besides the index, the queries and the results file."""

    top_k: int = _opt(10, "proponents and opponents per query, ≥ 1 (default %(default)s)")
    model: str | None = _opt(None, "model directory (default: the one recorded in the manifest; must match it)")
    exact: bool = _opt(False, "scan the full-precision vectors even if a compressed form exists")
    rerank: int | None = _opt(None, "candidates re-scored exactly when searching a compressed form; 0: keep the "
                                    "compressed scores (default: 10 × top-k, at least 100, or the depth PQ recorded)")
    by_doc: bool = _opt(False, "one hit per document in an index built with --chunk-tokens: a document scores as its "
                               "best window (max for proponents, min for opponents), shown with that window's span")


@dataclass
class CompressOptions:
    """What `tracestar compress` is asked besides the index and the kind (int8 or pq)."""

    m: int | None = _opt(None, "FAISS PQ sub-quantizers, dividing the dimension (default: dim/4, at most 4096)")
    nbits: int | None = _opt(None, "FAISS PQ bits per sub-quantizer, 1 to 16 (default 8)")
    nlist: int | None = _opt(None, "IVF lists; 0: plain PQ (default: IVF-PQ above 50k rows). From 16,384 dims "
                                   "--kind pq writes 1-bit sign codes unless --m, --nbits or --nlist asks for FAISS")
    drop_exact: bool = _opt(False, "delete vectors/ shards afterwards (scores become approximate)")


@dataclass
class ExplainOptions:
    """What `tracestar explain` is asked besides the index and the document: the query, one of two ways."""

    query_id: str | None = _opt(None, "a query of --queries")
    queries: str | None = _opt(None, "QUERIES.jsonl holding --query-id")
    prompt: str | None = _opt(None, "the query's prompt (with --target, instead of --queries/--query-id)")
    target: str | None = _opt(None, "the completion whose support is explained; only its tokens are scored")
    chunk: int | None = _opt(None, "the window of --doc-id to explain, in an index built with --chunk-tokens (a "
                                   "hit's `chunk`; needed when the document has several)")
    model: str | None = _opt(None, "model directory (default: the manifest's)")
    json: bool = _opt(False, "print {doc_id, doc_score, position_convention, tokens: [{position, token, score, "
                             "special}]}")


@dataclass
class LdsOptions:
    """What `tracestar lds` is asked besides the world and the working directory."""

    subsets: int = _opt(64, "retraining runs M, at least 3 (default %(default)s)")
    fraction: float = _opt(0.5, "share of the corpus in each subset, in (0, 1) (default %(default)s)")
    variants: tuple[str, ...] = _opt(
        (*VARIANTS, "bm25", "random", "relevant"), "ladder rungs, `exact` (full gradients; small worlds only) and "
        "baselines bm25, random, relevant (default: the ladder and the three baselines)", nargs="+")
    proj_dim: int = _opt(4096, "index dimension of every rung (default %(default)s)")
    max_queries: int | None = _opt(None, "score only the first N queries (default: all)")
    seed: int = _opt(0, "seeds the subsets, the models and the projection (default %(default)s)")


@dataclass
class TraceOptions:
    """What `tracestar trace` is asked besides the index and the prompt."""

    target: str | None = _opt(None, "trace this completion instead of generating one (tokenized as `query` does)")
    max_new_tokens: int = _opt(DEFAULT_MAX_NEW_TOKENS, f"most tokens to generate, 1 to {MAX_NEW_TOKENS_LIMIT} and "
                                                       f"below the index's max_length (default %(default)s)")
    top_k: int = _opt(10, "proponents and opponents to show, ≥ 1 (default %(default)s)")
    per_target_token: bool = _opt(False, "also trace each generated token on its own (its prefix: the prompt and the "
                                         "tokens before it)")
    explain: bool = _opt(True, "scores only, no per-token snippets (one backward pass per listed document fewer)")
    model: str | None = _opt(None, "model directory (default: the manifest's; must match the index)")
    json: bool = _opt(False, "print one JSON object: a `query` result plus `generation` (and `per_token`)")


@dataclass
class ServeOptions:
    """What `tracestar serve` is asked besides the index; `tracestar.serve.serve`'s defaults too."""

    host: str = _opt("127.0.0.1", "address to listen on (default %(default)s: this machine only; another exposes "
                                  "the corpus)")
    port: int = _opt(8765, "port, 0 to 65535; 0 picks a free one (default %(default)s)")
    model: str | None = _opt(None, "model directory (default: the manifest's; must match the index)")
    max_new_tokens: int = _opt(64, f"the most tokens a request may generate, 1 to {MAX_NEW_TOKENS_LIMIT} and below "
                                   f"the index's max_length (default %(default)s)")
    top_k: int = _opt(10, "documents per list, 1 to 100 (default %(default)s)")
