"""The paper's VQA prompt: section 3.1 writes 'We use the prompt "Question: {} Short Answer:"' (capital A); the VQA
yamls and the VQA model types use exactly that string."""

from pathlib import Path

import pytest
from lavis.common.registry import registry
from omegaconf import OmegaConf

import lavis_xformer  # noqa: F401  (registers the models)
from lavis_xformer.models.config_llm import PAPER_VQA_PROMPT, VQA_PROMPT

REPO = Path(__file__).resolve().parent.parent
VQA_RUN_YAMLS = sorted((REPO / "projects" / "xformer" / "train").glob("vqa_ft*.yaml")) + sorted(
    p for p in (REPO / "projects" / "xformer" / "eval").glob("*.yaml") if "qa" in p.name  # gqa, okvqa, vqav2
)
VQA_MODEL_TYPES = [
    ("xformer_opt", "vqa_ft_opt2.7b"), ("xformer_t5", "vqa_ft_flant5xl"),
    ("blip2_baseline_opt", "vqa_ft_opt2.7b"), ("blip2_baseline_t5", "vqa_ft_flant5xl"),
]


def test_the_paper_prompt_is_the_papers_string_and_the_default():
    assert PAPER_VQA_PROMPT == "Question: {} Short Answer:"
    assert VQA_PROMPT == PAPER_VQA_PROMPT
    assert PAPER_VQA_PROMPT.format("how many dogs?") == "Question: how many dogs? Short Answer:"


@pytest.mark.parametrize("path", VQA_RUN_YAMLS, ids=[p.name for p in VQA_RUN_YAMLS])
def test_vqa_yamls_use_the_paper_prompt(path):
    cfg = OmegaConf.load(path)
    if cfg.run.task == "xformer_fewshot_vqa":  # the few-shot task has no run.prompt: the model's vqa_prompt applies
        assert "prompt" not in cfg.run
        model_cls = registry.get_model_class(cfg.model.arch)
        type_cfg = OmegaConf.load(model_cls.default_config_path(cfg.model.model_type))
        assert type_cfg.model.get("vqa_prompt", VQA_PROMPT) == PAPER_VQA_PROMPT
        return
    assert cfg.run.prompt == PAPER_VQA_PROMPT
    if "vqa_prompt" in cfg.model:  # fine-tuning: the LLM learns the answer after the same prompt
        assert cfg.model.vqa_prompt == PAPER_VQA_PROMPT


def test_there_are_vqa_yamls_of_every_kind():
    names = {p.name for p in VQA_RUN_YAMLS}
    assert {"vqa_ft.yaml", "vqa_ft_flant5xl.yaml", "vqa_ft_blip2.yaml"} <= names
    assert any(n.startswith("gqa_") for n in names) and any(n.startswith("okvqa_") for n in names)
    assert any(n.startswith("vqav2_") for n in names)


@pytest.mark.parametrize("arch, model_type", VQA_MODEL_TYPES)
def test_vqa_model_types_default_to_the_paper_prompt(arch, model_type):
    cls = registry.get_model_class(arch)
    section = OmegaConf.load(cls.default_config_path(model_type)).model
    assert cls.config_class.from_lavis_cfg(section).vqa_prompt == PAPER_VQA_PROMPT
