"""Reliability II: runs never share a job folder, resume never touches a live run's files, checkpoints that do not fit
are refused, bad inputs fail with clear errors, and a distributed run survives the loss of one rank.

Each test reproduces one hole found in the first reliability pass (issue 15) and fails on the code before its fix.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lavis.common.registry import registry
from lavis.datasets.datasets.caption_datasets import CaptionDataset
from omegaconf import OmegaConf

from lavis_xformer.checkpoints import CheckpointError, find_resume_checkpoint, remove_interrupted_saves
from lavis_xformer.common import jobs
from lavis_xformer.compat import AnnotationFileError
from lavis_xformer.datasets.robust import BadSampleLimitExceeded, RobustDataset
from lavis_xformer.models.builders import build_bert_tokenizer, no_hub
from lavis_xformer.runners.runner_xformer import RunnerXFormer
from test_pipeline import DEMO_TRAIN, shapes_options
from test_reliability import assert_same_training_state, child_env, train_args
from test_robust_data import write_dataset
from test_stage2 import images, tiny


# =================================================================================================================
# Job folders
# =================================================================================================================
def test_two_runs_started_together_write_into_their_own_folders(tmp_path):
    """Two training runs into one output_dir, started at the same moment: two job folders, each with its own
    checkpoint and log (LAVIS's minute-resolution job id put both into one folder, the second run's checkpoint
    replacing the first's)."""
    out = tmp_path / "out"
    env = child_env()
    args = train_args(tmp_path / "data", out, "run.max_epoch=1", "run.checkpoint_every_iters=0")
    runs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2
    for folder in folders:
        assert (folder / "checkpoint_0.pth").is_file()
        assert not (folder / jobs.LOCK_NAME).exists()  # released at the end of the run
        log = (folder / "log.txt").read_text()
        assert log.count('{"train_') == 1  # one run's epoch, not two interleaved


def test_claimed_job_folders_are_unique_within_one_second(tmp_path):
    ids = [jobs.claim_job_folder(tmp_path)[0] for _ in range(20)]
    assert len(set(ids)) == 20 and all((tmp_path / i).is_dir() for i in ids)
    stamp = time.strftime("%Y%m%d%H")
    assert all(i.startswith(stamp) or i[:10] > stamp for i in ids)  # a timestamp first (the newest sorts last)


def _training_checkpoint(path: Path, epoch: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.full((2,), float(epoch))}, "optimizer": {"state": {}}, "epoch": epoch}, path)


def _age(path: Path, seconds: float):
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _lock(folder: Path, host: str, pid: int):
    (folder / jobs.LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid}))


def test_auto_resume_takes_the_newest_run_never_a_live_one_or_a_neighbour(tmp_path):
    """Under one output_dir: an older run that went further (neighbour), the newest finished-or-killed run, and a
    run still alive. ``auto`` (skipping live folders) resumes the newest dead run's furthest checkpoint."""
    neighbour, newest, live = tmp_path / "20260101000000-aaaaaa", tmp_path / "20260102000000-bbbbbb", tmp_path / "c"
    _training_checkpoint(neighbour / "checkpoint_5.pth", 5)
    _age(neighbour / "checkpoint_5.pth", 3600)
    _training_checkpoint(newest / "checkpoint_0.pth", 0)
    _training_checkpoint(newest / "checkpoint_1_iter2.pth", 0)
    _age(newest / "checkpoint_0.pth", 60)
    _lock(newest, jobs.this_host(), _dead_pid())  # killed: its lock stays behind
    _training_checkpoint(live / "checkpoint_2.pth", 2)
    _lock(live, jobs.this_host(), os.getpid())
    path, checkpoint = find_resume_checkpoint(tmp_path, skip_folder=jobs.folder_in_use)
    assert path == str(newest / "checkpoint_1_iter2.pth")
    # without the live check the live run's file would be taken; a named folder is searched as given
    assert find_resume_checkpoint(tmp_path)[0] == str(live / "checkpoint_2.pth")
    assert find_resume_checkpoint(neighbour)[0] == str(neighbour / "checkpoint_5.pth")
    # another host's lock is live while its heartbeat is fresh, stale after jobs.STALE_SECONDS
    _lock(live, "another-host", 1)
    assert jobs.folder_in_use(live)
    _age(live / jobs.LOCK_NAME, jobs.STALE_SECONDS + 60)
    assert not jobs.folder_in_use(live)


def test_resume_removes_only_temporary_files_of_dead_writers(tmp_path):
    host, dead = jobs.this_host(), _dead_pid()
    job = tmp_path / "job"
    job.mkdir()
    names = {
        "own": f"checkpoint_1.pth.tmp-{host}-{os.getpid()}",  # this (live) process: a save under way
        "dead": f"checkpoint_1.pth.tmp-{host}-{dead}",
        "legacy_dead": f"checkpoint_2.pth.tmp-{dead}",  # the old name, without a host: treated as another host's
        "foreign_fresh": "checkpoint_3.pth.tmp-node-17.cluster-4242",
        "foreign_stale": "checkpoint_4.pth.tmp-node-17.cluster-4243",
    }
    for name in names.values():
        (job / name).write_bytes(b"partial")
    _age(job / names["foreign_stale"], jobs.STALE_SECONDS + 60)
    removed = {Path(p).name for p in remove_interrupted_saves(tmp_path)}
    assert removed == {names["dead"], names["foreign_stale"]}
    assert all((job / names[k]).exists() for k in ("own", "legacy_dead", "foreign_fresh"))


SAVER = """
import sys, torch
from lavis_xformer.checkpoints import save_checkpoint_atomically
save_checkpoint_atomically({"model": {"w": torch.ones(1000)}, "optimizer": {}, "epoch": 0}, sys.argv[1])
"""


def test_a_save_under_way_survives_a_resume_in_the_same_folder(tmp_path):
    """The original failure: resume deleted the temporary file of a live save, which then died with
    FileNotFoundError at its rename and lost its epoch."""
    target = tmp_path / "job" / "checkpoint_0.pth"
    target.parent.mkdir()
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], env=child_env(
        LAVIS_XFORMER_TEST_SAVE_DELAY="4", PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not list(target.parent.glob("*.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(target.parent.glob("*.tmp-*")), "the save never started"
    assert remove_interrupted_saves(tmp_path) == []
    output = saver.communicate(timeout=120)[0]
    assert saver.returncode == 0, output
    assert torch.load(target, weights_only=True)["model"]["w"].sum() == 1000


# =================================================================================================================
# Checkpoints that do not fit
# =================================================================================================================
@pytest.fixture(scope="module")
def opt_model():
    torch.manual_seed(0)
    return tiny("xformer_opt").eval()


@pytest.fixture(scope="module")
def stage1_files(tmp_path_factory):
    """Trainable-only stage-1 checkpoints of X-Former and of the BLIP-2 baseline (as the runner writes them)."""
    from lavis_xformer.checkpoints import trainable_state_dict

    folder = tmp_path_factory.mktemp("stage1")
    files = {}
    for arch in ("xformer", "blip2_baseline"):
        torch.manual_seed(1)
        files[arch] = folder / f"{arch}.pth"
        torch.save({"model": trainable_state_dict(tiny(arch)), "optimizer": {}, "epoch": 0}, files[arch])
    files["foreign"] = folder / "foreign.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}}, files["foreign"])
    return files


def _from_config(arch, **fields):
    cls = registry.get_model_class(arch)
    cfg = OmegaConf.load(cls.default_config_path("tiny")).model
    for key, value in fields.items():
        cfg[key] = value
    return cls.from_config(cfg)


def test_stage2_from_its_stage1_checkpoint_loads_strictly(stage1_files):
    """Stage 2 expects every trainable tensor that exists in stage 1 (Q-Former, queries, ln_vision, dual block); the
    LLM projection is new in stage 2."""
    model = _from_config("xformer_opt", pretrained=str(stage1_files["xformer"]))
    saved = torch.load(stage1_files["xformer"], weights_only=True)["model"]
    assert torch.equal(model.dual_block.state_dict()[next(iter(model.dual_block.state_dict()))],
                       saved[f"dual_block.{next(iter(model.dual_block.state_dict()))}"])


@pytest.mark.parametrize("arch, field", [("xformer_opt", "pretrained"), ("xformer", "finetuned")])
def test_blip2_weights_into_xformer_are_refused_unless_partial_loads_are_allowed(stage1_files, caplog, arch, field):
    fields = {field: str(stage1_files["blip2_baseline"])}
    if field == "finetuned":
        fields["load_finetuned"] = True
    with pytest.raises(CheckpointError, match=r"lacks \d+ trainable tensors of .* dual_block .*allow_partial_load"):
        _from_config(arch, **fields)
    with caplog.at_level(logging.WARNING, logger="lavis_xformer.checkpoints"):
        _from_config(arch, allow_partial_load=True, **fields)
    warned = [r.message for r in caplog.records if r.levelno == logging.WARNING and "partial load" in r.message]
    assert len(warned) == 1 and "dual_block" in warned[0]


@pytest.mark.parametrize("field", ["pretrained", "finetuned"])
def test_a_file_matching_no_tensor_is_refused_even_with_partial_loads(stage1_files, field):
    fields = {field: str(stage1_files["foreign"]), "allow_partial_load": True}
    if field == "finetuned":
        fields["load_finetuned"] = True
    with pytest.raises(CheckpointError, match="matches no tensor of XFormerOPT .*encoder \\(1\\), head \\(1\\)"):
        _from_config("xformer_opt", **fields)


def test_stage2_checkpoint_for_evaluation_must_hold_the_projection(tmp_path, opt_model):
    """``finetuned`` (evaluation) expects every trainable tensor of the model, the projection included."""
    from lavis_xformer.checkpoints import trainable_state_dict

    path = tmp_path / "no_projection.pth"
    state = {k: v for k, v in trainable_state_dict(opt_model).items() if not k.startswith("opt_proj.")}
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"lacks 2 trainable tensors of XFormerOPT in opt_proj \(2\)"):
        _from_config("xformer_opt", finetuned=str(path), load_finetuned=True)


def test_finetuned_file_with_keys_the_model_does_not_know_is_refused(stage1_files):
    """A stage-1 checkpoint as the ``finetuned`` weights of a stage-2 model: its ITM / ITC heads are not the model's."""
    with pytest.raises(CheckpointError, match=r"has keys XFormerOPT does not know: .*itm_head \(2\), mae_out_proj \(2\), temp \(1\), text_proj \(2\), vision_proj \(2\)"):
        _from_config("xformer_opt", finetuned=str(stage1_files["xformer"]), load_finetuned=True)


def test_resume_from_a_weights_only_file_says_so(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    from lavis_xformer.checkpoints import read_checkpoint

    with pytest.raises(CheckpointError, match="holds weights only .*model.pretrained="):
        RunnerXFormer.restore_checkpoint_state(SimpleNamespace(), read_checkpoint(str(path)), str(path))


# =================================================================================================================
# Inputs
# =================================================================================================================
def test_malformed_annotation_file_is_named(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text("[]")
    bad.write_text('[{"image": "a.png", "caption": "x"},\n{"image": ')
    with pytest.raises(AnnotationFileError, match=rf"annotation file {bad} is not valid JSON \(line 2"):
        CaptionDataset(None, None, str(tmp_path), [str(good), str(bad)])


def test_overlong_question_is_truncated_not_an_index_error(opt_model):
    positions = opt_model.opt_model.config.max_position_embeddings
    question = " ".join(["what"] * (positions + 50))
    answers = opt_model.predict_answers({"image": images(1), "text_input": [question]}, max_len=3)
    assert len(answers) == 1 and isinstance(answers[0], str)
    captions = opt_model.generate({"image": images(1), "prompt": [question]}, max_length=3)
    assert len(captions) == 1


@pytest.mark.parametrize("arch", ["xformer_opt", "xformer"])
def test_integer_and_non_finite_images_are_refused(opt_model, arch):
    model = opt_model if arch == "xformer_opt" else tiny("xformer").eval()
    uint8 = (images(2) * 50 + 100).clamp(0, 255).to(torch.uint8)
    nan = images(2)
    nan[1, 0, 0, 0] = float("nan")
    inf = images(2)
    inf[0, 1, 2, 3] = float("inf")
    call = (lambda image: model.predict_answers({"image": image, "text_input": ["what?", "how?"]})) \
        if arch == "xformer_opt" else (lambda image: model({"image": image, "text_input": ["a", "b"]}))
    with pytest.raises(ValueError, match="dtype torch.uint8; the models take float images"):
        call(uint8)
    with pytest.raises(ValueError, match=r"NaN or inf values \(batch items \[1\]\)"):
        call(nan)
    with pytest.raises(ValueError, match=r"NaN or inf values \(batch items \[0\]\)"):
        call(inf)


def test_offline_paper_scale_tokenizer_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with no_hub():
        tokenizer = build_bert_tokenizer("bert-base-uncased")
    assert len(tokenizer) == 30522 + 1  # bert-base-uncased's size and the [DEC] token
    assert list(tmp_path.iterdir()) == []


def test_each_bad_file_counts_once_per_epoch(tmp_path):
    """8 bad files, 4 of them adjacent (each retried as its bad neighbour's replacement): 8 bad per epoch, not 18."""
    kinds = ["rgb", "missing", "missing", "missing", "missing", "rgb", "missing", "rgb", "missing", "rgb",
             "missing", "rgb", "missing", "rgb"]
    dataset = RobustDataset(write_dataset(tmp_path, kinds), max_bad_fraction=0.99, min_samples_before_limit=1)
    for epoch in range(2):
        dataset.start_epoch()
        for index in range(len(dataset)):
            dataset[index]
        assert dataset.stats()["bad"] == 8
    assert dataset.stats()["bad_total"] == 16


def test_absolute_bad_sample_limit_works_on_a_small_dataset(tmp_path):
    kinds = ["rgb"] * 6 + ["missing", "rgb", "missing", "rgb"]
    dataset = RobustDataset(write_dataset(tmp_path, kinds), max_bad_fraction=0.5, max_bad_samples=1)
    with pytest.raises(BadSampleLimitExceeded, match=r"2 of \d+ samples this epoch were unusable \(> max_bad_samples 1\)"):
        for index in range(len(dataset)):
            dataset[index]


# =================================================================================================================
# A rank killed in a distributed run
# =================================================================================================================
def torchrun_args(data_root, output_dir, *options):
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
        "--monitor-interval=0.5", "-m", "lavis_xformer.train", "--cfg-path", str(DEMO_TRAIN), "--options",
        *shapes_options("xformer_shapes_caption", data_root, num_train=16, num_val=2, num_test=2),
        "run.max_epoch=2", "run.batch_size_train=4", "run.warmup_steps=1", "run.checkpoint_every_iters=1",
        "run.resume_ckpt_path=auto", "run.device=cpu", f"run.output_dir={output_dir}", *options,
    ]


def run_ok(args, cwd, timeout=300, **env):
    """Run ``args`` in its own process group; on a timeout the whole group (torchrun and its workers) is killed, so
    a hung job fails this test instead of leaving workers behind."""
    process = subprocess.Popen(args, cwd=cwd, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(map(str, args))} hung for {timeout} s:\n{(stdout + stderr)[-6000:]}")
    output = stdout + stderr
    assert process.returncode == 0, f"{' '.join(map(str, args))} failed ({process.returncode}):\n{output[-6000:]}"
    return output


EXIT_PROBE = """
import atexit, os, sys
import torch
from omegaconf import OmegaConf
from lavis_xformer.common import distributed

# Registered before the process group exists, so it runs after shutdown_process_group (atexit: last in, first out).
atexit.register(lambda: print("gloo worker threads at exit:", distributed.gloo_worker_threads(), flush=True))
held = []


def train(how):
    distributed.init_distributed_mode(OmegaConf.create({"device": "cpu"}))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    model(torch.ones(3, 4)).sum().backward()
    distributed.sum_over_ranks(torch.ones(1))
    torch.distributed.barrier()
    if how == "keep":
        held.append(model)
    if how == "raise":
        raise RuntimeError("the run failed")


train(sys.argv[1])
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counting gloo's threads needs Linux's /proc")
@pytest.mark.parametrize("how", ["return", "raise", "keep"])
def test_process_group_is_destroyed_before_python_shuts_down(tmp_path, how):
    """A gloo worker thread frees its last collective only after the caller moved on, and takes the GIL to do so;
    if Python has started shutting down by then, the process aborts (SIGABRT) after a successful run: the restarted
    rank 1 of the torchrun test below failed that way in 1 run in 60 to 2 in 5, with the machine's load. The group is
    now destroyed at exit, while Python is whole, and no gloo worker thread is left, after a normal end and after an
    uncaught exception; a group that something still holds is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text(EXIT_PROBE)
    result = subprocess.run([sys.executable, str(probe), how], cwd=tmp_path, env=child_env(), capture_output=True,
                            text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == (1 if how == "raise" else 0), output[-3000:]
    if how == "keep":
        assert "gloo worker threads at exit: 2" in result.stdout
        assert "2 gloo worker threads outlived destroy_process_group: an object still holds the process group" in output
    else:
        assert "gloo worker threads at exit: 0" in result.stdout, output[-3000:]
        assert "outlived destroy_process_group" not in output


GATHER_PROBE = """
import torch
import torch.distributed as tdist
from lavis_xformer.common import distributed as dist
dist.init_single_process_group("gloo")
collectives = []
for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "gather"):
    original = getattr(tdist, name)
    setattr(tdist, name, lambda *a, _name=name, _original=original, **k: (collectives.append(_name),
                                                                           _original(*a, **k))[1])
features = torch.randn(4, 257, 160, requires_grad=True)  # X-Former's M at bench size with the MAE unmasked
gathered = dist.concat_all_gather(features)
assert torch.equal(gathered, features) and not gathered.requires_grad
print("collectives run:", collectives)
print("gloo-named threads after:", dist.gloo_worker_threads())
"""


def test_gather_in_one_process_leaves_no_second_openmp_team(tmp_path):
    """In one process ``concat_all_gather`` runs no collective. A gloo all_gather copies a large tensor on gloo's
    worker thread, where torch starts an OpenMP team of its own (its thread inherits the worker's name); with more
    OpenMP threads than cores libgomp throttles its spin-wait, and every later multi-threaded op of the process
    pays a futex sleep and wake-up (a small op: 5.9 -> 24-39 us on the development machine; an X-Former training
    step 20% slower, BLIP-2's in the same process as much). Two OpenMP threads, as on the 2-core machines.

    What is guarded is exact: no collective runs, and no third gloo-named thread exists afterwards (gloo's group
    has two worker threads of its own, which may still be starting; the old test compared the count right after
    the group started, 1 on a loaded machine, with the count after, 2, and failed without the fault). With LAVIS's
    gather (the old code) all_gather runs and a third gloo-named thread appears."""
    probe = tmp_path / "probe.py"
    probe.write_text(GATHER_PROBE)
    env = dict(child_env(), OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    result = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "collectives run: []" in result.stdout, result.stdout
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("gloo-named threads after:")]
    assert int(line.split(":")[1]) <= 2, result.stdout  # no third thread: no OpenMP team on gloo's worker


def test_torchrun_job_survives_a_killed_rank_and_ends_equal_to_an_uninterrupted_run(tmp_path):
    """2 gloo processes, 2 steps per epoch, 2 epochs, a checkpoint after every step. Rank 1 is SIGKILLed in the
    forward of global step 3 (epoch 1, iteration 1); torchrun stops rank 0 and restarts both (--max-restarts=1);
    the new job resumes (``auto``) from the killed job's last checkpoint and ends with the reference's weights and
    optimizer state (torch.equal)."""
    data = tmp_path / "data"
    reference_out = tmp_path / "reference"
    run_ok(torchrun_args(data, reference_out), cwd=tmp_path)
    faulty_out = tmp_path / "faulty"
    output = run_ok(torchrun_args(data, faulty_out), cwd=tmp_path, LAVIS_XFORMER_TEST_KILL="1@3")
    assert "LAVIS_XFORMER_TEST_KILL: killing rank 1 at global step 3" in output
    (restarted,) = [p.parent for p in faulty_out.glob("*/checkpoint_1.pth")]
    (killed,) = [p for p in faulty_out.iterdir() if p.is_dir() and p != restarted]
    assert (killed / "checkpoint_0.pth").is_file() and not (killed / "checkpoint_1.pth").exists()
    assert "resume: auto -> " + str(killed) in output
    (reference_job,) = [p for p in reference_out.iterdir() if p.is_dir()]
    assert_same_training_state(restarted / "checkpoint_1.pth", reference_job / "checkpoint_1.pth")


def test_image_value_check_tells_finite_values_overflowing_the_sum_from_nan_and_inf():
    from lavis_xformer.models.llm_head import check_image_values

    huge = torch.full((2, 3, 4, 4), 3.0e38)  # finite, but its sum is inf
    assert not torch.isfinite(huge.sum())
    assert check_image_values(huge) is huge
    huge[1, 2, 3, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"NaN or inf values \(batch items \[1\]\)"):
        check_image_values(huge)
