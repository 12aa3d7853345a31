"""The LLM VQA demo (``make demo-vqa`` = ``python -m lavis_xformer.demo``; ``make demo`` runs the experiment): its whole pipeline at smoke size (two seeds),
through the real entry points (stage 1, retrieval, stage 2, zero-shot VQA, VQA fine-tuning for X-Former and BLIP-2),
its multi-seed report (intervals, paired tests, verdicts) and figures; the shared CLIP-ViT stand-in; the pieces the
reconstruction figure is made of; the demo yamls."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import hashlib

import pytest
import torch
from lavis.models import load_model
from omegaconf import OmegaConf
from PIL import Image

from lavis_xformer.analysis import stats
from lavis_xformer.demo import pipeline
from lavis_xformer.demo import report as demo_report
from lavis_xformer.demo import standins
from lavis_xformer.datasets import shapes

REPO = Path(__file__).resolve().parent.parent
DEMO_YAMLS = sorted((REPO / "projects" / "xformer" / "demo").glob("*.yaml"))


def subprocess_env():
    env = pipeline.child_env(threads=None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def smoke_demo(tmp_path_factory):
    """``python -m lavis_xformer.demo --smoke`` once (two seeds; about two minutes on 2 idle CPU cores):
    (folder, output)."""
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
                assert value > 0  # losses, query diversity
        for direction in ("txt", "img"):
            assert row[f"{direction}_r1"] <= row[f"{direction}_r5"] <= row[f"{direction}_r10"]
    # X-Former = BLIP-2 + the dual block (and the frozen MAE): more parameters in both stages
    for stage in ("stage1", "stage2"):
        assert rows["xformer"][f"params_{stage}_trainable"] > rows["blip2"][f"params_{stage}_trainable"]
    assert rows["xformer"]["stage1_loss_rec"] > 0
    assert sorted(report["epochs"]) == ["0", "1"]  # --smoke: two seeds
    for seed_epochs in report["epochs"].values():
        assert set(seed_epochs["xformer"]) == set(pipeline.TRAINED) and len(seed_epochs["xformer"]["stage1"]) == 2
    assert report["examples"] and all(set(e["predictions"]) == {"X-Former", "BLIP-2"} for e in report["examples"])

    # the printed table: both models side by side, every metric a line
    assert re.search(r"metric +X-Former +BLIP-2", output)
    for _, label, _ in demo_report.METRICS:
        assert label.strip() in output


def test_smoke_demo_query_diversity_is_the_image_text_measure_of_each_seeds_stage1_model(smoke_demo):
    """Supplement section 6 on the shapes test split: seed 0's X-Former row equals the measure recomputed here from
    its stage-1 checkpoint over every (test image, one of its captions) pair."""
    from lavis.common.registry import registry

    from lavis_xformer.analysis import query_diversity

    out, _ = smoke_demo
    report = json.loads((out / "demo_results.json").read_text())
    settings = pipeline.DemoSettings(out_dir=out, smoke=True, data_root=str(out / "data"),
                                     clip_weights=Path(report["clip_standin"]["file"]),
                                     mae_weights=Path(report["mae_standin"]["folder"]))
    folder = pipeline.data_folder(settings.lavis_config(pipeline.STAGES[0], pipeline.MODELS[0]))
    annotations = shapes.read_annotation(folder, "caption_test")
    images = demo_report.load_test_images(settings.lavis_config(pipeline.STAGES[0], pipeline.MODELS[0]), folder,
                                          len(annotations))
    text = registry.get_processor_class("blip_caption").from_config(None)
    pairs = [(images[i : i + 1].repeat(len(a["caption"]), 1, 1, 1), [text(c) for c in a["caption"]])
             for i, a in enumerate(annotations)]
    job = Path(report["runs"]["0"]["xformer"]["stage1"])
    model = demo_report.trained_stage1_model(settings, pipeline.MODELS[0], pipeline.last_checkpoint(job))
    expected = query_diversity.measure_image_text(model, pairs, "X-Former").diversity
    rows = {row["key"]: row for row in report["seeds"]["0"]}
    assert rows["xformer"]["query_diversity"] == pytest.approx(expected, rel=1e-6)
    assert rows["xformer"]["query_diversity"] != rows["blip2"]["query_diversity"]


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
        for seed in (0, 1):
            assert f"[{model} seed {seed}]" in output
    assert "Train: data epoch" in output and "Evaluation" in output  # LAVIS's MetricLogger, streamed
    for seed in (0, 1):
        for model in pipeline.MODELS:
            for stage in pipeline.STAGES:
                (job,) = [p for p in (out / "runs" / f"seed{seed}" / model.key / stage.key).iterdir() if p.is_dir()]
                if stage.key in pipeline.TRAINED:
                    assert pipeline.last_checkpoint(job).name == "checkpoint_1.pth"
                    assert run_config(job)["run"]["seed"] == seed  # every trainable run retrained with the seed
                if stage.key in pipeline.EVALUATED:
                    assert (job / "evaluate.txt").is_file()
            assert (out / "logs" / f"seed{seed}" / f"{model.key}_vqa_ft.log").is_file()
    assert not list((out / "data").glob(".*tmp*"))  # the data was generated once, before the runs


def run_config(job: Path) -> dict:
    """The config a training run wrote beside its log (``config.yaml``)."""
    return OmegaConf.to_container(OmegaConf.load(job / "config.yaml"))


def test_smoke_demo_both_models_use_the_same_pretrained_clip_vit(smoke_demo):
    out, _ = smoke_demo
    report = json.loads((out / "demo_results.json").read_text())
    clip = report["clip_standin"]
    assert clip["epoch_losses"][-1] < clip["epoch_losses"][0]  # the stand-in was trained
    assert hashlib.sha256(Path(clip["file"]).read_bytes()).hexdigest() == clip["sha256"]
    for seed in ("0", "1"):
        for model in ("xformer", "blip2"):
            for stage in pipeline.TRAINED:
                config = run_config(Path(report["runs"][seed][model][stage]))
                weights = Path(config["model"]["vit_weights"])
                assert hashlib.sha256(weights.read_bytes()).hexdigest() == clip["sha256"], (seed, model, stage)
    assert report["mae_standin"]["epoch_losses"][-1] < report["mae_standin"]["epoch_losses"][0]
    # the OPT stand-in: one folder for every LLM run of both models, and what it scores with and without context
    llm = report["llm_standin"]
    assert set(llm["answer_loss"]) == {"with_context", "without_context"}
    for seed in ("0", "1"):
        for model in ("xformer", "blip2"):
            for stage in ("stage2", "vqa_ft"):
                config = run_config(Path(report["runs"][seed][model][stage]))
                assert config["model"]["opt_model"] == llm["folder"], (seed, model, stage)


def test_smoke_demo_headline_has_intervals_tests_and_matching_verdicts(smoke_demo):
    out, output = smoke_demo
    report = json.loads((out / "demo_results.json").read_text())
    lines = {line["key"]: line for line in report["headline"]}
    assert list(lines) == [key for key, _, _ in demo_report.HEADLINE]
    for key, line in lines.items():
        for entry in (line["xformer"], line["blip2"], line["difference"]):
            assert len(entry["per_seed"]) == 2
            assert entry["t_low"] <= entry["mean"] <= entry["t_high"]  # a t interval over the two seeds
            mean, low, high = stats.mean_t_interval(entry["per_seed"])
            assert (entry["mean"], entry["t_low"], entry["t_high"]) == pytest.approx((mean, low, high))
        # the per-seed values are those of the per-seed rows, and the difference is X-Former - BLIP-2
        for seed_index, seed in enumerate(("0", "1")):
            rows = {row["key"]: row for row in report["seeds"][seed]}
            assert line["xformer"]["per_seed"][seed_index] == rows["xformer"][key]
            assert line["difference"]["per_seed"][seed_index] == pytest.approx(rows["xformer"][key] - rows["blip2"][key])
        p = line["test"]["p_value"]
        assert 0.0 <= p <= 1.0
        significant = "not significant" not in line["verdict"]
        assert significant == (p < demo_report.SIGNIFICANCE), line["verdict"]
        assert f"p = {p:.3g}" in line["verdict"] and line["verdict"] in output.replace("\n    ", " ")
        assert f"{line['baseline']['value']:.1f}" in line["verdict"]
    # the VQA tests are McNemar's on the pooled per-question outcomes, recomputed here from LAVIS's result files
    folder = next((out / "data").glob("shapes-*"))
    for key, _, vqa in demo_report.HEADLINE:
        if vqa is None:
            continue
        stage, answer_type = vqa
        pooled = {}
        for model in ("xformer", "blip2"):
            per_seed = [demo_report.score_answers(folder, demo_report.predicted_answers(Path(report["runs"][seed][model][stage])),
                                                  out / "rescore" / seed / model / stage)
                        for seed in ("0", "1")]
            pooled[model] = demo_report.pooled_scores(per_seed, answer_type)
        expected = stats.compare_paired(pooled["blip2"], pooled["xformer"])
        assert lines[key]["test"]["p_value"] == pytest.approx(expected.mcnemar.p_value)
        assert lines[key]["test"]["pairs"] == expected.num_questions
    # the baselines printed beside the results: chance R@1 = one image in the test split, majority per answer type
    baselines = report["baselines"]
    assert baselines["chance_r1"] == pytest.approx(100.0 / baselines["num_test_images"])
    assert set(baselines["majority_answer"]) == {"number", "yes/no"}
    assert "Headline" in output and "majority answer" in output and "chance" in output


# ------------------------------------------------------------------------------------------------------------------
# The CLIP-ViT stand-in's weights
# ------------------------------------------------------------------------------------------------------------------
def test_vit_weights_file_loads_into_both_models_and_refuses_a_mismatch(tmp_path):
    torch.manual_seed(0)
    reference = load_model("xformer", "tiny").visual_encoder
    trained = {k: torch.randn_like(v) for k, v in reference.state_dict().items()}
    path = tmp_path / "clip_vit.pth"
    torch.save(trained, path)
    from lavis.common.registry import registry

    for arch in ("xformer", "blip2_baseline"):
        cfg = OmegaConf.load(registry.get_model_class(arch).default_config_path("tiny")).model
        cfg.vit_weights = str(path)
        model = registry.get_model_class(arch).from_config(cfg)
        loaded = model.visual_encoder.state_dict()
        assert all(torch.equal(loaded[k], trained[k]) for k in trained), arch
        assert not any(p.requires_grad for p in model.visual_encoder.parameters())  # frozen, as hub weights
    cfg.vit_embed_dim = 48  # a file of other sizes: a clear error, no silent partial load
    with pytest.raises(ValueError, match="does not fit the CLIP-ViT of this config"):
        registry.get_model_class("blip2_baseline").from_config(cfg)
    cfg.vit_embed_dim, cfg.vit_weights = 32, str(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="neither 'eva_clip_g', null .* nor an existing file"):
        registry.get_model_class("blip2_baseline").from_config(cfg)


def test_clip_standin_loss_is_clips_symmetric_cross_entropy():
    from lavis_xformer.models.builders import build_clip_vit
    from lavis_xformer.models.config import BackboneConfig

    torch.manual_seed(0)
    typed = BackboneConfig.from_lavis_cfg(dict(image_size=32, vit_weights=None, vit_patch_size=8, vit_embed_dim=32,
                                                vit_depth=2, vit_num_heads=2, vit_mlp_ratio=2.0, vit_precision="fp32",
                                                freeze_vit=False))
    clip = standins.ClipStandIn(build_clip_vit(typed), vocab_size=100, embed_dim=16, max_positions=16).eval()
    images, ids, mask = torch.randn(4, 3, 32, 32), torch.randint(5, 100, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    loss, _ = clip(images, ids, mask)
    image = torch.nn.functional.normalize(clip.image_proj(clip.image_norm(clip.vit(images).mean(1))), dim=-1)
    text = torch.nn.functional.normalize(clip.text_proj(clip.text(ids, mask).last_hidden_state[:, 0]), dim=-1)
    logits = clip.logit_scale.exp() * image @ text.t()
    labels = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(loss, expected)
    # the pairing matters: the same images with the captions shuffled give another loss
    assert not torch.allclose(clip(images, ids.flip(0), mask)[0], loss)


def test_llm_standin_documents_put_the_context_before_the_bos_and_the_loss_on_the_text_alone():
    from lavis_xformer.models.llm_builders import build_opt
    from lavis_xformer.models.config_llm import XFormerOPTConfig

    section = OmegaConf.to_container(OmegaConf.load(REPO / "configs/models/xformer_opt/xformer_opt_tiny.yaml").model)
    tokenizer, opt = build_opt(XFormerOPTConfig.from_lavis_cfg(section))

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    documents = [standins.ContextDocument("two red circles", "two red circles\n"),
                 standins.ContextDocument("a blue square", " yes\n", prompt="Question: is there a square? Short answer:")]
    input_ids, attention_mask, labels = standins.context_lm_batch(tokenizer, documents, max_length=32)
    first = ids("two red circles") + [tokenizer.bos_token_id] + ids("two red circles\n")
    second = ids("a blue square") + [tokenizer.bos_token_id] + ids("Question: is there a square? Short answer:") + ids(" yes\n")
    assert input_ids[0, : len(first)].tolist() == first and input_ids[1, : len(second)].tolist() == second
    assert attention_mask.sum(1).tolist() == [len(first), len(second)]
    # the labels: the text alone (not the context, the BOS, the prompt or the padding)
    assert [t for t in labels[0].tolist() if t != -100] == ids("two red circles\n")
    assert [t for t in labels[1].tolist() if t != -100] == ids(" yes\n")
    assert (labels[attention_mask == 0] == -100).all()
    # drop_context: the same document from its BOS on
    dropped, _, _ = standins.context_lm_batch(tokenizer, documents[:1], 32, drop_context=[True])
    assert dropped[0].tolist() == [tokenizer.bos_token_id] + ids("two red circles\n")
    # the context reaches the loss of the text (the slot a visual prefix takes is read)
    other = [standins.ContextDocument("a green triangle", documents[0].text)]
    with torch.no_grad():
        losses = [opt(input_ids=i, attention_mask=m, labels=l).loss
                  for i, m, l in (standins.context_lm_batch(tokenizer, d, 32) for d in (documents[:1], other))]
    assert not torch.allclose(*losses)


def test_llm_standin_corpus_pairs_every_training_caption_and_question_with_its_images_caption(tmp_path):
    folder = shapes.ensure_generated(shapes.ShapesSpec(image_size=32, num_train=8, num_val=2, num_test=2), tmp_path)
    documents = standins.llm_training_documents(folder)
    scenes = shapes.read_annotation(folder, "scenes_train")
    assert len(documents) == len(scenes) * (1 + shapes.QUESTIONS_PER_IMAGE)
    captions = [d for d in documents if not d.text.startswith("Question:")]
    assert all(d.text == d.context + "\n" for d in captions)  # stage 2's task: the caption from the context
    questions = [d for d in documents if d.text.startswith("Question:")]
    assert {d.context for d in questions} == {d.context for d in captions}
    assert all(re.fullmatch(r"Question: .+\? Short answer: (yes|no|\d)\n", d.text) for d in questions)


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
