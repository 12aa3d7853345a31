"""The supplement's ablations "CLIP w Recon." (Table 6 row 1; here its trainable-copy reading,
``clip_recon_trainable``; the frozen reading is tests/test_clip_recon_frozen.py's) and "w/o HFlip" (Table 5, the
project yamls ``pretrain_stage1_no_hflip*.yaml``)."""

from pathlib import Path

import pytest
import torch
from lavis.models import load_model
from omegaconf import OmegaConf
from transformers import ViTMAEConfig
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

from lavis_xformer.models.builders import no_hub
from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.masking import random_masking
from lavis_xformer.models.xformer import XFormer

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]
TRAIN = Path(__file__).resolve().parent.parent / "projects" / "xformer" / "train"


def clip_recon(**overrides) -> XFormer:
    cfg = load_model("xformer", "clip_recon_trainable_tiny").config
    torch.manual_seed(0)
    return XFormer(XFormerConfig(**{**cfg.to_dict(), **overrides}))


def images(size=4, seed=0):
    return torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def noise(size=4, seed=1):
    return torch.rand(size, 16, generator=torch.Generator().manual_seed(seed))  # tiny: a 4 x 4 patch grid


# ------------------------------------------------------------------------------------------------------------------
# CLIP w Recon.: the CLIP-ViT in the MAE encoder's place, on the masked image, trained for reconstruction
# ------------------------------------------------------------------------------------------------------------------
def test_random_masking_is_maes():
    tokens = torch.randn(4, 16, 8)
    embeddings = ViTMAEEmbeddings(ViTMAEConfig(hidden_size=8, image_size=32, patch_size=8, mask_ratio=0.5))
    expected = embeddings.random_masking(tokens, noise())
    for ours, reference in zip(random_masking(tokens, 0.5, noise()), expected):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_masked_clip_encodes_only_the_visible_patches():
    model = clip_recon().eval()
    image, fixed = images(), noise()
    encoding = model.forward_masked_clip(image, 0.5, fixed)
    assert encoding.features.shape == (4, 1 + 8, model.config.vit_embed_dim)  # [CLS] + the 8 visible of 16 patches
    assert encoding.mask.sum(1).tolist() == [8.0] * 4
    # The mask is MAE's for the same noise: the frozen MAE decoder un-shuffles it with ids_restore.
    _, mask, ids_restore = random_masking(torch.zeros(4, 16, 1), 0.5, fixed)
    assert torch.equal(encoding.mask, mask) and torch.equal(encoding.ids_restore, ids_restore)

    # Changing the pixels of a masked patch changes nothing; changing a visible patch changes M.
    masked, visible = int(encoding.mask[0].argmax()), int(encoding.mask[0].argmin())
    for patch, should_change in ((masked, False), (visible, True)):
        edited = image.clone()
        row, col = divmod(patch, 4)
        edited[0, :, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8] += 3.0
        changed = model.forward_masked_clip(edited, 0.5, fixed).features
        assert bool((changed[0] - encoding.features[0]).abs().max() > 1e-4) is should_change
        torch.testing.assert_close(changed[1:], encoding.features[1:], rtol=0, atol=0)

    # Unmasked, it is the CLIP-ViT's own forward on the whole image (the copy starts from the frozen CLIP's weights).
    whole = model.forward_masked_clip(image, 0.0).features
    torch.testing.assert_close(whole, model.masked_clip.forward_features(image), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, model.visual_encoder.forward_features(image).float(), rtol=1e-5, atol=1e-5)


def test_reconstruction_loss_trains_the_clip_copy_and_nothing_frozen(process_group):
    """Declared trainable: the CLIP-ViT copy (all of it), the dual block, the projection to the decoder, and what
    reaches Z_q; frozen: the CLIP-ViT that gives C and the MAE decoder. The reconstruction loss alone reaches every
    parameter of the copy and of the dual block's MAE branch, and no frozen parameter."""
    model = clip_recon().train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(p.requires_grad for p in model.masked_clip.parameters())
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())
    assert not any(p.requires_grad for p in model.mae_decoder.parameters())
    assert model.mae_encoder is None  # no MAE encoder is used (nor kept)

    output = model({"image": images(), "text_input": CAPTIONS, "mae_noise": noise()})
    output.loss_rec.backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached <= trainable
    copy = {f"masked_clip.{name}" for name, _ in model.masked_clip.named_parameters()}
    assert copy <= reached, sorted(copy - reached)[:5]
    assert {"mae_out_proj.weight", "dual_block.mae_proj.weight"} <= reached
    assert not any(name.startswith(("visual_encoder.", "mae_decoder.")) for name in reached)


def test_clip_copy_is_saved_in_checkpoints_and_reaches_stage2():
    """It is trainable in stage 2 too, so stage-1 and stage-2 checkpoints (trainable weights only) carry it."""
    stage2 = load_model("xformer_opt", "clip_recon_trainable_tiny")
    assert all(p.requires_grad for p in stage2.masked_clip.parameters())
    assert stage2.mae_decoder is None and stage2.config.reconstruction_loss is False
    stage1 = clip_recon()
    with torch.no_grad():
        stage1.masked_clip.blocks[0].mlp.fc1.weight.add_(1.0)  # "trained"
    trained = {k: v for k, v in stage1.state_dict().items() if k.startswith("masked_clip.")}
    result = stage2.load_state_dict(trained, strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(stage2.masked_clip.blocks[0].mlp.fc1.weight, stage1.masked_clip.blocks[0].mlp.fc1.weight)


def test_clip_recon_paper_scale_builds_on_meta_with_a_trainable_clip_vit():
    def build(model_type):
        model_cfg = OmegaConf.load(XFormer.default_config_path(model_type)).model
        return XFormer.from_config(OmegaConf.merge(model_cfg, {"load_pretrained": False}))

    with torch.device("meta"), no_hub():
        xformer, variant = build("pretrain"), build("clip_recon_trainable")

    def trainable(model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    clip_vit = sum(p.numel() for p in variant.masked_clip.parameters())
    assert clip_vit == sum(p.numel() for p in variant.visual_encoder.parameters())  # EVA ViT-g, 39 blocks
    wider_projection = (1408 - 1280) * 768  # the dual block's projection of M reads CLIP's 1408 instead of MAE's 1280
    assert trainable(variant) == trainable(xformer) + clip_vit + wider_projection
    assert variant.masked_clip.patch_embed.num_patches == (224 // 14) ** 2 == (variant.config.mae_image_size // variant.config.mae_patch_size) ** 2


def test_clip_recon_needs_matching_patch_grids():
    with pytest.raises(ValueError, match="patch grids must be the same"):
        XFormerConfig(mae_source="clip_vit", image_size=364)


# ------------------------------------------------------------------------------------------------------------------
# w/o HFlip
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", "_blip2"])
def test_no_hflip_yamls_differ_from_stage1_only_in_the_flip(suffix):
    stage1 = OmegaConf.load(TRAIN / f"pretrain_stage1{suffix}.yaml")
    ablation = OmegaConf.load(TRAIN / f"pretrain_stage1_no_hflip{suffix}.yaml")
    assert ablation.run.output_dir == stage1.run.output_dir + "_no_hflip"
    for name, dataset in ablation.datasets.items():
        assert dataset.vis_processor.train.pop("hflip") is False, name
    ablation.run.output_dir = stage1.run.output_dir
    assert ablation == stage1
