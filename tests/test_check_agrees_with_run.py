"""``check`` passes exactly when a run gets past its set-up (config, data, model, checkpoints, runner): every yaml in
projects/, without options and with its documented ones (the ``<job id>`` checkpoints replaced by real files of the
tiny models), and the option combinations issue 28 found. Paper-scale yamls run offline and stop at the hub boundary
(their hub weights are not cached here), in check and run alike."""

import re

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_xformer import check, launch
from lavis_xformer.checkpoints import trainable_state_dict
from lavis_xformer.common.meta import build_without_checkpoints
from lavis_xformer.models.config import LAVIS_LOADING_KEYS
from helpers import PROJECTS

DEMO = PROJECTS / "demo"
CHECKPOINT_KEYS = ("pretrained", "finetuned", "qformer_text_init")


def _family(yaml) -> str:
    return "blip2" if yaml.stem.endswith("_blip2") else "xformer"


@pytest.fixture(scope="module")
def demo_checkpoints(tmp_path_factory):
    """(family, stage) -> a training checkpoint (trainable tensors, as the runner saves them) of the demo yaml's
    model, with random weights."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for family in ("xformer", "blip2"):
        for stage in (1, 2):
            yaml = DEMO / f"pretrain_stage{stage}_shapes{'_blip2' if family == 'blip2' else ''}.yaml"
            model_cfg = OmegaConf.to_container(OmegaConf.load(yaml).model)
            overrides = {k: v for k, v in model_cfg.items()
                         if k not in ("arch", "model_type", *LAVIS_LOADING_KEYS, *CHECKPOINT_KEYS)}
            torch.manual_seed(0)
            model = build_without_checkpoints(model_cfg["arch"], model_cfg["model_type"], **overrides)
            paths[family, stage] = folder / f"{family}_stage{stage}.pth"
            torch.save({"model": trainable_state_dict(model)}, paths[family, stage])
    return paths


def documented_checkpoints(yaml, checkpoints) -> list:
    """The yaml's checkpoint options (its header comment's ``--options model.KEY=...``, or its placeholder / empty
    fields), each pointed at the matching real checkpoint: the stage its path names, else the previous stage for
    ``pretrained`` / ``qformer_text_init`` and this model's stage for ``finetuned``."""
    text = yaml.read_text()
    model = OmegaConf.load(yaml).model
    options = []
    for key in CHECKPOINT_KEYS:
        documented = re.search(rf"model\.{key}=(\S+)", text)
        value = documented.group(1) if documented else model.get(key, None)
        needed = (key == "finetuned" and model.get("load_finetuned", False)) or (value and "<job" in str(value))
        if not needed:
            continue
        named = re.search(r"pretrain_stage(\d)", str(value or ""))
        own_stage = 2 if str(model.arch).endswith(("_opt", "_t5")) else 1
        stage = int(named.group(1)) if named else (own_stage if key == "finetuned" else max(own_stage - 1, 1))
        if key == "qformer_text_init":
            stage = 1
        options.append(f"model.{key}={checkpoints[_family(yaml), stage]}")
    return options


def small_data(yaml, root) -> list:
    options = []
    for name, cfg in OmegaConf.load(yaml).datasets.items():
        if cfg.get("shapes", None) is not None:
            options += [f"datasets.{name}.shapes.root={root}", f"datasets.{name}.shapes.num_train=16",
                        f"datasets.{name}.shapes.num_val=4", f"datasets.{name}.shapes.num_test=4"]
    return options


def outcomes(yaml, options, tmp_path, memory=False):
    """(check's errors, the run's set-up error or None)."""
    options = [*options, f"run.output_dir={tmp_path / 'out'}"]
    errors = [f.message for f in check.check(yaml, options, memory=memory) if f.level == "ERROR"]
    training = not OmegaConf.load(yaml).run.get("evaluate", False)
    for key in ("result_dir", "output_dir"):  # LAVIS's runner registers these once per process
        registry.mapping["paths"].pop(key, None)
    try:
        runner = launch.build_runner(["--cfg-path", str(yaml), "--options", *options],
                                     description="Training" if training else "Evaluation")
        runner._release_job_folder()
        return errors, None
    except Exception as error:  # what the run's set-up stops on
        return errors, error


def assert_agree(errors, run_error):
    assert bool(errors) == (run_error is not None), (errors, repr(run_error))
    if run_error is not None:  # the run stops in its first step, on check's own findings
        assert isinstance(run_error, check.CheckFailed), repr(run_error)
        assert all(e in str(run_error) for e in errors)


DEMO_YAMLS = sorted(DEMO.glob("*.yaml"))
ALL_YAMLS = sorted(PROJECTS.rglob("*.yaml"))


def _one_per_arch_and_task(yamls) -> list:
    """The first paper yaml of each (model arch, task): every set-up path check and the run take, at less than half
    the yamls (the others differ from one of these in sizes, data or hyperparameters only)."""
    chosen = {}
    for path in yamls:
        cfg = OmegaConf.load(path)
        chosen.setdefault((cfg.model.arch, cfg.run.task), path)
    return sorted(chosen.values())


PAPER_YAMLS = _one_per_arch_and_task(p for p in ALL_YAMLS if p.parent.name != "demo")


@pytest.mark.parametrize("documented", [False, True], ids=["no_options", "documented_options"])
@pytest.mark.parametrize("yaml", DEMO_YAMLS, ids=lambda p: p.stem)
def test_demo_yaml_check_agrees_with_the_run(yaml, documented, demo_checkpoints, tmp_path, process_group):
    options = small_data(yaml, tmp_path / "shapes")
    if documented:
        options += documented_checkpoints(yaml, demo_checkpoints)
    errors, run_error = outcomes(yaml, options, tmp_path)
    assert_agree(errors, run_error)
    needs_checkpoint = bool(documented_checkpoints(yaml, demo_checkpoints))
    assert bool(errors) == (needs_checkpoint and not documented), errors  # documented options suffice


@pytest.mark.parametrize("options, passes", [
    (["run.max_iters=4"], True),  # max_iters alone: a default inner epoch
    (["run.max_iters=4", "run.iters_per_inner_epoch=2"], True),
    (["run.max_iters=5", "run.iters_per_inner_epoch=2"], False),
    (["run.iters_per_inner_epoch=2"], False),
], ids=["max_iters_alone", "multiple", "not_a_multiple", "inner_without_max"])
def test_iteration_options_agree(options, passes, tmp_path, process_group):
    yaml = DEMO / "pretrain_stage1_shapes.yaml"
    errors, run_error = outcomes(yaml, small_data(yaml, tmp_path / "shapes") + options, tmp_path, memory=False)
    assert_agree(errors, run_error)
    assert (not errors) == passes, errors


def test_max_iters_alone_gets_a_sensible_inner_epoch():
    from lavis_xformer.run_config import ConfigError, iteration_mode

    assert iteration_mode({"max_iters": 4}) == (4, 4)
    assert iteration_mode({"max_iters": 250000}) == (250000, 1000)
    assert iteration_mode({"max_iters": 3000}) == (3000, 1000)
    with pytest.raises(ConfigError, match="iters_per_inner_epoch"):
        iteration_mode({"max_iters": 10007})  # a prime: the user chooses


def test_vqa_with_only_the_stage2_checkpoint_fails_in_check_as_in_the_run(demo_checkpoints, tmp_path, process_group):
    yaml = DEMO / "vqa_ft_shapes.yaml"
    base = small_data(yaml, tmp_path / "shapes") + [f"model.pretrained={demo_checkpoints['xformer', 2]}"]
    errors, run_error = outcomes(yaml, base, tmp_path, memory=False)  # qformer_text_init still a placeholder
    assert_agree(errors, run_error)
    assert any("qformer_text_init" in e and "placeholder" in e for e in errors), errors
    errors, run_error = outcomes(yaml, base + ["model.qformer_text_init=null"], tmp_path, memory=False)
    assert_agree(errors, run_error)  # the loader's own refusal, found by check's dry run on meta
    assert any("QFormerTextWeightsMissing" in e for e in errors), errors


@pytest.mark.parametrize("yaml", PAPER_YAMLS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_yaml_check_agrees_with_the_run_up_to_the_hub_boundary(yaml, demo_checkpoints, tmp_path, monkeypatch,
                                                                       process_group):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = []
    for key in CHECKPOINT_KEYS:  # the documented checkpoints, as existing files
        if "<job" in str(OmegaConf.load(yaml).model.get(key, "")):
            options.append(f"model.{key}={demo_checkpoints[_family(yaml), 1]}")
    for opts in ([], options):
        errors, run_error = outcomes(yaml, opts, tmp_path, memory=False)
        assert_agree(errors, run_error)
        assert "placeholder" not in " ".join(errors) or not opts
        hub = [e for e in errors if "HF_HUB_OFFLINE is set" in e]
        assert hub, errors  # stopped at the hub boundary: the missing hub weights are named
