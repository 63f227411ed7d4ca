"""The factored gradient equals the explicit per-example gradient, corrected and projected densely."""

from __future__ import annotations

import pytest
import torch

from tiny import gpt2, llama, make_tokenizer
from tracestar.batching import collate, encode_document, encode_query, forward_loss
from tracestar.capture import FactoredCapture
from tracestar.model import coverage, tracked_matrices
from tracestar.normalizer import factored_v, from_optimizer_state, identity
from tracestar.projection import gaussian, make_layout

TEXTS = [
    "the capital of france is paris .",
    "berlin is a large city in germany and the capital",
    "rome",
    "the river in the north of italy was large , the mountain small and the city lives on .",
    "madrid spain lisbon portugal",
]


def _optimizer_state(model, kind: str, path):
    """A state_dict shaped like the named optimizer's, with random positive second moments."""
    gen = torch.Generator().manual_seed(7)
    state = {}
    for i, p in enumerate(model.parameters()):
        if p.dim() != 2:
            state[i] = {"step": torch.tensor(3.0)}
            continue
        a, b = p.shape
        r = torch.rand(a, generator=gen) + 0.05
        c = torch.rand(b, generator=gen) + 0.05
        if kind == "torch_adafactor":
            state[i] = {"step": torch.tensor(3.0), "row_var": r[:, None], "col_var": c[None, :]}
        elif kind == "hf_adafactor":
            state[i] = {"step": 3, "exp_avg_sq_row": r, "exp_avg_sq_col": c, "exp_avg_sq": torch.zeros(0)}
        else:
            state[i] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(a, b), "exp_avg_sq": torch.rand(a, b, generator=gen) + 0.01}
    n = len(list(model.parameters()))
    group = {"lr": 1e-3, "params": list(range(n))}
    if kind == "adam":
        group["betas"] = (0.9, 0.999)
    torch.save({"state": state, "param_groups": [group]}, path)
    return torch.load(path, weights_only=True)


def _explicit(model, tracked, blocks, sd, kind, batch_examples, seed):
    """Per-example autograd gradient ÷ √V, projected densely — the reference."""
    tok = make_tokenizer()
    index_of = {id(p): i for i, p in enumerate(model.parameters())}
    block_of = {p: i for i, b in enumerate(blocks) for p in b.params}
    out = []
    for ex in batch_examples:
        b = collate([ex], tok.pad_token_id)
        for p in model.parameters():
            p.requires_grad_(True)
        model.zero_grad()
        forward_loss(model, b).sum().backward()
        acc = [torch.zeros(bl.k, bl.k, dtype=torch.float64) for bl in blocks]
        for t in tracked:
            g = t.param.grad.double()
            st = sd["state"][index_of[id(t.param)]] if sd else None
            if kind == "torch_adafactor":
                v = factored_v(st["row_var"], st["col_var"])
            elif kind == "hf_adafactor":
                v = factored_v(st["exp_avg_sq_row"], st["exp_avg_sq_col"])
            elif kind == "adam":
                full = st["exp_avg_sq"].double() / (1 - 0.999 ** 3)
                v = factored_v(full.mean(1), full.mean(0))
            else:
                v = torch.ones_like(g)
            bi = block_of[t.name]
            k = blocks[bi].k
            L = gaussian(seed, t.name, "L", k, g.shape[0]).double()
            R = gaussian(seed, t.name, "R", k, g.shape[1]).double()
            acc[bi] += L @ (g / v.sqrt()) @ R.T
        out.append(torch.cat([a.flatten() for a in acc]))
    for p in model.parameters():
        p.requires_grad_(False)
    return torch.stack(out)


def _examples(queries: bool = False):
    tok = make_tokenizer()
    if queries:
        return [encode_query(tok, t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1], i, 64) for i, t in enumerate(TEXTS) if " " in t]
    return [encode_document(tok, t, i, 64) for i, t in enumerate(TEXTS)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["torch_adafactor", "hf_adafactor", "adam", "none"])
@pytest.mark.parametrize("blocks_kind", ["paper", "module"])
def test_factored_equals_explicit(tmp_path, arch, kind, blocks_kind):
    model = gpt2() if arch == "gpt2" else llama()
    tracked = tracked_matrices(model)
    blocks = make_layout(tracked, kind=blocks_kind, dim=4096)
    if kind == "none":
        sd, norm = None, identity(tracked)
    else:
        sd = _optimizer_state(model, kind, tmp_path / "opt.pt")
        norm = from_optimizer_state(tmp_path / "opt.pt", model, tracked)
        assert norm.kind == kind
    cap = FactoredCapture(model, tracked, blocks, norm, seed=3)
    for queries in (False, True):
        examples = _examples(queries)
        got = cap.vectors(collate(examples, make_tokenizer().pad_token_id)).double()
        want = _explicit(model, tracked, blocks, sd, kind, examples, seed=3)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item()), (got - want).abs().max()


def test_coverage_and_ties():
    for model, tied in ((gpt2(), True), (llama(), False)):
        tracked = tracked_matrices(model)
        cov = coverage(model, tracked)
        assert cov["share"] > 0.95, cov
        emb = model.get_input_embeddings().weight
        entry = [t for t in tracked if t.param is emb][0]
        assert (len(entry.sites) == 2) == tied  # a tied embedding is one parameter with two uses


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batch_and_padding_invariance(arch):
    model = gpt2() if arch == "gpt2" else llama()
    tracked = tracked_matrices(model)
    blocks = make_layout(tracked, kind="paper", dim=2048)
    cap = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0)
    tok = make_tokenizer()
    examples = _examples() + _examples()[:3]
    single = torch.cat([cap.vectors(collate([e], tok.pad_token_id)) for e in examples])
    for side in ("right", "left"):
        full = cap.vectors(collate(examples, tok.pad_token_id, padding_side=side))
        scale = single.abs().max()
        assert torch.allclose(full, single, atol=1e-5 * scale, rtol=1e-5), (side, (full - single).abs().max() / scale)


def test_token_vectors_sum_to_vector():
    model = gpt2()
    tracked = tracked_matrices(model)
    blocks = make_layout(tracked, kind="paper", dim=1024)
    cap = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0)
    batch = collate(_examples()[:2], make_tokenizer().pad_token_id)
    whole = cap.vectors(batch)
    per_token = cap.token_vectors(batch)
    assert torch.allclose(per_token.sum(1), whole, atol=1e-5 * whole.abs().max())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fused_head_equals_generic_path(arch):
    """The fused LM head + loss gives the same vectors as the model's own head and loss."""
    model = gpt2() if arch == "gpt2" else llama()
    tracked = tracked_matrices(model)
    blocks = make_layout(tracked, kind="paper", dim=2048)
    cap = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0)
    assert cap._head is not None
    tok = make_tokenizer()
    for queries in (False, True):
        batch = collate(_examples(queries), tok.pad_token_id, padding_side="left")
        fused = cap.vectors(batch)
        head, cap._head = cap._head, None
        try:
            generic = cap.vectors(batch)
        finally:
            cap._head = head
        assert torch.allclose(fused, generic, rtol=1e-4, atol=1e-5 * generic.abs().max())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_autocast_is_close(arch):
    """The optional bf16 autocast runs and stays close to the fp32 vectors (not exact)."""
    model = gpt2() if arch == "gpt2" else llama()
    tracked = tracked_matrices(model)
    blocks = make_layout(tracked, kind="paper", dim=2048)
    batch = collate(_examples(), make_tokenizer().pad_token_id)
    exact = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0).vectors(batch)
    cap = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0, autocast=torch.bfloat16)
    approx = cap.vectors(batch)
    assert approx.dtype == torch.float32 and approx.shape == exact.shape
    cos = torch.nn.functional.cosine_similarity(approx, exact, dim=1)
    assert cos.min() > 0.98, cos


def test_throughput_bench_llama_path_runs():
    """bench/index_throughput.py's llama path (the one bench/gpu.sh runs at 8B on a GPU), tiny, on CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "index_throughput.py"
    spec = importlib.util.spec_from_file_location("index_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for dtype in (torch.float32, torch.bfloat16):
        r = bench.throughput("tiny", 1024, 4, 512, 1, arch="llama", device="cpu", dtype=dtype, max_len=48)
        assert r["train_tok_s"] > 0 and r["index_tok_s"] > 0 and r["dim"] <= 1024


def test_fused_activations_swap_and_restore():
    """Capture runs GPT-2's tanh-GELU as torch's fused kernel, and leaves the model as it was."""
    from transformers.activations import NewGELUActivation

    from tracestar.model import fused_activations

    model = gpt2()
    acts = [m for m in model.modules() if isinstance(m, NewGELUActivation)]
    assert len(acts) == model.config.n_layer
    x = torch.randn(4, 7, 32) * 3
    calls = []
    real_gelu = torch.nn.functional.gelu
    try:
        torch.nn.functional.gelu = lambda t, approximate="none": calls.append(approximate) or real_gelu(t, approximate=approximate)
        with fused_activations(model) as n:
            assert n == len(acts)
            fused = acts[0](x)
        assert calls == ["tanh"]  # the swapped module went through the fused kernel
        stock = acts[0](x)
        assert calls == ["tanh"]  # and the stock op chain is back after exit
    finally:
        torch.nn.functional.gelu = real_gelu
    assert all("forward" not in vars(m) for m in acts)
    assert torch.allclose(fused, stock, rtol=0, atol=1e-6)
    wrapped = lambda t: t  # noqa: E731 — an instance-level forward set by someone else stays in place
    acts[0].forward = wrapped
    with fused_activations(model) as n:
        assert n == len(acts) - 1 and acts[0].forward is wrapped
    assert acts[0].forward is wrapped


def test_sites_reading_one_input_share_a_stacked_projection():
    """q/k/v and gate/up read one tensor each: found before the first batch, projected together, and
    the vectors equal those of one projection per site (the plain path, with no groups)."""
    model = llama()
    tracked = tracked_matrices(model)
    blocks = make_layout(tracked, kind="module", dim=4096)  # a block per matrix: groups span blocks
    batch = collate(_examples(), make_tokenizer().pad_token_id)
    cap = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0)
    grouped = cap.vectors(batch)
    names = {frozenset(cap._sites[m][0].module_name.rsplit(".", 1)[1] for m in g.members) for g in cap._groups.values()}
    assert names == {frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"})}
    n_layers = model.config.num_hidden_layers
    assert len({id(g) for g in cap._groups.values()}) == 2 * n_layers
    plain = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0)
    plain._groups = {}  # found, and none: one projection per site
    want = plain.vectors(batch)
    assert torch.allclose(grouped, want, rtol=1e-5, atol=1e-6 * want.abs().max())
    # GPT-2 reads each input once (c_attn is one fused matrix): nothing to group
    g2 = gpt2()
    cap2 = FactoredCapture(g2, tracked_matrices(g2), make_layout(tracked_matrices(g2), dim=1024), identity(tracked_matrices(g2)), seed=0)
    cap2.vectors(batch)
    assert cap2._groups == {}


def test_a_group_whose_input_differs_falls_back_to_its_own_projection(monkeypatch):
    """The stacked projection is reused only for the very tensor it was made from."""
    import tracestar.capture as capture_mod

    model = llama()
    tracked = tracked_matrices(model)
    blocks = make_layout(tracked, kind="paper", dim=2048)
    batch = collate(_examples(), make_tokenizer().pad_token_id)
    want = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0).vectors(batch)
    cap = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0)
    cap._find_groups(batch)
    calls = {"stacked": 0}
    real = capture_mod._project

    def counting(mat, x):
        calls["stacked"] += mat.shape[0] > 32  # a stacked [Σk, n] matrix (each site's k is ≤ 32 here)
        return real(mat, x)

    monkeypatch.setattr(capture_mod, "_project", counting)
    k_proj = next(site.module for site, _ in cap._sites if site.module_name.endswith("0.self_attn.k_proj"))
    handle = k_proj.register_forward_pre_hook(lambda mod, args: (args[0].clone(),))  # k reads a copy of q's input
    try:
        got = cap.vectors(batch)
    finally:
        handle.remove()
    assert calls["stacked"] == 2 * model.config.num_hidden_layers  # groups still stacked; k_proj went alone
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max())


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_fused_head_in_several_chunks(monkeypatch, autocast):
    """The fused head gives the same vectors when its rows are split into many chunks."""
    import tracestar.capture as capture_mod

    model = llama()
    tracked = tracked_matrices(model)
    blocks = make_layout(tracked, kind="paper", dim=2048)
    batch = collate(_examples(), make_tokenizer().pad_token_id)
    cap = FactoredCapture(model, tracked, blocks, identity(tracked), seed=0, autocast=autocast)
    whole = cap.vectors(batch)
    assert capture_mod._head_chunk(torch.device("cpu"), 49152) >= 256  # a large vocabulary is not cut into 21-row chunks
    monkeypatch.setattr(capture_mod, "_head_chunk", lambda device, V: 3)
    chunked = cap.vectors(batch)
    tol = 1e-5 if autocast is None else 2e-2
    assert torch.allclose(chunked, whole, rtol=tol, atol=tol * whole.abs().max())


def test_estimated_v_is_the_mean_squared_gradient_fitted_by_row_and_column_means():
    """`estimate` keeps only row and column sums of g²; its scales equal the dense definition's."""
    from tracestar.normalizer import estimate, factored_scales

    model = llama()
    tracked = tracked_matrices(model)
    tok = make_tokenizer()
    batches = [collate([e], tok.pad_token_id) for e in _examples()]
    got = estimate(model, tracked, batches, forward_loss)
    dense = {t.name: torch.zeros(t.shape, dtype=torch.float64) for t in tracked}
    for b in batches:  # the definition: V = mean over documents of the squared gradient
        for p in model.parameters():
            p.requires_grad_(True)
        model.zero_grad()
        forward_loss(model, b).sum().backward()
        for t in tracked:
            dense[t.name] += t.param.grad.double() ** 2 / len(batches)
    for p in model.parameters():
        p.requires_grad_(False)
    for t in tracked:
        want = factored_scales(dense[t.name].mean(dim=1), dense[t.name].mean(dim=0))
        assert torch.allclose(got.scales[t.name].row, want.row, rtol=1e-5), t.name
        assert torch.allclose(got.scales[t.name].col, want.col, rtol=1e-5), t.name
    assert got.kind == "estimated"
