"""Sharing a model as a Hugging Face model: save_pretrained / from_pretrained / push_to_hub, trainable-only and
sharded safetensors folders, the huggingface_hub model card's metadata, 0644 files. Every hub call is mocked."""

import json
import os
import re
import stat

import huggingface_hub
import pytest
import torch
import yaml
from lavis.common.registry import registry
from omegaconf import OmegaConf

from helpers import REPO, tiny_with_moved_weights
from lavis_xformer.checkpoints import (
    PRETRAINED_INDEX,
    CheckpointError,
    export_checkpoint,
    from_pretrained,
    push_to_hub,
    read_checkpoint,
    save_pretrained,
    trainable_state_dict,
)
from lavis_xformer.checkpoints import main as checkpoints_main
from lavis_xformer.checkpoints.card import CITATION_BIBTEX, model_card

FROZEN_PREFIXES = ("visual_encoder.", "mae", "opt_model.")  # (ln_vision is trained, as in BLIP-2)


@pytest.fixture(scope="module")
def model():
    """A tiny stage-2 X-Former (frozen ViT, MAE and OPT) whose trainable weights moved from their initialisation."""
    return tiny_with_moved_weights("xformer_opt").eval()


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def assert_same_weights(got, expected):
    got, expected = got.state_dict(), expected.state_dict()
    assert got.keys() == expected.keys()
    differing = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert not differing, differing[:5]


def modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


def test_every_exported_file_is_0644(model, tmp_path, umask_022):
    save_pretrained(model, tmp_path / "folder", max_shard_size=200_000)
    assert set(modes(tmp_path / "folder").values()) == {0o644}, modes(tmp_path / "folder")
    torch.save({"model": trainable_state_dict(model)}, tmp_path / "ckpt.pth")
    export_checkpoint(str(tmp_path / "ckpt.pth"), str(tmp_path / "w.safetensors"))
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644  # safetensors' temp file was 0600


def test_trainable_only_folder_has_no_frozen_tensors_and_loads_back_equal(model, tmp_path):
    summary = save_pretrained(model, tmp_path, trainable_only=True)
    assert summary["arch"] == "xformer_opt" and json.loads((tmp_path / "config.json").read_text())["weights"] == "trainable"
    stored = read_checkpoint(str(tmp_path))["model"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not set(stored) & frozen
    assert not [k for k in stored if k.startswith(FROZEN_PREFIXES)]  # no ViT, MAE, LLM (nor the LLM's tied head)
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= set(stored)
    loaded = from_pretrained(tmp_path)  # the frozen parts from their sources (tiny: the seeded random build)
    assert not loaded.training
    assert_same_weights(loaded, model)


def test_sharded_folder_has_an_index_and_loads_back_equal(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_size=200_000)
    index = json.loads((tmp_path / PRETRAINED_INDEX).read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(model.state_dict()) and not (tmp_path / "model.safetensors").exists()
    assert_same_weights(from_pretrained(tmp_path), model)
    # saving again unsharded replaces the shards and the index (no stale files a loader could pick up)
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    # a shard gone is one clear error
    save_pretrained(model, tmp_path / "again", max_shard_size=200_000)
    os.remove(tmp_path / "again" / shards[0])
    with pytest.raises(CheckpointError, match=r"names the shard .* which is missing"):
        from_pretrained(tmp_path / "again")


def test_from_pretrained_of_a_repo_id_calls_snapshot_download_and_honours_offline(model, tmp_path, monkeypatch):
    save_pretrained(model, tmp_path / "snapshot", trainable_only=True)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_weights(from_pretrained("someone/xformer-tiny", revision="v1"), model)
    (repo_id, kwargs), = calls
    assert repo_id == "someone/xformer-tiny" and kwargs["revision"] == "v1" and kwargs["local_files_only"] is True

    def not_cached(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    with pytest.raises(CheckpointError, match=r"'someone/absent' .* \(offline mode is on.*LocalEntryNotFoundError"):
        from_pretrained("someone/absent")
    with pytest.raises(CheckpointError, match=r"neither a folder nor a hub repository id"):
        from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_push_to_hub_creates_the_repo_and_uploads_a_trainable_only_folder(model, tmp_path, monkeypatch):
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        uploads.append(("create", repo_id, kwargs.get("private")))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        config = json.loads(open(os.path.join(folder_path, "config.json")).read())
        uploads.append(("upload", repo_id, sorted(os.listdir(folder_path)), config.get("weights")))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="m",
                                          commit_description="", oid="0" * 40)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LAVIS_XFORMER_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    commit = push_to_hub(model, "me/xformer-tiny", private=True)
    assert commit.commit_url.startswith("https://huggingface.co/me/xformer-tiny")
    assert uploads == [("create", "me/xformer-tiny", True),
                       ("upload", "me/xformer-tiny", ["README.md", "config.json", "model.safetensors"], "trainable")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="offline mode is on"):
        push_to_hub(tmp_path, "me/x")


def test_export_cli_writes_a_trainable_sharded_folder_and_pushes_it(model, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "checkpoint_0.pth"
    torch.save({"model": trainable_state_dict(model), "epoch": 0,
                "config": {"model": {"arch": "xformer_opt", "model_type": "tiny", "load_pretrained": False},
                           "run": {"task": "xformer_pretrain"}, "datasets": {"xformer_shapes_caption": {}}}},
               checkpoint)
    pushed = []
    monkeypatch.setattr("lavis_xformer.checkpoints.cli.push_to_hub",
                        lambda folder, repo_id, **kw: pushed.append((folder, repo_id)) or "commit-url")
    out = tmp_path / "out"
    assert checkpoints_main(["export", str(checkpoint), str(out), "--max-shard-size", "100KB",
                             "--push-to-hub", "me/x"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trainable_only"] is True and summary["pushed"] == "commit-url" and pushed == [(str(out), "me/x")]
    assert (out / PRETRAINED_INDEX).is_file() and len(list(out.glob("model-*.safetensors"))) >= 2
    assert_same_weights(from_pretrained(out), model)
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.datasets == ["xformer_shapes_caption"] and "stage 2" in card.text


def test_model_card_metadata_names_licence_base_models_datasets_tags_and_citation():
    cls = registry.get_model_class("xformer_opt")  # the paper-scale type's typed config, without building it
    typed = cls.config_class.from_lavis_cfg(OmegaConf.load(cls.default_config_path("pretrain_opt2.7b")).model)
    config = {"arch": "xformer_opt", "model_type": "pretrain_opt2.7b", **typed.to_dict()}
    card = model_card(config, {"tensors": 1, "elements": 1, "shards": 1, "trainable_only": True},
                      {"stage": "stage 2", "task": "xformer_pretrain", "datasets": {"coco_caption": {}}, "steps": 4,
                       "epoch": 0, "run": {}, "source": "checkpoint_0.pth", "train": [], "metrics": []})
    parsed = huggingface_hub.ModelCard(str(card))  # what the hub reads back from README.md
    data = parsed.data.to_dict()
    assert data["license"] == "bsd-3-clause" and data["library_name"] == "lavis-xformer"
    assert data["base_model"] == ["facebook/opt-2.7b", "facebook/vit-mae-huge"]  # eva_clip_g is no hub id
    assert data["datasets"] == ["coco_caption"] and data["pipeline_tag"] == "image-to-text"
    assert {"lavis", "x-former", "xformer_opt"} <= set(data["tags"])
    assert "`vit_weights`): `eva_clip_g`" in parsed.text  # every frozen source named in the body
    assert "arXiv:2407.13851" in parsed.text and "LAVIS: A One-stop Library" in parsed.text


def test_the_cards_citation_is_the_citation_cff():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    for work in (cff["preferred-citation"], *cff["references"]):
        assert work["title"] in CITATION_BIBTEX
        assert work["identifiers"][0]["value"] in CITATION_BIBTEX
        assert all(f"{a['family-names']}, {a['given-names']}" in re.sub(r"\s+", " ", CITATION_BIBTEX)
                   for a in work["authors"])
    assert cff["license"] == "BSD-3-Clause" and "BSD 3-Clause" in (REPO / "LICENSE").read_text()
