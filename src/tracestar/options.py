"""What an index build is asked to do: the options that fix its bytes, and the ablation ladder.

One place for every option and its default, so the CLI, the Python API, `refit` and the manifest
agree on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from tracestar.errors import OptionError, UserError, check_float, check_int
from tracestar.preconditioner import DEFAULT_DAMPING, DEFAULT_R_BLOCK
from tracestar.projection import DEFAULT_DIM

#: The paper's ablation ladder, each rung adding one thing.
VARIANTS: dict[str, dict] = {
    "dot": {"optimizer_correction": False, "unit_norm": False, "preconditioner": "none"},
    "opt": {"optimizer_correction": True, "unit_norm": False, "preconditioner": "none"},
    "opt-norm": {"optimizer_correction": True, "unit_norm": True, "preconditioner": "none"},
    "train-r": {"optimizer_correction": True, "unit_norm": True, "preconditioner": "train"},
    "trackstar": {"optimizer_correction": True, "unit_norm": True, "preconditioner": "mixed"},
}


@dataclass
class BuildOptions:
    optimizer_state: str | None = None
    proj_dim: int = DEFAULT_DIM
    blocks: str = "paper"
    max_length: int = 512
    batch_tokens: int = 4096
    seed: int = 0
    optimizer_correction: bool = True
    unit_norm: bool = True
    preconditioner: str | None = None  # none | train | mixed; default: mixed with eval queries, else train
    eval_queries: str | None = None
    lam: float | None = None
    fit_docs: int | None = None  # default: all documents, at most 10,000
    damping: float = DEFAULT_DAMPING
    r_block: int = DEFAULT_R_BLOCK
    dtype: str | None = None  # default float16 (float32 when vectors are not unit-normalized)
    shard_docs: int = 1024
    normalizer_docs: int = 128
    estimate_v_if_missing: bool = False  # an optimizer state without V (SGD, Lion): estimate V instead of stopping
    text_field: str = "text"
    id_field: str = "id"
    variant: str | None = None
    padding_side: str = "right"
    autocast: str | None = None  # "bfloat16": the model's forward/backward in bf16 (GPU, or CPUs with AVX512-BF16)
    device: str | None = None
    quiet: bool = False
    overwrite: bool = False

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
        if o.preconditioner not in ("none", "train", "mixed"):
            raise UserError(f"unknown --preconditioner {o.preconditioner!r} (none, train or mixed)")
        if o.preconditioner == "mixed" and not o.eval_queries:
            raise UserError("a mixed preconditioner (and --variant trackstar) needs --eval-queries")
        if o.dtype is None:
            o.dtype = "float16" if o.unit_norm else "float32"
        if o.dtype not in ("float16", "bfloat16", "float32"):
            raise UserError(f"unknown --dtype {o.dtype!r} (float16, bfloat16 or float32)")
        if o.device is None:
            o.device = "cuda" if torch.cuda.is_available() else "cpu"
        if o.autocast not in (None, "bfloat16"):
            raise UserError(f"unknown --autocast {o.autocast!r} (bfloat16)")
        if o.blocks not in ("paper", "module"):
            raise OptionError("--blocks", f"unknown layout {o.blocks!r} (paper or module)")
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

    def identity(self) -> dict:
        """The options that determine the index's bytes (a rerun with others is refused)."""
        skip = {"quiet", "overwrite", "device", "variant"}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        for key in ("optimizer_state", "eval_queries"):
            if d[key]:
                d[key] = str(Path(d[key]).resolve())
        return d
