"""Optimizer states as real training code writes them: each entry reaches its own parameter, or stops.

Every format is written by the real tool (HF `Trainer`, accelerate, torch.distributed.checkpoint
through a one-process gloo group, named-parameter torch optimizers, torch / HF Adafactor) on tiny
random models, and V is compared with the live optimizer's state of the *same parameter object*,
which involves no mapping at all. A state re-keyed by hand to `model.parameters()` order must give
the same V and the same vectors.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

import tiny
from tracestar.api import build_index, open_index
from tracestar.errors import UserError
from tracestar.model import load_model, tracked_matrices
from tracestar.normalizer import from_optimizer_state
from tracestar.optim_state import NoSecondMoment, from_state_dict, read, trainer_groups

ATTN = re.compile(r"(self_attn\.[qkvo]_proj|attn\.c_attn|attn\.c_proj)\.weight$")  # q/k/v/o matrices
BETA2 = 0.999


def _model(arch: str, seed: int = 0):
    return tiny.gpt2(seed) if arch == "gpt2" else tiny.llama(seed)


def _loss(model, text: str) -> torch.Tensor:
    ids = torch.tensor([tiny.make_tokenizer()(text)["input_ids"] + [1]])
    return model(input_ids=ids, labels=ids).loss


def _train(model, opt, steps: int = 3) -> None:
    model.train()
    for text in (tiny.FACTS + tiny.FILLER)[:steps]:
        opt.zero_grad()
        _loss(model, text).backward()
        opt.step()
    model.eval()


def _bias_corrected(live: dict) -> torch.Tensor:
    return live["exp_avg_sq"].double() / (1.0 - BETA2 ** int(live["step"]))


def _rekeyed(model, live_state_of, path, **hyper) -> None:
    """The live state saved by hand as one group in `model.parameters()` order (no mapping code involved)."""
    params = list(model.parameters())
    state = {i: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in live_state_of(p).items()}
             for i, p in enumerate(params) if live_state_of(p)}
    torch.save({"state": state, "param_groups": [{**hyper, "params": list(range(len(params)))}]}, path)


def _scales_equal(a, b) -> None:
    assert a.scales.keys() == b.scales.keys()
    for name in a.scales:
        assert torch.equal(a.scales[name].row, b.scales[name].row), name
        assert torch.equal(a.scales[name].col, b.scales[name].col), name


# --- HF Trainer ---------------------------------------------------------------------------------


def _collate(rows: list[dict]) -> dict:
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, tmp_path_factory):
    """(arch, trainer, checkpoint dir): four real `Trainer` steps of AdamW with weight decay 0.1."""
    from transformers import Trainer, TrainingArguments

    tok = tiny.make_tokenizer()
    rows = [{"input_ids": tok(t)["input_ids"] + [1]} for t in tiny.FACTS + tiny.FILLER]
    out = tmp_path_factory.mktemp(f"trainer-{request.param}")
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, save_steps=4,
                             learning_rate=1e-2, weight_decay=0.1, adam_beta2=BETA2, use_cpu=True, report_to="none",
                             logging_steps=100, disable_tqdm=True, seed=0)
    trainer = Trainer(model=_model(request.param), args=args, train_dataset=rows, data_collator=_collate,
                      processing_class=tok)
    trainer.train()
    trainer.model.eval()
    return request.param, trainer, out / "checkpoint-4"


def test_trainer_checkpoint_maps_by_trainer_groups(trained):
    arch, trainer, ckpt = trained
    model, _ = load_model(ckpt)
    live = dict(trainer.model.named_parameters())
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    position = {id(p): i for i, p in enumerate(model.parameters())}  # the old assumption: state index = this
    names = [n for n, _ in model.named_parameters()]
    checked = silent = 0
    for where in (ckpt, ckpt / "optimizer.pt"):
        state = read(where, model)
        assert (state.optimizer, state.mapping, state.step) == ("adamw", "trainer-groups", 4)
        assert [g["weight_decay"] for g in state.groups] == [0.1, 0.0]
        for name in names:
            if not ATTN.search(name):
                continue
            right = trainer.optimizer.state[live[name]]  # the in-memory state of THAT parameter
            got = state.second_moment(name).full
            assert got.shape == right["exp_avg_sq"].shape
            assert torch.allclose(got, _bias_corrected(right), rtol=1e-12, atol=0), name
            checked += 1
            # What the old model.parameters()-order reading took for it: another parameter's state.
            wrong = sd["state"][position[id(dict(model.named_parameters())[name])]]["exp_avg_sq"]
            if int(re.search(r"\.(\d+)\.", name).group(1)) > 0:  # llama's layer 0 comes before the first norm
                assert wrong.shape != right["exp_avg_sq"].shape or not torch.equal(wrong, right["exp_avg_sq"]), name
    assert checked == 2 * (4 if arch == "gpt2" else 8)
    # Where shapes only coincide by element count, the old reshape read another matrix silently.
    for i, name in enumerate(names):
        entry = sd["state"].get(i, {}).get("exp_avg_sq")
        right = trainer.optimizer.state[live[name]]["exp_avg_sq"]
        if entry is not None and entry.numel() == right.numel() and not torch.equal(entry.reshape(right.shape), right):
            silent += 1
    if arch == "llama":
        assert silent > 0  # layer 1's gate_proj [48, 32] got down_proj's [32, 48] state, reshaped without a word


def test_trainer_checkpoint_index_equals_rekeyed_by_hand(trained, tmp_path):
    from tracestar.cli import main

    arch, trainer, ckpt = trained
    corpus = tiny.write_corpus(tmp_path / "corpus.jsonl", tiny.FACTS + tiny.FILLER)
    opts = ["--proj-dim", "1024", "--preconditioner", "none", "--quiet"]
    assert main(["index", "--model", str(ckpt), "--corpus", str(corpus), "--out", str(tmp_path / "a"),
                 "--optimizer-state", str(ckpt), *opts]) == 0
    hand = tmp_path / "rekeyed.pt"
    _rekeyed(trainer.model, lambda p: trainer.optimizer.state.get(p, {}), hand, betas=(0.9, BETA2))
    build_index(ckpt, corpus, tmp_path / "b", optimizer_state=str(hand), proj_dim=1024, preconditioner="none", quiet=True)
    a, b = open_index(tmp_path / "a"), open_index(tmp_path / "b")
    assert a.manifest["normalizer"]["mapping"] == "trainer-groups"
    assert a.manifest["normalizer"]["optimizer"] == "adamw" and a.manifest["normalizer"]["step"] == 4
    assert b.manifest["normalizer"]["mapping"] == "parameter-order"
    _scales_equal(a.normalizer, b.normalizer)
    va, vb = tiny.all_vectors(a), tiny.all_vectors(b)
    assert va.shape == vb.shape and np.allclose(va, vb, atol=2e-3)


def test_sharded_trainer_checkpoint(trained, tmp_path):
    """The weights as sharded safetensors with an index JSON: the directory still reads as one checkpoint."""
    import shutil

    arch, trainer, ckpt = trained
    sharded = tmp_path / "checkpoint-4"
    shutil.copytree(ckpt, sharded)
    (sharded / "model.safetensors").unlink()
    trainer.model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*.safetensors"))) > 1
    model, _ = load_model(sharded)
    state = read(sharded, model)
    assert state.mapping == "trainer-groups" and state.files == [str((sharded / "optimizer.pt").resolve())]
    live = dict(trainer.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, live[name].detach())
        assert torch.equal(state.second_moment(name).full, _bias_corrected(trainer.optimizer.state[live[name]]))


def test_tailpatch_step_is_the_checkpoints_adamw_step(trained):
    from tracestar.evaluate.tailpatch import TailPatcher, _encode_document

    arch, trainer, ckpt = trained
    patcher = TailPatcher.from_dir(ckpt)
    assert (patcher.optimizer_kind, patcher.mapping, patcher.step_count) == ("adamw", "trainer-groups", 4)
    assert patcher.lr == pytest.approx(1e-2) and patcher.lr_source.startswith("initial_lr")  # the schedule ended at 0
    assert isinstance(patcher.optimizer, torch.optim.AdamW)
    doc = _encode_document(patcher.tokenizer, tiny.FACTS[0], None)
    before = {n: p.detach().clone() for n, p in patcher.model.named_parameters()}
    patcher.step(doc)
    after = {n: p.detach().clone() for n, p in patcher.model.named_parameters()}
    patcher.restore()
    # The reference: Trainer's own torch AdamW, in memory, one step on the same document.
    ref_model = copy.deepcopy(trainer.model)
    live = dict(trainer.model.named_parameters())
    ref_params = dict(ref_model.named_parameters())
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    ref = torch.optim.AdamW([{"params": [ref_params[_name_of(live, p)] for p in g["params"]]} for g in inner.param_groups])
    sd = copy.deepcopy(inner.state_dict())
    for g in sd["param_groups"]:
        g["lr"] = patcher.lr
    ref.load_state_dict(sd)
    ids = torch.tensor([doc])
    ref_model.zero_grad()
    logits = ref_model(input_ids=ids).logits.float()
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    ref.step()
    moved = 0
    for name, p in ref_model.named_parameters():
        assert torch.allclose(after[name], p.detach(), atol=1e-6, rtol=0), name
        moved += int(not torch.equal(after[name], before[name]))
    assert moved == len(before)  # every parameter moved, decayed or not
    assert all(torch.equal(p, before[n]) for n, p in patcher.model.named_parameters())  # and was put back


def _name_of(named: dict, param) -> str:
    return next(n for n, p in named.items() if p is param)


def test_trainer_group_rule_matches_installed_transformers():
    from transformers import Trainer

    for arch in ("gpt2", "llama"):
        model = _model(arch)
        installed = set(Trainer.get_decay_parameter_names(None, model))
        decay, rest = trainer_groups(model)
        assert decay and rest
        assert set(decay) == {n for n, _ in model.named_parameters() if n in installed}
        assert not set(rest) & installed


# --- named parameters, accelerate, DCP ----------------------------------------------------------


def test_named_parameter_optimizer_maps_by_names(tmp_path):
    model = tiny.llama()
    shuffled = list(model.named_parameters())[::-1]  # an order no positional rule would guess
    opt = torch.optim.AdamW(shuffled, lr=1e-2, weight_decay=0.1, betas=(0.9, BETA2))
    _train(model, opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = read(tmp_path / "opt.pt", model)
    assert (state.optimizer, state.mapping, state.step) == ("adamw", "names", 3)
    for name, p in model.named_parameters():
        assert torch.equal(state.second_moment(name).full, _bias_corrected(opt.state[p])), name
    _rekeyed(model, lambda p: opt.state.get(p, {}), tmp_path / "hand.pt", betas=(0.9, BETA2))
    tracked = tracked_matrices(model)
    _scales_equal(from_optimizer_state(tmp_path / "opt.pt", model, tracked),
                  from_optimizer_state(tmp_path / "hand.pt", model, tracked))
    # Without its names, the reversed order fits no rule: refused, naming a parameter and both shapes.
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    for g in sd["param_groups"]:
        del g["param_names"]
    # (entry 0, lm_head, fits embed_tokens by shape; entry 1, the final norm, does not fit q_proj)
    with pytest.raises(UserError, match=r"entry 1 .*'model\.layers\.0\.self_attn\.q_proj\.weight'\) has exp_avg "
                                        r"of shape \[32\]; the parameter is \[32, 32\]"):
        from_state_dict(sd, model)


def test_accelerate_save_state(tmp_path):
    from accelerate import Accelerator

    model = tiny.llama()
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, BETA2))
    model, opt = acc.prepare(model, opt)
    model.train()
    for text in tiny.FACTS[:3]:
        opt.zero_grad()
        acc.backward(_loss(model, text))
        opt.step()
    acc.save_state(str(tmp_path / "state"))
    assert (tmp_path / "state" / "optimizer.bin").is_file()
    fresh = tiny.llama()
    state = read(tmp_path / "state", fresh)
    assert (state.optimizer, state.mapping, state.step) == ("adamw", "parameter-order", 3)
    live = dict(model.named_parameters())
    for name, _ in fresh.named_parameters():
        assert torch.equal(state.second_moment(name).full, _bias_corrected(opt.state[live[name]])), name


def test_dcp_directory_from_fsdp2(tmp_path):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = tiny.llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, BETA2))
        _train(model, opt)
        dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=str(tmp_path / "nested"))
        flat = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
        dcp.save({"optim": flat}, checkpoint_id=str(tmp_path / "flat"))
        live = {n: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in opt.state[p].items()}
                for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
    fresh = tiny.llama()
    _rekeyed(fresh, lambda p: live[_name_of(dict(fresh.named_parameters()), p)], tmp_path / "hand.pt", betas=(0.9, BETA2))
    tracked = tracked_matrices(fresh)
    by_hand = from_optimizer_state(tmp_path / "hand.pt", fresh, tracked)
    for where in ("nested", "flat"):
        state = read(tmp_path / where, fresh)
        assert (state.optimizer, state.mapping, state.step) == ("adamw", "names", 3), where
        for name in live:
            assert torch.equal(state.second_moment(name).full, _bias_corrected(live[name])), (where, name)
        _scales_equal(from_optimizer_state(tmp_path / where, fresh, tracked), by_hand)


# --- Adafactor, and the step it takes -----------------------------------------------------------


def _adafactor(kind: str, params):
    if kind == "torch":
        return torch.optim.Adafactor(params, lr=1e-2)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


@pytest.mark.parametrize("kind", ["torch", "hf"])
def test_adafactor_states_and_step(kind, tmp_path):
    from tracestar.evaluate.tailpatch import TailPatcher, _encode_document

    model = tiny.gpt2()
    opt = _adafactor(kind, model.parameters())
    _train(model, opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = read(tmp_path / "opt.pt", model)
    assert (state.optimizer, state.mapping) == ({"torch": "adafactor", "hf": "hf_adafactor"}[kind], "parameter-order")
    row_key, col_key = ("row_var", "col_var") if kind == "torch" else ("exp_avg_sq_row", "exp_avg_sq_col")
    for t in tracked_matrices(model):
        v = state.second_moment(t.name)
        assert torch.equal(v.row.flatten(), opt.state[t.param][row_key].flatten()), t.name
        assert torch.equal(v.col.flatten(), opt.state[t.param][col_key].flatten()), t.name
    norm = from_optimizer_state(tmp_path / "opt.pt", model, tracked_matrices(model))
    assert norm.kind == {"torch": "torch_adafactor", "hf": "hf_adafactor"}[kind]
    # tail-patch replays this optimizer: the same step as the class itself with the loaded state
    ref_model = copy.deepcopy(model)
    patcher = TailPatcher(model, tiny.make_tokenizer(), optimizer_state=tmp_path / "opt.pt")
    assert type(patcher.optimizer) is type(opt) and patcher.lr == pytest.approx(1e-2)
    doc = _encode_document(patcher.tokenizer, tiny.FACTS[1], None)
    patcher.step(doc)
    ref = _adafactor(kind, ref_model.parameters())
    ref.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    ids = torch.tensor([doc])
    logits = ref_model(input_ids=ids).logits.float()
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    ref.step()
    for (name, p), q in zip(patcher.model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name
    patcher.restore()


# --- no second moment, wrong states -------------------------------------------------------------


def test_sgd_stops_or_estimates(world, tmp_path):
    from tracestar.cli import main

    model, _ = load_model(world["model"])
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    _train(model, opt)
    torch.save(opt.state_dict(), tmp_path / "sgd.pt")
    out = tmp_path / "idx"
    with pytest.raises(NoSecondMoment, match="SGD state keeps no second moment.*--estimate-v-if-missing"):
        build_index(world["model"], world["corpus"], out, optimizer_state=str(tmp_path / "sgd.pt"), proj_dim=1024,
                    preconditioner="none", quiet=True)
    assert not out.exists()
    build_index(world["model"], world["corpus"], out, optimizer_state=str(tmp_path / "sgd.pt"), proj_dim=1024,
                preconditioner="none", estimate_v_if_missing=True, quiet=True)
    info = json.loads((out / "manifest.json").read_text())["normalizer"]
    assert info["kind"] == "estimated" and info["v_missing"] == "estimated"
    assert info["optimizer"] == "sgd" and info["mapping"] == "parameter-order"
    assert info["optimizer_state"] == str((tmp_path / "sgd.pt").resolve())
    assert main(["index", "--model", str(world["model"]), "--corpus", str(world["corpus"]), "--out",
                 str(tmp_path / "cli"), "--optimizer-state", str(tmp_path / "sgd.pt"), "--quiet"]) == 2
    assert not (tmp_path / "cli").exists()


def test_lion_is_told_by_its_keys():
    model = tiny.gpt2()
    params = list(model.parameters())
    sd = {"state": {i: {"exp_avg": torch.zeros_like(p)} for i, p in enumerate(params)},
          "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "params": list(range(len(params)))}]}
    state = from_state_dict(sd, model)
    assert state.optimizer == "lion" and not state.has_second_moment
    with pytest.raises(NoSecondMoment, match="Lion state keeps no second moment"):
        from_optimizer_state(state, model, tracked_matrices(model))


def test_permuted_or_short_state_is_refused_and_nothing_written(world, tmp_path):
    model, _ = load_model(world["model"])
    sd = torch.load(world["optimizer"], weights_only=True)
    n = len(sd["param_groups"][0]["params"])
    permuted = {"state": {n - 1 - i: st for i, st in sd["state"].items()}, "param_groups": sd["param_groups"]}
    torch.save(permuted, tmp_path / "permuted.pt")
    out = tmp_path / "idx"
    with pytest.raises(UserError) as err:
        build_index(world["model"], world["corpus"], out, optimizer_state=str(tmp_path / "permuted.pt"), proj_dim=1024,
                    quiet=True)
    msg = str(err.value)
    assert "\n" not in msg and not out.exists()
    name = re.search(r"'([^']+)'", msg).group(1)
    shapes = re.findall(r"\[[\d, ]+\]", msg)
    assert len(shapes) == 2 and shapes[1] == str(list(dict(model.named_parameters())[name].shape)), msg
    short = {"state": {i: sd["state"][i] for i in range(n - 1)},
             "param_groups": [{**sd["param_groups"][0], "params": list(range(n - 1))}]}
    with pytest.raises(UserError, match=f"lists {n - 1} parameters, the model has {n}"):
        from_state_dict(short, model)


class _Toy(torch.nn.Module):
    """Two bias-free linears around a LayerNorm whose weight is also [4, 4]: shapes cannot tell
    Trainer's grouping from parameter order."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(4, 4, bias=False)
        self.norm = torch.nn.LayerNorm([4, 4])
        self.second = torch.nn.Linear(4, 4, bias=False)


def test_ambiguous_mapping_is_refused_unless_trainer_wrote_it(tmp_path):
    model = _Toy()
    decay, rest = trainer_groups(model)
    assert (decay, rest) == (["first.weight", "second.weight"], ["norm.weight", "norm.bias"])
    sd = {"state": {i: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(4, 4), "exp_avg_sq": torch.full((4, 4), float(i))}
                    for i in range(4)},
          "param_groups": [{"lr": 1e-3, "betas": (0.9, BETA2), "weight_decay": 0.1, "params": [0, 1]},
                           {"lr": 1e-3, "betas": (0.9, BETA2), "weight_decay": 0.0, "params": [2, 3]}]}
    with pytest.raises(UserError, match=r"ambiguous.*entry 1 is 'second\.weight' \[4, 4\] by trainer-groups but "
                                        r"'norm\.weight' \[4, 4\] by parameter-order"):
        from_state_dict(sd, model)
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    torch.save(sd, ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text("{}")
    state = read(ckpt, model)
    assert state.mapping == "trainer-groups"
    assert float(state.entries["second.weight"]["exp_avg_sq"][0, 0]) == 1.0
