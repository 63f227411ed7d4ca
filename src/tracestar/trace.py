"""Why did the model just say that? Generate a continuation, then trace it like any target.

    result = trace(open_index("index/"), "The capital of France is", max_new_tokens=8)
    result["generation"]["text"]          # what the model said (greedy)
    result["proponents"][0]["doc_id"]     # the document that supports it most

The continuation is produced by the index's own model (its fingerprint is checked when it is
loaded), by plain greedy decoding: the argmax at every step, whatever sampling settings the
model's `generation_config` carries, so a trace is reproducible. It stops at the tokenizer's (or
the generation config's) end-of-sequence token, which is not part of the continuation.

The continuation is attributed by its *token ids*, not by its text: decoding and re-encoding can
split words differently, and the tokens traced must be the ones the model produced. With
`target=` the target is tokenized as `tracestar query` tokenizes it, so a trace with a target
gives exactly `query`'s results for that (prompt, target).

Per-target-token mode attributes every continuation token on its own: the target is that one
token and the prefix is the prompt plus the tokens before it, which shows which documents drove
which word. Every result has the shape of a `query` result (`query_id`, `prompt`, `target`,
`proponents`, `opponents`), with per-token heat maps (`tokens`) and a one-line `snippet` per
document when explained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from tracestar.batching import Example, TargetTooLong, query_example, query_prompt_ids
from tracestar.errors import OptionError, UserError, check_int
from tracestar.options import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT
SNIPPET_MARK = "**"  # around the tokens that carry most of a document's score, in a snippet


@dataclass
class Continuation:
    """What the model read and what it said, as token ids."""

    prompt: str
    context_ids: list[int]  # the prompt as the model read it (cut from the left to fit its window)
    ids: list[int]  # the continuation (no end-of-sequence token)
    texts: list[str]  # each continuation token decoded on its own
    text: str  # the continuation decoded as a whole
    source: str  # "greedy" or "target"
    stopped: str | None  # "eos" or "max_new_tokens" for a generation; None for a given target
    prompt_cut: int = 0  # prompt tokens dropped from the left so the generation fits the window

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "source": self.source,
            "stopped": self.stopped,
            "prompt_tokens": len(self.context_ids),
            "prompt_tokens_cut": self.prompt_cut,
            "tokens": [{"position": i, "id": t, "token": s} for i, (t, s) in enumerate(zip(self.ids, self.texts))],
        }


# --- the continuation --------------------------------------------------------------------------


def stop_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's and those of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {int(i) for i in ids if i is not None}


def greedy_ids(model, context: Sequence[int], max_new_tokens: int, stop: set[int]) -> Iterator[int]:
    """Greedy decoding with the key/value cache, one token id at a time (the stop token included,
    then it ends): one forward pass over the context, then one per generated token."""
    device = next(model.parameters()).device
    cache_arg = _cache_argument(model)
    ids = torch.tensor([list(context)], dtype=torch.long, device=device)  # [1, T]
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, use_cache=True, **{cache_arg: past})
            past = getattr(out, cache_arg)
            nxt = int(out.logits[0, -1].argmax())  # the first of tied maxima, as generate() takes it
            yield nxt
            if nxt in stop:
                return
            ids = torch.tensor([[nxt]], dtype=torch.long, device=device)


def _cache_argument(model) -> str:
    """The forward argument (and output field) that carries the key/value cache: `cache` in recent
    transformers, `past_key_values` before it."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def max_new_tokens_limit(index) -> int:
    """The longest continuation that can be traced: it and one token of context must fit the
    index's max_length (attribution scores at most that many positions) and the model's window."""
    window = index.tracer().window or index.max_length
    return max(1, min(MAX_NEW_TOKENS_LIMIT, index.max_length - 1, window - 1))


def check_max_new_tokens(index, max_new_tokens: int, *, option: str = "--max-new-tokens") -> int:
    """`max_new_tokens` if it is between 1 and `max_new_tokens_limit`, else an OptionError."""
    limit = max_new_tokens_limit(index)
    why = f" (the index scores {index.max_length} positions, one of them context)" if limit < MAX_NEW_TOKENS_LIMIT else ""
    return check_int(option, max_new_tokens, minimum=1, maximum=limit, why=why)


def generate(index, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, *,
             on_token: Callable[[int, int, str], None] | None = None) -> Continuation:
    """The model's greedy continuation of `prompt`; `on_token(position, id, text)` is called as
    each token is produced (not for the stop token). The prompt is cut from the left so that
    prompt + continuation fit the model's window."""
    tracer = index.tracer()
    check_max_new_tokens(index, max_new_tokens)
    context = query_prompt_ids(tracer.tokenizer, prompt)
    window = tracer.window
    cut = 0
    if window is not None and len(context) + max_new_tokens > window:
        cut = len(context) + max_new_tokens - window
        context = context[cut:]
    stop = stop_ids(tracer.model, tracer.tokenizer)
    ids, texts, stopped = [], [], "max_new_tokens"
    for tid in greedy_ids(tracer.model, context, max_new_tokens, stop):
        if tid in stop:
            stopped = "eos"
            break
        texts.append(tracer.tokenizer.decode([tid]))
        ids.append(tid)
        if on_token is not None:
            on_token(len(ids) - 1, tid, texts[-1])
    text = tracer.tokenizer.decode(ids)
    return Continuation(prompt, context, ids, texts, text, "greedy", stopped, cut)


def given(index, prompt: str, target: str) -> Continuation:
    """A target supplied by the user, tokenized as `tracestar query` tokenizes it."""
    if not target:
        raise OptionError("--target", "empty; give the completion to trace, or leave it out to generate one")
    tok = index.tracer().tokenizer
    ids = list(tok(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise OptionError("--target", f"{target!r} has no tokens")
    texts = [tok.decode([t]) for t in ids]
    return Continuation(prompt, query_prompt_ids(tok, prompt), ids, texts, target, "target", None)


# --- attribution ---------------------------------------------------------------------------------


@dataclass
class Piece:
    """One traced target: the whole continuation or one of its tokens."""

    query_id: str
    prompt: str  # the text before the target (for a token: the prompt plus the earlier tokens)
    target: str
    example: Example
    position: int | None = None  # the token's position in the continuation (per-token mode)


def whole(cont: Continuation, max_length: int, query_id: str = "trace") -> Piece:
    """The continuation as one target (the prompt cut from the left as `query` cuts it)."""
    if not cont.ids:
        raise UserError("the model ended its answer at once (its first token was end-of-sequence): "
                        "nothing to trace; give a target, or another prompt")
    try:
        ex = query_example(cont.context_ids, cont.ids, 0, max_length)
    except TargetTooLong as exc:
        raise OptionError("--target" if cont.source == "target" else "--max-new-tokens", exc.problem) from None
    return Piece(query_id, cont.prompt, cont.text, ex)


def one_token(cont: Continuation, position: int, max_length: int, query_id: str = "trace") -> Piece:
    """Token `position` of the continuation as its own target, after the prompt and the tokens before it."""
    if not 0 <= position < len(cont.ids):
        raise OptionError("position", f"must be between 0 and {len(cont.ids) - 1}, got {position}")
    ex = query_example(cont.context_ids + cont.ids[:position], [cont.ids[position]], position, max_length)
    prefix = cont.prompt + "".join(cont.texts[:position])
    return Piece(f"{query_id}/{position}", prefix, cont.texts[position], ex, position)


def piece_vectors(index, pieces: Sequence[Piece]) -> np.ndarray:
    """[N, D] final query vectors of the pieces: one forward and backward pass each, batched."""
    from tracestar.tracer import finalize_vectors

    tracer = index.tracer()
    examples = [Example(i, p.example.ids, p.example.loss_from, p.example.truncated) for i, p in enumerate(pieces)]
    raw = torch.from_numpy(tracer.raw_vectors(index._capture, examples, index.options))
    return finalize_vectors(raw, index.preconditioner, index.manifest["unit_norm"]).numpy()


def search_pieces(index, pieces: Sequence[Piece], vectors: np.ndarray, top_k: int) -> list[dict]:
    """`query`-shaped results of the pieces (one scan for all of them)."""
    props, opps = index.hits(index.search_vectors(vectors, top_k))  # a window's hit carries its span
    out = []
    for qi, p in enumerate(pieces):
        res = {
            "query_id": p.query_id,
            "prompt": p.prompt,
            "target": p.target,
            "proponents": props[qi],
            "opponents": opps[qi],
        }
        if p.position is not None:
            res["position"] = p.position
        out.append(res)
    return out


def explain_results(index, pieces: Sequence[Piece], vectors: np.ndarray, results: Sequence[dict], *,
                    texts: Mapping[str, str] | None = None) -> dict:
    """Per-token attributions of every listed document, keyed by (query id, doc id): one backward
    pass per distinct document, whichever pieces retrieved it. Adds `snippet` and `tokens` to each hit."""
    from tracestar.corpus import Query
    from tracestar.explain import explain_pairs
    from tracestar.report.hits import hit_key

    queries = {p.query_id: Query(p.query_id, p.prompt, p.target) for p in pieces}
    pairs = [(queries[r["query_id"]], hit_key(h)) for r in results for key in ("proponents", "opponents") for h in r[key]]
    vecs = {p.query_id: vectors[i] for i, p in enumerate(pieces)}
    found = explain_pairs(index, pairs, texts=texts, query_vectors=vecs)
    for r in results:
        for key, sign in (("proponents", 1.0), ("opponents", -1.0)):
            for h in r[key]:
                att = found.get((r["query_id"], hit_key(h)))
                if att is not None:
                    h["snippet"] = snippet(att.tokens, att.special, sign=sign)
                    h["tokens"] = att.to_json()["tokens"]
    return found


def snippet(tokens: Sequence[tuple[str, float]], special: Sequence[bool] = (), *, sign: float = 1.0,
            before: int = 8, after: int = 16, marks: int = 3) -> str:
    """One line of a document around its strongest token (largest score × sign), the `marks`
    strongest tokens in view marked with ** (special tokens left out, whitespace folded)."""
    shown = [i for i in range(len(tokens)) if not (i < len(special) and special[i])]
    if not shown:
        return ""
    best = max(shown, key=lambda i: sign * tokens[i][1])
    lo = max(0, best - before)
    view = [i for i in shown if lo <= i < best + after]
    strong = set(sorted((i for i in view if sign * tokens[i][1] > 0), key=lambda i: -sign * tokens[i][1])[:marks])
    marked = [i in strong and bool(tokens[i][0].strip()) for i in view]
    parts = []
    for k, i in enumerate(view):
        text = tokens[i][0]
        if marked[k]:  # a run of marked neighbours shares one pair of marks: **Moresby.**, not **Moresby****.**
            core = text.strip()
            lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()):]
            opens = "" if k > 0 and marked[k - 1] and not lead else SNIPPET_MARK
            closes = "" if k + 1 < len(view) and marked[k + 1] and not tokens[view[k + 1]][0][:1].isspace() else SNIPPET_MARK
            text = f"{lead}{opens}{core}{closes}{trail}"
        parts.append(text)
    line = " ".join("".join(parts).split())
    return ("… " if view[0] > shown[0] else "") + line + (" …" if view[-1] < shown[-1] else "")


# --- the whole trace -------------------------------------------------------------------------------


def trace(
    index,
    prompt: str,
    *,
    target: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    top_k: int = 10,
    per_target_token: bool = False,
    explain: bool = True,
    texts: Mapping[str, str] | None = None,
    on_token: Callable[[int, int, str], None] | None = None,
    timings: dict | None = None,
) -> dict:
    """Generate (or take `target`), attribute the continuation, and return a `query`-shaped result
    plus `generation` (and `per_token`, one result per continuation token, in per-token mode).

    `index`: an opened index (`tracestar.api.open_index`); its model is loaded on first use and
    refused if its fingerprint differs. `texts` (doc_id -> text) saves reading the corpus for the
    snippets. `timings`, when given, receives the seconds each step took.
    """
    from tracestar.api import check_search_options

    check_search_options(top_k, None)
    check_int("--max-new-tokens", max_new_tokens, minimum=1, maximum=MAX_NEW_TOKENS_LIMIT)
    clock = StepClock(timings)
    with clock("generate_s"):
        cont = given(index, prompt, target) if target is not None else generate(index, prompt, max_new_tokens, on_token=on_token)
    max_length = index.max_length
    pieces = [whole(cont, max_length)]
    if per_target_token:
        pieces += [one_token(cont, i, max_length) for i in range(len(cont.ids))]
    with clock("attribute_s"):
        vectors = piece_vectors(index, pieces)
        results = search_pieces(index, pieces, vectors, top_k)
    if explain:
        with clock("explain_s"):
            explain_results(index, pieces, vectors, results, texts=texts)
    out = {**results[0], "generation": cont.to_json()}
    if per_target_token:
        out["per_token"] = results[1:]
    return out


class StepClock:
    """`with clock("name"):` adds the block's seconds to a dict (or does nothing without one)."""

    def __init__(self, into: dict | None):
        self.into, self.name, self.t0 = into, "", 0.0

    def __call__(self, name: str) -> "StepClock":
        self.name = name
        return self

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.into is not None:
            self.into[self.name] = self.into.get(self.name, 0.0) + time.perf_counter() - self.t0


# --- text output -----------------------------------------------------------------------------------


def format_trace(result: dict, *, searched: str | None = None, width: int = 14) -> str:
    """The CLI's text form: the generation, then the proponents and opponents with their snippets
    (and the same per token in per-token mode)."""
    gen = result["generation"]
    how = "given as --target" if gen["source"] == "target" else {
        "eos": "greedy, stopped at end-of-sequence", "max_new_tokens": "greedy, stopped at --max-new-tokens"}[gen["stopped"]]
    lines = [f"prompt      {result['prompt']!r}"]
    if gen.get("prompt_tokens_cut"):
        lines.append(f"            (its first {gen['prompt_tokens_cut']} tokens dropped to fit the model's window)")
    lines.append(f"generation  {gen['text']!r}  ({len(gen['tokens'])} tokens, {how})")
    if searched:
        lines.append(f"searched    {searched}")
    lines += _hit_lines(result, width)
    for r in result.get("per_token") or []:
        lines.append("")
        lines.append(f"token {r['position']}: {r['target']!r} after {r['prompt']!r}")
        lines += _hit_lines(r, width, opponents=False)
    if any("snippet" in h for h in result["proponents"]):
        lines.append("")
        lines.append(f"{SNIPPET_MARK}…{SNIPPET_MARK} marks the tokens of a document that carry most of its score "
                     "(`tracestar explain` lists them all)")
    return "\n".join(lines)


def _hit_lines(result: dict, width: int, *, opponents: bool = True) -> list[str]:
    lines = []
    for key in ("proponents", "opponents") if opponents else ("proponents",):
        lines.append(f"  {key}:" if result[key] else f"  {key}: none")
        for rank, h in enumerate(result[key], 1):
            doc = h["doc_id"] if len(h["doc_id"]) <= width else h["doc_id"][: width - 1] + "…"
            text = f"  {h['snippet']}" if h.get("snippet") else ""
            if h.get("chunk") is not None:  # a window of a longer document (--chunk-tokens): where it lies
                text = f"  #{h['chunk']} [{h['start']}, {h['end']}){text}"
            lines.append(f"  {rank:>3}  {doc:<{width}}  {h['score']:+.4f}{text}")
    return lines
