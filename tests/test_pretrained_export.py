"""The shareable checkpoint folder: ``python -m lavis_xformer.checkpoints export CHECKPOINT FOLDER`` writes
config.json, model.safetensors and a model card; ``from_pretrained(folder)`` and a yaml's ``model.pretrained: FOLDER``
load it back bit for bit."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from helpers import tiny_with_moved_weights
from lavis_xformer.checkpoints import CheckpointError, from_pretrained, trainable_state_dict
from lavis_xformer.checkpoints import main as checkpoints_main
from lavis_xformer.models.xformer import XFormer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny stage-1 X-Former whose trainable weights moved away from their initialisation, saved as the runner
    saves it (trainable weights only, with the run config), next to a log.txt and evaluate.txt."""
    job = tmp_path_factory.mktemp("job")
    model = tiny_with_moved_weights("xformer")
    config = {
        "model": {"arch": "xformer", "model_type": "tiny", "load_pretrained": False},
        "run": {"task": "xformer_pretrain", "batch_size_train": 32, "world_size": 1, "lr_sched": "linear_warmup_cosine_lr",
                "init_lr": 5e-3},
        "datasets": {"xformer_shapes_caption": {"shapes": {"num_train": 2048}}},
    }
    trainer = {"epoch": 11, "iteration": 64, "iters_per_epoch": 64, "complete": True}
    torch.save({"model": trainable_state_dict(model), "optimizer": {}, "config": config, "epoch": 11,
                "trainer": trainer}, job / "checkpoint_11.pth")
    (job / "log.txt").write_text(
        '{\n    "run": {}\n}\n'
        '{"kind": "iter", "iter": 32, "epoch": 0, "lr": 0.001, "loss": 9.0}\n'
        '{"train_lr": "0.003", "train_loss": "8.500", "train_loss_itc": "3.100"}\n'
        '{"train_lr": "0.002", "train_loss": "6.250", "train_loss_itc": "2.800"}\n')
    (job / "evaluate.txt").write_text('{"txt_r1": 41.0, "img_r1": 39.5, "agg_metrics": 40.25}\n')
    return model, job / "checkpoint_11.pth"


def test_export_folder_round_trips_every_tensor(trained, tmp_path, capsys):
    model, checkpoint = trained
    folder = tmp_path / "xformer-tiny-stage1"
    assert checkpoints_main(["export", str(checkpoint), str(folder)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert summary["tensors"] == len(model.state_dict())

    config = json.loads((folder / "config.json").read_text())
    assert config == {"arch": "xformer", "model_type": "tiny", **model._build_cfg.to_dict()}

    loaded = from_pretrained(folder)
    assert isinstance(loaded, XFormer) and not loaded.training
    assert loaded._build_cfg.qformer_hidden_size == model._build_cfg.qformer_hidden_size
    expected, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    differing = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert not differing, differing[:5]
    assert ({n for n, p in loaded.named_parameters() if p.requires_grad}
            == {n for n, p in model.named_parameters() if p.requires_grad})

    # a yaml's model.pretrained: FOLDER loads the same weights into the model the yaml describes
    node = OmegaConf.merge(OmegaConf.load(XFormer.default_config_path("tiny")).model,
                           {"arch": "xformer", "load_pretrained": True, "pretrained": str(folder)})
    from_yaml = XFormer.from_config(node).state_dict()
    assert all(torch.equal(from_yaml[k], expected[k]) for k in expected)
    # and LAVIS's load_model(..., checkpoint=FOLDER)
    from lavis.models import load_model

    from_lavis = load_model("xformer", "tiny", is_eval=True, checkpoint=str(folder)).state_dict()
    assert all(torch.equal(from_lavis[k], expected[k]) for k in expected)


def test_model_card_tells_stage_data_steps_and_metrics(trained, tmp_path):
    _, checkpoint = trained
    folder = tmp_path / "card"
    assert checkpoints_main(["export", str(checkpoint), str(folder)]) == 0
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")  # huggingface_hub's metadata block (test_sharing checks its fields)
    assert "\n# xformer (tiny): stage 1, vision-language representation learning\n" in card
    assert "Training iterations done: 768 (epoch 11), batch size 32" in card  # 12 epochs x 64
    assert '`xformer_shapes_caption`: `{"shapes": {"num_train": 2048}}`' in card
    assert "| epoch | loss | loss_itc |" in card and "| 1 | 6.250 | 2.800 |" in card
    assert '"agg_metrics": 40.25' in card and '"kind"' not in card


def test_export_and_from_pretrained_refuse_what_they_cannot_use(tmp_path):
    bare = tmp_path / "bare.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, bare)
    with pytest.raises(CheckpointError, match=r"holds no run config .* export it as .safetensors instead"):
        from lavis_xformer.checkpoints import export_pretrained

        export_pretrained(str(bare), str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match=r"has no config.json: not a folder written by"):
        from_pretrained(tmp_path)
