"""Checkpoints carry their model config; a load compares it with the target model's and refuses a difference in an
architectural or frozen field, naming the fields (issue 28: a demo checkpoint with 4-pixel MAE patches loaded
silently into the tiny type's 8-pixel MAE)."""

import pytest
import torch
from lavis.models import load_model

from lavis_xformer import check
from lavis_xformer.checkpoints import CheckpointError, export_pretrained, from_pretrained, trainable_state_dict
from lavis_xformer.checkpoints.model_config import config_differences, stored_model_config, typed_fields
from lavis_xformer.common.meta import build_without_checkpoints
from helpers import PROJECTS


def save_run_checkpoint(path, arch, model_type="tiny", **fields):
    """A checkpoint as the runner writes it: trainable tensors and the run config (its ``model:`` node)."""
    torch.manual_seed(0)
    model = build_without_checkpoints(arch, model_type, **fields)
    config = {"model": {"arch": arch, "model_type": model_type, **fields},
              "run": {"task": "xformer_pretrain", "output_dir": str(path.parent)}, "datasets": {}}
    torch.save({"model": trainable_state_dict(model), "config": config, "epoch": 0}, path)
    return model


def test_stored_config_is_the_full_typed_config(tmp_path):
    model = save_run_checkpoint(tmp_path / "c.pth", "xformer", mae_patch_size=4)
    stored = stored_model_config(torch.load(tmp_path / "c.pth", weights_only=True))
    assert stored["mae_patch_size"] == 4 and stored["arch"] == "xformer"
    assert not config_differences(stored, typed_fields(model))


def test_a_frozen_field_mismatch_is_refused_naming_the_field(tmp_path):
    save_run_checkpoint(tmp_path / "c.pth", "xformer", mae_patch_size=4)
    with pytest.raises(CheckpointError, match=r"mae_patch_size: checkpoint 4 vs model 8.*model\.mae_patch_size=4"):
        load_model("xformer", "tiny", checkpoint=str(tmp_path / "c.pth"))


def test_the_same_config_and_runtime_differences_load(tmp_path):
    save_run_checkpoint(tmp_path / "c.pth", "xformer", mae_patch_size=4, drop_path_rate=0.1, mask_ratio=0.5)
    model = build_without_checkpoints("xformer", "tiny", mae_patch_size=4)
    model.load_checkpoint(str(tmp_path / "c.pth"))  # drop path and mask ratio do not change the network
    reference = torch.load(tmp_path / "c.pth", weights_only=True)["model"]
    key = next(k for k in reference if k.startswith("query_tokens"))
    assert torch.equal(model.state_dict()[key], reference[key])


def test_stage1_demo_checkpoint_loads_into_the_stage2_demo_model_and_not_into_another_mae(tmp_path):
    save_run_checkpoint(tmp_path / "s1.pth", "xformer", mae_patch_size=4)
    stage2 = build_without_checkpoints("xformer_opt", "tiny", mae_patch_size=4)
    stage2.load_from_pretrained(str(tmp_path / "s1.pth"))
    other = build_without_checkpoints("xformer_opt", "tiny")
    with pytest.raises(CheckpointError, match="mae_patch_size"):
        other.load_from_pretrained(str(tmp_path / "s1.pth"))


def test_check_reports_the_mismatch_as_the_run_would(tmp_path):
    save_run_checkpoint(tmp_path / "s1.pth", "xformer")  # the tiny type's 8-pixel patches
    yaml = PROJECTS / "demo" / "pretrain_stage2_shapes.yaml"  # 4-pixel patches
    findings = check.check(yaml, [f"model.pretrained={tmp_path / 's1.pth'}",
                                  f"datasets.xformer_shapes_caption.shapes.root={tmp_path / 'shapes'}",
                                  f"run.output_dir={tmp_path / 'out'}"], memory=False)
    assert any("mae_patch_size: checkpoint 8 vs model 4" in f.message for f in findings if f.level == "ERROR")


def test_load_model_with_an_exported_folder_reads_its_config_json(tmp_path):
    save_run_checkpoint(tmp_path / "c.pth", "xformer", mae_patch_size=4)
    export_pretrained(str(tmp_path / "c.pth"), str(tmp_path / "export"))
    with pytest.raises(CheckpointError, match=r"mae_patch_size.*from_pretrained"):
        load_model("xformer", "tiny", checkpoint=str(tmp_path / "export"))
    model = from_pretrained(tmp_path / "export")  # the checkpoint's own model
    assert model.config.mae_patch_size == 4
    same = build_without_checkpoints("xformer", "tiny", mae_patch_size=4)
    same.load_checkpoint(str(tmp_path / "export"))  # a matching model takes the folder
