"""The precision policy (models/precision.py): what ``auto`` picks for each device, forced values, the config's
checks and the one log line. Every device is mocked: no test here depends on this machine's processor or GPU."""

import logging

import pytest
import torch
from lavis.models import load_model

from lavis_xformer.models import precision
from lavis_xformer.models.config import BackboneConfig, XFormerConfig
from lavis_xformer.models.config_llm import Blip2OPTConfig, XFormerT5Config
from lavis_xformer.models.precision import DeviceCaps, choose_llm_precision, choose_precision, frozen_half_dtype

# name: (torch CPU capability, AVX512-BF16, AMX tiles) or (CUDA compute capability)
CPUS = {"AVX2": ("AVX2", False, False), "AVX512": ("AVX512", False, False),
        "AVX512-BF16": ("AVX512", True, False), "AMX": ("AVX512", True, True)}
GPUS = {"CUDA 7.0": (7, 0), "CUDA 7.5": (7, 5), "CUDA 8.0": (8, 0), "CUDA 9.0": (9, 0)}
AUTO = {"AVX2": "fp32", "AVX512": "fp32", "AVX512-BF16": "bf16", "AMX": "bf16",
        "CUDA 7.0": "fp16", "CUDA 7.5": "fp16", "CUDA 8.0": "bf16", "CUDA 9.0": "bf16"}


@pytest.fixture
def device(monkeypatch):
    """``device(name)`` makes torch's probes report that processor or GPU (and forgets what was logged)."""
    monkeypatch.setattr(precision, "_LOGGED", set())
    monkeypatch.setattr(precision, "cpu_model_name", lambda: "Mocked CPU")

    def mock(name):
        if name in CPUS:
            capability, avx512_bf16, amx = CPUS[name]
            monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
            monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False, raising=False)
        else:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: GPUS[name])
            monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Mocked GPU")
        return precision.probe_device()

    return mock


@pytest.mark.parametrize("name", list(AUTO))
def test_auto_picks_bf16_only_where_native_fp16_on_older_gpus_fp32_otherwise(device, name):
    caps = device(name)
    assert caps.kind == ("cpu" if name in CPUS else "cuda")
    assert caps.native_bf16 == (AUTO[name] == "bf16")
    choice = choose_precision("auto", caps)
    assert choice.name == AUTO[name] and not choice.emulated
    assert frozen_half_dtype(BackboneConfig()) == precision.HALF_DTYPES.get(AUTO[name])  # the default is auto
    # LAVIS's vit_precision: fp32 still means fp32, on every device.
    assert frozen_half_dtype(BackboneConfig(vit_precision="fp32")) is None


def test_probe_reads_torchs_cpu_flags_and_names_the_processor(device):
    caps = device("AVX2")
    assert (caps.capability, caps.native_bf16, caps.amx) == ("AVX2", False, False)
    assert caps.describe() == "CPU Mocked CPU, capability AVX2, no native bf16"
    assert device("AMX").describe() == "CPU Mocked CPU, capability AVX512, AMX, native bf16"
    assert device("CUDA 8.0").describe() == "CUDA Mocked GPU, compute capability 8.0, native bf16"
    record = device("AVX512-BF16").as_record()
    assert record["native_bf16"] is True and record["amx"] is False and record["line"].startswith("CPU Mocked CPU")


@pytest.mark.parametrize("name, forced, emulated", [
    ("AVX2", "bf16", True), ("AVX2", "fp16", True), ("AVX2", "fp32", False), ("AMX", "bf16", False),
    ("AMX", "fp32", False), ("CUDA 7.0", "bf16", True), ("CUDA 7.0", "fp16", False), ("CUDA 8.0", "fp32", False),
])
def test_a_forced_precision_is_used_as_asked_and_flagged_where_emulated(device, name, forced, emulated):
    choice = choose_precision(forced, device(name))
    assert (choice.name, choice.emulated) == (forced, emulated)
    assert frozen_half_dtype(BackboneConfig(frozen_precision=forced)) == precision.HALF_DTYPES.get(forced)


def test_choice_is_logged_once_with_its_reason_and_emulation_warns(device, caplog):
    device("AVX2")
    caplog.set_level(logging.INFO)
    for _ in range(3):  # e.g. the CLIP-ViT, then the MAE encoder, then another model of the same run
        frozen_half_dtype(BackboneConfig())
    lines = [r.getMessage() for r in caplog.records if "frozen precision" in r.getMessage()]
    assert lines == ["frozen precision: fp32 (auto: CPU Mocked CPU, capability AVX2, no native bf16)"]
    caplog.clear()
    frozen_half_dtype(BackboneConfig(frozen_precision="bf16"))
    frozen_half_dtype(BackboneConfig(frozen_precision="bf16"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bf16 emulated: slow" in warnings[0].getMessage()


@pytest.mark.parametrize("name", list(AUTO))
def test_llm_keeps_lavis_half_type_with_cuda_and_fp32_on_a_cpu(device, name):
    caps = device(name)
    for lavis_half in ("fp16", "bf16"):  # OPT, FlanT5
        choice = choose_llm_precision("auto", caps, lavis_half)
        assert choice.name == (lavis_half if caps.kind == "cuda" else "fp32")
        assert choice.emulated == (caps.kind == "cuda" and lavis_half == "bf16" and not caps.native_bf16)
        forced = choose_llm_precision("fp16", caps, lavis_half)
        assert forced.name == ("fp16" if caps.kind == "cuda" else "fp32")  # LAVIS's LLM code autocasts on CUDA only
        assert choose_llm_precision("fp32", caps, lavis_half).name == "fp32"


def test_llm_builders_follow_the_policy(device):
    from lavis_xformer.models.llm_builders import llm_dtype

    opt, t5 = Blip2OPTConfig(opt_model=None, llm_tokenizer="tiny_opt"), XFormerT5Config()
    device("AMX")
    assert llm_dtype(opt, "fp16") == llm_dtype(t5, "bf16") == torch.float32
    device("CUDA 8.0")
    assert llm_dtype(opt, "fp16") == torch.float16 and llm_dtype(t5, "bf16") == torch.bfloat16
    assert llm_dtype(Blip2OPTConfig(llm_precision="fp32"), "fp16") == torch.float32


def test_built_model_runs_its_encoders_in_the_precision_the_device_gets(device):
    from lavis_xformer.models.xformer import XFormer

    config = XFormerConfig(**{**load_model("xformer", "tiny").config.to_dict(), "vit_precision": "fp16"})
    for name, dtype in (("AVX2", None), ("AVX512-BF16", torch.bfloat16)):
        device(name)
        model = XFormer(config)
        assert precision.runs_in_half_precision(model.visual_encoder) == dtype
        assert precision.runs_in_half_precision(model.mae_encoder) == dtype


def test_config_refuses_contradictions_and_the_replaced_field():
    with pytest.raises(ValueError, match="frozen_precision='fp8' is not valid"):
        BackboneConfig(frozen_precision="fp8")
    with pytest.raises(ValueError, match="vit_precision='fp32'.*contradicts frozen_precision='bf16'"):
        BackboneConfig(vit_precision="fp32", frozen_precision="bf16")
    assert BackboneConfig(vit_precision="fp32", frozen_precision="fp32").frozen_precision == "fp32"
    with pytest.raises(ValueError, match="'frozen_cpu_precision' .* was replaced: use frozen_precision"):
        BackboneConfig.from_lavis_cfg({"frozen_cpu_precision": "bf16"})
    with pytest.raises(ValueError, match="llm_precision='fp8' is not valid"):
        Blip2OPTConfig(llm_precision="fp8")
    assert Blip2OPTConfig().llm_precision == XFormerT5Config().llm_precision == "auto"


def test_unknown_precision_names_raise():
    caps = DeviceCaps("cpu", "x", "AVX2", native_bf16=False, native_fp16=False)
    with pytest.raises(ValueError, match="not valid"):
        choose_precision("half", caps)
    with pytest.raises(ValueError, match="not valid"):
        choose_llm_precision("half", caps, "fp16")
