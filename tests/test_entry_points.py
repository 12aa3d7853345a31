"""The entry points end to end in subprocesses on a CPU: train, resume, evaluate, LAVIS's scripts, two-process DDP."""

import json
import math
import sys

import pytest
import torch

from lavis_xformer.runners.logs import read_epoch_log
from helpers import DEMO_EVAL, DEMO_TRAIN, DEMO_TRAIN_BLIP2, run_cli, shapes_options


# =================================================================================================================
# End to end, through the entry points (subprocesses)
# =================================================================================================================
STAGE1_SIZES = dict(num_train=48, num_val=4, num_test=8)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """``python -m lavis_xformer.train`` on a demo yaml (2 epochs x 3 steps), once per model: (folder, job, output)."""
    runs = {}

    def run(model):
        if model not in runs:
            folder = tmp_path_factory.mktemp(f"stage1_{model}")
            yaml = DEMO_TRAIN if model == "xformer" else DEMO_TRAIN_BLIP2
            output = run_cli(
                [sys.executable, "-m", "lavis_xformer.train", "--cfg-path", yaml, "--options",
                 *shapes_options("xformer_shapes_caption", folder / "data", **STAGE1_SIZES),
                 "run.max_epoch=2", "run.batch_size_train=16", "run.log_freq=1", "run.warmup_steps=2",
                 f"run.output_dir={folder / 'train'}"],
                cwd=folder,
            )
            (job,) = [p for p in (folder / "train").iterdir() if p.is_dir()]
            runs[model] = folder, job, output
        return runs[model]

    return run


@pytest.mark.parametrize("model", ["xformer", "blip2"])
def test_train_stage1_on_cpu(model, stage1_run):
    _, job, output = stage1_run(model)
    epochs = read_epoch_log(job)
    assert len(epochs) == 2
    losses = [float(e["train_loss"]) for e in epochs]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    terms = {"train_loss_itc", "train_loss_itm", "train_loss_lm"} | ({"train_loss_rec"} if model == "xformer" else set())
    assert terms <= set(epochs[0]) and all(math.isfinite(float(e[t])) for e in epochs for t in terms)
    assert output.count(" loss: ") >= 2 * 3  # LAVIS's MetricLogger, every step (48 images / batch 16)

    assert sorted(p.name for p in job.iterdir() if p.is_file()) == ["checkpoint_0.pth", "checkpoint_1.pth",
                                                                     "config.yaml", "log.txt"]
    checkpoint = torch.load(job / "checkpoint_1.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["optimizer"]["state"]
    assert "query_tokens" in checkpoint["model"]
    assert not any(k.startswith(("visual_encoder.", "mae_encoder.")) for k in checkpoint["model"])  # frozen: not saved


def test_resume_from_checkpoint_on_cpu(stage1_run, tmp_path):
    """``run.resume_ckpt_path`` continues after the saved epoch. (LAVIS's own resume loads the trainable-only
    state dict strictly and fails on the frozen encoders it did not save.)"""
    folder, job, _ = stage1_run("blip2")
    out = tmp_path / "resumed"
    run_cli(
        [sys.executable, "-m", "lavis_xformer.train", "--cfg-path", DEMO_TRAIN_BLIP2, "--options",
         *shapes_options("xformer_shapes_caption", folder / "data", **STAGE1_SIZES),
         "run.max_epoch=2", "run.batch_size_train=16", f"run.resume_ckpt_path={job / 'checkpoint_0.pth'}",
         f"run.output_dir={out}"],
        cwd=tmp_path,
    )
    (resumed,) = out.iterdir()
    assert sorted(p.name for p in resumed.glob("checkpoint_*")) == ["checkpoint_1.pth"]  # epoch 0 was not redone
    assert torch.load(resumed / "checkpoint_1.pth", weights_only=True)["epoch"] == 1


def retrieval_options(stage1_run):
    """``--options`` of the zero-shot retrieval runs on the X-Former trained by ``stage1_run``."""
    folder, job, _ = stage1_run("xformer")
    return [*shapes_options("xformer_shapes_retrieval", folder / "data", **STAGE1_SIZES),
            f"model.finetuned={job / 'checkpoint_1.pth'}", "run.k_test=4"]


@pytest.fixture(scope="module")
def plugin_retrieval(stage1_run):
    """``python -m lavis_xformer.evaluate`` on the demo retrieval yaml with the stage-1 X-Former, once (the same run
    serves the retrieval test and the LAVIS-evaluate.py comparison): its metrics (last line of evaluate.txt)."""
    folder, _, _ = stage1_run("xformer")
    run_cli([sys.executable, "-m", "lavis_xformer.evaluate", "--cfg-path", DEMO_EVAL, "--options",
             *retrieval_options(stage1_run), f"run.output_dir={folder / 'eval'}"], cwd=folder)
    (eval_job,) = (folder / "eval").iterdir()
    return json.loads((eval_job / "evaluate.txt").read_text().splitlines()[-1])


def test_evaluate_stage1_retrieval_on_cpu(plugin_retrieval):
    """Zero-shot retrieval on the shapes test split with the trained X-Former (LAVIS's retrieval task). BLIP-2's
    evaluation is the same LAVIS code (``Blip2Qformer.compute_sim_matrix``), so one model suffices."""
    metrics = plugin_retrieval
    assert set(metrics) >= {"txt_r1", "txt_r5", "img_r1", "img_r5", "agg_metrics"}
    assert 0.0 <= metrics["txt_r1"] <= metrics["txt_r5"] <= 100.0


def lavis_script(runner_import: str, run: str) -> str:
    """The steps LAVIS's own train.py and evaluate.py (GitHub; not in the wheel) share, unchanged, plus
    `import lavis_xformer`; they differ in how they import and build the runner and in what they run."""
    return f'''
import random
import sys

import numpy as np
import torch
import torch.backends.cudnn as cudnn

import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, init_distributed_mode
from lavis.common.logger import setup_logger
from lavis.common.optims import LinearWarmupCosineLRScheduler, LinearWarmupStepLRScheduler  # noqa: F401
from lavis.common.registry import registry  # noqa: F401
from lavis.common.utils import now
from lavis.datasets.builders import *  # noqa: F401,F403
from lavis.models import *  # noqa: F401,F403
from lavis.processors import *  # noqa: F401,F403
{runner_import}
from lavis.tasks import *  # noqa: F401,F403

import lavis_xformer  # noqa: F401  (the plugin, imported after LAVIS's own bindings)


class Args:
    cfg_path = sys.argv[1]
    options = sys.argv[2:]


job_id = now()
cfg = Config(Args())
init_distributed_mode(cfg.run_cfg)
seed = cfg.run_cfg.seed + get_rank()
random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
cudnn.benchmark = False
cudnn.deterministic = True
setup_logger()
cfg.pretty_print()
task = tasks.setup_task(cfg)
datasets = task.build_datasets(cfg)
model = task.build_model(cfg)
{run}
'''


# train.py: the runner named by the yaml
LAVIS_TRAIN_PY = lavis_script("from lavis.runners import *  # noqa: F401,F403", '''\
runner = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))(
    cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets
)
runner.train()''')
# evaluate.py (the 1.0.x one): RunnerBase, whatever the yaml's run.runner says
LAVIS_EVALUATE_PY = lavis_script("from lavis.runners.runner_base import RunnerBase", '''\
runner = RunnerBase(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
runner.evaluate(skip_reload=True)''')


def test_lavis_train_py_steps_train_on_cpu(tmp_path):
    """LAVIS's own training sequence (its init_distributed_mode, its runner lookup) runs the project's demo yaml on
    CPU once the plugin is imported: the yaml's ``runner_xformer`` makes the process group and fixes the rest."""
    script = tmp_path / "lavis_train.py"
    script.write_text(LAVIS_TRAIN_PY)
    out = tmp_path / "out"
    output = run_cli(
        [sys.executable, script, DEMO_TRAIN_BLIP2,
         *shapes_options("xformer_shapes_caption", tmp_path / "data", num_train=32, num_val=2, num_test=2),
         "run.max_epoch=1", f"run.output_dir={out}"],
        cwd=tmp_path,
    )
    assert "Not using distributed mode" in output  # LAVIS's init: no process group of its own
    (job,) = out.iterdir()
    assert (job / "checkpoint_0.pth").is_file()
    (epoch,) = read_epoch_log(job)
    assert math.isfinite(float(epoch["train_loss"]))


def test_lavis_evaluate_py_steps_evaluate_on_cpu(stage1_run, plugin_retrieval, tmp_path):
    """LAVIS's own evaluation sequence (RunnerBase, whatever run.runner says) evaluates the demo retrieval yaml
    with a stage-1 checkpoint on CPU, with the same metrics as the plugin's ``python -m lavis_xformer.evaluate``
    (the ``plugin_retrieval`` run: same yaml, options and checkpoint)."""
    script = tmp_path / "lavis_evaluate.py"
    script.write_text(LAVIS_EVALUATE_PY)
    output = run_cli([sys.executable, script, DEMO_EVAL, *retrieval_options(stage1_run),
                      f"run.output_dir={tmp_path / 'lavis'}"], cwd=tmp_path)
    assert "Not using distributed mode" in output  # LAVIS's init: no process group, RunnerBase as LAVIS builds it
    lavis_metrics = json.loads(next((tmp_path / "lavis").glob("*/evaluate.txt")).read_text().splitlines()[-1])
    metrics = [lavis_metrics, plugin_retrieval]
    assert set(metrics[0]) >= {"txt_r1", "txt_r5", "img_r1", "img_r5", "agg_metrics"}
    assert metrics[0] == metrics[1]


DDP_PROBE = '''
"""Runs lavis_xformer's training entry point, recording what the model sees, then saves it per rank."""
import sys

import torch
import torch.distributed as dist

import lavis_xformer.common.distributed as model_dist
from lavis_xformer import launch

out_dir, argv = sys.argv[1], sys.argv[2:]
runner = launch.build_runner(argv)
records = {"loss_itc": [], "gather_rows": []}
gather = model_dist.concat_all_gather


def recording_gather(tensor):
    gathered = gather(tensor)
    records["gather_rows"].append((tensor.shape[0], gathered.shape[0]))
    return gathered


model_dist.concat_all_gather = recording_gather
runner._model.register_forward_hook(lambda module, inputs, output: records["loss_itc"].append(output["loss_itc"].item()))
initial = {k: v.clone() for k, v in runner._model.state_dict().items()}
runner.train()
torch.save(
    {"world_size": dist.get_world_size(), "distributed": runner.use_distributed, "records": records,
     "initial": initial, "final": runner.unwrap_dist_model(runner.model).state_dict()},
    f"{out_dir}/rank{dist.get_rank()}.pt",
)
del runner  # its DDP model holds the process group, which lavis_xformer destroys at exit (common/distributed.py)
'''


def test_two_process_cpu_ddp_matches_one_process(tmp_path):
    """torchrun, 2 gloo processes x 4 images vs 1 process x 8 images over the same 8 images.

    Made deterministic so the first-step ITC loss is comparable: no dropout, MAE masking off (ratio 0, so no
    reconstruction loss), the deterministic eval transform for training, and exactly one global batch per epoch.
    Rank 1 is seeded differently (LAVIS offsets the seed by the rank): DDP must still give it rank 0's weights.
    """
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE)
    common = [
        "--cfg-path", str(DEMO_TRAIN), "--options",
        *shapes_options("xformer_shapes_caption", tmp_path / "data", num_train=8, num_val=2, num_test=2),
        "datasets.xformer_shapes_caption.vis_processor.train.name=xformer_image_eval",
        "model.qformer_dropout=0.0", "model.dual_dropout=0.0", "model.mask_ratio=0.0", "model.reconstruction_loss=False",
        "run.max_epoch=2",
    ]
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    output = run_cli(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", probe,
         tmp_path / "ddp", *common, "run.batch_size_train=4", f"run.output_dir={tmp_path / 'ddp'}"],
        cwd=tmp_path,
    )
    assert "distributed init (torchrun, gloo, rank 0, world 2)" in output
    run_cli([sys.executable, probe, tmp_path / "single", *common, "run.batch_size_train=8",
             f"run.output_dir={tmp_path / 'single'}"], cwd=tmp_path)

    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["distributed"] for r in ranks)
    assert single["world_size"] == 1 and not single["distributed"]
    # ITC gathers the other rank's features: 4 local rows, 8 rows after the gather
    for r in ranks:
        assert r["records"]["gather_rows"] and set(r["records"]["gather_rows"]) == {(4, 8)}
    assert set(single["records"]["gather_rows"]) == {(8, 8)}
    # the mean of the ranks' first-step ITC losses is the one-process ITC loss over the same 8 pairs
    first = [r["records"]["loss_itc"][0] for r in ranks]
    assert first[0] != pytest.approx(first[1], abs=1e-4)  # the ranks did see different halves
    assert sum(first) / 2 == pytest.approx(single["records"]["loss_itc"][0], rel=1e-5)
    # both ranks end with identical weights, though rank 1 started from other ones
    initial, final = [r["initial"] for r in ranks], [r["final"] for r in ranks]
    assert any(not torch.equal(initial[0][k], initial[1][k]) for k in initial[0])
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert any(not torch.equal(final[0][k], initial[0][k]) for k in final[0])  # and training changed them
    assert all(torch.equal(initial[0][k], single["initial"][k]) for k in initial[0])  # same start as 1 process
