"""``common.atomic``: the one atomic writer, used by the comparison's files and by checkpoints."""

import json

import pytest
import torch

from lavis_xformer.checkpoints import save_checkpoint_atomically
from lavis_xformer.common.atomic import atomic_write, atomic_write_json, atomic_write_text


def test_a_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "sub" / "file.txt", "old")

    def half_then_fail(handle):
        handle.write(b"new, but only hal")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_json_round_trips_and_the_named_temporary_is_used(tmp_path):
    target = atomic_write_json(tmp_path / "a.json", {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    seen = []
    atomic_write(target, lambda handle: seen.append(handle.name) or handle.write(b"{}"), tmp_path=tmp_path / "x.tmp")
    assert seen == [str(tmp_path / "x.tmp")] and target.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_checkpoints_save_through_it(tmp_path):
    path = save_checkpoint_atomically({"w": torch.arange(3)}, tmp_path / "checkpoint_0.pth")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_0.pth"]
