"""The demo (``make demo`` = ``python -m lavis_xformer.demo``): its whole pipeline at smoke size, through the real
entry points (stage 1, retrieval, stage 2, VQA for X-Former and BLIP-2), its report and figures; the pieces the
reconstruction figure is made of; the demo yamls."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lavis.models import load_model
from omegaconf import OmegaConf
from PIL import Image

from lavis_xformer.demo import pipeline
from lavis_xformer.demo import report as demo_report
from lavis_xformer.datasets import shapes

REPO = Path(__file__).resolve().parent.parent
DEMO_YAMLS = sorted((REPO / "projects" / "xformer" / "demo").glob("*.yaml"))


def subprocess_env():
    env = pipeline.child_env(threads=None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def smoke_demo(tmp_path_factory):
    """``python -m lavis_xformer.demo --smoke`` once (about a minute and a half on 2 CPU cores): (folder, output)."""
    out = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "lavis_xformer.demo", "--smoke", "--out", str(out), "--data-root", str(out / "data")]
    result = subprocess.run(command, cwd=out, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the smoke demo failed ({result.returncode}):\n{output[-6000:]}"
    return out, output


def test_smoke_demo_table_has_both_models_with_every_metric(smoke_demo):
    out, output = smoke_demo
    report = json.loads((out / "demo_results.json").read_text())
    rows = {row["key"]: row for row in report["rows"]}
    assert [row["model"] for row in report["rows"]] == ["X-Former", "BLIP-2"]
    for key, row in rows.items():
        for metric, _, kind in demo_report.METRICS:
            assert metric in row, (key, metric)
            value = row[metric]
            if (key, metric) in demo_report.NOT_APPLICABLE:
                assert value is None, (key, metric)
                continue
            assert isinstance(value, (int, float)) and math.isfinite(value), (key, metric, value)
            if kind in ("recall", "acc"):
                assert 0.0 <= value <= 100.0, (key, metric, value)
            elif kind == "params":
                assert value > 0
            else:
                assert value > 0  # losses
        for direction in ("txt", "img"):
            assert row[f"{direction}_r1"] <= row[f"{direction}_r5"] <= row[f"{direction}_r10"]
    # X-Former = BLIP-2 + the dual block (and the frozen MAE): more parameters in both stages
    for stage in ("stage1", "stage2"):
        assert rows["xformer"][f"params_{stage}_trainable"] > rows["blip2"][f"params_{stage}_trainable"]
    assert rows["xformer"]["stage1_loss_rec"] > 0
    assert set(report["epochs"]["xformer"]) == {"stage1", "stage2"} and len(report["epochs"]["xformer"]["stage1"]) == 2
    assert report["examples"] and all(set(e["predictions"]) == {"X-Former", "BLIP-2"} for e in report["examples"])

    # the printed table: both models side by side, every metric a line
    assert re.search(r"metric +X-Former +BLIP-2", output)
    for _, label, _ in demo_report.METRICS:
        assert label.strip() in output


def test_smoke_demo_markdown_has_both_rows_in_every_table(smoke_demo):
    out, _ = smoke_demo
    markdown = (out / "demo_results.md").read_text()
    assert markdown.count("\n| X-Former | ") == len(demo_report.TABLE_GROUPS)
    assert markdown.count("\n| BLIP-2 | ") == len(demo_report.TABLE_GROUPS)
    for title, _ in demo_report.TABLE_GROUPS:
        assert f"## {title}" in markdown


@pytest.mark.parametrize("name", ["loss_curves.png", "reconstructions.png"])
def test_smoke_demo_figures_are_valid_images(smoke_demo, name):
    out, _ = smoke_demo
    path = out / name
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        extrema = image.convert("L").getextrema()
        assert extrema[1] - extrema[0] > 100  # drawn on, not a blank canvas


def test_smoke_demo_runs_through_lavis_entry_points(smoke_demo):
    out, output = smoke_demo
    for model in ("X-Former", "BLIP-2"):
        assert f"[{model}]" in output
    assert "Train: data epoch" in output and "Evaluation" in output  # LAVIS's MetricLogger, streamed
    for model in pipeline.MODELS:
        for stage in pipeline.STAGES:
            (job,) = [p for p in (out / "runs" / model.key / stage.key).iterdir() if p.is_dir()]
            if stage.key.startswith("stage"):
                assert pipeline.last_checkpoint(job).name == "checkpoint_1.pth"
            else:
                assert (job / "evaluate.txt").is_file()
        assert (out / "logs" / f"{model.key}_vqa.log").is_file()
    assert not list((out / "data").glob(".*tmp*"))  # the data was generated once, before the runs


# ------------------------------------------------------------------------------------------------------------------
# The reconstruction figure
# ------------------------------------------------------------------------------------------------------------------
def test_unpatchify_inverts_patchify():
    model = load_model("xformer", "tiny")
    pixels = torch.randn(3, 3, 32, 32)
    patches = model.patchify(pixels)
    assert patches.shape == (3, 16, 8 * 8 * 3)
    assert torch.equal(demo_report.unpatchify(patches, 8), pixels)
    assert torch.equal(model.patchify(demo_report.unpatchify(patches, 8)), patches)
    # a patch is a p x p block of the image: patch 1 is rows 0-7, columns 8-15
    block = pixels[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1], block)
    with pytest.raises(ValueError, match="cannot unpatchify"):
        demo_report.unpatchify(torch.zeros(1, 15, 192), 8)


def test_reconstruction_views_mask_exactly_the_masked_patches():
    torch.manual_seed(0)
    model = load_model("xformer", "tiny").eval()
    image = torch.randn(4, 3, 32, 32)
    views = demo_report.reconstruct(model, image, mask_ratio=0.5, seed=0)
    assert {k for k in views if k != "loss"} == {"original", "masked", "reconstruction", "reconstruction_visible"}
    for key in ("original", "masked", "reconstruction", "reconstruction_visible"):
        assert views[key].shape == (4, 3, 32, 32) and 0.0 <= views[key].min() and views[key].max() <= 1.0
    # the same fixed draw as forward_mae with that noise: half the 16 patches hidden, shown grey
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    mask = model.forward_mae(image, 0.5, noise).mask  # [4, 16], 1 = masked
    pixel_mask = demo_report.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 192), 8).bool()
    assert (mask.sum(1) == 8).all()
    assert torch.all(views["masked"][pixel_mask] == 0.5)
    torch.testing.assert_close(views["masked"][~pixel_mask], views["original"][~pixel_mask])
    torch.testing.assert_close(views["reconstruction_visible"][~pixel_mask], views["original"][~pixel_mask])
    torch.testing.assert_close(views["reconstruction_visible"][pixel_mask], views["reconstruction"][pixel_mask])
    assert views["loss"] > 0


def test_stage2_meets_the_frozen_encoders_stage1_trained_with():
    """Checkpoints hold trainable weights only, so the demo's stage 2 (and every evaluation) relies on the tiny
    models' random frozen encoders being the same in every build, whatever the seed and the build order."""
    torch.manual_seed(1)
    stage1 = load_model("xformer", "tiny")
    torch.manual_seed(2)
    stage2 = load_model("xformer_opt", "tiny")  # builds the OPT before the MAE, and no MAE decoder
    torch.manual_seed(3)
    stage2_again = load_model("xformer_opt", "tiny")
    for module in ("visual_encoder", "mae_encoder"):
        ours, theirs = getattr(stage1, module).state_dict(), getattr(stage2, module).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), module
    for ours, theirs in zip(stage2.opt_model.state_dict().values(), stage2_again.opt_model.state_dict().values()):
        assert torch.equal(ours, theirs)
    assert not torch.equal(stage1.query_tokens, load_model("xformer", "tiny").query_tokens)  # trainable: seeded


# ------------------------------------------------------------------------------------------------------------------
# The demo yamls
# ------------------------------------------------------------------------------------------------------------------
def test_demo_has_every_stage_for_both_models():
    names = {p.name for p in DEMO_YAMLS}
    for stage in pipeline.STAGES:
        for model in pipeline.MODELS:
            assert f"{stage.yaml}{model.suffix}.yaml" in names


@pytest.mark.parametrize("path", DEMO_YAMLS, ids=[p.name for p in DEMO_YAMLS])
def test_demo_yaml_data_stays_out_of_lavis_default_cache(path):
    """LAVIS's default cache_root is /export/home/.cache/lavis: the demo's data root is absolute (in ~/.cache)."""
    cfg = OmegaConf.load(path)
    for dataset in cfg.datasets.values():
        root = shapes.resolve_root(dataset.shapes.root)
        assert root.is_absolute() and not str(root).startswith("/export"), root
    assert cfg.run.device == "cpu" and not str(cfg.run.output_dir).startswith("/")


def test_demo_vqa_yamls_use_the_paper_protocol():
    for path in DEMO_YAMLS:
        if path.stem.startswith("vqa_"):
            run = OmegaConf.load(path).run
            assert run.task == "xformer_vqa" and run.prompt == "Question: {} Short answer:"
            assert (run.num_beams, run.length_penalty, run.inference_method) == (5, 0, "generate")
        if path.stem.startswith("pretrain_stage2"):
            cfg = OmegaConf.load(path)
            assert cfg.model.load_pretrained is True and "pretrain_stage1_shapes" in cfg.model.pretrained
            assert list(cfg.datasets) == ["xformer_shapes_caption"]
