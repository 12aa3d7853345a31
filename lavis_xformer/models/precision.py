"""Frozen encoders in half precision, on the GPU and on the CPU.

The paper, and LAVIS on CUDA, run the frozen CLIP-ViT in fp16 (``vit_precision: fp16``: LAVIS casts its linear and
convolution weights to half and runs the forward under autocast). LAVIS does so only where CUDA is: on a CPU its
autocast is off and the ViT stays fp32, since fp16 has no fast CPU kernels (on this project's CPU an fp16 matmul is
about 30x slower than fp32, a bf16 one about 4x faster).

``run_in_half_precision(module, dtype)`` applies the same recipe to any frozen encoder, with the half type the
device runs fast: fp16 with CUDA, bfloat16 on a CPU-only machine (``frozen_cpu_precision: bf16``). It

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
difference to the fp32 encoders and the stage-1 losses.
"""

from typing import Dict, Optional

import torch
import torch.nn as nn

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_half_dtype(cfg) -> Optional[torch.dtype]:
    """The dtype the config's frozen encoders run in: None (fp32), fp16 with CUDA, else ``frozen_cpu_precision``."""
    if cfg.vit_precision != "fp16":
        return None
    if torch.cuda.is_available():
        return torch.float16  # LAVIS's choice on the GPU
    return HALF_DTYPES.get(cfg.frozen_cpu_precision)  # "fp32" -> None: as LAVIS runs on the CPU


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


_HALF_CLASSES: Dict[tuple, type] = {}


def _half_class(cls: type, dtype: torch.dtype) -> type:
    key = (cls, dtype)
    if key not in _HALF_CLASSES:
        name = f"{'BF16' if dtype == torch.bfloat16 else 'FP16'}{cls.__name__}"
        _HALF_CLASSES[key] = type(name, (HalfPrecisionForward, cls), {"half_dtype": dtype, "__module__": cls.__module__})
    return _HALF_CLASSES[key]


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
        module.__class__ = _half_class(type(module), dtype)
    return module


def runs_in_half_precision(module: Optional[nn.Module]) -> Optional[torch.dtype]:
    """The dtype a module was switched to by ``run_in_half_precision``, or None."""
    return module.half_dtype if isinstance(module, HalfPrecisionForward) else None


__all__ = ["frozen_half_dtype", "run_in_half_precision", "runs_in_half_precision", "HALF_DTYPES"]
