"""LAVIS 1.0.2 on a CPU: the compatibility patches, the plugin's runner and tasks, in this process."""

from types import SimpleNamespace

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_xformer import compat
from lavis_xformer.checkpoints import save_checkpoint_atomically
from lavis_xformer.runners.runner_xformer import RunnerXFormer


ON_GPU_MACHINE = torch.cuda.is_available()


# =================================================================================================================
# Tasks, runner and compatibility patches (in process)
# =================================================================================================================
class RecordingVQAModel:
    def __init__(self):
        self.calls = []

    def predict_answers(self, samples, **kwargs):
        self.calls.append(kwargs)
        return ["2"] * len(samples["question_id"])


def test_vqa_task_passes_length_penalty():
    from lavis.tasks.vqa import VQATask

    cfg = SimpleNamespace(run_cfg=OmegaConf.create({"prompt": "Question: {} Short answer:", "num_beams": 5,
                                                   "length_penalty": 0, "inference_method": "generate"}))
    samples = {"question_id": torch.tensor([7, 8]), "image": torch.zeros(2, 3, 4, 4)}
    ours, theirs = RecordingVQAModel(), RecordingVQAModel()
    results = registry.get_task_class("xformer_vqa").setup_task(cfg=cfg).valid_step(ours, samples)
    VQATask.setup_task(cfg=cfg).valid_step(theirs, samples)
    assert results == [{"question_id": 7, "answer": "2"}, {"question_id": 8, "answer": "2"}]
    assert ours.calls[0]["length_penalty"] == 0.0 and ours.calls[0]["prompt"] == "Question: {} Short answer:"
    assert "length_penalty" not in theirs.calls[0]  # why the plugin's task exists


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_0.pth"
    save_checkpoint_atomically({"model": {"w": torch.ones(3)}, "epoch": 0}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 0

    def torn_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_atomically({"model": {"w": torch.zeros(3)}, "epoch": 1}, path)
    kept = torch.load(path, weights_only=True)  # the previous checkpoint, intact
    assert kept["epoch"] == 0 and torch.equal(kept["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_0.pth"]  # no temporary file left


def test_compat_patches_are_applied():
    import lavis.common.dist_utils as dist_utils
    from lavis.common.logger import SmoothedValue

    from lavis_xformer.common import distributed

    assert SmoothedValue.synchronize_between_processes is compat.synchronize_between_processes
    assert dist_utils.init_distributed_mode is distributed.init_distributed_mode
    from lavis.runners.runner_base import RunnerBase

    assert RunnerBase.create_loaders is compat.runner_create_loaders
    assert RunnerBase.model.fget is compat.runner_model and RunnerBase.eval_epoch is compat.runner_eval_epoch


def test_smoothed_value_synchronizes_on_gloo(process_group):
    from lavis.common.logger import SmoothedValue

    meter = SmoothedValue()
    for value in (1.0, 2.0, 4.0):
        meter.update(value)
    if not ON_GPU_MACHINE:  # LAVIS's original builds a CUDA tensor (lavis/common/logger.py:43)
        with pytest.raises((RuntimeError, AssertionError)):
            compat.ORIGINALS["SmoothedValue.synchronize_between_processes"](meter)
    meter.synchronize_between_processes()
    assert (meter.count, meter.total) == (3, 7.0)


def test_init_distributed_mode_original_needs_cuda(monkeypatch):
    if ON_GPU_MACHINE:
        pytest.skip("LAVIS's original works on a GPU machine")
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    args = SimpleNamespace(dist_url="env://")
    with pytest.raises(RuntimeError):  # torch.cuda.set_device (lavis/common/dist_utils.py:72)
        compat.ORIGINALS["dist_utils.init_distributed_mode"](args)


def test_prefetch_loader_is_host_only_inside_the_runner():
    import lavis.runners.runner_base as runner_base
    from lavis.datasets.datasets.dataloader_utils import PrefetchLoader

    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=4)
    if not ON_GPU_MACHINE:  # LAVIS's wrapper creates a CUDA stream (dataloader_utils.py:56)
        with pytest.raises(RuntimeError):
            PrefetchLoader(loader)
    with compat.host_prefetch_loader():
        wrapped = runner_base.PrefetchLoader(loader)
    assert runner_base.PrefetchLoader is PrefetchLoader  # restored after the block
    assert isinstance(wrapped, PrefetchLoader) and len(wrapped) == 3 and wrapped.dataset == loader.dataset
    assert [b.tolist() for b in wrapped] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def fake_runner(**attrs):
    base = dict(_wrapped_model=None, device=torch.device("cpu"), cuda_enabled=False, use_distributed=False,
                config=SimpleNamespace(run_cfg=OmegaConf.create({"amp": True})))
    return SimpleNamespace(**{**base, **attrs})


def test_runner_model_and_scaler_on_cpu():
    from lavis.models.base_model import BaseModel
    from lavis.runners.runner_base import RunnerBase

    module = BaseModel()
    module.linear = torch.nn.Linear(2, 2)
    assert compat.ORIGINALS["RunnerBase.model"].fget(fake_runner(_model=module)) is None  # LAVIS: runner_base.py:85-97
    assert RunnerXFormer.model.fget(fake_runner(_model=module)) is module
    assert RunnerBase.model.fget(fake_runner(_model=module)) is module  # patched for LAVIS's evaluate.py
    assert RunnerXFormer.scaler.fget(fake_runner()) is None  # amp: True is ignored off-GPU


def test_runner_evaluation_keeps_batches_on_cpu():
    from lavis.tasks.base_task import BaseTask

    class Task(BaseTask):
        def valid_step(self, model, samples):
            return [samples["image"].device.type]

    loader = [{"image": torch.zeros(1)}]
    if not ON_GPU_MACHINE:  # LAVIS's runner calls evaluation() whose cuda_enabled defaults to True
        with pytest.raises((RuntimeError, AssertionError)):
            Task().evaluation(None, loader)
    model = torch.nn.Linear(1, 1)
    model.before_evaluation = lambda **kwargs: None
    runner = fake_runner(dataloaders={"test": loader}, datasets={"test": None}, task=Task(), model=model,
                         unwrap_dist_model=lambda m: m)
    assert RunnerXFormer.eval_epoch(runner, "test", cur_epoch=0, skip_reload=True) is None
    task = Task()
    task.after_evaluation = lambda val_result, **kwargs: val_result
    runner.task = task
    assert RunnerXFormer.eval_epoch(runner, "test", cur_epoch=0, skip_reload=True) == ["cpu"]


def test_lavis_runner_base_loaders_are_host_only_off_gpu():
    """LAVIS's evaluate.py builds RunnerBase itself: its create_loaders makes the CUDA-only PrefetchLoader
    (runner_base.py:538); patched, a CPU run gets the host wrapper and a GPU run LAVIS's own."""
    from lavis.datasets.datasets.dataloader_utils import PrefetchLoader
    from lavis.runners.runner_base import RunnerBase

    from lavis_xformer.compat import HostPrefetchLoader

    runner = fake_runner(use_dist_eval_sampler=False)
    numbers = torch.utils.data.Subset(list(range(10)), range(10))  # a map-style dataset (a list means several)
    args = dict(datasets=[numbers], num_workers=0, batch_sizes=[4], is_trains=[False], collate_fns=[None])
    if not ON_GPU_MACHINE:
        with pytest.raises(RuntimeError):
            compat.ORIGINALS["RunnerBase.create_loaders"](runner, **args)
    (loader,) = RunnerBase.create_loaders(runner, **args)
    assert type(loader) is HostPrefetchLoader and [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    if ON_GPU_MACHINE:
        (loader,) = RunnerBase.create_loaders(fake_runner(use_dist_eval_sampler=False, cuda_enabled=True), **args)
        assert type(loader) is PrefetchLoader
