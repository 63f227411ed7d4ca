"""How well each projection layout keeps the inner products of corrected per-document gradients.

A deep, narrow Llama (random weights, then a few AdamW steps on synthetic documents so that its
gradients are not those of an untrained model) is traced two ways:
  - exactly: each document's autograd weight gradient, corrected by the estimated V (D_r G D_c),
    flattened over every tracked matrix (float64);
  - projected: `FactoredCapture` with the paper layout at several caps on the number of layer
    groups (and the one-block-per-matrix layout), at the same requested dimension, over several
    projection seeds.
For every pair of documents it compares the projected cosine with the exact one (what a unit-norm
index scores) and the projected inner product with the exact one, and prints the RMS errors and
the correlation, averaged over the seeds. Runs in a minute or two on one CPU thread.

    python bench/projection_fidelity.py                       # 16 layers, 2^12, groups 8 and 16
    python bench/projection_fidelity.py --layers 30 --groups 8,15,30 --dim 8192 --seeds 5
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from tracestar.batching import Example, bucketed, collate, forward_loss
from tracestar.capture import FactoredCapture
from tracestar.model import tracked_matrices
from tracestar.normalizer import estimate
from tracestar.projection import make_layout


def deep_llama(layers: int, width: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 3, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def documents(n: int, vocab: int, seed: int = 0) -> list[Example]:
    """Documents with structure a model can learn: each repeats a short random motif with noise."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        motif = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 6))]
        ids = [motif[t % len(motif)] if rng.random() > 0.1 else rng.randrange(3, vocab) for t in range(rng.randint(16, 40))]
        out.append(Example(row=i, ids=ids, loss_from=1))
    return out


def train(model, docs: list[Example], steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for p in model.parameters():
        p.requires_grad_(True)
    for step in range(steps):
        batch = collate(docs[(step * 8) % len(docs):][:8] or docs[:8], 0)
        opt.zero_grad()
        forward_loss(model, batch).mean().backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)


def exact_vectors(model, tracked, normalizer, docs: list[Example]) -> torch.Tensor:
    """[N, P] each document's corrected gradient, flattened (float64)."""
    rows = []
    for p in model.parameters():
        p.requires_grad_(True)
    for ex in docs:
        model.zero_grad()
        forward_loss(model, collate([ex], 0)).sum().backward()
        parts = []
        for t in tracked:
            s = normalizer.scales[t.name]
            parts.append((s.row.double()[:, None] * t.param.grad.double() * s.col.double()[None, :]).flatten())
        rows.append(torch.cat(parts))
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return torch.stack(rows)


def pair_errors(exact: torch.Tensor, approx: torch.Tensor) -> dict:
    """RMS error of cosines and of inner products (relative to the exact ones' RMS) over pairs i < j."""
    iu = torch.triu_indices(len(exact), len(exact), offset=1)
    ip_e, ip_a = (exact @ exact.T)[iu[0], iu[1]], (approx @ approx.T)[iu[0], iu[1]]
    ue, ua = exact / exact.norm(dim=1, keepdim=True), approx / approx.norm(dim=1, keepdim=True)
    cos_e, cos_a = (ue @ ue.T)[iu[0], iu[1]], (ua @ ua.T)[iu[0], iu[1]]
    return {
        "cos_rms": float((cos_a - cos_e).pow(2).mean().sqrt()),
        "cos_corr": float(torch.corrcoef(torch.stack([cos_e, cos_a]))[0, 1]),
        "ip_rel_rms": float((ip_a - ip_e).pow(2).mean().sqrt() / ip_e.pow(2).mean().sqrt()),
        "norm_rel_rms": float(((approx.norm(dim=1) / exact.norm(dim=1)) - 1).pow(2).mean().sqrt()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--steps", type=int, default=60, help="AdamW steps before tracing")
    ap.add_argument("--dim", type=int, default=4096, help="requested projection dimension")
    ap.add_argument("--groups", default="8,16", help="comma list of caps on the paper layout's layer groups")
    ap.add_argument("--module", action="store_true", help="also the one-block-per-matrix layout")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = deep_llama(args.layers, args.width, args.vocab)
    docs = documents(args.docs, args.vocab)
    train(model, documents(256, args.vocab, seed=1), args.steps)
    tracked = tracked_matrices(model)
    batches = [collate(g, 0) for g in bucketed(docs, 1024)]
    normalizer = estimate(model, tracked, batches, forward_loss)
    exact = exact_vectors(model, tracked, normalizer, docs)
    ordered = sorted(docs, key=lambda e: e.row)
    layouts = {f"paper, ≤{g} groups": make_layout(tracked, dim=args.dim, max_groups=int(g)) for g in args.groups.split(",")}
    if args.module:
        layouts["module"] = make_layout(tracked, kind="module", dim=args.dim)
    print(f"Llama {args.layers} layers × {args.width} wide, {sum(t.param.numel() for t in tracked):,} tracked weights, "
          f"{len(docs)} documents ({len(docs) * (len(docs) - 1) // 2} pairs), V estimated, {args.seeds} projection seeds")
    print(f"{'layout':>22} {'blocks':>6} {'k':>10} {'dim':>6} {'cosine RMS err':>15} {'cosine corr':>11} "
          f"{'inner-product rel RMS':>21} {'norm rel RMS':>12}")
    for name, blocks in layouts.items():
        runs = []
        for seed in range(args.seeds):
            capture = FactoredCapture(model, tracked, blocks, normalizer, seed=seed)
            approx = torch.cat([capture.vectors(collate([e], 0)) for e in ordered]).double()
            runs.append(pair_errors(exact, approx))
        mean = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        ks = sorted({b.k for b in blocks})
        print(f"{name:>22} {len(blocks):>6} {str(ks if len(ks) < 4 else [ks[0], ks[-1]]):>10} "
              f"{sum(b.size for b in blocks):>6} {mean['cos_rms']:>15.4f} {mean['cos_corr']:>11.4f} "
              f"{mean['ip_rel_rms']:>21.4f} {mean['norm_rel_rms']:>12.4f}", flush=True)


if __name__ == "__main__":
    main()
