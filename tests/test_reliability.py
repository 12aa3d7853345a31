"""Reliability: bad data, non-finite losses, interrupted runs and saves, exact resume, unsafe checkpoints, bad configs.

The training runs are real ``python -m lavis_xformer.train`` subprocesses (tiny X-Former, 48 shapes images, batch 16:
3 steps per epoch) that are killed with SIGKILL where a cluster would kill them; "equal" means ``torch.equal`` on
every saved tensor (weights and optimizer state), i.e. bit-identical on this CPU.
"""

import json
import logging
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from lavis_xformer import launch
from lavis_xformer.checkpoints import CheckpointError, checkpoint_progress, find_resume_checkpoint, read_checkpoint
from lavis_xformer.checkpoints import main as checkpoints_main
from lavis_xformer.datasets import shapes
from lavis_xformer.datasets.robust import RobustDataset
from lavis_xformer.runners import reliability
from lavis_xformer.runners.reliability import NonFiniteLossError, StepGuard
from lavis_xformer.runners.runner_xformer import RunnerXFormer, make_train_datasets_robust
from helpers import DEMO_TRAIN, shapes_options, subprocess_env
from test_robust_data import BAD_KINDS, GOOD_KINDS, write_dataset

SIZES = dict(num_train=48, num_val=4, num_test=8)  # 48 / batch 16 = 3 steps per epoch
BUILDER = "xformer_shapes_caption"


def train_args(data_root, output_dir, *options, sizes=SIZES):
    return [
        sys.executable, "-m", "lavis_xformer.train", "--cfg-path", str(DEMO_TRAIN), "--options",
        *shapes_options(BUILDER, data_root, **sizes),
        "run.max_epoch=3", "run.batch_size_train=16", "run.log_freq=1", "run.warmup_steps=2",
        "run.checkpoint_every_iters=2", f"run.output_dir={output_dir}", *options,
    ]


def child_env(**extra):
    """helpers.subprocess_env with one OpenMP thread per process: on a 2-core machine shared with
    other processes, two spinning OpenMP threads per process make a step ~50x slower (measured: 4.7 s vs 0.08 s).
    Every run of this file uses it, so the runs compared bit for bit use the same thread count."""
    return dict(subprocess_env(), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def run_cli(args, cwd, timeout=240):
    result = subprocess.run(args, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed ({result.returncode}):\n{output[-6000:]}"
    return output


def run_failing(args, cwd, timeout=240):
    result = subprocess.run(args, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"expected a failure:\n{output[-4000:]}"
    return output


def job_folder(output_dir: Path) -> Path:
    (job,) = [p for p in output_dir.iterdir() if p.is_dir()]
    return job


def final_checkpoint(output_dir: Path) -> Path:
    """The one checkpoint_2.pth under ``output_dir`` (LAVIS's job id has a 10-minute resolution, so a resumed run
    may write into the interrupted run's job folder or into a new one)."""
    (path,) = output_dir.glob("*/checkpoint_2.pth")
    return path


def epoch_stats(job: Path):
    """The per-epoch lines of a job's log.txt (``runners.logs``: kind "epoch")."""
    return [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if '"kind": "epoch"' in line]


def assert_same_training_state(a_path, b_path):
    a, b = (read_checkpoint(str(p)) for p in (a_path, b_path))
    assert a["model"].keys() == b["model"].keys()
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differing, f"{len(differing)} of {len(a['model'])} tensors differ: {differing[:5]}"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[p][k], state_b[p][k]) for p in state_a for k in state_a[p])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The uninterrupted run: 3 epochs x 3 steps (mid-epoch checkpoints every 2 steps, as the killed runs)."""
    out = tmp_path_factory.mktemp("reference")
    run_cli(train_args(data_root, out), cwd=out)
    return job_folder(out)


# =================================================================================================================
# Exact resume
# =================================================================================================================
def test_uninterrupted_run_keeps_only_epoch_checkpoints(reference):
    assert sorted(p.name for p in reference.glob("checkpoint*")) == [f"checkpoint_{e}.pth" for e in range(3)]
    checkpoint = read_checkpoint(str(reference / "checkpoint_2.pth"))
    trainer = checkpoint["trainer"]
    assert (trainer["epoch"], trainer["iteration"], trainer["complete"]) == (2, 3, True)
    rng = trainer["ranks"][0]["rng"]
    assert set(rng) == {"python", "numpy", "torch", "cuda"} and rng["python"]["state"].numel() == 625
    assert trainer["data"] == {"seed": 42, "batch_size": 16, "order": "EpochLoader"}
    assert trainer["lr_scheduler"]["params"]["max_epoch"] == 3


def test_resume_from_end_of_epoch_is_bit_identical(reference, data_root, tmp_path):
    """Epoch 0 of the reference run, then 2 more epochs in another process (``run.resume_ckpt_path``) == 3 epochs
    uninterrupted (the killed runs below also check that epoch 0 itself is the same in every process)."""
    out = tmp_path / "out"
    output = run_cli(train_args(data_root, out, f"run.resume_ckpt_path={reference / 'checkpoint_0.pth'}"),
                     cwd=tmp_path)
    assert "Start training epoch 0," not in output and "settings that differ" not in output
    job = job_folder(out)
    assert sorted(p.name for p in job.glob("checkpoint*")) == ["checkpoint_1.pth", "checkpoint_2.pth"]
    assert_same_training_state(job / "checkpoint_2.pth", reference / "checkpoint_2.pth")


def kill_when(args, cwd, env, ready, log_path, timeout=240):
    """Start ``args``; SIGKILL it as soon as ``ready(log_text)`` is true; return the log."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and process.poll() is None:
                if ready(Path(log_path).read_text()):
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            process.kill()
            process.wait(timeout=60)
    text = Path(log_path).read_text()
    assert process.returncode == -signal.SIGKILL, f"not killed (exit {process.returncode}):\n{text[-4000:]}"
    return text


def half_written(out, name):
    """The predicate "a save of ``name`` is under way and has bytes on disk" (the test hook stalls it there)."""
    return lambda _log: any(p.stat().st_size > 0 for p in out.glob(f"*/{name}.tmp-*"))


def test_sigkill_mid_epoch_and_mid_save_then_resume_ends_where_uninterrupted_does(reference, data_root, tmp_path):
    """A: killed in the middle of epoch 1, while writing its second mid-epoch checkpoint (mid-epoch checkpoints
    after every step; the test hook stalls that save half-written, so the kill lands there every time).
    B: resumes A (``auto``) from its first mid-epoch checkpoint, and is killed while writing checkpoint_2 at the end
    of the run. C: resumes B (``auto``) from the end of epoch 1. Every committed checkpoint stays loadable, torn files
    are refused and then removed, nothing is redone, and C ends bit-identical to the uninterrupted reference."""
    out = tmp_path / "out"
    log_a = kill_when(train_args(data_root, out, "run.checkpoint_every_iters=1"), tmp_path,
                      child_env(LAVIS_XFORMER_TEST_SAVE_DELAY="300@checkpoint_1_iter2.pth"),
                      half_written(out, "checkpoint_1_iter2.pth"), tmp_path / "a.log")
    assert "Saving checkpoint at epoch 1, iteration 2" in log_a
    committed = sorted(p.name for p in out.glob("*/checkpoint_*.pth"))
    assert committed == ["checkpoint_0.pth", "checkpoint_1_iter1.pth"], committed  # older mid-epoch ones pruned
    for path in out.glob("*/checkpoint_*.pth"):
        assert read_checkpoint(str(path))["trainer"]  # every committed checkpoint loads (weights_only)
    assert_same_training_state(next(out.glob("*/checkpoint_0.pth")), reference / "checkpoint_0.pth")
    mid_epoch = next(out.glob("*/checkpoint_1_iter1.pth"))
    (torn_a,) = out.glob("*/checkpoint_1_iter2.pth.tmp-*")

    log_b = kill_when(train_args(data_root, out, "run.resume_ckpt_path=auto", "run.checkpoint_every_iters=0"),
                      tmp_path, child_env(LAVIS_XFORMER_TEST_SAVE_DELAY="300@checkpoint_2.pth"),
                      half_written(out, "checkpoint_2.pth"), tmp_path / "b.log")
    assert f"resume: auto -> {mid_epoch}" in log_b and "resuming epoch 1 at iteration 1" in log_b
    assert "Start training epoch 0," not in log_b  # nothing before the checkpoint was redone
    assert "a save that was interrupted" in log_b and not torn_a.exists()
    assert not list(out.glob("*/checkpoint_2.pth"))
    previous = next(out.glob("*/checkpoint_1.pth"))
    assert read_checkpoint(str(previous))["trainer"]["epoch"] == 1  # the previous checkpoint is intact
    (torn,) = out.glob("*/checkpoint_2.pth.tmp-*")
    with pytest.raises(CheckpointError, match=r"truncated or corrupt") as err:
        read_checkpoint(str(torn))
    assert str(torn) in str(err.value)

    output = run_cli(train_args(data_root, out, "run.resume_ckpt_path=auto"), cwd=tmp_path)
    assert f"resume: auto -> {previous}" in output and "Start training epoch 1," not in output
    assert "a save that was interrupted" in output and not list(out.rglob("*.tmp-*"))
    final = final_checkpoint(out)
    assert not list(final.parent.glob("checkpoint_*_iter*.pth"))  # mid-epoch checkpoints go with the epoch's own
    assert_same_training_state(final, reference / "checkpoint_2.pth")


def test_auto_resume_skips_unreadable_and_malicious_checkpoints(reference, tmp_path, caplog):
    """A newer checkpoint that is truncated, or carries pickled code, is passed over for the newest good one."""
    job = tmp_path / "job"
    job.mkdir()
    good = job / "checkpoint_1.pth"
    good.write_bytes((reference / "checkpoint_1.pth").read_bytes())
    (job / "checkpoint_2.pth").write_bytes((reference / "checkpoint_2.pth").read_bytes()[:5000])
    marker = tmp_path / "pwned"
    (job / "checkpoint_2_iter1.pth").write_bytes(pickle.dumps(_Exploit(str(marker)), protocol=2))
    with caplog.at_level(logging.WARNING):
        path, checkpoint = find_resume_checkpoint(tmp_path)
    assert path == str(good) and checkpoint["trainer"]["epoch"] == 1
    assert not marker.exists()  # the payload never ran
    warned = caplog.text
    assert "checkpoint_2.pth" in warned and "truncated or corrupt" in warned
    assert "checkpoint_2_iter1.pth" in warned and "was refused" in warned
    assert checkpoint_progress("checkpoint_3.pth") == (4, 0) and checkpoint_progress("checkpoint_3_iter7.pth") == (3, 7)
    assert checkpoint_progress("checkpoint_best.pth") is None
    assert find_resume_checkpoint(tmp_path / "empty") == (None, None)


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


class _RandomSamples(torch.utils.data.Dataset):
    """Each sample: its index and a random draw (stands in for a random augmentation)."""

    def __len__(self):
        return 20

    def __getitem__(self, index):
        return {"index": index, "draw": torch.rand(()).item()}


def _epoch_batches(loader, epoch, start_iter=0):
    loader.start_epoch(epoch, start_iter)
    return [next(loader) for _ in range(len(loader) - start_iter)]


def test_epoch_loader_is_a_function_of_seed_epoch_and_index_only():
    """Same batches and same random draws with 0 or 2 workers, whatever the global RNG does in between; a start
    inside the epoch gives the rest of that epoch's batches; another epoch shuffles differently; two ranks split it."""
    collate = torch.utils.data.default_collate
    make = lambda workers, **kw: reliability.EpochLoader(_RandomSamples(), 4, workers, collate, seed=7, **kw)
    torch.manual_seed(1)
    reference = _epoch_batches(make(0), epoch=1)
    torch.manual_seed(2)
    with_workers = _epoch_batches(make(2), epoch=1)
    assert len(reference) == 5
    for a, b in zip(reference, with_workers):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["draw"], b["draw"])
    resumed = _epoch_batches(make(0), epoch=1, start_iter=3)
    assert all(torch.equal(a["draw"], b["draw"]) for a, b in zip(reference[3:], resumed))
    assert not torch.equal(_epoch_batches(make(0), epoch=2)[0]["index"], reference[0]["index"])
    global_state = torch.get_rng_state()
    ranks = [_epoch_batches(make(0, num_replicas=2, rank=r), epoch=1) for r in (0, 1)]
    assert torch.equal(global_state, torch.get_rng_state())  # loading never touches the caller's RNG
    seen = [i for batches in ranks for b in batches for i in b["index"].tolist()]
    assert len(seen) == len(set(seen)) == 16  # 10 each, 2 full batches of 4: disjoint slices of one permutation
    with pytest.raises(ValueError, match="fewer than run.batch_size_train=32"):
        reliability.EpochLoader(_RandomSamples(), 32, 0, collate, seed=7)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = reliability.capture_rng_state()
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    torch.save(state, tmp_path / "rng.pth")
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    reliability.restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    again = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


# =================================================================================================================
# Non-finite losses
# =================================================================================================================
def test_nan_losses_skip_the_step_are_counted_and_an_all_skipped_epoch_stops_the_run(reference, data_root,
                                                                                    tmp_path):
    """Every step of epoch 1 (global steps 3, 4, 5) gets a NaN reconstruction loss, with
    run.max_consecutive_bad_steps=4: the three steps are skipped with a warning naming the loss, and although the
    streak limit is not reached, an epoch in which every step was skipped is a failure: the run stops before
    writing that epoch's checkpoint (issue 25: it exited 0 with train_loss "nan" and a new checkpoint)."""
    out = tmp_path / "out"
    output = run_failing(
        train_args(data_root, out, "run.debug_nan_steps=[3,4,5]", "run.debug_nan_loss=loss_rec",
                   "run.max_consecutive_bad_steps=4"),
        cwd=tmp_path,
    )
    assert output.count("non-finite loss_rec=nan, loss=nan at epoch 1") == 3
    assert "optimiser step skipped (3 in a row, 3 this epoch" in output
    assert ("NonFiniteLossError: every optimiser step of epoch 1 (3) had a non-finite loss or gradient; last: "
            "loss_rec=nan, loss=nan") in output
    job = job_folder(out)
    assert [s["train_skipped_steps"] for s in epoch_stats(job)] == [0]
    assert_same_training_state(job / "checkpoint_0.pth", reference / "checkpoint_0.pth")
    assert not (job / "checkpoint_1.pth").exists() and not (job / "checkpoint_2.pth").exists()


class _ToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, samples):
        out = self.linear(samples["x"]).pow(2).mean()
        return {"loss": out, "loss_a": out}


class _SqrtModel(_ToyModel):
    """Finite loss, non-finite gradient at zero weights (d sqrt|w| / dw)."""

    def forward(self, samples):
        out = self.linear.weight.abs().sqrt().sum() + 0 * samples["x"].sum()
        return {"loss": out}


def _run_inner_loop(model, guard, scaler=None, steps=4, optimizer=None, x_scale=1.0, task=None):
    """runner_xformer's inner loop on a toy model: returns (weights before each step, scaler states, stats)."""
    from lavis.tasks.base_task import BaseTask

    runner = object.__new__(RunnerXFormer)
    runner.config = SimpleNamespace(run_cfg=OmegaConf.create({"distributed": False}))
    runner.step_guard, runner.checkpoint_every_iters, runner.task = guard, 0, task or BaseTask()
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=0.1)
    seen = []

    class Schedule:
        def step(self, cur_epoch, cur_step):
            seen.append(({k: v.clone() for k, v in model.state_dict().items()},
                         scaler.state_dict() if scaler is not None else None))

    torch.manual_seed(0)
    data = iter([{"x": x_scale * torch.randn(8, 4)} for _ in range(steps)])
    stats = runner.train_inner_loop(epoch=0, iters_per_epoch=steps, model=model, data_loader=data,
                                    optimizer=optimizer, lr_scheduler=Schedule(), scaler=scaler, log_freq=100)
    seen.append(({k: v.clone() for k, v in model.state_dict().items()}, scaler.state_dict() if scaler else None))
    return seen, stats


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "grad_scaler"])
def test_skipped_step_leaves_weights_optimizer_and_scaler_untouched(amp, caplog):
    torch.manual_seed(0)
    model = _ToyModel()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1) if amp else None
    guard = StepGuard(max_consecutive=3, debug_nan_steps=[1], debug_nan_loss="loss_a")
    with caplog.at_level(logging.WARNING):
        seen, stats = _run_inner_loop(model, guard, scaler=scaler)
    weights = [w for w, _ in seen]
    assert _equal(weights[1], weights[2])  # step 1 skipped: after == before
    assert not _equal(weights[0], weights[1]) and not _equal(weights[2], weights[3])  # the others stepped
    assert guard.skipped_epoch == 1 and guard.consecutive == 0
    assert "non-finite loss_a=nan, loss=nan at epoch 0 iteration 1" in caplog.text
    if amp:  # neither scaler.step nor scaler.update ran on the skipped step: scale and growth tracker unchanged
        scalers = [s for _, s in seen]
        assert scalers[1] == scalers[2]
        assert scalers[2]["scale"] * 2 == scalers[3]["scale"]  # growth resumes after the skipped step
    assert float(stats["loss"]) > 0


def test_task_loss_terms_are_averaged_over_kept_steps_and_the_task_is_not_patched():
    """The runner owns the loop: the task only names its loss terms (``logged_loss_terms``); a skipped step enters
    neither the total's nor the terms' averages, a named term the model does not output is not logged, and the
    task object is left as it was (no swapped methods, no flags)."""
    from lavis.tasks.base_task import BaseTask

    class Task(BaseTask):
        logged_loss_terms = ("loss_a", "loss_not_in_output")

    torch.manual_seed(0)
    model = _ToyModel()
    values = []
    model.register_forward_hook(lambda module, inputs, output: values.append(output["loss_a"].item()))
    task = Task()
    before = dict(vars(task))
    _, stats = _run_inner_loop(model, StepGuard(debug_nan_steps=[1], debug_nan_loss="loss_a"), task=task)
    kept = [values[0], values[2], values[3]]  # step 1 was NaN (injected after the recording hook) and skipped
    assert stats["loss_a"] == pytest.approx(sum(kept) / 3, rel=1e-6) and stats["loss"] == stats["loss_a"]  # numbers
    assert "loss_not_in_output" not in stats
    assert vars(task) == before
    _, stats = _run_inner_loop(_ToyModel(), StepGuard())
    assert "loss_a" not in stats  # LAVIS's tasks name no terms: only the total is logged


def test_overflowing_scaled_gradients_are_the_scalers_business():
    """Finite loss, gradients overflowing at the current scale: GradScaler skips the step and backs off; it is not
    counted as a bad step."""
    torch.manual_seed(0)
    model = _ToyModel()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    guard = StepGuard(max_consecutive=1)
    seen, _ = _run_inner_loop(model, guard, scaler=scaler, steps=1, x_scale=100.0)
    assert _equal(seen[0][0], seen[1][0]) and seen[1][1]["scale"] == 2.0**126
    assert guard.amp_overflows_epoch == 1 and guard.skipped_epoch == 0


def test_non_finite_gradient_skips_the_step_naming_the_parameter(caplog):
    model = _SqrtModel()
    with torch.no_grad():
        model.linear.weight.zero_()
    guard = StepGuard(max_consecutive=2)
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteLossError, match="gradient of linear.weight"):
        _run_inner_loop(model, guard, steps=3)
    assert guard.skipped_epoch == 2 and torch.count_nonzero(model.linear.weight) == 0


def test_consecutive_limit_and_reset():
    guard = StepGuard(max_consecutive=2)
    guard.skipped(["loss=nan"], 0, 0, 0)
    guard.stepped()
    guard.skipped(["loss=inf"], 0, 2, 2)
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive .* loss_itm=inf"):
        guard.skipped(["loss_itm=inf"], 0, 3, 3)
    assert guard.skipped_total == 3
    with pytest.raises(ValueError, match="max_consecutive_bad_steps"):
        StepGuard(max_consecutive=0)


DDP_NAN_PROBE = '''
import sys
import torch
import torch.distributed as dist
from lavis_xformer import launch

out_dir, argv = sys.argv[1], sys.argv[2:]
runner = launch.build_runner(argv)
runner.train()
torch.save({"final": runner.unwrap_dist_model(runner.model).state_dict(), "skipped": runner.step_guard.skipped_total},
           f"{out_dir}/rank{dist.get_rank()}.pt")
'''


def test_ddp_ranks_agree_to_skip_a_nan_on_one_rank(data_root, tmp_path):
    """torchrun, 2 gloo processes; the loss is NaN on rank 1 only at step 1. Both ranks skip that step (one
    all-reduced flag), nobody hangs, and both end with the same weights."""
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_NAN_PROBE)
    output = run_cli(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", probe, tmp_path,
         "--cfg-path", str(DEMO_TRAIN), "--options", *shapes_options(BUILDER, data_root, **SIZES),
         "run.max_epoch=1", "run.batch_size_train=8", "run.debug_nan_steps=[1]", "run.debug_nan_ranks=[1]",
         f"run.output_dir={tmp_path / 'out'}"],
        cwd=tmp_path,
    )
    assert "non-finite loss_itc=nan (rank 1), loss=nan (rank 1) at epoch 0 iteration 1" in output
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert all(torch.equal(ranks[0]["final"][k], ranks[1]["final"][k]) for k in ranks[0]["final"])
    (stats,) = epoch_stats(job_folder(tmp_path / "out"))
    assert stats["train_skipped_steps"] == 1


# =================================================================================================================
# Bad data through the training entry point
# =================================================================================================================
def inject_bad_samples(data_root, sizes):
    """Generate the shapes data, then interleave every good-but-odd and every bad kind of test_robust_data into
    its train split (each after a shapes image, so a bad sample's replacement is always a usable one)."""
    folder = shapes.ensure_generated(shapes.ShapesSpec(**sizes), data_root)
    bad_dir = folder / "images" / "train" / "odd"
    bad_dir.mkdir()
    write_dataset(bad_dir, GOOD_KINDS + BAD_KINDS)
    odd = json.loads((bad_dir / "annotations.json").read_text())
    for entry in odd:
        entry["image"] = f"train/odd/{entry['image']}"
    path = shapes.annotation_path(folder, "caption_train")
    train = json.loads(path.read_text())
    merged = []
    for index, entry in enumerate(train):
        merged.append(entry)
        if index < len(odd):
            merged.append(odd[index])
    path.write_text(json.dumps(merged))
    return len(merged)


@pytest.fixture(scope="module")
def bad_data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_shapes")
    sizes = dict(num_train=34, num_val=4, num_test=8)
    total = inject_bad_samples(root, sizes)
    assert total == 48  # 3 full batches of 16: every sample is drawn once per epoch
    return root, sizes


BAD_REASONS = {
    "missing": "FileNotFoundError", "truncated": "truncated", "undecodable": "UnidentifiedImageError",
    "zero_bytes": "UnidentifiedImageError", "giant": "DecompressionBomb", "empty_caption": "text_input is empty",
    "non_utf8_caption": "not valid UTF-8",
}


def test_training_survives_every_bad_sample_kind_with_exact_counts(bad_data_root, tmp_path):
    root, sizes = bad_data_root
    out = tmp_path / "out"
    output = run_cli(
        train_args(root, out, "run.max_epoch=2", "run.max_bad_fraction=0.5", "run.bad_fraction_min_samples=1",
                   "run.max_image_pixels=100000", sizes=sizes),
        cwd=tmp_path,
    )
    for kind in BAD_KINDS:  # each warning names the file and the reason
        line = next((l for l in output.splitlines() if f"skipping unusable sample train/odd/{kind}_0" in l), None)
        assert line is not None, f"no warning for {kind}"
        assert BAD_REASONS[kind] in line, line
    for kind in GOOD_KINDS:  # grayscale, CMYK, RGBA, 16-bit, palette, overlong caption: converted, not skipped
        assert f"train/odd/{kind}_0" not in output
    stats = epoch_stats(job_folder(out))
    # each bad sample drawn exactly once per epoch, replaced by its (usable) neighbour: 48 + 7 loads
    assert [(s["train_bad_samples"], s["train_loaded_samples"]) for s in stats] == [(7, 55), (7, 55)]
    assert all(s["train_skipped_steps"] == 0 and float(s["train_loss"]) > 0 for s in stats)
    assert "epoch 0: 7 unusable training samples replaced (of 55 loaded, 12.73%)" in output


@pytest.mark.parametrize("min_samples, expected, never_written", [
    # checked inside the epoch once 10 samples have loaded: stopped before any checkpoint
    ("run.bad_fraction_min_samples=10", "samples this epoch were unusable", "checkpoint_*.pth"),
    # 55 loads per epoch, under the default 100 after which the fraction is checked inside an epoch: the check at the
    # end of the epoch (over all ranks) stops the run before the epoch's checkpoint (before, a small dataset could
    # never reach the limit)
    ("run.bad_fraction_min_samples=100", "7 of 55 samples this epoch were unusable (12.7% > max_bad_fraction 5.0%)",
     "checkpoint_0.pth"),
])
def test_bad_fraction_limit_stops_the_run(bad_data_root, tmp_path, min_samples, expected, never_written):
    root, sizes = bad_data_root
    output = run_failing(
        train_args(root, tmp_path / "out", "run.max_bad_fraction=0.05", min_samples,
                   "run.max_image_pixels=100000", sizes=sizes),
        cwd=tmp_path,
    )
    assert "BadSampleLimitExceeded" in output
    assert expected in output and "> max_bad_fraction 5.0%" in output
    assert not list((tmp_path / "out").rglob(never_written))


def test_robust_data_switch_wraps_any_lavis_dataset(tmp_path):
    from lavis.datasets.datasets.caption_datasets import CaptionDataset

    plain = write_dataset(tmp_path, ["rgb", "missing"])
    assert type(plain) is CaptionDataset
    datasets = {"coco_caption": {"train": plain, "val": plain}}
    cfg = OmegaConf.create({"robust_data": True, "max_bad_fraction": 0.6, "bad_fraction_min_samples": 2})
    (wrapped,) = make_train_datasets_robust(datasets, ["train"], cfg)
    assert datasets["coco_caption"]["train"] is wrapped and datasets["coco_caption"]["val"] is plain
    assert wrapped.dataset is plain and wrapped.max_bad_fraction == 0.6
    assert wrapped[1]["text_input"] and wrapped.stats()["bad"] == 1  # the missing image was replaced
    # unset: what builders made stays as it is (plugin builders wrap, LAVIS's don't); False unwraps
    assert make_train_datasets_robust({"x": {"train": plain}}, ["train"], OmegaConf.create({})) == []
    again = {"x": {"train": RobustDataset(plain)}}
    assert make_train_datasets_robust(again, ["train"], OmegaConf.create({"robust_data": False})) == []
    assert again["x"]["train"] is plain


# =================================================================================================================
# Configs and the checkpoint command line
# =================================================================================================================
@pytest.mark.parametrize(
    "option, expected",
    [
        ("model.arch=xformr", r"model.arch='xformr' is not a registered architecture \(did you mean 'xformer'\?\); "
                              r"valid: .*blip2_baseline, .*xformer"),
        ("model.model_type=giant", r"model.model_type='giant' is not a type of xformer; valid: .*pretrain, .*tiny"),
        ("run.task=pretrain", r"run.task='pretrain' is not registered \(did you mean 'xformer_pretrain'\?\)"),
        ("run.lr_sched=cosine", r"run.lr_sched='cosine' is not registered.*linear_warmup_cosine_lr"),
        ("run.max_epoch=three", r"run.max_epoch='three' must be an integer"),
        ("run.max_bad_fraction=2", r"run.max_bad_fraction=2 must lie in \[0, 1\)"),
    ],
)
def test_bad_config_fails_before_anything_is_built_listing_valid_choices(option, expected, tmp_path):
    data = tmp_path / "data"
    with pytest.raises(launch.ConfigError, match=expected):
        launch.build_runner(["--cfg-path", str(DEMO_TRAIN), "--options", *shapes_options(BUILDER, data), option])
    assert not data.exists()  # no dataset was generated, no model built


def test_missing_and_mistyped_fields_are_reported_together(tmp_path):
    yaml = tmp_path / "broken.yaml"
    cfg = OmegaConf.load(DEMO_TRAIN)
    del cfg.model["model_type"]
    del cfg.run["init_lr"]
    cfg.run.amp = "yes"
    OmegaConf.save(cfg, yaml)
    with pytest.raises(launch.ConfigError) as err:
        launch.validate_config(yaml)
    message = str(err.value)
    assert "model.model_type is missing; xformer has the types" in message and "tiny" in message
    assert "run.init_lr is missing" in message and "run.amp='yes' must be true or false" in message
    # a mistyped model field: the typed model config refuses it, listing the valid fields, before any weight
    data = tmp_path / "data"
    with pytest.raises(ValueError, match=r"model config field 'num_query_token' .* expected <class 'int'>"):
        launch.build_runner(["--cfg-path", str(DEMO_TRAIN), "--options", *shapes_options(BUILDER, data),
                             "model.num_query_token=many"])
    assert not data.exists()


def test_checkpoint_cli_exports_safetensors_and_inspects(reference, tmp_path, capsys):
    from safetensors import safe_open

    src = reference / "checkpoint_2.pth"
    dst = tmp_path / "weights.safetensors"
    assert checkpoints_main(["export", str(src), str(dst)]) == 0
    saved = read_checkpoint(str(src))["model"]
    exported = read_checkpoint(str(dst))["model"]
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    with safe_open(str(dst), "pt") as handle:
        assert handle.metadata()["arch"] == "xformer" and handle.metadata()["epoch"] == "2"
    trainable = tmp_path / "trainable.safetensors"
    assert checkpoints_main(["export", str(src), str(trainable), "--trainable-only"]) == 0
    only = read_checkpoint(str(trainable))["model"]
    assert "query_tokens" in only and set(only) < set(saved)  # buffers (e.g. position ids) left out
    capsys.readouterr()
    assert checkpoints_main(["inspect", str(src)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resume"] == {"epoch": 2, "iteration": 3, "iters_per_epoch": 3, "complete": True, "world_size": 1}
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Exploit(str(tmp_path / "pwned")), protocol=2))
    assert checkpoints_main(["inspect", str(evil)]) == 1
    assert "was refused" in capsys.readouterr().err and not (tmp_path / "pwned").exists()
