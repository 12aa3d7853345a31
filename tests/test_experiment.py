"""The experiment end to end at smoke size (``python -m lavis_xformer.experiment --size smoke``): it reruns to the
same table, prints a health line per (seed, arm), the differences with their MDEs and a verdict of the pre-stated
reading, and writes its table, record and figure."""

import json

import pytest
from PIL import Image

from lavis_xformer.experiment.design import ARMS, SMOKE
from lavis_xformer.experiment.run import run_experiment

ARMS_UNDER_TEST = tuple(a for a in ARMS if a.name in ("blip2", "xformer", "control"))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    lines = []
    first = run_experiment([0, 1], SMOKE, tmp_path_factory.mktemp("run1"), jobs=1, arms=ARMS_UNDER_TEST,
                           say=lines.append)
    out = tmp_path_factory.mktemp("run2")
    second = run_experiment([0, 1], SMOKE, out, jobs=1, arms=ARMS_UNDER_TEST, say=lambda line: None)
    return first, second, out, "\n".join(lines)


def test_same_seeds_give_the_same_table(two_runs):
    first, second, _, _ = two_runs
    assert first["markdown"] == second["markdown"]
    assert first["accuracy"] == second["accuracy"]


def test_table_has_every_arm_type_difference_mde_and_a_stated_verdict(two_runs):
    first, _, _, printed = two_runs
    for arm in ARMS_UNDER_TEST:
        assert arm.label in first["markdown"]
    assert "MDE80" in first["markdown"] and "X-Former - BLIP-2" in first["markdown"]
    assert first["verdict"] in ("POSITIVE", "NEGATIVE", "INCONCLUSIVE")
    assert f"Verdict: {first['verdict']}" in printed
    assert printed.index("Pre-stated reading") < printed.index("Verdict:")  # the reading comes before the result
    assert len([line for line in first["health"] if line.startswith("seed ")]) == 2 * len(ARMS_UNDER_TEST)
    assert "ETA" in printed


def test_outputs_are_written(two_runs):
    _, second, out, _ = two_runs
    record = json.loads((out / "experiment.json").read_text())
    assert len(record["runs"]) == 2 * len(ARMS_UNDER_TEST) and record["summary"]["verdict"] == second["verdict"]
    assert (out / "experiment.md").read_text().startswith(second["markdown"])
    with Image.open(out / "experiment_accuracy.png") as image:
        assert image.size[0] > 500


def test_a_cached_stand_in_is_reused_only_for_the_same_data_sizes_and_recipe():
    from dataclasses import replace

    from lavis_xformer.experiment.design import FULL, Recipe
    from lavis_xformer.experiment.run import standin_key

    key = standin_key("clip32", FULL)
    assert standin_key("clip32", replace(FULL, stage1=Recipe(steps=1, batch_size=2, lr=1e-3, warmup_steps=1))) == key
    assert standin_key("clip32", replace(FULL, mae_epochs=1)) == key  # the MAE's recipe is not the CLIP's
    for changed in (replace(FULL, clip_epochs=1), replace(FULL, num_pretrain=64), replace(FULL, max_objects=4)):
        assert standin_key("clip32", changed) != key
    assert standin_key("clip64", FULL) != key and standin_key("mae", replace(FULL, mae_epochs=1)) != standin_key("mae", FULL)
