"""Tail-patch (the paper's influence measure; docs/ARCHITECTURE.md, “Evaluation”).

From the final checkpoint, take ONE training step on a single proponent document and measure how
much the target's log-probability given the prompt goes up; then put the model (and the optimizer
state) back exactly as they were before the next document.

- Loss on the document = the training loss: mean next-token cross-entropy over the document's
  tokens, with the end-of-sequence token appended (batch of one).
- Target log-probability = sum over the target tokens of log p(token | prompt, earlier target
  tokens); Δprob = exp(after) − exp(before).
- Optimizer: the checkpoint's own, rebuilt from its saved state (`optim_state.read`: a Trainer
  checkpoint, accelerate's `optimizer.bin`, a DCP directory, any state_dict), each entry mapped to
  its parameter by name or by Trainer's groups and shape-checked: AdamW/Adam with their moments,
  step count, betas, eps and per-group weight decay; torch or HF Adafactor; SGD with its momentum.
  So the step is the one training would have taken next. With no state, plain SGD. The learning
  rate: the one given, else the trainer's (`train_log.json`), else each group's saved lr — or its
  `initial_lr` where the schedule had decayed it to 0 (a Trainer run's last checkpoint).
  Gradient clipping, which the training loop (not the optimizer) applied, is not replayed.
- Dropout is off during the step (`model.eval()`), so a patch is deterministic.

Efficient on CPU: the base log-probs of every query are computed once; documents are processed
one at a time and each patched model scores, in one batch, every query that has that document in
any method's list, so a document shared by many queries or methods costs one step. Restoring is an
in-place copy of saved tensors, not a reload.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from tracestar.batching import Example, collate, encode_document, encode_query, forward_loss, pad_id
from tracestar.corpus import Query
from tracestar.errors import UserError
from tracestar.optim_state import OptimizerState, find_in_dir, from_state_dict
from tracestar.optim_state import read as read_optimizer_state

DEFAULT_LR = 1e-2  # only when neither the caller nor train_log.json names one


# --- encoding -----------------------------------------------------------------------------------


def _max_length(model) -> int | None:
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _encode_document(tokenizer, text: str, max_length: int | None) -> list[int]:
    """The training document's tokens (tokenizer specials, then EOS), as the trainer sees them."""
    return encode_document(tokenizer, text, 0, max_length or 1 << 30).ids


def _encode_query(tokenizer, prompt: str, target: str, max_length: int | None) -> tuple[list[int], int]:
    """(ids, n_prompt): prompt tokens, then target tokens; only the target is scored."""
    ex = encode_query(tokenizer, prompt, target, 0, max_length or 1 << 30)
    if ex.loss_from >= len(ex.ids):
        raise UserError(f"query target {target!r} has no tokens")
    return ex.ids, ex.loss_from


# --- optimizer state ----------------------------------------------------------------------------


def read_train_lr(model_dir: str | Path | None) -> float | None:
    """The trainer's learning rate from `model_dir/train_log.json`, if any.

    The lr of the last training step (`final_lr`) comes first: a tail-patch step is the step
    training would have taken next. Then `lr`, `learning_rate`, `peak_lr` (top level, then under
    `config` / `args` / `hparams` / `cache_key.config`).
    """
    if model_dir is None:
        return None
    p = Path(model_dir) / "train_log.json"
    if not p.exists():
        return None
    try:
        log = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(log, dict):
        return None
    cands = [log] + [log.get(k) for k in ("config", "args", "hparams") if isinstance(log.get(k), dict)]
    ck = log.get("cache_key")
    if isinstance(ck, dict) and isinstance(ck.get("config"), dict):
        cands.append(ck["config"])
    for key in ("final_lr", "lr", "learning_rate", "peak_lr"):
        for d in cands:
            v = d.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return float(v)
    return None


def _read_state(spec, model) -> OptimizerState | None:
    """The optimizer state `spec` names, mapped onto `model` (None: no state, the step is SGD)."""
    if spec is None or isinstance(spec, OptimizerState):
        return spec
    if isinstance(spec, Mapping):
        return from_state_dict(spec, model)
    return read_optimizer_state(spec, model)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float | None) -> tuple[float, str]:
    """Set each group's step size; returns (the first group's lr, where it came from).

    A given lr applies to every group. Otherwise each group keeps the lr it was saved with, which a
    scheduler set for the step that would come next — unless the schedule had ended at 0 (linear
    decay, as Trainer's last checkpoint has), where a step would change nothing: then the group's
    `initial_lr` (the schedule's peak), else DEFAULT_LR.
    """
    source = "given"
    for g in optimizer.param_groups:
        if lr is not None:
            g["lr"] = float(lr)
            if g.get("relative_step"):
                g["relative_step"] = False  # HF Adafactor would otherwise ignore the lr it is given
        elif g.get("lr") is None and g.get("relative_step"):
            source = "relative step (HF Adafactor)"
        elif not g.get("lr"):
            initial = g.get("initial_lr")
            g["lr"], source = (float(initial), "initial_lr (the saved lr was 0)") if initial else (DEFAULT_LR, "default")
        else:
            source = "optimizer state"
    first = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
    return (float(first) if first is not None else float("nan")), source


class TailPatcher:
    """One model, one optimizer; `patched_logprobs(doc, queries)` = step, score, restore.

    `optimizer_state`: where the saved optimizer state is (file or directory, see `optim_state`),
    an in-memory state_dict, an `OptimizerState`, or None (SGD, no state). `lr`: the step size for
    every group; None → each group's saved lr (its `initial_lr` where that is 0), else DEFAULT_LR.
    """

    def __init__(self, model, tokenizer, *, optimizer_state: str | Path | Mapping | OptimizerState | None = None,
                 lr: float | None = None, max_length: int | None = None, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.model.eval()
        self.max_length = max_length or _max_length(model)
        self.batch_size = batch_size
        state = _read_state(optimizer_state, model)
        self.optimizer_source = None if state is None else state.source
        self.mapping = None if state is None else state.mapping
        self.step_count = None if state is None else state.step
        if state is None:
            self.optimizer_kind = "sgd"
            self.lr, self.lr_source = (float(lr), "given") if lr is not None else (DEFAULT_LR, "default")
            self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=self.lr)
        else:
            self.optimizer_kind = state.optimizer
            self.optimizer = state.build_optimizer(model)
            self.lr, self.lr_source = _set_lr(self.optimizer, lr)
        # the parameters the step can change: their values and optimizer state are restored after it
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._snapshot()

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, optimizer_state: str | Path | None | bool = True,
                 lr: float | None = None, **kw) -> "TailPatcher":
        """Load model + tokenizer from a HF directory. optimizer_state=True → the state inside
        `model_dir` when there is one (a Trainer checkpoint's `optimizer.pt`); a path → that;
        None/False → SGD. lr=None → train_log.json's lr, else the state's."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise UserError(f"{model_dir}: no such model directory")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_dir)
        if optimizer_state is True:
            optimizer_state = find_in_dir(model_dir)
        elif optimizer_state is False:
            optimizer_state = None
        if lr is None:
            lr = read_train_lr(model_dir)
        return cls(model, tok, optimizer_state=optimizer_state, lr=lr, **kw)

    def describe(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer_kind, "optimizer_state": self.optimizer_source, "mapping": self.mapping,
                "optimizer_step": self.step_count, "lr": self.lr, "lr_source": self.lr_source,
                "dropout": "off", "doc_loss": "mean next-token cross-entropy, EOS appended"}

    # --- save / restore -------------------------------------------------------------------------

    def _snapshot(self) -> None:
        self._saved_params = [p.detach().clone() for p in self.params]
        self._saved_state: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(self.params):
            st = self.optimizer.state.get(p)
            if st:
                self._saved_state[i] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}

    @torch.no_grad()
    def restore(self) -> None:
        """Put parameters and optimizer state back to the snapshot, in place."""
        for p, saved in zip(self.params, self._saved_params):
            p.copy_(saved)
            p.grad = None
        for i, p in enumerate(self.params):
            saved = self._saved_state.get(i)
            if saved is None:
                self.optimizer.state.pop(p, None)
                continue
            st = self.optimizer.state[p]
            for k in list(st):
                if k not in saved:
                    del st[k]
            for k, v in saved.items():
                cur = st.get(k)
                if torch.is_tensor(v) and torch.is_tensor(cur) and cur.shape == v.shape and cur.dtype == v.dtype:
                    cur.copy_(v)
                else:
                    st[k] = v.clone() if torch.is_tensor(v) else v

    # --- scoring --------------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, queries: Sequence[Query | tuple[list[int], int]]) -> np.ndarray:
        """Sum of target-token log-probs per query (float64 array): minus TrackStar's query loss."""
        enc = [q if isinstance(q, tuple) else _encode_query(self.tokenizer, q.prompt, q.target, self.max_length) for q in queries]
        examples = sorted((Example(row=i, ids=list(toks), loss_from=n) for i, (toks, n) in enumerate(enc)), key=lambda e: len(e.ids))
        out = np.zeros(len(enc), dtype=np.float64)
        for s in range(0, len(examples), self.batch_size):
            batch = collate(examples[s:s + self.batch_size], pad_id(self.tokenizer))
            out[batch.rows] = -forward_loss(self.model, batch).double().numpy()
        return out

    def step(self, doc_ids: list[int]) -> float:
        """One optimizer step on one document; returns its loss before the step."""
        if len(doc_ids) < 2:
            return float("nan")  # nothing to predict: the step is a no-op
        ids = torch.tensor([doc_ids])
        self.model.zero_grad(set_to_none=True)
        logits = self.model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)  # parameters outside the state's groups got gradients too
        return float(loss.detach())

    def patched_logprobs(self, doc: str | list[int], queries: Sequence[Query | tuple[list[int], int]]) -> np.ndarray:
        """Target log-probs of `queries` after one step on `doc`; the model is restored afterwards."""
        ids = _encode_document(self.tokenizer, doc, self.max_length) if isinstance(doc, str) else doc
        try:
            self.step(ids)
            return self.logprobs(queries)
        finally:
            self.restore()


# --- the evaluation -----------------------------------------------------------------------------


def relevant_results(queries: Sequence[Query], top_k: int = 10) -> list[dict[str, Any]]:
    """The ground-truth documents as a 'method': up to top_k of `extra["relevant"]`, in file order."""
    from tracestar.evaluate.metrics import relevant_ids

    return [{"query_id": q.id, "proponents": [{"doc_id": d, "score": 0.0} for d in relevant_ids(q)[:top_k]],
             "opponents": []} for q in queries]


def tail_patch(
    patcher: TailPatcher,
    queries: Sequence[Query],
    method_results: Mapping[str, Sequence[dict[str, Any]]],
    doc_texts: Mapping[str, str] | Callable[[str], str],
    ks: Sequence[int] = (1, 3, 5, 10),
    *,
    progress: bool = False,
    threads: int | None = 1,
) -> dict[str, dict[str, dict[str, float]]]:
    """Tail-patch Δ per method and k.

    For each method, each query and each of its top max(ks) proponents: Δlogprob = log p(target |
    prompt) after one step on the proponent − before; Δprob likewise on probabilities. Averaged over
    a query's top-k proponents (fewer if its list is shorter), then over the queries with at least
    one proponent. Returns ``{method: {"k": {"delta_logprob", "delta_prob", "n_queries"}}}``.

    `threads`: torch intra-op threads while patching (restored afterwards). One step on one short
    document is many tiny kernels that do not parallelize; measured on 2 busy cores with a 1.7M
    model, 1 thread ran ~2x faster than 2. None keeps torch's setting (use it for big models).
    """
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _tail_patch(patcher, queries, method_results, doc_texts, ks, progress)
    finally:
        torch.set_num_threads(saved_threads)


def _tail_patch(patcher, queries, method_results, doc_texts, ks, progress):
    ks = sorted({int(k) for k in ks})
    kmax = max(ks) if ks else 0
    qpos = {q.id: i for i, q in enumerate(queries)}
    enc = [_encode_query(patcher.tokenizer, q.prompt, q.target, patcher.max_length) for q in queries]
    # which queries each document must be scored on
    lists: dict[str, dict[int, list[str]]] = {}
    need: dict[str, set[int]] = {}
    for method, results in method_results.items():
        per_q: dict[int, list[str]] = {}
        for r in results:
            qi = qpos.get(str(r["query_id"]))
            if qi is None:
                continue
            docs = [str(p["doc_id"]) for p in r.get("proponents", [])][:kmax]
            per_q[qi] = docs
            for d in docs:
                need.setdefault(d, set()).add(qi)
        lists[method] = per_q

    text_of = doc_texts if callable(doc_texts) else doc_texts.__getitem__
    base = patcher.logprobs(enc)
    after: dict[tuple[str, int], float] = {}
    t0 = time.time()
    docs = list(need)
    for n, d in enumerate(docs, start=1):
        qis = sorted(need[d])
        lp = patcher.patched_logprobs(text_of(d), [enc[i] for i in qis])
        for i, v in zip(qis, lp):
            after[(d, i)] = float(v)
        if progress and (n % 50 == 0 or n == len(docs)):
            el = time.time() - t0
            print(f"  tail-patch: {n}/{len(docs)} documents, {el:.0f}s elapsed, ~{el / n * (len(docs) - n):.0f}s left",
                  file=sys.stderr, flush=True)

    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, per_q in lists.items():
        out[method] = {}
        for k in ks:
            dl, dp = [], []
            for qi, docs_q in per_q.items():
                top = docs_q[:k]
                if not top:
                    continue
                b = base[qi]
                dl.append(float(np.mean([after[(d, qi)] - b for d in top])))
                dp.append(float(np.mean([math.exp(after[(d, qi)]) - math.exp(b) for d in top])))
            out[method][str(k)] = {
                "delta_logprob": float(np.mean(dl)) if dl else 0.0,
                "delta_prob": float(np.mean(dp)) if dp else 0.0,
                "n_queries": len(dl),
            }
    return out
