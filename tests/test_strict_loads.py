"""Checkpoints that do not fit the model are refused, naming the file and the missing or unknown tensors."""

import logging
from types import SimpleNamespace

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_xformer.checkpoints import CheckpointError
from lavis_xformer.runners.runner_xformer import RunnerXFormer
from test_stage2 import tiny


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
