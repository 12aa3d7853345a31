"""The benchmark runs at a tiny size and reports every field for both models, with ratios computed from them."""

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, "-m", "lavis_xformer.analysis.bench", "--size", "tiny", "--repeats", "2", "--warmup", "1", "--json", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


def test_every_field_for_both_models(report):
    data, _ = report
    for stage in ("stage1", "stage2"):
        paper = data["paper_scale"][stage]
        for row in ("blip2", "xformer"):
            assert paper[row]["trainable"] > 0 and paper[row]["frozen"] > 0 and paper[row]["forward_flops_per_sample"] > 0
        timed = ["train_step", "feature_extraction"] + (["predict_answers"] if stage == "stage2" else [])
        for row in ("blip2", "blip2+impl", "xformer"):
            for key in timed:
                result = data[stage][key][row]
                assert result["median_s"] > 0 and result["iqr_s"] >= 0 and result["n"] >= 2
            assert data[stage]["memory"][row]["peak_mb"] > 0
            assert data[stage]["parameters"][row]["trainable"] > 0


def test_paper_scale_counts_and_printed_ratios(report):
    data, stdout = report
    stage1, stage2 = data["paper_scale"]["stage1"], data["paper_scale"]["stage2"]
    # X-Former adds the dual block (and the frozen MAE): the same counts the parameter tests assert.
    assert abs(stage1["xformer"]["trainable"] - stage1["blip2"]["trainable"] - 20.87e6) < 0.1e6
    assert abs(stage2["blip2"]["trainable"] - 108.31e6) < 0.1e6
    assert stage1["xformer"]["forward_flops_per_sample"] > stage1["blip2"]["forward_flops_per_sample"]
    flops_ratio = stage1["xformer"]["forward_flops_per_sample"] / stage1["blip2"]["forward_flops_per_sample"]
    assert f"stage 1: **{flops_ratio:.3f}**" in stdout
    step_ratio = data["stage1"]["train_step"]["xformer"]["median_s"] / data["stage1"]["train_step"]["blip2"]["median_s"]
    assert f"| stage-1 train_step | {step_ratio:.3f} |" in stdout
