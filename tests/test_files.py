"""The one atomic-write helper: old file or new file, never half of one, and its fault seam."""

from __future__ import annotations

import errno
import hashlib
import json

import numpy as np
import pytest

from tracestar import files


def _disk_full(tmp, target):
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp))


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if files.TMP_MARK in p.name)


def test_a_fault_before_the_rename_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "info.json"
    files.write_json(target, {"v": 1})
    monkeypatch.setattr(files, "before_replace", _disk_full)
    with pytest.raises(OSError) as exc:
        files.write_json(target, {"v": 2})
    assert exc.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"v": 1}
    assert _leftovers(target.parent) == []


def test_an_error_while_writing_leaves_no_file(tmp_path):
    target = tmp_path / "rows.jsonl"

    def rows():
        yield {"id": "a"}
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="producer"):
        files.write_jsonl(target, rows())
    assert not target.exists() and _leftovers(tmp_path) == []


def test_the_temporary_name_is_beside_the_target_and_marked(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(files, "before_replace", lambda tmp, target: seen.append((tmp, target, tmp.read_bytes())))
    files.write_bytes(tmp_path / "shard-00001.npy", b"abc")
    (tmp, target, data), = seen
    assert tmp.parent == target.parent and tmp.name.startswith("shard-00001.npy" + files.TMP_MARK)
    assert data == b"abc" and target.read_bytes() == b"abc" and not tmp.exists()


def test_text_is_utf8_with_newline_line_ends(tmp_path):
    target = tmp_path / "t.jsonl"
    files.write_jsonl(target, [{"city": "Zürich"}, {"city": "Kraków"}])
    assert target.read_bytes() == '{"city": "Zürich"}\n{"city": "Kraków"}\n'.encode()
    files.write_json(tmp_path / "a.json", {"city": "Zürich"})
    assert (tmp_path / "a.json").read_bytes() == b'{\n  "city": "Z\\u00fcrich"\n}\n'


def test_write_npy_returns_the_sha256_of_its_bytes(tmp_path):
    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    sha = files.write_npy(tmp_path / "x.npy", x)
    assert sha == hashlib.sha256((tmp_path / "x.npy").read_bytes()).hexdigest()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)


def test_sha256_file_across_chunk_boundaries(tmp_path):
    data = bytes(range(256)) * 5 + b"tail"
    (tmp_path / "b").write_bytes(data)
    assert files.sha256_file(tmp_path / "b", chunk=7) == hashlib.sha256(data).hexdigest()


def test_a_build_that_hits_a_full_disk_leaves_nothing_behind(world, tmp_path, monkeypatch):
    from tracestar.api import build_index

    def full_for_shards(tmp, target):
        if target.suffix == ".npy":
            _disk_full(tmp, target)

    monkeypatch.setattr(files, "before_replace", full_for_shards)
    out = tmp_path / "new" / "index"
    with pytest.raises(OSError) as exc:
        build_index(world["model"], world["corpus"], out, optimizer_state=world["optimizer"], proj_dim=256,
                    shard_docs=4, quiet=True)
    assert exc.value.errno == errno.ENOSPC
    assert not (tmp_path / "new").exists()  # no build.json, no V, no temporary shard


def test_safetensors_with_several_metadata_keys_are_the_same_bytes_on_every_write(tmp_path):
    # safetensors orders a metadata map by hash: with two or more keys, unfolded, about half of
    # these writes would differ from the first.
    import torch
    from safetensors import safe_open

    tensors = {"b.row": torch.arange(6, dtype=torch.float32), "a.col": torch.ones(3, 2)}
    meta = {"kind": "adafactor", "source": "ckpt/optimizer.pt", "extra": "x", "more": "y"}
    digests = set()
    for i in range(12):
        path = tmp_path / f"n{i}.safetensors"
        files.write_safetensors(path, tensors, metadata=meta)
        digests.add(files.sha256_file(path))
    assert len(digests) == 1
    with safe_open(str(tmp_path / "n0.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["tracestar"]) == meta
        assert torch.equal(fh.get_tensor("b.row"), tensors["b.row"])
