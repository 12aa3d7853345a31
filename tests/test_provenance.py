"""Provenance (``lavis_xformer.common.provenance``): an evaluation folder says which checkpoint (by sha256), config,
packages and commit produced its numbers."""

import hashlib
import json
import subprocess
import sys

import torch

from lavis_xformer.common import provenance
from helpers import PROJECTS, run_cli, shapes_options
from lavis.models import load_model


def test_evaluation_folder_names_the_checkpoint_sha256(tmp_path):
    model = load_model("xformer", "tiny")
    checkpoint = tmp_path / "stage1.pth"
    trained_with = {"run": {"task": "xformer_pretrain", "init_lr": 1e-4}}
    torch.save({"model": model.state_dict(), "config": trained_with}, checkpoint)
    run_cli(
        [sys.executable, "-m", "lavis_xformer.evaluate", "--cfg-path", PROJECTS / "demo" / "caption_shapes_eval.yaml",
         "--options", *shapes_options("xformer_shapes_caption", tmp_path / "data", num_train=4, num_val=2, num_test=2),
         f"model.finetuned={checkpoint}", f"run.output_dir={tmp_path / 'eval'}", "run.num_beams=1", "run.max_len=5"],
        cwd=tmp_path,
    )
    (job,) = (tmp_path / "eval").iterdir()
    record = json.loads((job / "provenance.json").read_text())
    expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["checkpoints"]["finetuned"]["sha256"] == expected
    assert record["checkpoints"]["finetuned"]["path"] == str(checkpoint.resolve())
    assert record["checkpoints"]["finetuned"]["stored_config"] == trained_with
    assert record["config"]["model"]["finetuned"] == str(checkpoint)
    assert record["config"]["run"]["task"] == "xformer_captioning" and record["config"]["run"]["max_len"] == 5
    assert record["packages"]["torch"] == torch.__version__.split("+")[0] or record["packages"]["torch"]
    assert record["packages"]["salesforce-lavis"] == "1.0.2"
    assert (job / "evaluate.txt").is_file()  # the numbers it describes


def test_checkpoint_identity_and_git_state(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"abc" * 1000)
    identity = provenance.checkpoint_identity(weights)
    assert identity == {"path": str(weights.resolve()), "sha256": hashlib.sha256(b"abc" * 1000).hexdigest(), "size": 3000}
    assert provenance.checkpoint_identity(tmp_path / "missing.pth")["sha256"] is None
    assert provenance.git_state(tmp_path) is None  # not a work tree
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "w.pth"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "w"],
                   check=True)
    state = provenance.git_state(tmp_path)
    assert len(state["commit"]) == 40 and state["dirty"] is False
    weights.write_bytes(b"changed")
    assert provenance.git_state(tmp_path)["dirty"] is True
