"""SDPA against the reference attention in every precision ``frozen_precision`` can select (fp32, bf16, fp16).

The half types are forced, so the test runs the same on every machine (slowly where the device emulates them: the
model is tiny). In fp32 the two agree to 1e-5 (tests/test_sdpa.py has the losses and gradients); in a half type the
frozen encoders' attention rounds differently, so the image features agree within that type's rounding: 1e-2 of
their norm (bf16 moves them about 1e-2 from fp32, fp16 about 1e-3; tests/test_precision.py)."""

import pytest
import torch
from lavis.models import load_model

from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.precision import runs_in_half_precision
from lavis_xformer.models.xformer import XFormer

TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}


@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_sdpa_features_equal_reference_attention_within_the_precisions_rounding(precision):
    torch.manual_seed(0)
    base = load_model("xformer", "tiny").config.to_dict()
    config = {**base, "vit_precision": "fp16", "frozen_precision": precision}
    fast = XFormer(XFormerConfig(**{**config, "sdpa_attention": True})).eval()
    reference = XFormer(XFormerConfig(**{**config, "sdpa_attention": False})).eval()
    reference.load_state_dict(fast.state_dict())
    assert runs_in_half_precision(fast.mae_encoder) == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    image = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for forward in ("forward_clip", "encode_image"):
            got, want = getattr(fast, forward)(image), getattr(reference, forward)(image)
            assert got.dtype == want.dtype == torch.float32
            relative = float((got - want).norm() / want.norm())
            assert relative <= TOLERANCE[precision], (forward, relative)
        got = fast.forward_mae(image, mask_ratio=0.0).features
        want = reference.forward_mae(image, mask_ratio=0.0).features
        assert float((got - want).norm() / want.norm()) <= TOLERANCE[precision]
