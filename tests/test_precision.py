"""Frozen encoders in half precision (models/precision.py): which parts, which dtype, and how close to fp32."""

import pytest
import torch
from lavis.models import load_model

from lavis_xformer.models.config import BackboneConfig, XFormerConfig
from lavis_xformer.models.precision import frozen_half_dtype, run_in_half_precision, runs_in_half_precision
from lavis_xformer.models.xformer import XFormer

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]


def tiny_config(**overrides) -> XFormerConfig:
    # The tiny types run fp32 (vit_precision: fp32) so that they equal LAVIS's code exactly; ask for half here.
    base = load_model("xformer", "tiny").config.to_dict()
    return XFormerConfig(**{**base, "vit_precision": "fp16", **overrides})


def half_and_full():
    torch.manual_seed(0)
    half = XFormer(tiny_config())
    full = XFormer(tiny_config(frozen_cpu_precision="fp32"))
    full.load_state_dict(half.state_dict())  # the bf16 weights, widened: the two differ only in compute precision
    return half, full


def samples(batch=4):
    generator = torch.Generator().manual_seed(0)
    return {"image": torch.randn(batch, 3, 32, 32, generator=generator), "text_input": CAPTIONS[:batch],
            "mae_noise": torch.rand(batch, 16, generator=generator)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the half type is fp16, LAVIS's")
def test_half_dtype_follows_the_config_on_a_cpu():
    assert frozen_half_dtype(BackboneConfig()) == torch.bfloat16
    assert frozen_half_dtype(BackboneConfig(frozen_cpu_precision="fp32")) is None
    assert frozen_half_dtype(BackboneConfig(vit_precision="fp32")) is None
    with pytest.raises(ValueError, match="frozen_cpu_precision"):
        BackboneConfig(frozen_cpu_precision="fp16")
    with pytest.raises(ValueError, match="half precision"):
        run_in_half_precision(torch.nn.Linear(2, 2), torch.float64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the half type is fp16, LAVIS's")
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


def test_half_precision_features_are_close_to_fp32_and_float32_out():
    half, full = half_and_full()
    half.eval(), full.eval()
    image = samples()["image"]
    with torch.no_grad():
        clip_half, clip_full = half.forward_clip(image), full.forward_clip(image)
        mae_half = half.forward_mae(image, mask_ratio=0.0).features
        mae_full = full.forward_mae(image, mask_ratio=0.0).features
        queries_half, queries_full = half.encode_image(image), full.encode_image(image)
    for got, want in ((clip_half, clip_full), (mae_half, mae_full), (queries_half, queries_full)):
        assert got.dtype == torch.float32
        assert not torch.equal(got, want)  # bf16 really ran
        relative = (got - want).norm() / want.norm()
        assert relative < 2e-2, float(relative)


def test_half_precision_losses_are_close_and_gradients_reach_the_same_parameters(process_group):
    half, full = half_and_full()
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
    donor = XFormer(tiny_config(frozen_cpu_precision="fp32"))
    missing, unexpected = half.load_state_dict(donor.state_dict(), strict=True)
    assert not missing and not unexpected
    weight = half.visual_encoder.blocks[0].mlp.fc1.weight
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight.float(), donor.visual_encoder.blocks[0].mlp.fc1.weight.to(torch.bfloat16).float())
