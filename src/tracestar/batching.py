"""Tokenization, loss masks and length-bucketed batches.

L for a training document is the summed next-token cross-entropy over its tokens; for a query it
is the summed cross-entropy of the target tokens only, given the prompt. Both become an
`Example`: token ids plus the positions whose token is predicted (`loss_from`). Padding never
changes a result: pad positions carry no loss, are masked from attention, and position ids are
given explicitly so left padding does not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from tracestar.errors import UserError


@dataclass
class Example:
    """Token ids of one document or query; tokens at positions ≥ `loss_from` are predicted."""

    row: int
    ids: list[int]
    loss_from: int
    truncated: bool = False
    chunk: int | None = None  # a window of a longer document (`encode_chunks`): its number
    start: int = 0  # the document position of ids[0] (non-zero for a window)

    @property
    def end(self) -> int:
        """The document position just past ids[-1]."""
        return self.start + len(self.ids)


@dataclass
class Batch:
    rows: list[int]
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] 1 where the token at t is predicted (from t - 1)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(
            self.rows,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.loss_mask.to(device),
        )


def _context_token(tokenizer) -> int:
    for tok in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tok is not None:
            return int(tok)
    return 0


def document_ids(tokenizer, text: str) -> list[int]:
    """A document's full token ids: the tokenizer's own specials, plus eos as the trainer appends it."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(int(tokenizer.eos_token_id))
    return ids


def encode_document(tokenizer, text: str, row: int, max_length: int) -> Example:
    """A document as one example, cut after `max_length` tokens (`truncated` says so)."""
    ids = document_ids(tokenizer, text)
    truncated = len(ids) > max_length
    return Example(row=row, ids=ids[:max_length], loss_from=1, truncated=truncated)


def chunk_spans(n_tokens: int, chunk_tokens: int, stride: int) -> list[tuple[int, int]]:
    """[(start, end)] token windows of a document of `n_tokens`: at most `chunk_tokens` long, one
    every `stride` tokens from 0, the last ending at the document's end, so together they cover it.

    Each window is read on its own: its first token is context, every later one is predicted. So
    with `stride == chunk_tokens` (no overlap) the first token of each window after the first is
    predicted by no window; an overlap (`stride < chunk_tokens`) predicts it with context. A last
    window of one token would predict nothing, so it starts one token earlier. A document of at
    most `chunk_tokens` tokens is one window, the whole document.
    """
    if n_tokens <= chunk_tokens:
        return [(0, n_tokens)]
    spans = []
    start = 0
    while True:
        end = min(start + chunk_tokens, n_tokens)
        spans.append((start, end))
        if end == n_tokens:
            break
        start += stride
    if end - spans[-1][0] < 2:
        spans[-1] = (end - 2, end)
    return spans


def encode_chunks(tokenizer, text: str, first_row: int, chunk_tokens: int, stride: int) -> list[Example]:
    """A document as one example per window (`chunk_spans`), rows `first_row`, `first_row + 1`, …

    The document is tokenized once and its token ids are cut, so a window is exactly the tokens
    the model would read from the whole document (a decoded and re-tokenized piece of text need not
    be). Nothing is truncated.
    """
    ids = document_ids(tokenizer, text)
    return [Example(row=first_row + c, ids=ids[s:e], loss_from=1, chunk=c, start=s)
            for c, (s, e) in enumerate(chunk_spans(len(ids), chunk_tokens, stride))]


class UnusableTarget(UserError):
    """A query target that cannot be scored; `problem` says why, and the caller names the query."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(f"field 'target': {problem}")


class TargetTooLong(UnusableTarget):
    """A query target that cannot be scored whole within `max_length` positions (one goes to context)."""

    def __init__(self, n_target: int, max_length: int):
        self.n_target, self.max_length = n_target, max_length
        super().__init__(f"{n_target} tokens do not fit in {max_length} positions (the model's window or "
                         f"--max-length), which leave room for {max_length - 1} after one token of context")


class EmptyTarget(UnusableTarget):
    """A target with no tokens: its loss is 0 and its gradient zero, so every score would be 0."""

    def __init__(self) -> None:
        super().__init__("tokenizes to no tokens, so there is nothing to attribute")


def encode_query(tokenizer, prompt: str, target: str, row: int, max_length: int) -> Example:
    """Prompt tokens then target tokens; only the target is predicted. An empty prompt gets the
    tokenizer's bos/eos as context so the first target token has something to condition on.

    Too long for `max_length`: the prompt is cut from the left (its oldest tokens go, the ones
    nearest the target stay), and every target token is kept — a target scored in part would be
    another query. A target that does not fit even after one context token raises `TargetTooLong`,
    one with no tokens at all `EmptyTarget`.
    """
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    return query_example(query_prompt_ids(tokenizer, prompt), target_ids, row, max_length)


def query_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as a query reads them: with the tokenizer's own specials, and its
    bos/eos alone for an empty prompt. Generation (`tracestar trace`) starts from the same ids."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    return prompt_ids or [_context_token(tokenizer)]


def query_example(prompt_ids: list[int], target_ids: list[int], row: int, max_length: int) -> Example:
    """A query from token ids (a generated continuation has ids, not text): the prompt is cut from
    the left to fit `max_length`, every target token is kept, as `encode_query` describes."""
    prompt_ids, target_ids = list(prompt_ids), list(target_ids)
    if not target_ids:
        raise EmptyTarget()
    if len(target_ids) > max_length - 1:
        raise TargetTooLong(len(target_ids), max_length)
    truncated = len(prompt_ids) + len(target_ids) > max_length
    if truncated:
        prompt_ids = prompt_ids[len(prompt_ids) + len(target_ids) - max_length :]
    return Example(row=row, ids=prompt_ids + target_ids, loss_from=len(prompt_ids), truncated=truncated)


def collate(examples: list[Example], pad_id: int, *, padding_side: str = "right") -> Batch:
    T = max(len(e.ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.float32)
    for i, e in enumerate(examples):
        n = len(e.ids)
        start = T - n if padding_side == "left" else 0
        sl = slice(start, start + n)
        input_ids[i, sl] = torch.tensor(e.ids, dtype=torch.long)
        attention[i, sl] = 1
        positions[i, sl] = torch.arange(n)
        loss_mask[i, start + max(e.loss_from, 1) : start + n] = 1.0
    return Batch([e.row for e in examples], input_ids, attention, positions, loss_mask)


def bucketed(examples: Iterable[Example], batch_tokens: int, *, max_batch: int = 256) -> Iterator[list[Example]]:
    """Group examples of similar length so padding stays small: sort by length, then fill batches
    up to `batch_tokens` padded tokens. Deterministic for a given input order."""
    ordered = sorted(examples, key=lambda e: (len(e.ids), e.row))
    batch: list[Example] = []
    for e in ordered:
        longest = max([len(e.ids)] + [len(x.ids) for x in batch[-1:]])
        if batch and ((len(batch) + 1) * longest > batch_tokens or len(batch) >= max_batch):
            yield batch
            batch = []
        batch.append(e)
    if batch:
        yield batch


def pad_id(tokenizer) -> int:
    for tok in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tok is not None:
            return int(tok)
    return 0


def shifted_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] gold, [B, T] weight) aligned with the logits at each position: the logits at t
    predict the token at t + 1. Positions with no loss (the last one, prompt, padding) get gold
    -100 (cross-entropy's ignore index) and weight 0."""
    ids, mask = batch.input_ids, batch.loss_mask
    weight = torch.zeros_like(mask)
    weight[:, :-1] = mask[:, 1:]
    gold = torch.full_like(ids, -100)
    gold[:, :-1] = ids[:, 1:]
    gold.masked_fill_(weight == 0, -100)
    return gold, weight


def summed_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B] summed cross-entropy of the predicted tokens of each example (the L of TrackStar).

    Computed on the full, contiguous [B, T, V] logits with shifted targets, so neither the forward
    nor the backward pass makes a copy of the logits (slicing off the last position would copy
    them once each way); fp32 logits are used as they are, others are upcast once."""
    B, T, V = logits.shape
    gold, weight = shifted_targets(batch)
    flat = logits.reshape(B * T, V)
    if flat.dtype != torch.float32:
        flat = flat.float()
    ce = torch.nn.functional.cross_entropy(flat, gold.reshape(-1), reduction="none", ignore_index=-100)
    return (ce.view(B, T) * weight).sum(dim=1)


def forward_loss(model, batch: Batch) -> torch.Tensor:
    """[B] per-example TrackStar loss for a batch."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return summed_loss(out.logits, batch)
