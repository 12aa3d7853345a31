"""Which precision the frozen parts run in, chosen by the hardware, and running a frozen encoder in it.

The paper, and LAVIS on CUDA, run the frozen CLIP-ViT in fp16 (``vit_precision: fp16``: LAVIS casts its linear and
convolution weights to half and runs the forward under autocast); on a CPU LAVIS's autocast is off and the ViT stays
fp32. A half type only pays where the device has kernels for it: on a CPU without AVX512-BF16 or AMX (AMD EPYC
before Zen 4, most Intel before Sapphire Rapids) a 1024^3 bf16 matmul is about 150x slower than fp32, and an fp16
one has fast CPU kernels almost nowhere.

The policy (``choose_precision``), for ``frozen_precision`` (the frozen CLIP-ViT and MAE encoder) and
``llm_precision`` (the frozen LLM):

- ``auto`` (default): bf16 where the device runs it natively (CPU: AVX512-BF16 or AMX; CUDA: compute capability
  >= 8.0), fp16 on a GPU without bf16, fp32 otherwise. The LLM keeps LAVIS's half type on CUDA (OPT fp16, FlanT5
  bf16, the types LAVIS's LLM forward autocasts to; fp16 overflows T5) and is fp32 on a CPU, where LAVIS's LLM code
  runs no autocast.
- ``fp32`` / ``bf16`` / ``fp16``: forced. A half type the device only emulates is used as asked, with a WARNING.
- LAVIS's ``vit_precision: fp32`` still means fp32 (``auto`` then resolves to fp32; a forced half type beside it is
  refused as a contradiction). The former ``frozen_cpu_precision`` is refused with a pointer to ``frozen_precision``.

Each choice is logged once per process with its reason, e.g. ``frozen precision: fp32 (auto: CPU AMD EPYC,
capability AVX2, no native bf16)``. Tests mock ``probe_device``; nothing here assumes this machine.

``run_in_half_precision(module, dtype)`` then applies LAVIS's recipe to any frozen encoder. It

- stores the linear and convolution weights (nearly every parameter) in ``dtype``, which halves their memory;
  layer norms, position embeddings and [CLS] stay fp32, so layer norms made trainable (``freeze_vit_layernorms:
  False``) keep fp32 weights;
- runs the module's forward under ``torch.autocast`` for ``dtype`` on the input's device, so every matmul,
  convolution and attention product is computed in ``dtype`` while the numerically sensitive ops (layer norm,
  softmax) accumulate in fp32 as autocast prescribes;
- returns fp32 floating tensors, so the trainable parts that read the features are untouched. Gradients flow
  through it (the frozen MAE decoder passes the reconstruction loss's gradient back to M').

The class of the module is swapped in place for a subclass (as ``sdpa.use_sdpa_attention`` does), so attribute
access (``patch_embed``, ``blocks``, ``config``) and the state dict are unchanged. tests/test_precision.py bounds the
difference to the fp32 encoders and the stage-1 losses; tests/test_precision_policy.py the policy.
"""

import logging
import platform
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from lavis_xformer.models.class_swaps import mixed_class, swap_class

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES = {"fp32": torch.float32, **HALF_DTYPES}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # the values of frozen_precision and llm_precision


# ----------------------------------------------------------------------------------------------------------------
# What the device runs natively
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceCaps:
    """What the precision policy reads from a device: its kind, name, capability and native half types."""

    kind: str  #: "cpu" or "cuda"
    name: str  #: CPU model name (/proc/cpuinfo) or GPU name
    capability: str  #: torch's CPU capability ("AVX2", "AVX512", ...) or the CUDA compute capability ("8.0")
    native_bf16: bool  #: bf16 matmuls in hardware: AVX512-BF16 or AMX on a CPU, compute capability >= 8.0 on CUDA
    native_fp16: bool  #: fp16 matmuls in hardware: any CUDA GPU torch supports; AMX-FP16 on a CPU
    amx: bool = False  #: Intel AMX tiles (CPU only)

    def describe(self) -> str:
        """One line: ``CPU AMD EPYC, capability AVX2, no native bf16`` / ``CUDA NVIDIA A100, compute capability 8.0,
        native bf16``."""
        if self.kind == "cuda":
            where = f"CUDA {self.name}, compute capability {self.capability}"
        else:
            where = f"CPU {self.name}, capability {self.capability}" + (", AMX" if self.amx else "")
        return f"{where}, {'native bf16' if self.native_bf16 else 'no native bf16'}"

    def as_record(self) -> dict:
        """The fields a benchmark or report stores (JSON-ready)."""
        return {"kind": self.kind, "name": self.name, "capability": self.capability,
                "native_bf16": self.native_bf16, "native_fp16": self.native_fp16, "amx": self.amx,
                "line": self.describe()}


def cpu_model_name() -> str:
    """The processor's model name: /proc/cpuinfo's ``model name`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flag(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # private torch probes (2.x); absent means "not known to be there"
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - a probe that cannot run says nothing about the hardware
        return False


def probe_cpu() -> DeviceCaps:
    amx = _cpu_flag("_is_amx_tile_supported")  # every AMX CPU has AMX-BF16
    return DeviceCaps(
        kind="cpu",
        name=cpu_model_name(),
        capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16=_cpu_flag("_is_avx512_bf16_supported") or amx,
        native_fp16=_cpu_flag("_is_amx_fp16_supported"),
        amx=amx,
    )


def probe_cuda(index: Optional[int] = None) -> DeviceCaps:
    major, minor = torch.cuda.get_device_capability(index)
    return DeviceCaps(kind="cuda", name=torch.cuda.get_device_name(index), capability=f"{major}.{minor}",
                      native_bf16=major >= 8, native_fp16=True)


def probe_device(kind: Optional[str] = None) -> DeviceCaps:
    """The device a run uses: CUDA where it is available (as LAVIS's runner chooses), else the CPU."""
    kind = kind or ("cuda" if torch.cuda.is_available() else "cpu")
    return probe_cuda() if kind == "cuda" else probe_cpu()


# ----------------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------------
class PrecisionChoice(NamedTuple):
    """A resolved precision: ``name`` ("fp32", "bf16", "fp16"), why, and whether the device only emulates it."""

    name: str
    reason: str
    emulated: bool = False

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The half dtype, or None for fp32 (what ``run_in_half_precision`` takes)."""
        return HALF_DTYPES.get(self.name)


def is_native(name: str, caps: DeviceCaps) -> bool:
    return name == "fp32" or (caps.native_bf16 if name == "bf16" else caps.native_fp16)


def native_half(caps: DeviceCaps) -> str:
    """What ``auto`` picks: bf16 where native, fp16 on a GPU without bf16, fp32 otherwise."""
    if caps.native_bf16:
        return "bf16"
    return "fp16" if caps.kind == "cuda" and caps.native_fp16 else "fp32"


def choose_precision(requested: str, caps: DeviceCaps, lavis_fp32: bool = False) -> PrecisionChoice:
    """The frozen encoders' precision for a ``frozen_precision`` value on ``caps``; ``lavis_fp32``: the config says
    LAVIS's ``vit_precision: fp32``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not valid; choose one of {list(PRECISIONS)}")
    if requested == "auto":
        if lavis_fp32:
            return PrecisionChoice("fp32", "vit_precision: fp32")
        return PrecisionChoice(native_half(caps), f"auto: {caps.describe()}")
    emulated = not is_native(requested, caps)
    return PrecisionChoice(requested, f"forced; {caps.describe()}" + (f", {requested} emulated: slow" if emulated else ""),
                           emulated)


def choose_llm_precision(requested: str, caps: DeviceCaps, lavis_half: str) -> PrecisionChoice:
    """The frozen LLM's weight dtype for an ``llm_precision`` value. ``lavis_half``: the half type LAVIS runs this
    LLM in on CUDA ("fp16" for OPT, "bf16" for FlanT5; its forward autocasts to that type there, so ``auto`` keeps
    it). On a CPU the LLM is fp32 whatever is asked: LAVIS's LLM forward autocasts on CUDA only, so half weights
    would meet fp32 inputs."""
    if requested not in PRECISIONS:
        raise ValueError(f"llm_precision {requested!r} is not valid; choose one of {list(PRECISIONS)}")
    if caps.kind != "cuda":
        why = "auto:" if requested == "auto" else f"{requested} asked, but"
        return PrecisionChoice("fp32", f"{why} LAVIS's LLM code runs no autocast on a CPU; {caps.describe()}")
    name = lavis_half if requested == "auto" else requested
    emulated = not is_native(name, caps)
    how = f"auto: LAVIS runs this LLM in {lavis_half}" if requested == "auto" else "forced"
    return PrecisionChoice(name, f"{how}; {caps.describe()}" + (f", {name} emulated: slow" if emulated else ""), emulated)


_LOGGED = set()


def log_choice_once(part: str, choice: PrecisionChoice) -> PrecisionChoice:
    """Log ``<part> precision: <name> (<reason>)`` the first time this process makes that choice; WARNING when the
    device only emulates it. ``part``: "frozen" or "llm" (the config field is ``<part>_precision``)."""
    line = f"{part} precision: {choice.name} ({choice.reason})"
    if line not in _LOGGED:
        _LOGGED.add(line)
        if choice.emulated:
            logging.warning("%s; set %s_precision: auto (or fp32) for speed on this device", line, part)
        else:
            logging.info(line)
    return choice


def resolve_frozen_precision(cfg, caps: Optional[DeviceCaps] = None) -> PrecisionChoice:
    """The precision the config's frozen CLIP-ViT and MAE encoder run in on this device (or ``caps``)."""
    return choose_precision(cfg.frozen_precision, caps or probe_device(), lavis_fp32=cfg.vit_precision == "fp32")


def frozen_half_dtype(cfg) -> Optional[torch.dtype]:
    """The dtype the config's frozen encoders run in: None (fp32), bf16 or fp16 (see ``choose_precision``); logged
    once."""
    return log_choice_once("frozen", resolve_frozen_precision(cfg)).dtype


def resolve_llm_precision(cfg, lavis_half: str, caps: Optional[DeviceCaps] = None) -> PrecisionChoice:
    return choose_llm_precision(cfg.llm_precision, caps or probe_device(), lavis_half)


def run_precision_report(cfg, caps: Optional[DeviceCaps] = None) -> List[Tuple[str, str]]:
    """(level, line) per frozen part of a model config, for ``check``: the precision the run will use on this device
    and why ("OK"), or "WARNING" where a forced half type is emulated here (slow)."""
    caps = caps or probe_device()
    choices = []
    if hasattr(cfg, "frozen_precision"):
        choices.append(("frozen", "model.frozen_precision", resolve_frozen_precision(cfg, caps)))
    if hasattr(cfg, "llm_precision"):
        lavis_half = "bf16" if hasattr(cfg, "t5_model") else "fp16"  # LAVIS: FlanT5 in bf16, OPT in fp16
        choices.append(("llm", "model.llm_precision", resolve_llm_precision(cfg, lavis_half, caps)))
    report = []
    for part, field, choice in choices:
        line = f"{part} precision: {choice.name} ({choice.reason})"
        if choice.emulated:
            report.append(("WARNING", f"{line}: this device has no {choice.name} hardware, so the forced {choice.name} "
                                      f"is emulated and slow; set {field}: auto (or fp32)"))
        else:
            report.append(("OK", line))
    return report


# ----------------------------------------------------------------------------------------------------------------
# Running a frozen encoder in half precision
# ----------------------------------------------------------------------------------------------------------------
def _first_device_type(args, kwargs) -> str:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _to_float(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_float(v) for v in value)
    if isinstance(value, dict):  # transformers' ModelOutput is an OrderedDict (and a dataclass)
        for key in list(value.keys()):
            value[key] = _to_float(value[key])
        return value
    return value


class HalfPrecisionForward:
    """Mixin placed before an encoder's class: its forward runs under autocast to ``half_dtype``, outputs fp32."""

    half_dtype: torch.dtype = torch.bfloat16

    def forward(self, *args, **kwargs):
        with torch.autocast(_first_device_type(args, kwargs), dtype=self.half_dtype):
            output = super().forward(*args, **kwargs)
        return _to_float(output)


def _half_class(cls: type, dtype: torch.dtype) -> type:
    return mixed_class(HalfPrecisionForward, cls, "BF16" if dtype == torch.bfloat16 else "FP16", half_dtype=dtype)


def run_in_half_precision(module: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """Store ``module``'s linear/convolution weights in ``dtype`` and run its forward in it (see module docstring).

    ``dtype=None`` leaves the module fp32 and returns it unchanged.
    """
    if dtype is None or any(p.is_meta for p in module.parameters()):
        return module  # meta builds only count parameters and FLOPs, which the dtype does not change
    if dtype not in HALF_DTYPES.values():
        raise ValueError(f"half precision must be torch.float16 or torch.bfloat16, got {dtype}")
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            for param in (child.weight, child.bias):
                if param is not None:
                    param.data = param.data.to(dtype)
    if not isinstance(module, HalfPrecisionForward):
        swap_class(module, _half_class(type(module), dtype), "half_precision")
    return module


def runs_in_half_precision(module: Optional[nn.Module]) -> Optional[torch.dtype]:
    """The dtype a module was switched to by ``run_in_half_precision``, or None."""
    return module.half_dtype if isinstance(module, HalfPrecisionForward) else None


__all__ = ["DeviceCaps", "PrecisionChoice", "probe_device", "choose_precision", "choose_llm_precision", "resolve_frozen_precision",
           "frozen_half_dtype", "resolve_llm_precision", "run_precision_report", "run_in_half_precision", "runs_in_half_precision", "HALF_DTYPES", "PRECISIONS"]
