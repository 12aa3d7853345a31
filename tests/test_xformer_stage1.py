"""Stage-1 X-Former: BLIP-2 equivalence, reconstruction against transformers' MAE, gradients, sizes, bad input."""

import copy
import logging

import pytest
import torch
from lavis.models import load_model
from transformers import ViTMAEForPreTraining

from lavis_xformer.checkpoints import load_state_dict_checked
from lavis_xformer.models.blip2_baseline import Blip2Baseline
from lavis_xformer.models.builders import mae_config, no_hub
from lavis_xformer.models.config import BackboneConfig, XFormerConfig
from lavis_xformer.models.xformer import XFormer

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]


def tiny(**overrides) -> XFormer:
    """The `tiny` model type with config overrides (random weights, offline)."""
    cfg = load_model("xformer", "tiny").config  # the yaml's values
    return XFormer(XFormerConfig(**{**cfg.to_dict(), **overrides}))


def batch(size=4, image_size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(size, 3, image_size, image_size, generator=generator), "text_input": CAPTIONS[:size]}


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count(params):
    return sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------------------------------------
# The BLIP-2 part is BLIP-2
# ------------------------------------------------------------------------------------------------------------------
# Dropout draws differ between SDPA's fused kernel and LAVIS's nn.Dropout, so the train-mode comparison (same
# dropout masks) uses the reference attention; eval mode compares the default SDPA path.
@pytest.mark.parametrize("train_mode, sdpa", [(False, True), (True, False)])
def test_mae_off_losses_equal_lavis_blip2(process_group, train_mode, sdpa):
    torch.manual_seed(0)
    blip2 = load_model("blip2_baseline", "tiny")
    xformer = tiny(use_mae=False, reconstruction_loss=False, sdpa_attention=sdpa)
    result = xformer.load_state_dict(blip2.state_dict(), strict=True)  # identical parameter sets
    assert not result.missing_keys and not result.unexpected_keys
    blip2.train(train_mode)
    xformer.train(train_mode)

    samples = batch()
    torch.manual_seed(123)  # same dropout masks and the same sampled ITM negatives
    reference = blip2(samples)
    torch.manual_seed(123)
    ours = xformer(samples)

    for key in ("loss_itc", "loss_itm", "loss_lm", "loss"):
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-5, msg=key)
    assert ours.loss_rec is None and "loss_rec" not in ours


def test_blip2_checkpoint_loads_with_only_xformer_modules_missing(tmp_path, caplog):
    blip2 = load_model("blip2_baseline", "tiny")
    path = tmp_path / "blip2_stage1.pth"
    torch.save({"model": blip2.state_dict()}, path)
    xformer = load_model("xformer", "tiny")
    with caplog.at_level(logging.INFO, logger="lavis_xformer.checkpoints"):
        result = xformer.load_from_pretrained(str(path))
    assert result.unexpected_keys == []
    assert {key.split(".")[0] for key in result.missing_keys} == {"mae_encoder", "mae_decoder", "dual_block", "mae_out_proj"}
    for name, value in blip2.state_dict().items():
        assert torch.equal(xformer.state_dict()[name], value), name
    summary = [r.message for r in caplog.records if "loaded" in r.message]
    assert len(summary) == 1 and "missing: dual_block" in summary[0] and "unexpected: none" in summary[0]


def test_enriched_cache_with_zero_enrichment_is_blip2_cache():
    model = tiny().eval()
    clip_features = model.forward_clip(batch()["image"])
    output = model.forward_queries(clip_features, output_hidden_states=True)
    cache = model.enriched_query_cache(output, torch.zeros_like(output.last_hidden_state))
    assert len(cache) == len(output.past_key_values) == model.config.qformer_num_layers
    for (key, value), (ref_key, ref_value) in zip(cache, output.past_key_values):
        torch.testing.assert_close(key, ref_key, rtol=0, atol=1e-6)
        torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-6)


def test_itg_depends_on_the_enriched_queries():
    """With the enriched cache the text decoder sees Z': changing the MAE input changes the ITG loss."""
    model = tiny().eval()
    samples = batch()
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    first = model({**samples, "mae_noise": noise})["loss_lm"]
    torch.manual_seed(0)
    second = model({**samples, "mae_noise": noise.flip(-1)})["loss_lm"]
    assert (first - second).abs() > 1e-6  # random tiny weights: a small but real difference
    qformer_cache = tiny(itg_conditioning="qformer_cache").eval()
    qformer_cache.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    a = qformer_cache({**samples, "mae_noise": noise})["loss_lm"]
    torch.manual_seed(0)
    b = qformer_cache({**samples, "mae_noise": noise.flip(-1)})["loss_lm"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# Reconstruction
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruction_loss_equals_transformers_mae_loss(norm_pix_loss):
    model = tiny(norm_pix_loss=norm_pix_loss).eval()
    reference = ViTMAEForPreTraining(mae_config(model.config)).eval()
    reference.vit.load_state_dict(model.mae_encoder.state_dict())
    reference.decoder.load_state_dict(model.mae_decoder.state_dict())

    image = batch()["image"]
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(1))
    mae = model.forward_mae(image, mask_ratio=model.config.mask_ratio, noise=noise)
    # M' replaced by M: the MAE encoder's own features go straight into the frozen decoder.
    predicted = model.mae_decoder(mae.features, mae.ids_restore).logits
    ours = model.reconstruction_loss(mae.pixels, predicted, mae.mask)
    expected = reference(pixel_values=mae.pixels, noise=noise).loss
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_mae_sees_its_own_normalisation():
    model = tiny()
    raw = torch.rand(2, 3, 32, 32)
    clip_normalised = (raw - model._clip_mean) / model._clip_std
    imagenet_normalised = (raw - model._mae_mean) / model._mae_std
    torch.testing.assert_close(model.mae_pixels(clip_normalised), imagenet_normalised, rtol=1e-5, atol=1e-5)


def test_masked_patch_count_and_loss_covers_only_masked_patches():
    model = tiny(mask_ratio=0.5).train()
    mae = model.forward_mae(batch()["image"])
    num_patches = (32 // 8) ** 2
    assert mae.mask.shape == (4, num_patches)
    assert (mae.mask.sum(dim=1) == int(0.5 * num_patches)).all()
    assert mae.features.shape[1] == 1 + num_patches - int(0.5 * num_patches)  # [CLS] + visible

    target = model.patchify(mae.pixels)
    perfect = model.reconstruction_loss(mae.pixels, target, mae.mask)
    assert perfect.item() == 0.0
    visible_wrong = target + 5.0 * (1 - mae.mask).unsqueeze(-1)  # error on visible patches only
    assert model.reconstruction_loss(mae.pixels, visible_wrong, mae.mask).item() == 0.0
    masked_wrong = target + 1.0 * mae.mask.unsqueeze(-1)
    torch.testing.assert_close(model.reconstruction_loss(mae.pixels, masked_wrong, mae.mask), torch.tensor(1.0))


def test_eval_mae_sees_the_whole_image_in_order():
    model = tiny().eval()
    mae = model.forward_mae(batch()["image"])
    assert mae.mask.sum() == 0 and mae.features.shape[1] == 1 + 16
    assert torch.equal(mae.ids_restore, torch.arange(16).expand(4, -1))


# ------------------------------------------------------------------------------------------------------------------
# Training step: what is frozen stays frozen, everything trainable learns
# ------------------------------------------------------------------------------------------------------------------
def test_optimizer_step_updates_exactly_the_trainable_parameters():
    torch.manual_seed(0)
    model = tiny().train()
    frozen_modules = {"visual_encoder": model.visual_encoder, "mae_encoder": model.mae_encoder, "mae_decoder": model.mae_decoder}
    frozen_before = {name: copy.deepcopy(m.state_dict()) for name, m in frozen_modules.items()}
    params = trainable(model)
    assert params, "no trainable parameters"
    assert not any(n.startswith(("visual_encoder.", "mae_encoder.", "mae_decoder.")) for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}

    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    output = model(batch())
    output.loss.backward()
    no_grad = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], f"trainable parameters without gradient: {no_grad}"
    optimizer.step()

    for name, module in frozen_modules.items():
        for p in module.parameters():
            assert p.grad is None
        for key, value in module.state_dict().items():
            assert torch.equal(value, frozen_before[name][key]), f"{name}.{key} changed"
    assert all(not torch.equal(before[n], p) for n, p in params.items() if n != "temp")


def test_reconstruction_loss_sends_gradient_into_the_dual_block():
    model = tiny().train()
    model(batch())["loss_rec"].backward()
    for name, p in model.dual_block.named_parameters():
        if name.startswith("layers.0.query_"):
            continue  # the query branch (Z') does not feed M'
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0  # through Z_q -> M'


def test_loss_weights_and_output_fields():
    model = tiny(loss_weight_itc=2.0, loss_weight_itm=0.5, loss_weight_itg=0.0, loss_weight_rec=3.0).eval()
    torch.manual_seed(0)
    out = model(batch())
    expected = 2.0 * out.loss_itc + 0.5 * out.loss_itm + 3.0 * out.loss_rec
    torch.testing.assert_close(out.loss, expected)
    assert set(k for k, v in out.items() if v is not None) == {"loss", "loss_itc", "loss_itm", "loss_lm", "loss_rec"}


# ------------------------------------------------------------------------------------------------------------------
# Full size, on the meta device: no weights, no downloads
# ------------------------------------------------------------------------------------------------------------------
def test_full_size_trainable_parameters_exceed_lavis_blip2_by_22m():
    with torch.device("meta"), no_hub():
        xformer = XFormer(XFormerConfig())
        blip2 = Blip2Baseline(BackboneConfig())
    extra = count(trainable(xformer).values()) - count(trainable(blip2).values())
    assert abs(extra - 22e6) <= 2e6, f"X-Former adds {extra / 1e6:.2f}M trainable parameters"
    # The published frozen encoders: EVA ViT-g (39 blocks) ~ 985M, MAE ViT-H encoder ~ 630M.
    assert abs(count(xformer.visual_encoder.parameters()) - 985.0e6) < 5e6
    assert abs(count(xformer.mae_encoder.parameters()) - 630.8e6) < 5e6
    assert xformer.mae_encoder.config.hidden_size == 1280 and xformer.config.num_query_token == 32


# ------------------------------------------------------------------------------------------------------------------
# Bad input and bad config
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "samples, message",
    [
        ({"image": torch.randn(2, 3, 48, 48), "text_input": CAPTIONS[:2]}, "image_size is 32"),
        ({"image": torch.randn(2, 1, 32, 32), "text_input": CAPTIONS[:2]}, "has 1 channels"),
        ({"image": torch.randn(3, 32, 32), "text_input": CAPTIONS[:1]}, "must be a \\[batch, 3, 32, 32\\] tensor"),
        ({"image": torch.randn(2, 3, 32, 32), "text_input": []}, "empty list"),
        ({"image": torch.randn(2, 3, 32, 32), "text_input": CAPTIONS[:3]}, "2 images but 3 texts"),
        ({"image": torch.randn(2, 3, 32, 32), "text_input": "a red circle"}, "list of strings"),
    ],
)
def test_bad_input_raises_clear_value_error(samples, message):
    with pytest.raises(ValueError, match=message):
        tiny()(samples)


def test_unknown_or_mistyped_config_fields_are_refused_before_building():
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['mask_ration'\].*valid fields: .*mask_ratio"):
        XFormerConfig.from_lavis_cfg({"arch": "xformer", "mask_ration": 0.5})
    with pytest.raises(ValueError, match="'num_query_token' .* expected <class 'int'>"):
        XFormerConfig.from_lavis_cfg({"num_query_token": "32"})
    with pytest.raises(ValueError, match="itg_conditioning='x' is not valid; choose one of"):
        XFormerConfig(itg_conditioning="x")
    with pytest.raises(ValueError, match="at least one MAE patch"):
        XFormerConfig(mask_ratio=1.0)
