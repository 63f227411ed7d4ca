"""The model session: a loaded model and its tracked matrices, turning text into vectors.

`query`, `explain`, `trace` and the build all embed text the same way, through a `Tracer`:
g = P(∇L/√V) per example (`capture.py`), then Ḡ = unit(R^{-1/2} g) (`finalize_vectors`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from tracestar import dist
from tracestar.batching import (
    UnusableTarget,
    bucketed,
    collate,
    encode_document,
    encode_query,
    forward_loss,
    pad_id,
)
from tracestar.capture import FactoredCapture
from tracestar.corpus import Document, Query
from tracestar.errors import UserError
from tracestar.model import (
    coverage,
    load_model,
    model_fingerprint,
    model_window,
    tokenizer_hash,
    tracked_matrices,
)
from tracestar.normalizer import (
    Normalizer,
    docs_per_batch,
    estimate,
    estimate_batch_tokens,
    from_optimizer_state,
    identity,
)
from tracestar.options import BuildOptions
from tracestar.preconditioner import Preconditioner
from tracestar.projection import Block


class Tracer:
    """A loaded model with its tracked matrices: everything that turns text into raw vectors."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        self.model_dir = Path(model_dir).resolve()
        self.device = device
        self.model, self.tokenizer = load_model(self.model_dir, device=device)
        self.tracked = tracked_matrices(self.model)
        self.coverage = coverage(self.model, self.tracked)
        self.fingerprint = model_fingerprint(self.model)
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)
        self.pad = pad_id(self.tokenizer)

    def normalizer(self, opts: BuildOptions, sample: list[Document] | None, progress=None) -> Normalizer:
        """V: from the optimizer state, or estimated on `sample` (`progress(docs, tokens)` after each)."""
        if not opts.optimizer_correction:
            return identity(self.tracked)
        if opts.optimizer_state and sample is None:  # a sample means V is estimated even with a state
            return from_optimizer_state(opts.optimizer_state, self.model, self.tracked)

        def batches():  # several documents per batch, bucketed by length (`normalizer.docs_per_batch`)
            examples = [encode_document(self.tokenizer, d.text, i, opts.max_length) for i, d in enumerate(sample or [])]
            tokens = estimate_batch_tokens(getattr(self.model.config, "vocab_size", 1), opts.batch_tokens)
            for group in bucketed(examples, tokens, max_batch=docs_per_batch(self.tracked)):
                batch = collate(group, self.pad)
                yield batch.to(self.device)
                if progress is not None:  # resumed once `estimate` has run the batch
                    progress(len(group), batch.n_tokens)

        return estimate(self.model, self.tracked, batches(), forward_loss, reduce=dist.all_reduce_)

    def capture(self, blocks: list[Block], normalizer: Normalizer, seed: int, autocast: str | None = None) -> FactoredCapture:
        dtype = {None: None, "bfloat16": torch.bfloat16}[autocast]
        return FactoredCapture(self.model, self.tracked, blocks, normalizer, seed, device=self.device, autocast=dtype)

    def raw_vectors(self, capture: FactoredCapture, examples: list, opts: BuildOptions, progress=None) -> np.ndarray:
        """[N, D] float32 in the order of `examples` (batched by length internally)."""
        out = np.zeros((len(examples), capture.dim), dtype=np.float32)
        position = {e.row: i for i, e in enumerate(examples)}
        for group in bucketed(examples, opts.batch_tokens):
            batch = collate(group, self.pad, padding_side=opts.padding_side)
            vecs = capture.vectors(batch).detach().to("cpu", torch.float32).numpy()  # [B, D]
            out[[position[r] for r in batch.rows]] = vecs
            if progress is not None:
                progress(len(group), batch.n_tokens)
        return out

    def query_vectors(self, capture: FactoredCapture, queries: list[Query], opts: BuildOptions, progress=None) -> np.ndarray:
        return self.raw_vectors(capture, encode_queries(self.tokenizer, queries, opts.max_length), opts, progress)

    @property
    def window(self) -> int | None:
        """The model's context length (None when its config does not say)."""
        return model_window(self.model)


def encode_queries(tokenizer, queries: list[Query], max_length: int) -> list:
    """Queries as `Example`s; a target that cannot be scored (too long, no tokens) is refused naming
    the query's file and line."""
    examples = []
    for i, q in enumerate(queries):
        try:
            examples.append(encode_query(tokenizer, q.prompt, q.target, i, max_length))
        except UnusableTarget as exc:
            raise UserError(f"{q.describe()}: field 'target': {exc.problem}") from None
    return examples


def clamp_to_window(opts: BuildOptions, window: int | None) -> tuple[BuildOptions, int]:
    """(options with `max_length` ≤ the model's window, the requested max_length).

    Positions past the window would index outside the model's position embedding, so the
    effective length is the smaller of the two; the manifest records both.
    """
    requested = opts.max_length
    if window is None or requested <= window:
        return opts, requested
    return dataclasses.replace(opts, max_length=window), requested


def finalize_vectors(raw: torch.Tensor, precond: Preconditioner, unit_norm: bool) -> torch.Tensor:
    """Ḡ = unit(R^{-1/2} g): the vectors that are stored and searched. [N, D] → [N, D]."""
    v = precond.apply(raw.float())
    if unit_norm:
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return v
