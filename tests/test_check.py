"""``python -m lavis_xformer.check`` and the checks train/evaluate run before anything is built; LAVIS's cache_root
never under /export; quiet third-party warnings."""

import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_xformer import check, launch, paths, run_config
from lavis_xformer.check import CheckFailed, Finding
from lavis_xformer.common.meta import build_on_meta
from helpers import DEMO_TRAIN, PROJECTS, REPO, shapes_options, subprocess_env

DEMO_STAGE2 = PROJECTS / "demo" / "pretrain_stage2_shapes.yaml"
PAPER_VQA_EVAL = PROJECTS / "eval" / "vqav2_zeroshot_opt2.7b.yaml"


def messages(findings, level="ERROR"):
    return [f.message for f in findings if f.level == level]


@pytest.fixture
def empty_cache_root(tmp_path, monkeypatch):
    """LAVIS's cache_root pointed at an empty folder, and every download LAVIS could start made to fail loudly."""
    root = tmp_path / "lavis_cache"
    monkeypatch.setitem(registry.mapping["paths"], "cache_root", str(root))

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    import lavis.datasets.builders.base_dataset_builder as base_builder
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(base_builder, "download_url", no_download)
    monkeypatch.setattr(tv_utils, "download_url", no_download)
    return root


def small_shapes(tmp_path):
    return shapes_options("xformer_shapes_caption", tmp_path / "shapes", num_train=16, num_val=4, num_test=4)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def test_placeholder_checkpoint_is_refused_before_building_with_the_command_that_writes_it(tmp_path):
    findings = check.check(DEMO_STAGE2, small_shapes(tmp_path), memory=False)
    (error,) = messages(findings)
    assert "model.pretrained=output/xformer/demo/pretrain_stage1_shapes/<job_id>/checkpoint_11.pth" in error
    assert "placeholder (<job_id>)" in error
    assert "python -m lavis_xformer.train --cfg-path projects/xformer/demo/pretrain_stage1_shapes.yaml" in error
    assert not (tmp_path / "shapes").exists()  # nothing generated, nothing built (what kept it fast; no timing)


def test_train_stops_on_the_placeholder_before_building_data_or_model(tmp_path):
    with pytest.raises(CheckFailed, match=r"placeholder \(<job_id>\)"):
        launch.build_runner(["--cfg-path", str(DEMO_STAGE2), "--options", *small_shapes(tmp_path)])
    assert not (tmp_path / "shapes").exists()


def test_checkpoints_are_opened_and_must_fit_the_model(tmp_path):
    from lavis_xformer.common.meta import build_without_checkpoints

    model = build_without_checkpoints("xformer", "tiny", mae_patch_size=4)  # the demo yamls' MAE patches
    model_keys = set(model.state_dict())
    good, unrelated, truncated = tmp_path / "good.pth", tmp_path / "unrelated.pth", tmp_path / "truncated.pth"
    torch.save({"model": model.state_dict(), "epoch": 0}, good)
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, unrelated)
    truncated.write_bytes(good.read_bytes()[:2000])

    ok = check.check_checkpoint("model.pretrained", good, model_keys)
    assert ok.level == "OK" and f"{len(model_keys)} of its {len(model_keys)} tensors" in ok.message
    assert check.check_checkpoint("model.pretrained", unrelated, model_keys).level == "ERROR"
    bad = check.check_checkpoint("model.pretrained", truncated, model_keys)
    assert bad.level == "ERROR" and "cannot be loaded" in bad.message
    missing = check.check_checkpoint("model.finetuned", tmp_path / "nope.pth", model_keys)
    assert missing.level == "ERROR" and "no such file" in missing.message

    findings = check.check(DEMO_STAGE2, [*small_shapes(tmp_path), f"model.pretrained={good}"], memory=False)
    assert not messages(findings)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def test_missing_lavis_dataset_is_reported_with_its_path_and_no_download(empty_cache_root):
    findings = check.check(PAPER_VQA_EVAL, memory=False)  # empty_cache_root makes any download raise
    errors = messages(findings)
    expected = empty_cache_root / "coco" / "annotations" / "v2_mscoco_val2014_annotations.json"
    assert any(str(expected) in e and "v2_mscoco_val2014_annotations.json to that path" in e for e in errors)
    assert any(str(empty_cache_root / "coco" / "images") in e and "download_coco.py" in e for e in errors)
    assert not empty_cache_root.exists()  # LAVIS's builder would have created the folders and downloaded

    allowed = check.check(PAPER_VQA_EVAL, ["run.allow_downloads=True"], memory=False)
    assert any("LAVIS will download it from https://" in w for w in messages(allowed, "WARNING"))
    assert not any("annotation file" in e for e in messages(allowed))


def test_cc3m_default_annotation_path_is_salesforce_internal(empty_cache_root):
    findings = check.check(PROJECTS / "train" / "pretrain_stage1.yaml", memory=False)
    (cc3m,) = [e for e in messages(findings) if e.startswith("conceptual_caption_3m: annotation")]
    assert str(empty_cache_root / "conceptual_caption" / "annotations" / "cc3m.json") in cc3m
    assert "/export/home/workspace/datasets/cc3m.json does not exist either" in cc3m


def test_evaluate_stops_on_missing_data_before_anything_is_built(empty_cache_root):
    with pytest.raises(CheckFailed, match=r"coco_vqa: annotation file .*vqa_val_eval.json"):
        launch.build_runner(["--cfg-path", str(PAPER_VQA_EVAL)], description="Evaluation")
    assert not empty_cache_root.exists()


# ---------------------------------------------------------------------------------------------------------------
# Config: learning rates, unknown keys, --options
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, expected", [
    ("run.min_lr=-2e-2", "run.min_lr=-0.02 must be >= 0"),
    ("run.init_lr=0", "run.init_lr=0 must be > 0"),
    ("run.init_lr=-1e-4", "run.init_lr=-0.0001 must be > 0"),
    ("run.warmup_lr=-0.5", "run.warmup_lr=-0.5 must be >= 0 (or -1: start the warm-up at init_lr)"),
    ("run.init_lr=nan", "run.init_lr='nan' must be a finite number"),
    ("run.min_lr=inf", "run.min_lr='inf' must be a finite number"),
    ("run.max_epochs=0", "run.max_epochs is not a known run setting; did you mean run.max_epoch"),
    ("run.batch_size=0", "run.batch_size is not a known run setting; did you mean run.batch_size_eval or "
                         "run.batch_size_train?"),
    ("model.mask_ration=0.3", "model.mask_ration is not a known model setting; did you mean model.mask_ratio"),
])
def test_bad_run_settings_are_one_line_each(option, expected, tmp_path):
    findings = check.check(DEMO_TRAIN, [*small_shapes(tmp_path), option], memory=False)
    (error,) = messages(findings)
    assert error.startswith(expected)
    with pytest.raises(launch.ConfigError, match=re.escape(expected)):
        launch.build_runner(["--cfg-path", str(DEMO_TRAIN), "--options", *small_shapes(tmp_path), option])
    assert not (tmp_path / "shapes").exists()


def test_valid_lr_edge_cases_pass(tmp_path):
    # warmup_lr -1 is LAVIS's "start the warm-up at init_lr"; min_lr 0 is a valid floor
    findings = check.check(DEMO_TRAIN, [*small_shapes(tmp_path), "run.warmup_lr=-1", "run.min_lr=0"], memory=False)
    assert not messages(findings)


@pytest.mark.parametrize("options", [["run.max_epoch"], ["run.max_epoch=1", "run.seed"], ["run.max_epoch", "1", "x"]])
def test_malformed_options_say_what_form_is_expected(options, tmp_path):
    (error,) = messages(check.check(DEMO_TRAIN, options, memory=False))
    assert "expected key=value items, e.g. --options run.max_epoch=1" in error


def test_plugin_run_keys_are_known_without_a_second_list():
    known = run_config.known_run_keys()
    assert {"checkpoint_every_iters", "max_bad_fraction", "robust_data", "allow_downloads"} <= known
    assert {"max_epoch", "k_test", "dist_url", "train_dataset_ratios"} <= known


# ---------------------------------------------------------------------------------------------------------------
# Every demo yaml passes; the CLI
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("yaml", sorted((PROJECTS / "demo").glob("*.yaml")), ids=lambda p: p.stem)
def test_demo_yamls_pass_but_for_their_placeholder_checkpoints(yaml, tmp_path):
    builder = next(iter(OmegaConf.load(yaml).datasets))
    options = shapes_options(builder, tmp_path / "shapes", num_train=16, num_val=4, num_test=4)
    errors = messages(check.check(yaml, options, memory=False))
    assert all("placeholder (<job_id>)" in e or "is empty but the run loads it" in e for e in errors), errors
    model = OmegaConf.load(yaml).model
    unset_finetuned = model.get("load_finetuned", False) and not model.get("finetuned", None)
    assert bool(errors) == ("<job_id>" in str(model.get("pretrained", "")) or bool(unset_finetuned))


def test_memory_estimate_counts_weights_optimizer_and_activations_per_sample(tmp_path):
    def estimate(batch):
        (line,) = [f.message for f in check.check(DEMO_TRAIN, [*small_shapes(tmp_path), f"run.batch_size_train="
                                                              f"{batch}"]) if "GPU memory" in f.message]
        return line

    from lavis.models import load_model

    trainable = sum(p.numel() for p in load_model("xformer", "tiny").parameters() if p.requires_grad)
    model = build_on_meta("xformer", "tiny")
    config = model.config
    (line,) = [f.message for f in check.memory_estimate(model, config, 8, training=True)]
    assert f"{trainable / 1e6:.1f}M trainable" in line and "estimate" in line
    saved = {b: check.saved_activation_bytes(model, b, config.image_size) for b in (2, 4, 8)}
    assert saved[4] > saved[2] > 0
    # activations grow with the batch (in-batch ITC similarities add a small quadratic term)
    assert saved[8] - saved[4] == pytest.approx(2 * (saved[4] - saved[2]), rel=0.05)
    assert "batch 32" in estimate(32)


def test_hub_weights_are_looked_up_in_the_cache_only(monkeypatch):
    class Config:
        vit_weights = None
        qformer_weights = None
        tokenizer = "tiny_bert_vocab.txt"  # a local asset
        use_mae = True
        mae_weights = "nobody-xformer-test/not-a-model"

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (finding,) = check.check_hub_weights(Config)
    assert finding == Finding("WARNING", "model.mae_weights: MAE-ViT nobody-xformer-test/not-a-model is not cached, "
                                         "will download")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check.check_hub_weights(Config)[0].level == "ERROR"


def test_cli_exit_status_and_one_line_per_problem(tmp_path):
    env = subprocess_env()
    result = subprocess.run([sys.executable, "-m", "lavis_xformer.check", "--cfg-path", str(DEMO_STAGE2),
                             "--no-memory", "--options", *small_shapes(tmp_path), "run.min_lr=-1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 1
    assert [line for line in lines if line.startswith("ERROR")] == ["ERROR: run.min_lr=-1 must be >= 0"]
    ok = subprocess.run([sys.executable, "-m", "lavis_xformer.check", "--cfg-path", str(DEMO_TRAIN), "--no-memory",
                         "--options", *small_shapes(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1] == "0 error(s), 0 warning(s)"


def test_check_help_prints_no_third_party_warning(tmp_path):
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, "-W", "default", "-m", "lavis_xformer.check", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--cfg-path" in result.stdout
    assert "Warning" not in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# cache_root: never LAVIS's /export/home default
# ---------------------------------------------------------------------------------------------------------------
PROBE = ("import lavis_xformer; from lavis.common.registry import registry; from lavis_xformer.datasets import shapes; "
         "print(registry.get_path('cache_root')); print(shapes.resolve_root(None))")


@pytest.mark.parametrize("lavis_cache_root", [None, "custom"])
def test_shapes_data_never_goes_under_export(lavis_cache_root, tmp_path):
    env = dict(subprocess_env(), HOME=str(tmp_path / "home"))
    env.pop("XDG_CACHE_HOME", None)
    env.pop("LAVIS_CACHE_ROOT", None)
    if lavis_cache_root:
        env["LAVIS_CACHE_ROOT"] = str(tmp_path / lavis_cache_root)
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cache_root, shapes_root = result.stdout.split()
    expected = tmp_path / lavis_cache_root if lavis_cache_root else tmp_path / "home" / ".cache" / "lavis"
    assert (cache_root, shapes_root) == (str(expected), str(expected / "xformer_shapes"))
    assert not shapes_root.startswith("/export")


def test_a_cache_root_set_in_lavis_is_kept(monkeypatch):
    monkeypatch.delenv("LAVIS_CACHE_ROOT", raising=False)
    monkeypatch.setitem(registry.mapping["paths"], "cache_root", "/data/lavis")
    assert paths.apply_cache_root() == "/data/lavis"
    monkeypatch.setitem(registry.mapping["paths"], "cache_root", paths.LAVIS_SHIPPED_CACHE_ROOT)
    assert paths.apply_cache_root() == str(paths.user_cache_root())
    assert not os.path.commonpath([paths.user_cache_root(), "/export"]) == "/export"


# ---------------------------------------------------------------------------------------------------------------
# Model types that imply weights: no released X-Former weights
# ---------------------------------------------------------------------------------------------------------------
def _from_type(arch, model_type, **overrides):
    from lavis_xformer.models.builders import no_hub

    cls = registry.get_model_class(arch)
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path(model_type)).model, overrides)
    with torch.device("meta"), no_hub():
        return cls.from_config(cfg)


@pytest.mark.parametrize("arch, model_type", [("xformer", "pretrain"), ("xformer_opt", "pretrain_opt2.7b"),
                                              ("xformer_opt", "caption_coco_opt2.7b")])
def test_paper_scale_types_say_loudly_that_no_xformer_weights_exist(arch, model_type, caplog):
    with caplog.at_level(logging.INFO):
        _from_type(arch, model_type)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING and "UNTRAINED" in r.getMessage()]
    assert "no released X-Former weights exist" in warning.getMessage()


def test_tiny_types_do_not_warn(caplog):
    from lavis.models import load_model

    with caplog.at_level(logging.INFO):
        load_model("xformer", "tiny")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "UNTRAINED" in r.getMessage()]


@pytest.mark.parametrize("key", ["pretrained", "finetuned"])
@pytest.mark.parametrize("path", ["output/xformer/pretrain_stage1/<job_id>/checkpoint_8.pth", "no/such/file.pth"])
def test_an_unsatisfiable_checkpoint_path_is_an_error(key, path):
    from lavis_xformer.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match=f"model.{key}={re.escape(path)}"):
        _from_type("xformer_opt", "pretrain_opt2.7b", **{key: path, f"load_{key}": True})


def test_a_local_llm_folder_is_a_warning_and_a_missing_one_an_error(tmp_path):
    """The demo passes its pretrained stand-in OPT as a folder: no published sizes, so no meta build, but no error."""
    folder = tmp_path / "opt"
    folder.mkdir()
    findings = check.check(DEMO_STAGE2, [*small_shapes(tmp_path), f"model.opt_model={folder}",
                                         f"model.pretrained={folder / 'x.pth'}"], memory=False)
    assert messages(findings) == [f"model.pretrained={folder / 'x.pth'}: no such file (resolved as {folder / 'x.pth'})"]
    assert any(w.startswith("model not built on the meta device") for w in messages(findings, "WARNING"))
    missing = check.check(DEMO_STAGE2, [*small_shapes(tmp_path), f"model.opt_model={tmp_path / 'nope'}"], memory=False)
    assert f"model.opt_model: LLM {tmp_path / 'nope'} is neither an existing path nor a hub repository id" in \
        messages(missing)
