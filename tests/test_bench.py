"""The benchmark runs at a tiny size (``--quick``) and reports every field for every row, with ratios computed from
them; the component attribution and the peak-memory count are checked on calls whose answer is known."""

import json
import subprocess
import sys

import pytest
import torch

from lavis_xformer.analysis import bench, bench_report
from lavis_xformer.analysis.breakdown import LABELS, attribute, component_labels


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text("prose kept\n\n" + bench_report.README_MARKER + "\n\nold figures\n")
    command = [sys.executable, "-m", "lavis_xformer.analysis.bench", "--quick", "--threads", "1", "--clock", "process",
               "--target-runs", "1",
               "--json", str(out / "bench.json"), "--readme", str(readme), "--figures", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), completed.stdout, readme.read_text(), out


def test_every_field_for_every_row(report):
    data, _, _, _ = report
    assert data["machine"]["threads"] == 1 and data["machine"]["clock"] == "process CPU time"
    for stage in ("stage1", "stage2"):
        paper = data["paper_scale"][stage]
        for row in ("blip2", "xformer"):
            assert paper[row]["trainable"] > 0 and paper[row]["frozen"] > 0 and paper[row]["forward_flops_per_sample"] > 0
            assert paper[row]["forward_macs_per_sample"] == paper[row]["forward_flops_per_sample"] / 2
        for op, rows in bench.ROWS_OF[int(stage[-1])].items():
            for row in rows:
                result = data[stage][op][row]
                assert result["median_s"] > 0 and result["iqr_s"] >= 0 and result["n"] == len(result["times_s"]) >= 2
                assert data[stage]["flops"][op][row] > 0
        for row in bench.build_rows(bench.TINY, int(stage[-1])):
            assert data[stage]["memory"][row]["peak_mb"] > 0
            assert data[stage]["parameters"][row]["trainable"] > 0
        for op in ("train_step", "feature_extraction"):
            for row in (bench_report.REFERENCE, "xformer"):
                assert set(data[stage]["breakdown"][op][row]) == set(LABELS)
        xformer, blip2 = data[stage]["breakdown"]["train_step"]["xformer"], data[stage]["breakdown"]["train_step"][bench_report.REFERENCE]
        assert xformer["MAE encoder"] > 0 and xformer["fusion"] > 0 and xformer["optimiser"] > 0 and blip2["MAE encoder"] == 0
        assert (xformer["LLM"] > 0) == (stage == "stage2") and (xformer["MAE decoder"] > 0) == (stage == "stage1")


def test_paper_scale_counts_and_the_paper_delta(report):
    data, stdout, _, _ = report
    stage1, stage2 = data["paper_scale"]["stage1"], data["paper_scale"]["stage2"]
    # X-Former adds the dual block (and the frozen MAE): the same counts the parameter tests assert.
    assert abs(stage1["xformer"]["trainable"] - stage1["blip2"]["trainable"] - 20.87e6) < 0.1e6
    assert abs(stage2["blip2"]["trainable"] - 108.31e6) < 0.1e6
    # one MAE-ViT-H pass on half the patches is the paper's +0.08T (in MACs); unmasked it is twice that
    assert abs(stage1["xformer"]["mae_encoder_macs_per_sample"] / 1e12 - 0.08) < 0.005
    assert stage2["xformer-mask50"]["mae_encoder_macs_per_sample"] == stage1["xformer"]["mae_encoder_macs_per_sample"]
    assert 1.9 < stage2["xformer"]["mae_encoder_macs_per_sample"] / stage2["xformer-mask50"]["mae_encoder_macs_per_sample"] < 2.1
    flops_ratio = stage1["xformer"]["forward_flops_per_sample"] / stage1["blip2"]["forward_flops_per_sample"]
    assert f"stage 1: **{flops_ratio:.3f}**" in stdout
    assert f"{stage1['xformer']['mae_encoder_macs_per_sample'] / 1e12:.3f}T MACs" in stdout


def test_printed_ratios_are_the_paired_ratios_beside_the_flops_ratios(report):
    data, stdout, _, _ = report
    stage1 = data["stage1"]
    for op in ("train_step", "feature_extraction"):
        xformer, reference = stage1[op]["xformer"], stage1[op][bench_report.REFERENCE]
        low, high = sorted(a / b for a, b in zip(xformer["times_s"], reference["times_s"]))  # two repeats
        median, q1, q3 = (low + high) / 2, low + (high - low) / 4, low + 3 * (high - low) / 4  # interpolated quartiles
        flops_ratio = stage1["flops"][op]["xformer"] / stage1["flops"][op][bench_report.REFERENCE]
        assert f"| stage-1 {op} | {median:.3f} [{q1:.3f}, {q3:.3f}] | {flops_ratio:.3f} |" in stdout


def test_scaling_rows_readme_and_charts(report):
    data, stdout, readme, out = report
    points = {(p["operation"], p["row"], p["batch_size"], p["image_size"]) for p in data["scaling"]}
    for batch, image_size in bench.QUICK_SCALING_POINTS:
        for row in (bench_report.REFERENCE, "xformer"):
            assert ("feature_extraction", row, batch, image_size) in points
            assert (("train_step", row, batch, image_size) in points) == (batch > 1)
    assert all(p["median_s"] > 0 and p["peak_mb"] > 0 for p in data["scaling"] if p["operation"] == "train_step")
    assert "How cost grows" in stdout
    # the README keeps its prose, and the generated part is this run's report
    assert readme.startswith("prose kept") and "old figures" not in readme and stdout.strip() in readme
    for name in ("breakdown_stage1", "breakdown_stage2", "scaling"):
        for suffix in (".png", ".svg"):
            assert (out / (name + suffix)).stat().st_size > 1000


def test_component_attribution_covers_forward_and_backward():
    """A model of two labelled components: each gets its forward and backward matmuls, and the total is kept."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.visual_encoder = torch.nn.Linear(256, 256)
    model.mae_encoder = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256, requires_grad=True)
    from torch.profiler import profile

    with component_labels(model), profile() as prof:
        (model.mae_encoder(model.visual_encoder(x)) ** 2).sum().backward()
    seconds = attribute(prof.events())
    assert seconds["CLIP-ViT"] > 0 and seconds["MAE encoder"] > 0
    names = {e.name for e in prof.events()}
    assert "CLIP-ViT" in names and "MAE encoder" in names
    # the backward matmuls are attributed: without the sequence-number link they would fall to "other"

    def under(event, test):
        while event is not None:
            if test(event.name):
                return True
            event = event.cpu_parent
        return False

    events = prof.events()
    forward = sum(e.self_cpu_time_total for e in events if under(e, lambda n: n in ("CLIP-ViT", "MAE encoder"))) / 1e6
    backward_nodes = lambda n: n.startswith("autograd::engine::evaluate_function: AddmmBackward")  # noqa: E731
    assert sum(1 for e in events if backward_nodes(e.name)) == 2
    backward = sum(e.self_cpu_time_total for e in events if under(e, backward_nodes)) / 1e6
    assert backward > 0 and seconds["CLIP-ViT"] + seconds["MAE encoder"] >= forward + backward - 1e-9
    total = sum(e.self_cpu_time_total for e in prof.events()) / 1e6
    assert abs(sum(seconds.values()) - total) < 1e-6


def test_call_peak_memory_counts_what_torch_allocates():
    def call():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = torch.ones(2048, 1024)  # 8 MiB while a is alive: 12 MiB at the peak
        del a
        return b.sum()

    assert abs(bench.call_peak_mb(call, torch.device("cpu")) - 12.0) < 0.1


def test_attention_flops_are_counted_on_the_cpu_kernel_as_written_out():
    """SDPA's CPU kernel counts what the same attention written as matmuls counts (torch registers formulas only for
    the CUDA kernels): the forward's two products, and the backward's five (it recomputes the scores)."""
    batch, heads, queries, keys, width = 2, 3, 5, 7, 4
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, queries, width, generator=generator, requires_grad=True)
    k, v = (torch.randn(batch, heads, keys, width, generator=generator, requires_grad=True) for _ in range(2))
    product = 2 * batch * heads * queries * keys * width  # FLOPs of one [queries x width] @ [width x keys]
    assert bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 2 * product
    written_out = bench.count_flops(lambda: torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    assert written_out == 2 * product
    with torch.no_grad():
        assert bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 2 * product
    step = bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    assert step == 2 * product + 5 * product


def test_time_per_flop_by_part_splits_xformer_into_its_two_added_parts():
    """GFLOP/s of BLIP-2 and of X-Former's two added parts from the rows' median times and FLOPs: the MAE branch with
    the fusion is ``xformer-norec`` - BLIP-2, the reconstruction ``xformer`` - ``xformer-norec``."""
    result = {
        "train_step": {bench_report.REFERENCE: {"median_s": 0.30}, "xformer-norec": {"median_s": 0.37}, "xformer": {"median_s": 0.45}},
        "flops": {"train_step": {bench_report.REFERENCE: 30e9, "xformer-norec": 37e9, "xformer": 39e9}},
    }
    rates = bench_report.part_throughput(result)
    assert rates["BLIP-2"] == pytest.approx(100.0)
    assert rates["MAE branch + fusion"] == pytest.approx(7 / 0.07)
    assert rates["reconstruction"] == pytest.approx(2 / 0.08)
    text = bench_report.part_throughput_markdown(result)
    assert "reconstruction 25.0 GFLOP/s (x4.00 BLIP-2's time per FLOP)" in text


def test_head_divisor_keeps_the_papers_head_widths():
    size = bench.BenchSize(head_divisor=8)
    fields = bench.xformer_fields(size)
    assert (fields["vit_embed_dim"] // fields["vit_num_heads"], fields["mae_hidden_size"] // fields["mae_num_heads"]) == (88, 80)
    assert fields["mae_decoder_hidden_size"] // fields["mae_decoder_num_heads"] == 32
    default = bench.xformer_fields(bench.BenchSize())
    assert default["mae_decoder_num_heads"] == 16 and default["mae_decoder_hidden_size"] == 64  # heads 4 wide


def test_targets_run_by_run_in_fresh_processes(report):
    """``--target-runs 1``: the run's own stage-1 ratios, then a fresh process's, each with time / FLOPs at the median
    and Q3, and a verdict that counts a target met only where every run meets it."""
    data, stdout, _, _ = report
    runs = data["target_runs"]
    assert len(runs) == 2
    assert runs[0] == bench_report.target_ratios(data["stage1"])
    for run in runs:
        for op in bench_report.TARGET_OPERATIONS:
            assert run[op]["per_flop"] == pytest.approx(run[op]["median"] / run[op]["flops_ratio"])
            assert run[op]["per_flop_q3"] >= run[op]["per_flop"] > 0
    # the fresh process counted the same FLOPs on the same calls
    assert runs[1]["train_step"]["flops_ratio"] == pytest.approx(runs[0]["train_step"]["flops_ratio"])
    for op in bench_report.TARGET_OPERATIONS:
        met = sum(run[op]["per_flop"] <= bench_report.TIME_PER_FLOP_TARGET for run in runs)
        assert f"{op}: met at the median in {met} of 2 runs" in stdout
        assert ("(met)" if met == 2 else "(not met)") in stdout.split(f"{op}: met at the median")[1].split(";")[0]


def test_processor_and_each_rows_precision_are_recorded_and_printed(report):
    """latest.json and the Markdown name the processor and the precision each row's frozen parts ran in: ``blip2`` as
    LAVIS ships it (fp32 on a CPU), the other rows what ``frozen_precision: auto`` picks on this machine (whatever it
    is: the expectation is the policy's, not a constant)."""
    from lavis_xformer.models.precision import choose_precision, probe_device

    data, stdout, _, _ = report
    processor = data["machine"]["processor"]
    assert set(processor) >= {"kind", "name", "capability", "native_bf16", "amx", "line"} and processor["kind"] == "cpu"
    assert f"Processor: {processor['line']}." in stdout and processor["name"] in data["machine"]["device"]
    auto = choose_precision("auto", probe_device("cpu")).name
    for stage in ("stage1", "stage2"):
        precision = data[stage]["precision"]
        assert precision["blip2"]["clip_vit"] == "fp32"
        assert precision[bench.REFERENCE]["clip_vit"] == precision["xformer"]["clip_vit"] == auto
        assert precision["xformer"]["mae_encoder"] == auto
        assert f"| xformer | {bench_report.precision_text(precision['xformer'])} |" in stdout
    assert data["stage2"]["precision"]["xformer"]["llm"] == "fp32"  # LAVIS's LLM code runs no autocast on a CPU


def test_connector_table_rows_and_ratios(report):
    """``--quick`` includes the stage-2 connector table: every row has counts, visual tokens, FLOPs and both timed
    operations, and the printed ratios are those of the recorded times and FLOPs against ``REFERENCE``."""
    data, stdout, _, _ = report
    connectors, reference = data["connectors"], bench_report.REFERENCE
    assert list(connectors["parameters"]) == [reference, "xformer", "perceiver", "projector", "perceiver_dual"]
    tokens = connectors["visual_tokens"]
    grid = (bench.TINY.image_size // 14) ** 2
    assert tokens == {reference: 32, "xformer": 32, "perceiver": 128, "projector": min(64, grid), "perceiver_dual": 128}
    for row, params in connectors["parameters"].items():
        assert params["trainable"] > 0 and params["frozen"] > 0 and connectors["forward_flops_per_sample"][row] > 0
        for op in ("train_step", "feature_extraction"):
            assert connectors[op][row]["n"] == 2 and connectors["flops"][op][row] > 0
        fwd = connectors["forward_flops_per_sample"][row] / connectors["forward_flops_per_sample"][reference]
        step = bench_report.paired_ratio(connectors["train_step"][row], connectors["train_step"][reference])
        flops = connectors["flops"]["train_step"][row] / connectors["flops"]["train_step"][reference]
        assert f"| {row} | {bench_report.CONNECTORS[row]} | {tokens[row]} |" in stdout
        assert f"| {fwd:.3f} | {connectors['train_step'][row]['median_s']:.4f} | {bench_report._ratio_text(step)} | {flops:.3f} |" in stdout
    # the shared parts are the same: a connector's frozen count is BLIP-2's (+ the MAE's for the two MAE rows)
    frozen = {row: p["frozen"] for row, p in connectors["parameters"].items()}
    assert frozen["perceiver"] == frozen["projector"] == frozen[reference] < frozen["xformer"] < frozen["perceiver_dual"]
    assert connectors["parameters"][reference] == data["stage2"]["parameters"][reference]
