"""The GPU check (``python -m lavis_xformer.gpucheck``): its CPU parts. What it checks on CUDA is a GPU's to decide;
here: without CUDA it claims nothing and exits 0, it plans every check the issue names, one failing check never
stops the others and fails the run, and the AMP comparison's plumbing (same weights, inputs and random draws) gives
an fp32 loss equal to itself bit for bit on the CPU."""

import json

import pytest
import torch

from lavis_xformer import gpucheck


def test_without_cuda_it_says_so_and_claims_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report" / "gpucheck.json"
    assert gpucheck.main(["--out", str(out)]) == 0
    assert gpucheck.NO_CUDA in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["cuda"] is False and report["checks"] == [] and report["passed"] == 0 and report["failed"] == 0
    assert "claims nothing" in report["message"]


def test_it_plans_every_cuda_path_at_both_sizes():
    names = list(gpucheck.planned_checks())
    for size in ("tiny", "bench"):
        for stage in (1, 2):
            for dtype in ("fp16", "bf16"):
                for model in ("blip2", "xformer"):
                    assert f"amp/stage{stage}/{size}/{dtype}/{model}" in names
            assert f"shipped/stage{stage}/{size}/xformer" in names
        assert {f"sdpa/{size}/fp16", f"sdpa/{size}/bf16", f"predict_answers/{size}/xformer", f"bench/{size}"} <= set(names)
    assert "nccl" in names and len(names) == len(set(names))


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path):
    def broken():
        raise gpucheck.CheckFailed("loss 3.2 vs 3.0")

    def crashing():
        raise RuntimeError("No available kernel")

    lines = []
    results = gpucheck.run_checks({"a": lambda: {"x": 1}, "b": broken, "c": crashing, "d": lambda: None}, False, lines.append)
    assert [r.passed for r in results] == [True, False, False, True]
    assert results[1].error == "CheckFailed: loss 3.2 vs 3.0" and "No available kernel" in results[2].error
    assert lines[0].startswith("PASS  a") and lines[1].startswith("FAIL  b") and "loss 3.2 vs 3.0" in lines[1]
    report = gpucheck.report(results, cuda=False)
    assert (report["passed"], report["failed"]) == (2, 2) and report["checks"][0]["details"] == {"x": 1}
    json.dumps(report, default=str)


@pytest.mark.parametrize("stage", [1, 2])
def test_amp_check_plumbing_on_the_cpu_in_fp32(stage):
    details = gpucheck.amp_training_step(stage, "xformer", "tiny", torch.float32, device="cpu")
    assert details["loss_fp32"] == details["loss_amp"] and details["difference"] == 0.0
    moved, total = map(int, details["parameters_moved"].split("/"))
    assert 0 < moved <= total
