"""The project yamls: each parses through LAVIS's Config and builds on meta; twins differ only in the model."""

import json
from types import SimpleNamespace

import pytest
import torch
from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_xformer.models.builders import no_hub
from helpers import PROJECTS


ALL_YAMLS = sorted(PROJECTS.rglob("*.yaml"))
CONNECTOR_SUFFIXES = ("_perceiver_dual", "_perceiver_matched", "_projector_llava", "_perceiver", "_projector")


def _is_connector(path) -> bool:
    return OmegaConf.load(path).model.arch.startswith(("perceiver", "projector"))


CONNECTOR_YAMLS = [p for p in ALL_YAMLS if _is_connector(p)]
XFORMER_YAMLS = [p for p in ALL_YAMLS if not p.stem.endswith("_blip2") and p not in CONNECTOR_YAMLS]
TWIN_ARCH = {"xformer": "blip2_baseline", "xformer_opt": "blip2_baseline_opt", "xformer_t5": "blip2_baseline_t5"}
ON_GPU_MACHINE = torch.cuda.is_available()


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


def _assert_same_data_and_run(path, twin):
    """The two run yamls read the same data with the same run settings, into different output folders."""
    assert twin.is_file(), f"{path.name} has no BLIP-2 twin {twin.name}"
    ours, theirs = OmegaConf.load(path), OmegaConf.load(twin)
    assert ours.datasets == theirs.datasets
    run_ours, run_theirs = dict(ours.run), dict(theirs.run)
    assert run_ours.pop("output_dir") != run_theirs.pop("output_dir")  # runs must not write into each other
    assert run_ours == run_theirs
    return ours, theirs


@pytest.mark.parametrize("path", XFORMER_YAMLS, ids=[str(p.relative_to(PROJECTS)) for p in XFORMER_YAMLS])
def test_blip2_twin_differs_only_in_model(path):
    ours, theirs = _assert_same_data_and_run(path, path.with_name(f"{path.stem}_blip2.yaml"))
    assert theirs.model.arch == TWIN_ARCH[ours.model.arch]
    assert theirs.model.model_type == ours.model.model_type


def _connector_twin(path):
    """The BLIP-2 yaml a connector yaml is compared with: the same stem without the connector's suffix (the demo's
    one-stage connectors: the BLIP-2 stage-2 demo run)."""
    if path.parent.name == "demo":
        return path.with_name("pretrain_stage2_shapes_blip2.yaml")
    suffix = next(s for s in CONNECTOR_SUFFIXES if path.stem.endswith(s))
    return path.with_name(f"{path.stem[:-len(suffix)]}_blip2.yaml")


@pytest.mark.parametrize("path", CONNECTOR_YAMLS, ids=[str(p.relative_to(PROJECTS)) for p in CONNECTOR_YAMLS])
def test_connector_yaml_differs_from_its_blip2_twin_only_in_model(path):
    """A connector comparison differs from BLIP-2 only in the connector: the same data, run settings and task."""
    _assert_same_data_and_run(path, _connector_twin(path))


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
    one_stage_connector = path in CONNECTOR_YAMLS and path.stem.startswith("pretrain_stage2")  # BLIP-3: no stage 1
    if path.stem.startswith("pretrain_stage1") or one_stage_connector:
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
        assert run.prompt == "Question: {} Short Answer:"  # the paper's (section 3.1)
    assert (run.num_beams, run.length_penalty, run.inference_method) == (5, 0, "generate")
    assert run.task in ("xformer_vqa", "xformer_gqa", "xformer_fewshot_vqa")  # LAVIS's vqa/gqa drop length_penalty
