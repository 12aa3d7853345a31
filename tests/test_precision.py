"""Frozen encoders in half precision (models/precision.py): which parts, which dtype, and how close to fp32.

The half types are forced here (``frozen_precision: bf16`` / ``fp16``), so these tests run the same on every machine;
where the device only emulates one (bf16 or fp16 on an AVX2 CPU) they are slow, so the models are tiny. Which
precision ``auto`` picks is tests/test_precision_policy.py's subject. Tolerance: the half-precision features, losses
and gradients are within 2e-2 (relative) of the fp32 ones, for bf16 (8-bit mantissa) and fp16 alike.
"""

import pytest
import torch
from lavis.models import load_model

from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.precision import run_in_half_precision, runs_in_half_precision
from lavis_xformer.models.xformer import XFormer

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def tiny_config(**overrides) -> XFormerConfig:
    # The tiny types run fp32 (vit_precision: fp32) so that they equal LAVIS's code exactly; ask for half here.
    base = load_model("xformer", "tiny").config.to_dict()
    return XFormerConfig(**{**base, "vit_precision": "fp16", "frozen_precision": "bf16", **overrides})


def half_and_full(precision="bf16"):
    torch.manual_seed(0)
    half = XFormer(tiny_config(frozen_precision=precision))
    full = XFormer(tiny_config(frozen_precision="fp32"))
    full.load_state_dict(half.state_dict())  # the half weights, widened: the two differ only in compute precision
    return half, full


def samples(batch=4):
    generator = torch.Generator().manual_seed(0)
    return {"image": torch.randn(batch, 3, 32, 32, generator=generator), "text_input": CAPTIONS[:batch],
            "mae_noise": torch.rand(batch, 16, generator=generator)}


def test_forced_precision_sets_the_encoders_dtype_on_any_device():
    for name, dtype in HALF.items():
        half, full = half_and_full(name)
        assert runs_in_half_precision(half.visual_encoder) == runs_in_half_precision(half.mae_encoder) == dtype
        assert runs_in_half_precision(full.visual_encoder) is None and runs_in_half_precision(full.mae_encoder) is None
    with pytest.raises(ValueError, match="half precision"):
        run_in_half_precision(torch.nn.Linear(2, 2), torch.float64)


def test_only_frozen_encoders_hold_half_weights():
    half, full = half_and_full()
    assert runs_in_half_precision(half.visual_encoder) == torch.bfloat16
    assert runs_in_half_precision(half.mae_encoder) == torch.bfloat16
    assert runs_in_half_precision(half.mae_decoder) is None  # gradient flows through it: training precision
    assert runs_in_half_precision(full.visual_encoder) is None and runs_in_half_precision(full.mae_encoder) is None
    for name, param in half.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32, name
    linear_dtypes = {m.weight.dtype for m in half.visual_encoder.modules() if isinstance(m, torch.nn.Linear)}
    norm_dtypes = {m.weight.dtype for m in half.visual_encoder.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert linear_dtypes == {torch.bfloat16} and norm_dtypes == {torch.float32}
    # The swapped class is still the encoder's class: LAVIS and transformers code reading its attributes works.
    assert half.visual_encoder.patch_embed.num_patches == full.visual_encoder.patch_embed.num_patches
    assert type(half.mae_encoder).__name__ == "BF16ViTMAEModel"


@pytest.mark.parametrize("precision", list(HALF))
def test_half_precision_features_are_close_to_fp32_and_float32_out(precision):
    half, full = half_and_full(precision)
    half.eval(), full.eval()
    image = samples()["image"]
    with torch.no_grad():
        clip_half, clip_full = half.forward_clip(image), full.forward_clip(image)
        mae_half = half.forward_mae(image, mask_ratio=0.0).features
        mae_full = full.forward_mae(image, mask_ratio=0.0).features
        queries_half, queries_full = half.encode_image(image), full.encode_image(image)
    for got, want in ((clip_half, clip_full), (mae_half, mae_full), (queries_half, queries_full)):
        assert got.dtype == torch.float32
        assert not torch.equal(got, want)  # the half type really ran
        relative = (got - want).norm() / want.norm()
        assert relative < 2e-2, float(relative)


@pytest.mark.parametrize("precision", list(HALF))
def test_half_precision_losses_are_close_and_gradients_reach_the_same_parameters(process_group, precision):
    half, full = half_and_full(precision)
    half.train(), full.train()
    results = []
    for model in (half, full):
        torch.manual_seed(7)
        out = model(samples())
        out.loss.backward()
        results.append((out, {n for n, p in model.named_parameters() if p.grad is not None}))
    (half_out, half_grads), (full_out, full_grads) = results
    for key in ("loss_itc", "loss_itm", "loss_lm", "loss_rec"):
        torch.testing.assert_close(half_out[key], full_out[key], rtol=2e-2, atol=2e-2, msg=key)
    trainable = {n for n, p in half.named_parameters() if p.requires_grad}
    assert half_grads == full_grads == trainable


def test_trainable_vit_layernorms_stay_fp32_and_learn(process_group):
    torch.manual_seed(0)
    model = XFormer(tiny_config(freeze_vit_layernorms=False)).train()
    norms = [m for m in model.visual_encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.weight.requires_grad and m.weight.dtype == torch.float32 for m in norms)
    model(samples()).loss.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in norms)


def test_fp32_checkpoint_loads_into_half_encoders():
    half, full = half_and_full()
    torch.manual_seed(1)
    donor = XFormer(tiny_config(frozen_precision="fp32"))
    missing, unexpected = half.load_state_dict(donor.state_dict(), strict=True)
    assert not missing and not unexpected
    weight = half.visual_encoder.blocks[0].mlp.fc1.weight
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight.float(), donor.visual_encoder.blocks[0].mlp.fc1.weight.to(torch.bfloat16).float())
