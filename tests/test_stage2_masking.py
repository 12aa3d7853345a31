"""Stage-2 MAE masking: the paper's 50% by default (``pretrain_stage2_*.yaml``), whole images in the
``_unmasked`` yamls, whole images at inference. The yamls' masking fields are applied to the tiny model types and
the mask a training forward actually builds is read back."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import OmegaConf

import lavis_xformer  # noqa: F401  (registers the models)

TRAIN = Path(__file__).resolve().parent.parent / "projects" / "xformer" / "train"
LLMS = {"opt2.7b": "xformer_opt", "opt6.7b": "xformer_opt", "flant5xl": "xformer_t5"}
MASKING_FIELDS = ("mask_ratio", "eval_mask_ratio", "reconstruction_loss")
CAPTIONS = ["a red circle", "two blue squares and a star"]


def yaml_model_config(path: Path):
    """The ``model:`` config LAVIS builds from a project yaml (model type defaults merged under it)."""
    return Config(SimpleNamespace(cfg_path=str(path), options=None)).model_cfg


def tiny_with(arch: str, model_cfg):
    """The tiny type of ``arch`` with the project yaml's masking fields."""
    cls = registry.get_model_class(arch)
    section = OmegaConf.to_container(OmegaConf.load(cls.default_config_path("tiny")).model)
    section.update({field: model_cfg[field] for field in MASKING_FIELDS})
    torch.manual_seed(0)
    return cls(cls.config_class.from_lavis_cfg(section))


def masks_built(model, samples):
    """Every MAE mask (1 = hidden) built by one call of ``model`` on ``samples``."""
    masks, original = [], model.forward_mae

    def forward_mae(*args, **kwargs):
        encoding = original(*args, **kwargs)
        masks.append(encoding.mask)
        return encoding

    model.forward_mae = forward_mae
    return masks


def images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("llm", sorted(LLMS))
def test_paper_stage2_yaml_masks_half_the_patches_in_training_and_none_at_inference(llm):
    model_cfg = yaml_model_config(TRAIN / f"pretrain_stage2_{llm}.yaml")
    assert (model_cfg.mask_ratio, model_cfg.eval_mask_ratio, model_cfg.reconstruction_loss) == (0.5, 0.0, False)
    model = tiny_with(LLMS[llm], model_cfg).train()
    masks = masks_built(model, None)
    model({"image": images(), "text_input": CAPTIONS})
    assert len(masks) == 1
    patches = masks[0].shape[1]
    assert masks[0].sum(dim=1).tolist() == [patches // 2] * 2  # 50% of each image's patches hidden from the MAE
    masks.clear()
    model.eval()
    model.generate({"image": images()}, num_beams=1, max_length=2)
    assert masks[0].sum().item() == 0  # inference: the whole image


@pytest.mark.parametrize("llm", sorted(LLMS))
def test_unmasked_stage2_yaml_shows_the_mae_whole_images_in_training(llm):
    path = TRAIN / f"pretrain_stage2_{llm}_unmasked.yaml"
    model_cfg = yaml_model_config(path)
    assert model_cfg.mask_ratio == 0.0
    model = tiny_with(LLMS[llm], model_cfg).train()
    masks = masks_built(model, None)
    model({"image": images(), "text_input": CAPTIONS})
    assert masks[0].sum().item() == 0
    # The unmasked run differs from the paper's in the model's masking and the output folder only.
    paper, unmasked = OmegaConf.load(TRAIN / f"pretrain_stage2_{llm}.yaml"), OmegaConf.load(path)
    assert paper.datasets == unmasked.datasets
    assert {**paper.run, "output_dir": None} == {**unmasked.run, "output_dir": None}
    assert paper.run.output_dir != unmasked.run.output_dir


def test_stage2_model_types_default_to_the_papers_masking():
    for arch, types in {"xformer_opt": ("pretrain_opt2.7b", "pretrain_opt6.7b", "tiny"),
                        "xformer_t5": ("pretrain_flant5xl", "tiny")}.items():
        cls = registry.get_model_class(arch)
        for model_type in types:
            assert OmegaConf.load(cls.default_config_path(model_type)).model.mask_ratio == 0.5, (arch, model_type)
        assert cls.config_class().mask_ratio == 0.5
