"""``check`` reports the precision the run will use on this device, and warns where a forced half type is emulated.
The device is mocked: the expectations hold on any machine."""

from pathlib import Path

import pytest
import torch

from lavis_xformer import check
from lavis_xformer.models import precision
from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.config_llm import XFormerOPTConfig
from lavis_xformer.models.precision import DeviceCaps, run_precision_report

DEMO_TRAIN = Path(__file__).resolve().parents[1] / "projects" / "xformer" / "demo" / "pretrain_stage1_shapes.yaml"
AVX2 = DeviceCaps("cpu", "Mocked EPYC", "AVX2", native_bf16=False, native_fp16=False)
A100 = DeviceCaps("cuda", "Mocked A100", "8.0", native_bf16=True, native_fp16=True)


@pytest.fixture
def avx2(monkeypatch):
    monkeypatch.setattr(precision, "probe_device", lambda kind=None: AVX2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_report_names_each_frozen_parts_precision_and_warns_on_emulation():
    auto = run_precision_report(XFormerOPTConfig(), AVX2)
    assert auto == [("OK", "frozen precision: fp32 (auto: CPU Mocked EPYC, capability AVX2, no native bf16)"),
                    ("OK", "llm precision: fp32 (auto: LAVIS's LLM code runs no autocast on a CPU; CPU Mocked EPYC, "
                           "capability AVX2, no native bf16)")]
    (level, line), = run_precision_report(XFormerConfig(frozen_precision="bf16"), AVX2)
    assert level == "WARNING" and "frozen precision: bf16" in line and "emulated" in line
    assert "frozen_precision: auto" in line
    assert [level for level, _ in run_precision_report(XFormerConfig(frozen_precision="bf16"), A100)] == ["OK"]
    assert run_precision_report(XFormerConfig(), A100)[0][1].startswith("frozen precision: bf16 (auto: CUDA Mocked A100")


def test_check_prints_the_precision_line_and_the_emulation_warning(avx2, tmp_path):
    options = [f"datasets.xformer_shapes_caption.shapes.root={tmp_path / 'shapes'}"]
    findings = check.check(DEMO_TRAIN, options, memory=False)
    assert any(f.level == "OK" and f.message.startswith("frozen precision: ") for f in findings)
    forced = check.check(DEMO_TRAIN, options + ["model.vit_precision=fp16", "model.frozen_precision=bf16"], memory=False)
    warnings = [f.message for f in forced if f.level == "WARNING" and "frozen precision" in f.message]
    assert len(warnings) == 1 and "bf16 is emulated and slow" in warnings[0]
