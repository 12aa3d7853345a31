"""The bench records the precision each row runs in, and ``blip2+impl`` follows the same policy as X-Former, so its
ratio stays the architecture's own overhead on every processor. The processors are mocked; no model runs."""

import pytest
import torch

from lavis_xformer.analysis import bench, bench_report
from lavis_xformer.models import precision
from lavis_xformer.models.precision import DeviceCaps

AVX2 = DeviceCaps("cpu", "Mocked EPYC", "AVX2", native_bf16=False, native_fp16=False)
AVX512_BF16 = DeviceCaps("cpu", "Mocked Xeon", "AVX512", native_bf16=True, native_fp16=False, amx=True)


@pytest.fixture
def processor(monkeypatch):
    monkeypatch.setattr(precision, "_LOGGED", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def mock(caps):
        monkeypatch.setattr(precision, "probe_device", lambda kind=None: caps)
        monkeypatch.setattr(precision, "probe_cpu", lambda: caps)

    return mock


@pytest.mark.parametrize("caps, auto", [(AVX2, "fp32"), (AVX512_BF16, "bf16")])
def test_rows_follow_the_policy_and_lavis_as_shipped_stays_fp32_on_a_cpu(processor, caps, auto):
    processor(caps)
    rows = bench.build_stage1(bench.TINY)
    built = {row: rows[row]() for row in ("blip2", "blip2+impl", "xformer")}
    assert bench.row_precision(built["blip2"]) == {"clip_vit": "fp32"}
    assert bench.row_precision(built["blip2+impl"]) == {"clip_vit": auto}
    assert bench.row_precision(built["xformer"]) == {"clip_vit": auto, "mae_encoder": auto}
    assert bench_report.precision_text(bench.row_precision(built["xformer"])) == f"CLIP-ViT {auto}, MAE encoder {auto}"


def test_processor_record_names_the_processor_and_its_bf16(processor):
    processor(AVX2)
    record = bench.processor_record(torch.device("cpu"))
    assert record["name"] == "Mocked EPYC" and record["capability"] == "AVX2" and record["native_bf16"] is False
    assert record["line"] == "CPU Mocked EPYC, capability AVX2, no native bf16"
