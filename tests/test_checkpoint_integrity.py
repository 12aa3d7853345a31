"""Corrupted weights never train: tensor checksums written with every checkpoint and verified when it is read
(``auto`` falls back to the previous good file), non-finite trainable weights refused at load, and an epoch whose
every step was skipped is a failure whatever its length."""

import zipfile
from pathlib import Path

import pytest
import torch

from lavis_xformer.checkpoints import (
    CheckpointError,
    find_resume_checkpoint,
    load_model_weights,
    read_checkpoint,
    save_checkpoint_atomically,
)
from lavis_xformer.runners.reliability import NonFiniteLossError, StepGuard


def _training_checkpoint(epoch: int) -> dict:
    torch.manual_seed(epoch)
    return {"model": {"weight": torch.randn(64, 64), "bias": torch.randn(64)},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(64, 64)}}, "param_groups": []}, "epoch": epoch}


def flip_bytes(path: Path, entry_suffix: str, count: int = 16) -> str:
    """Flip ``count`` bytes in the middle of the stored data of the first zip entry ending in ``entry_suffix``
    (torch stores tensor data uncompressed, so the flipped bytes are the tensor's; the zip CRC is not checked)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(entry_suffix))
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for offset in range(start, start + count):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return info.filename


def test_flipped_bytes_in_one_tensor_are_refused_naming_the_file_and_tensor(tmp_path):
    path = tmp_path / "checkpoint_0.pth"
    save_checkpoint_atomically(_training_checkpoint(0), path)
    assert read_checkpoint(str(path))["checksums"]["algorithm"] == "crc32"  # written with the file
    flip_bytes(path, "data/0")  # the first tensor saved: model.weight
    with pytest.raises(CheckpointError, match=r"corrupt.*model/weight") as err:
        read_checkpoint(str(path))
    assert str(path) in str(err.value)


def test_auto_falls_back_to_the_previous_good_checkpoint(tmp_path):
    good, bad = tmp_path / "checkpoint_0.pth", tmp_path / "checkpoint_1.pth"
    save_checkpoint_atomically(_training_checkpoint(0), good)
    save_checkpoint_atomically(_training_checkpoint(1), bad)
    flip_bytes(bad, "data/2")
    skipped = []
    path, checkpoint = find_resume_checkpoint(tmp_path, skipped=skipped)
    assert path == str(good) and checkpoint["epoch"] == 0
    assert skipped and skipped[0][0] == str(bad) and "checksums" in skipped[0][1]


def test_files_without_checksums_still_load(tmp_path):
    """LAVIS's own checkpoints and the plugin's older ones carry no checksums: read as before."""
    torch.save(_training_checkpoint(0), tmp_path / "lavis.pth")
    assert "checksums" not in read_checkpoint(str(tmp_path / "lavis.pth"))


def test_non_finite_trainable_weights_are_refused_at_load_frozen_ones_are_not_checked(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)  # frozen
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    before = model[1].weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"non-finite.*1\.weight") as err:
        load_model_weights(model, str(tmp_path / "nan.pth"))
    assert str(tmp_path / "nan.pth") in str(err.value)
    assert torch.equal(model[1].weight, before)  # refused before anything was loaded
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "frozen_inf.pth")
    load_model_weights(model, str(tmp_path / "frozen_inf.pth"))


def test_an_epoch_whose_every_step_was_skipped_fails_whatever_its_length():
    guard = StepGuard(max_consecutive=10)
    guard.start_epoch()
    guard.skipped(["loss=inf"], 0, 0, 0)
    with pytest.raises(NonFiniteLossError, match=r"every optimiser step of epoch 0 \(1\)"):
        guard.end_epoch(0)
    guard.start_epoch()
    guard.skipped(["loss=inf"], 1, 0, 1)
    guard.stepped()
    guard.end_epoch(1)  # one kept step: a bad batch, not a broken run
    guard.start_epoch()
    guard.end_epoch(2)  # no step at all (a run resumed at the epoch's end): nothing to judge
    restored = StepGuard()
    guard.skipped(["loss=nan"], 3, 0, 2)
    restored.load_state_dict(guard.state_dict())  # a resume inside the epoch keeps the count
    with pytest.raises(NonFiniteLossError):
        restored.end_epoch(3)
