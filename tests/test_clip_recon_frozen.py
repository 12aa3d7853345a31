""""CLIP w Recon." read with a frozen CLIP-ViT (variant ``clip_recon``, ``mae_source: frozen_clip_vit``): the frozen
CLIP-ViT that gives C also encodes the visible patches of the masked image; X-Former and the MAE decoder train."""

import copy

import pytest
import torch
from lavis.models import load_model
from omegaconf import OmegaConf

from lavis_xformer.models.builders import no_hub
from lavis_xformer.models.clip_recon import encode_visible_patches
from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.precision import run_in_half_precision
from lavis_xformer.models.variants import VARIANTS
from lavis_xformer.models.xformer import XFormer, random_masking

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]


def frozen_recon() -> XFormer:
    cfg = load_model("xformer", "clip_recon_tiny").config
    torch.manual_seed(0)
    return XFormer(XFormerConfig(**cfg.to_dict()))


def images(size=4, seed=0):
    return torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def noise(size=4, seed=1):
    return torch.rand(size, 16, generator=torch.Generator().manual_seed(seed))  # tiny: a 4 x 4 patch grid


def test_clip_recon_is_the_frozen_reading_and_the_trainable_copy_is_its_own_variant():
    assert VARIANTS["clip_recon"].overrides == {"mae_source": "frozen_clip_vit", "mae_decoder_trainable": True}
    assert VARIANTS["clip_recon_trainable"].overrides == {"mae_source": "clip_vit"}
    model = frozen_recon()
    assert model.masked_clip is None and model.mae_encoder is None  # no copy, no MAE encoder


def test_frozen_clip_encodes_the_visible_patches_with_the_masking_the_decoder_unshuffles():
    model = frozen_recon().eval()
    image, fixed = images(), noise()
    encoding = model.forward_encoders(image, 0.5, fixed)[1]
    assert encoding.features.shape == (4, 1 + 8, model.config.vit_embed_dim)  # [CLS] + 8 visible of 16 patches
    _, mask, ids_restore = random_masking(torch.zeros(4, 16, 1), 0.5, fixed)
    assert torch.equal(encoding.mask, mask) and torch.equal(encoding.ids_restore, ids_restore)
    # Unmasked, it is the frozen CLIP-ViT's own forward on the whole image: the same module that gives C.
    whole = model.forward_encoders(image, 0.0)[1].features
    torch.testing.assert_close(whole, model.visual_encoder.forward_features(image).float(), rtol=1e-5, atol=1e-5)
    # The visible tokens of the masked pass are the whole-image pass's only where attention mixes nothing else: a
    # masked patch's pixels must not matter.
    masked_patch = int(encoding.mask[0].argmax())
    edited = image.clone()
    row, col = divmod(masked_patch, 4)
    edited[0, :, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8] += 3.0
    torch.testing.assert_close(model.forward_encoders(edited, 0.5, fixed)[1].features, encoding.features, rtol=0, atol=0)


def test_training_step_trains_exactly_the_declared_parameters(process_group):
    """Declared trainable: X-Former (queries, ln_vision, Q-Former, heads, dual block, projection to the decoder) and
    the MAE decoder; frozen: the CLIP-ViT, which encodes both C and the masked image. One step of the full stage-1
    loss: every trainable parameter that the losses read gets a gradient, no frozen one does, and the CLIP-ViT's
    weights are unchanged by the optimiser step."""
    model = frozen_recon().train()
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    # the decoder's fixed sin-cos positions are a buffer-like parameter transformers never trains
    clip = {f"visual_encoder.{name}" for name, _ in model.visual_encoder.named_parameters()}
    assert frozen == clip | {"mae_decoder.decoder_pos_embed"}

    clip_before = {k: v.clone() for k, v in model.visual_encoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    output = model({"image": images(), "text_input": CAPTIONS, "mae_noise": noise()})
    output.loss.backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert not any(p.grad is not None for p in model.visual_encoder.parameters())  # the CLIP-ViT gets no gradient
    assert trainable - reached == set(), sorted(trainable - reached)  # every trainable parameter gets a gradient
    assert any(name.startswith("mae_decoder.") for name in trainable)  # the decoder among them
    optimizer.step()
    for key, value in model.visual_encoder.state_dict().items():
        assert torch.equal(value, clip_before[key]), key


def test_reconstruction_gradient_reaches_the_decoder_and_dual_block_but_not_clip(process_group):
    model = frozen_recon().train()
    output = model({"image": images(), "text_input": CAPTIONS, "mae_noise": noise()})
    output.loss_rec.backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"mae_decoder.decoder_pred.weight", "mae_out_proj.weight", "dual_block.mae_proj.weight"} <= reached
    assert not any(name.startswith("visual_encoder.") for name in reached)


def test_stage2_frozen_reading_has_no_clip_copy_and_builds_from_stage1_weights():
    stage2 = load_model("xformer_opt", "clip_recon_tiny")
    assert stage2.masked_clip is None and stage2.mae_decoder is None
    assert stage2.config.mae_source == "frozen_clip_vit"
    assert not any(p.requires_grad for p in stage2.visual_encoder.parameters())


def test_half_precision_frozen_clip_runs_under_its_autocast():
    vit = frozen_recon().eval().visual_encoder  # the tiny types keep it fp32
    half = run_in_half_precision(copy.deepcopy(vit), torch.bfloat16)
    ours = encode_visible_patches(half, images(), 0.5, noise())[0]
    reference = encode_visible_patches(vit, images(), 0.5, noise())[0]
    assert ours.dtype == torch.float32
    assert not torch.equal(ours, reference)  # it did run in bf16
    torch.testing.assert_close(ours, reference, rtol=0.1, atol=0.1)


def test_paper_scale_counts_of_both_readings():
    def build(model_type):
        model_cfg = OmegaConf.load(XFormer.default_config_path(model_type)).model
        return XFormer.from_config(OmegaConf.merge(model_cfg, {"load_pretrained": False}))

    with torch.device("meta"), no_hub():
        xformer, frozen, copy = build("pretrain"), build("clip_recon"), build("clip_recon_trainable")

    def trainable(model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    wider_projection = (1408 - 1280) * 768  # the dual block's projection of M reads CLIP's 1408 instead of MAE's 1280
    decoder = trainable(frozen.mae_decoder)  # all but its fixed sin-cos positions
    clip_vit = sum(p.numel() for p in copy.masked_clip.parameters())
    assert trainable(frozen) == trainable(xformer) + wider_projection + decoder
    assert trainable(copy) == trainable(xformer) + wider_projection + clip_vit


def test_frozen_reading_needs_matching_patch_grids():
    with pytest.raises(ValueError, match="patch grids must be the same"):
        XFormerConfig(mae_source="frozen_clip_vit", image_size=364)
