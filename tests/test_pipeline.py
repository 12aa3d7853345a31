"""The training/evaluation pipeline: entry points, runner, tasks, LAVIS compatibility patches, shapes data, yamls.

Subprocess tests run the real entry points (``python -m lavis_xformer.train`` / ``.evaluate``, ``torchrun``) on
CPU with the tiny models on a few shapes images; everything else runs in this process.
"""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import OmegaConf
from PIL import Image

from lavis_xformer import compat
from lavis_xformer.datasets import shapes
from lavis_xformer.datasets.robust import RobustDataset
from lavis_xformer.models.builders import no_hub
from lavis_xformer.checkpoints import save_checkpoint_atomically
from lavis_xformer.runners.runner_xformer import RunnerXFormer

REPO = Path(__file__).resolve().parent.parent
PROJECTS = REPO / "projects" / "xformer"
DEMO_TRAIN = PROJECTS / "demo" / "pretrain_stage1_shapes.yaml"
DEMO_TRAIN_BLIP2 = PROJECTS / "demo" / "pretrain_stage1_shapes_blip2.yaml"
DEMO_EVAL = PROJECTS / "demo" / "ret_shapes_eval.yaml"
ALL_YAMLS = sorted(PROJECTS.rglob("*.yaml"))
XFORMER_YAMLS = [p for p in ALL_YAMLS if not p.stem.endswith("_blip2")]
TWIN_ARCH = {"xformer": "blip2_baseline", "xformer_opt": "blip2_baseline_opt", "xformer_t5": "blip2_baseline_t5"}
ON_GPU_MACHINE = torch.cuda.is_available()

SMALL_SPEC = shapes.ShapesSpec(seed=3, image_size=48, num_train=24, num_val=6, num_test=6)


def subprocess_env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # this checkout's plugin
    for launcher_variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(launcher_variable, None)  # a single-process run must not think it was launched by torchrun/SLURM
    return env


def run_cli(args, cwd, timeout=240):
    """Run a command; on failure show its output (the last part) in the assertion message."""
    result = subprocess.run(args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed ({result.returncode}):\n{output[-6000:]}"
    return output


def shapes_options(builder, root, **sizes):
    """--options entries pointing a shapes dataset at ``root`` with the given sizes."""
    items = [f"datasets.{builder}.shapes.root={root}"]
    items += [f"datasets.{builder}.shapes.{key}={value}" for key, value in sizes.items()]
    return items


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return shapes.ensure_generated(SMALL_SPEC, root)


# =================================================================================================================
# Shapes data
# =================================================================================================================
def test_shapes_generator_is_deterministic(tmp_path, small_shapes):
    again = shapes.ensure_generated(SMALL_SPEC, tmp_path / "again")
    assert sorted(p.name for p in again.rglob("*")) == sorted(p.name for p in small_shapes.rglob("*"))
    assert tree_digest(again) == tree_digest(small_shapes)  # same spec -> same bytes, PNGs included
    other = shapes.ensure_generated(dataclasses.replace(SMALL_SPEC, seed=4), tmp_path / "other")
    assert tree_digest(other) != tree_digest(small_shapes)
    # resizing one split leaves the others' content unchanged
    bigger = shapes.ensure_generated(dataclasses.replace(SMALL_SPEC, num_train=30), tmp_path / "big")
    for name in ("caption_val", "vqa_test_annotations", "scenes_test"):
        assert shapes.read_annotation(bigger, name) == shapes.read_annotation(small_shapes, name)
    assert not list(tmp_path.glob("*/.shapes-*"))  # no staging folders left behind


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected components of a boolean image (independent of the generator's geometry)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_shapes_annotations_are_correct(small_shapes):
    words = {1: "a", 2: "two", 3: "three", 4: "four"}
    for split in shapes.SPLITS:
        scenes = {s["image_id"]: s for s in shapes.read_annotation(small_shapes, f"scenes_{split}")}
        for scene in scenes.values():
            assert 1 <= len(scene["objects"]) <= 4
            # the picture shows exactly the annotated objects: one blob each, in its colour
            pixels = np.asarray(Image.open(small_shapes / "images" / scene["image"]).convert("RGB"))
            assert _components((pixels != shapes.BACKGROUND).any(axis=-1)) == len(scene["objects"])
            for obj in scene["objects"]:
                x, y = obj["center"]
                assert tuple(pixels[y, x]) == shapes.COLORS[obj["color"]]

        # VQA answers, recomputed from the scene annotation
        vqa = shapes.read_annotation(small_shapes, f"vqa_{split}")
        kinds = Counter()
        for qa in vqa:
            objects = scenes[qa["image_id"]]["objects"]
            question = qa["question"]
            if question.startswith("How many"):
                shape = question.split()[2].rstrip("s")
                expected = str(sum(o["shape"] == shape for o in objects))
                kinds["count"] += 1
            else:
                color, shape = question.split()[3:5]  # "Is there a {color} {shape} in the image?"
                expected = "yes" if any(o["color"] == color and o["shape"] == shape for o in objects) else "no"
                kinds[expected] += 1
            assert qa["answer"] == [expected] * 10, question
        n_images = len(scenes)
        assert kinds == Counter({"count": n_images, "yes": n_images, "no": n_images})  # yes/no exactly balanced

        # captions name every (colour, shape) group with its number
        for ann in shapes.read_annotation(small_shapes, f"caption_{split}"):
            texts = ann["caption"] if isinstance(ann["caption"], list) else [ann["caption"]]
            image_id = ann["image_id"] if split != "train" else int(ann["image_id"].split("_")[1])
            groups = Counter((o["color"], o["shape"]) for o in scenes[image_id]["objects"])
            for text in texts:
                for (color, shape), n in groups.items():
                    assert f"{words[n]} {color} {shape}{'s' if n > 1 else ''}" in text, text


def _build(builder_name, root, spec=SMALL_SPEC):
    sizes = dataclasses.asdict(spec)
    cfg = OmegaConf.load(registry.get_builder_class(builder_name).default_config_path()).datasets[builder_name]
    cfg.shapes.update(sizes, root=str(root))
    cfg.vis_processor = {"train": {"name": "xformer_image_train", "image_size": 32},
                         "eval": {"name": "xformer_image_eval", "image_size": 32}}
    text = "blip_question" if builder_name.endswith("vqa") else "blip_caption"
    cfg.text_processor = {"train": {"name": text}, "eval": {"name": text}}
    return registry.get_builder_class(builder_name)(cfg).build_datasets()


def test_lavis_dataset_classes_read_shapes(small_shapes, tmp_path):
    from lavis.common.vqa_tools.vqa import VQA
    from lavis.common.vqa_tools.vqa_eval import VQAEval
    from lavis.datasets.datasets.caption_datasets import CaptionDataset, CaptionEvalDataset
    from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset, COCOVQAEvalDataset
    from lavis.datasets.datasets.retrieval_datasets import RetrievalDataset, RetrievalEvalDataset

    root = small_shapes.parent
    caption = _build("xformer_shapes_caption", root)
    # train splits come wrapped in RobustDataset (bad samples replaced and counted) around LAVIS's class
    assert isinstance(caption["train"], RobustDataset)
    assert type(caption["train"].dataset) is CaptionDataset and type(caption["val"]) is CaptionEvalDataset
    sample = caption["train"][0]
    assert sample["image"].shape == (3, 32, 32) and isinstance(sample["text_input"], str)
    assert isinstance(caption["test"][0]["image_id"], int)  # CaptionTask does int(image_id)

    vqa = _build("xformer_shapes_vqa", root)
    assert type(vqa["train"].dataset) is COCOVQADataset and type(vqa["test"]) is COCOVQAEvalDataset
    assert len(vqa["train"]) == 3 * SMALL_SPEC.num_train
    batch = vqa["train"].collater([vqa["train"][i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["weight"].tolist() == [1.0] * 4
    val = vqa["val"]
    assert val.answer_list == shapes.ANSWER_LIST and val.coco_fmt_qust_file and val.coco_fmt_anno_file
    # LAVIS's official VQA scorer reads the files: perfect answers score 100, "yes" everywhere does not
    official = VQA(val.coco_fmt_anno_file, val.coco_fmt_qust_file)
    truth = {a["question_id"]: a["multiple_choice_answer"] for a in official.dataset["annotations"]}
    for answers, expected in ((truth, 100.0), ({q: "yes" for q in truth}, 100.0 / 3)):
        results = tmp_path / "results.json"
        results.write_text(json.dumps([{"question_id": q, "answer": a} for q, a in answers.items()]))
        scorer = VQAEval(official, official.loadRes(str(results), val.coco_fmt_qust_file), n=2)
        scorer.evaluate()
        assert scorer.accuracy["overall"] == pytest.approx(expected, abs=0.01)

    retrieval = _build("xformer_shapes_retrieval", root)
    assert type(retrieval["train"].dataset) is RetrievalDataset and type(retrieval["test"]) is RetrievalEvalDataset
    test = retrieval["test"]
    assert len(test.image) == SMALL_SPEC.num_test and len(test.text) == 3 * SMALL_SPEC.num_test
    assert all(test.txt2img[t] == i for i, texts in test.img2txt.items() for t in texts)


# =================================================================================================================
# Project yamls
# =================================================================================================================
def load_config(path, options=None):
    return Config(SimpleNamespace(cfg_path=str(path), options=options))


_META_BUILDS = {}


def build_on_meta(model_cls, model_cfg):
    """Build the model on the meta device (no memory, no download); returns its image size. Several yamls share
    a model config: each distinct one is built once."""
    key = json.dumps(OmegaConf.to_container(model_cfg, resolve=True), sort_keys=True)
    if key not in _META_BUILDS:
        with torch.device("meta"), no_hub():
            model = model_cls.from_config(model_cfg)
        assert any(p.requires_grad for p in model.parameters())
        _META_BUILDS[key] = getattr(getattr(model, "config", None), "image_size", None)
    return _META_BUILDS[key]


@pytest.mark.parametrize("path", ALL_YAMLS, ids=[str(p.relative_to(PROJECTS)) for p in ALL_YAMLS])
def test_project_yaml_parses_and_builds_on_meta(path):
    arch = OmegaConf.load(path).model.arch
    model_cls = registry.get_model_class(arch)
    if model_cls is None:
        pytest.skip(f"model arch {arch!r} is not registered (the stage-2 models land separately)")
    cfg = load_config(path)
    run = cfg.run_cfg
    assert registry.get_task_class(run.task) is not None, run.task
    assert registry.get_runner_class(run.runner) is not None, run.runner
    if "lr_sched" in run:
        import lavis.common.optims  # noqa: F401  (registers the schedulers)

        assert registry.get_lr_scheduler_class(run.lr_sched) is not None
    for name, dataset_cfg in cfg.datasets_cfg.items():
        for kind in ("vis_processor", "text_processor"):
            for split_cfg in (dataset_cfg.get(kind) or {}).values():
                assert registry.get_processor_class(split_cfg.name) is not None, split_cfg.name

    model_cfg = OmegaConf.merge(cfg.model_cfg, {"load_pretrained": False, "load_finetuned": False})
    image_size = build_on_meta(model_cls, model_cfg)
    if image_size is not None:  # the processors' image size is the model's
        for dataset_cfg in cfg.datasets_cfg.values():
            sizes = {split.image_size for split in dataset_cfg.vis_processor.values()}
            assert sizes == {image_size}, (sizes, image_size)


@pytest.mark.parametrize("path", XFORMER_YAMLS, ids=[str(p.relative_to(PROJECTS)) for p in XFORMER_YAMLS])
def test_blip2_twin_differs_only_in_model(path):
    twin = path.with_name(f"{path.stem}_blip2.yaml")
    assert twin.is_file(), f"{path.name} has no BLIP-2 twin {twin.name}"
    ours, theirs = OmegaConf.load(path), OmegaConf.load(twin)
    assert ours.datasets == theirs.datasets
    run_ours, run_theirs = dict(ours.run), dict(theirs.run)
    assert run_ours.pop("output_dir") != run_theirs.pop("output_dir")  # runs must not write into each other
    assert run_ours == run_theirs
    assert theirs.model.arch == TWIN_ARCH[ours.model.arch]
    assert theirs.model.model_type == ours.model.model_type


RUN_YAMLS = [p for p in ALL_YAMLS if p.parent.name in ("train", "eval")]


@pytest.mark.parametrize("path", RUN_YAMLS, ids=[str(p.relative_to(PROJECTS)) for p in RUN_YAMLS])
def test_project_yaml_loads_the_checkpoint_it_names(path):
    """After LAVIS merges the model type's defaults, the weights loaded are the ones the yaml names: never a
    released fine-tuned checkpoint that a model type defaults to (blip2_baseline_opt's caption_coco_opt2.7b)."""
    arch = OmegaConf.load(path).model.arch
    if registry.get_model_class(arch) is None:
        pytest.skip(f"model arch {arch!r} is not registered (the stage-2 models land separately)")
    model_cfg = load_config(path).model_cfg
    assert model_cfg.load_finetuned is False
    if path.stem.startswith("pretrain_stage1"):
        assert model_cfg.load_pretrained is False
    else:
        assert model_cfg.load_pretrained is True
        assert model_cfg.pretrained == OmegaConf.load(path).model.pretrained and "<job_id>" in model_cfg.pretrained


@pytest.mark.parametrize("name", ["vqa_ft", "caption_coco_ft"])
def test_finetuning_twins_train_the_same_vit_parameters(name):
    trainable = []
    for path in (PROJECTS / "train" / f"{name}.yaml", PROJECTS / "train" / f"{name}_blip2.yaml"):
        cfg = load_config(path)
        model_cfg = OmegaConf.merge(cfg.model_cfg, {"load_pretrained": False, "load_finetuned": False})
        with torch.device("meta"), no_hub():
            model = registry.get_model_class(model_cfg.arch).from_config(model_cfg)
        trainable.append(sorted(n for n, p in model.visual_encoder.named_parameters() if p.requires_grad))
    assert trainable[0] and all("norm" in n for n in trainable[0])  # the supplement: CLIP layer norms only
    assert trainable[0] == trainable[1]


def _yaml(rel):
    return OmegaConf.load(PROJECTS / rel)


def test_paper_training_settings():
    stage1 = _yaml("train/pretrain_stage1.yaml")
    assert set(stage1.datasets) == {"coco_caption", "vg_caption", "conceptual_caption_3m", "conceptual_caption_12m",
                                    "sbu_caption"}
    for dataset in stage1.datasets.values():
        assert dict(dataset.vis_processor.train) == {"name": "xformer_image_train", "image_size": 224}
    assert stage1.model.mask_ratio == 0.5 and stage1.model.load_pretrained is False
    run = stage1.run
    assert (run.max_epoch, run.lr_sched, run.init_lr, run.warmup_steps) == (9, "linear_warmup_cosine_iter_lr", 1e-4,
                                                                              2000)
    assert (run.beta2, run.weight_decay, run.task, run.runner) == (0.98, 0.05, "xformer_pretrain", "runner_xformer")

    for llm in ("opt2.7b", "opt6.7b", "flant5xl"):
        stage2 = _yaml(f"train/pretrain_stage2_{llm}.yaml")
        assert (stage2.run.max_epoch, stage2.run.min_lr, stage2.run.init_lr, stage2.run.beta2) == (1, 5e-5, 1e-4, 0.98)
        assert stage2.run.lr_sched == "linear_warmup_cosine_iter_lr"  # per iteration: 1 epoch still ends at min_lr
        assert stage2.datasets == stage1.datasets and stage2.model.model_type == f"pretrain_{llm}"

    vqa_ft = _yaml("train/vqa_ft.yaml")
    assert (vqa_ft.model.freeze_vit, vqa_ft.model.freeze_vit_layernorms, vqa_ft.model.image_size) == (True, False, 490)
    assert vqa_ft.run.init_lr == 1e-5 and set(vqa_ft.datasets) == {"coco_vqa", "vg_vqa"}


@pytest.mark.parametrize("rel", sorted(str(p.relative_to(PROJECTS)) for p in (PROJECTS / "eval").glob("*qa_*.yaml")))
def test_paper_vqa_generation_settings(rel):
    run = _yaml(rel).run
    if run.task == "xformer_fewshot_vqa":  # no run.prompt: the model's vqa_prompt, for demonstrations and query
        assert "prompt" not in run
    else:
        assert run.prompt == "Question: {} Short answer:"
    assert (run.num_beams, run.length_penalty, run.inference_method) == (5, 0, "generate")
    assert run.task in ("xformer_vqa", "xformer_gqa", "xformer_fewshot_vqa")  # LAVIS's vqa/gqa drop length_penalty


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
    epochs = [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"train')]
    assert len(epochs) == 2
    losses = [float(e["train_loss"]) for e in epochs]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    terms = {"train_loss_itc", "train_loss_itm", "train_loss_lm"} | ({"train_loss_rec"} if model == "xformer" else set())
    assert terms <= set(epochs[0]) and all(math.isfinite(float(e[t])) for e in epochs for t in terms)
    assert output.count(" loss: ") >= 2 * 3  # LAVIS's MetricLogger, every step (48 images / batch 16)

    assert sorted(p.name for p in job.iterdir() if p.is_file()) == ["checkpoint_0.pth", "checkpoint_1.pth", "log.txt"]
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


def test_evaluate_stage1_retrieval_on_cpu(stage1_run):
    """Zero-shot retrieval on the shapes test split with the trained X-Former (LAVIS's retrieval task). BLIP-2's
    evaluation is the same LAVIS code (``Blip2Qformer.compute_sim_matrix``), so one model suffices."""
    folder, job, _ = stage1_run("xformer")
    run_cli(
        [sys.executable, "-m", "lavis_xformer.evaluate", "--cfg-path", DEMO_EVAL, "--options",
         *shapes_options("xformer_shapes_retrieval", folder / "data", **STAGE1_SIZES),
         f"model.finetuned={job / 'checkpoint_1.pth'}", "run.k_test=4", f"run.output_dir={folder / 'eval'}"],
        cwd=folder,
    )
    (eval_job,) = (folder / "eval").iterdir()
    metrics = json.loads((eval_job / "evaluate.txt").read_text().splitlines()[-1])
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
    (epoch,) = [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"train')]
    assert math.isfinite(float(epoch["train_loss"]))


def test_lavis_evaluate_py_steps_evaluate_on_cpu(stage1_run, tmp_path):
    """LAVIS's own evaluation sequence (RunnerBase, whatever run.runner says) evaluates the demo retrieval yaml
    with a stage-1 checkpoint on CPU, with the same metrics as the plugin's ``python -m lavis_xformer.evaluate``."""
    folder, job, _ = stage1_run("xformer")
    script = tmp_path / "lavis_evaluate.py"
    script.write_text(LAVIS_EVALUATE_PY)
    options = [*shapes_options("xformer_shapes_retrieval", folder / "data", **STAGE1_SIZES),
               f"model.finetuned={job / 'checkpoint_1.pth'}", "run.k_test=4"]
    output = run_cli([sys.executable, script, DEMO_EVAL, *options, f"run.output_dir={tmp_path / 'lavis'}"],
                     cwd=tmp_path)
    assert "Not using distributed mode" in output  # LAVIS's init: no process group, RunnerBase as LAVIS builds it
    run_cli([sys.executable, "-m", "lavis_xformer.evaluate", "--cfg-path", DEMO_EVAL, "--options", *options,
             f"run.output_dir={tmp_path / 'plugin'}"], cwd=tmp_path)
    metrics = [json.loads(next((tmp_path / name).glob("*/evaluate.txt")).read_text().splitlines()[-1])
               for name in ("lavis", "plugin")]
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
