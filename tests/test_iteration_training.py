"""runner_xformer's iteration mode (run.max_iters, iters_per_inner_epoch, train_dataset_ratios) with exact resume.

The runs are real ``python -m lavis_xformer.train`` subprocesses on the shapes data; "equal" is ``torch.equal`` on
every saved tensor.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from lavis_xformer.runners.logs import read_iteration_log
from lavis_xformer.runners.reliability import EpochLoader, MixedLoader
from lavis_xformer.runners.runner_xformer import RunnerXFormer, _iteration_mode
from test_reliability import (
    assert_same_training_state,
    child_env,
    epoch_stats,
    half_written,
    job_folder,
    kill_when,
    run_cli,
    train_args,
)


ITERATION_RUN = ("run.max_iters=8", "run.iters_per_inner_epoch=4", "run.checkpoint_every_iters=0")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


# =================================================================================================================
# Iteration mode
# =================================================================================================================
@pytest.fixture(scope="module")
def iteration_reference(data_root, tmp_path_factory):
    """8 iterations in 2 inner epochs of 4 (the data's epochs have 3 batches, so the two do not line up)."""
    out = tmp_path_factory.mktemp("iteration_reference")
    run_cli(train_args(data_root, out, *ITERATION_RUN), cwd=out)
    return job_folder(out)


def test_iteration_mode_runs_max_iters_in_inner_epochs(iteration_reference):
    job = iteration_reference
    assert sorted(p.name for p in job.glob("checkpoint*")) == ["checkpoint_0.pth", "checkpoint_1.pth"]
    from lavis_xformer.checkpoints import read_checkpoint

    trainer = read_checkpoint(str(job / "checkpoint_1.pth"))["trainer"]
    assert (trainer["epoch"], trainer["iteration"], trainer["iters_per_epoch"]) == (1, 4, 4)
    assert trainer["loader"] == {"epoch": 2, "position": 2}  # 8 batches = 2 data epochs of 3 + 2
    assert trainer["lr_scheduler"]["params"]["max_epoch"] == 2  # the schedule sees the inner epochs
    assert [line["iteration"] for line in read_iteration_log(job)] == list(range(1, 9))  # log_freq 1
    stats = epoch_stats(job)
    assert len(stats) == 2 and all(s["train_loaded_samples"] == 4 * 16 for s in stats)


def test_iteration_mode_resume_from_an_inner_epoch_end_is_bit_identical(iteration_reference, data_root, tmp_path):
    out = tmp_path / "out"
    output = run_cli(train_args(data_root, out, *ITERATION_RUN,
                                f"run.resume_ckpt_path={iteration_reference / 'checkpoint_0.pth'}"), cwd=tmp_path)
    assert "Start training epoch 0," not in output and "not bit-identical" not in output
    assert_same_training_state(job_folder(out) / "checkpoint_1.pth", iteration_reference / "checkpoint_1.pth")


def test_iteration_mode_sigkill_mid_inner_epoch_then_auto_resume_ends_where_uninterrupted_does(
        iteration_reference, data_root, tmp_path):
    """Killed while saving after iteration 6 (inner epoch 1, step 2), the run resumes (``auto``) from iteration 5,
    in the middle of the second data epoch, and ends bit-identical to the uninterrupted run."""
    out = tmp_path / "out"
    log_a = kill_when(train_args(data_root, out, *ITERATION_RUN, "run.checkpoint_every_iters=1"), tmp_path,
                      child_env(LAVIS_XFORMER_TEST_SAVE_DELAY="300@checkpoint_1_iter2.pth"),
                      half_written(out, "checkpoint_1_iter2.pth"), tmp_path / "a.log")
    assert "Saving checkpoint at epoch 1, iteration 2" in log_a
    output = run_cli(train_args(data_root, out, *ITERATION_RUN, "run.resume_ckpt_path=auto"), cwd=tmp_path)
    assert "resuming epoch 1 at iteration 1" in output and "Start training epoch 0," not in output
    (final,) = out.glob("*/checkpoint_1.pth")
    assert_same_training_state(final, iteration_reference / "checkpoint_1.pth")


def test_mixed_loader_draws_by_ratio_and_resumes_exactly():
    """Each batch comes from one dataset with the configured odds; after ``load_state_dict`` of a saved state a
    fresh loader continues with exactly the batches the original gives next."""
    def make():
        parts = [EpochLoader(list(range(start, start + 12)), batch_size=3, num_workers=0, collate_fn=list, seed=7)
                 for start in (0, 100)]
        return MixedLoader(parts, ratios=[3, 1], seed=7)

    loader = make()
    first = [next(loader) for _ in range(400)]
    from_a = sum(batch[0] < 100 for batch in first)
    assert 260 < from_a < 340  # 3:1 odds (expected 300, sd 8.7)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(10)]
    again = make()
    again.load_state_dict(json.loads(json.dumps(state)))  # plain ints: the checkpoint's weights_only load reads it
    assert [next(again) for _ in range(10)] == expected
    assert [next(make()) for _ in range(1)] == first[:1]


def test_iteration_settings_and_ratios_are_checked():
    def run_cfg(**items):
        return OmegaConf.create(items)

    assert _iteration_mode(run_cfg()) == (0, 0)
    assert _iteration_mode(run_cfg(max_iters=8, iters_per_inner_epoch=4)) == (8, 4)
    with pytest.raises(ValueError, match=r"run.max_iters=10 must be a positive multiple of run.iters_per_inner"):
        _iteration_mode(run_cfg(max_iters=10, iters_per_inner_epoch=4))
    with pytest.raises(ValueError, match=r"run.iters_per_inner_epoch=4 is set without run.max_iters"):
        _iteration_mode(run_cfg(iters_per_inner_epoch=4))
    with pytest.raises(ValueError, match=r"train_dataset_ratios needs an iteration-based run"):
        _iteration_mode(run_cfg(train_dataset_ratios={"a": 1}))

    runner = object.__new__(RunnerXFormer)
    runner.datasets = {"coco": {"train": [], "val": []}, "vg": {"train": []}, "eval_only": {"test": []}}
    runner.config = SimpleNamespace(run_cfg=run_cfg(train_dataset_ratios={"vg": 1, "coco": 3}))
    assert runner._ordered_train_ratios() == [3.0, 1.0]  # LAVIS's concatenation order, not the yaml's
    runner.config = SimpleNamespace(run_cfg=run_cfg(train_dataset_ratios={"vg": 1, "eval_only": 3}))
    with pytest.raises(ValueError, match=r"not train datasets: \['eval_only'\]; without a ratio: \['coco'\]"):
        runner._ordered_train_ratios()


class _Numbers(torch.utils.data.Dataset):
    """A map-style dataset of (name, index) samples whose collater tags the batch with the dataset's name."""

    def __init__(self, name, size):
        self.name, self.size = name, size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return index

    def collater(self, samples):
        return {"source": self.name, "indices": samples}


def test_train_dataset_ratios_give_each_train_dataset_its_loader_and_collater():
    """Through LAVIS's ``dataloaders`` (which concatenates the train datasets): the runner splits the concatenation
    back into one EpochLoader per dataset, each with its own collater, mixed with the configured ratios."""
    runner = object.__new__(RunnerXFormer)
    runner.datasets = {"small": {"train": _Numbers("small", 12), "val": _Numbers("val", 4)},
                       "large": {"train": _Numbers("large", 48)}}
    runner.config = SimpleNamespace(run_cfg=OmegaConf.create({
        "train_dataset_ratios": {"small": 1, "large": 3}, "train_splits": ["train"], "valid_splits": ["val"],
        "batch_size_train": 4, "batch_size_eval": 4, "num_workers": 0, "seed": 5, "distributed": False,
        "device": "cpu"}))
    runner._device, runner._dataloaders = torch.device("cpu"), None
    loaders = runner.dataloaders
    train = loaders["train"]
    assert isinstance(train, MixedLoader) and train.ratios == [0.25, 0.75]
    assert [len(loader) for loader in train.loaders] == [3, 12]
    batches = [next(train) for _ in range(200)]
    assert {b["source"] for b in batches} == {"small", "large"}
    assert 20 < sum(b["source"] == "small" for b in batches) < 80  # 1:3 odds (expected 50, sd 6)
    assert all(len(b["indices"]) == 4 for b in batches)
    assert loaders["val"] is not None and not isinstance(loaders["val"], MixedLoader)
