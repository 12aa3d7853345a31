""""CLIP w Recon." (supplement Table 6 row 1): a CLIP-ViT in the MAE encoder's place, on the visible patches.

The supplement's one sentence on it: "we replace MAE encoder with CLIP-ViT and pass masked image to CLIP-ViT which
is then optimized for image reconstruction with MAE decoder." It has two readings, both model types
(``models/variants.py``):

``mae_source: frozen_clip_vit`` (variant ``clip_recon``, the default reading)
    The frozen CLIP-ViT itself (``visual_encoder``, the one C comes from: the same weights, so no copy) encodes the
    visible patches; what is optimised for reconstruction is X-Former and the MAE decoder
    (``mae_decoder_trainable: True``). The same supplement says, of VQA fine-tuning: "BLIP-2 completely unfreezes the
    CLIP ViT, resulting in a total of 1.2 Billion trainable parameters during fine-tuning. However, due to resource
    constraints, we are unable to train such large models." Training a 1B-parameter CLIP-ViT copy in the ablation
    would contradict that, so this reading is the default.
``mae_source: clip_vit`` (variant ``clip_recon_trainable``, the literal reading of "optimized")
    A trainable fp32 copy of the CLIP-ViT (``masked_clip``), trained by the reconstruction loss and, through Z', the
    stage-1 losses; it stays trainable in stage 2 (checkpoints hold trainable weights only).

Whether the MAE decoder trains in the frozen reading is not said by the paper (X-Former's own decoder is frozen:
"a frozen image decoder", section 2.3); training it is this project's choice, so that something besides X-Former
adapts the decoder to CLIP features (``mae_decoder_trainable``, a config field).

Both encode like MAE's encoder: patch embeddings plus their positions, MAE's random masking (``random_masking``,
the same ``noise`` convention, so the MAE decoder un-shuffles M' as it does MAE's), [CLS] with its position in front,
then every block (as C is read: LAVIS's 39-block ViT-g, the second-to-last layer).
"""

import contextlib

import torch
import torch.utils.checkpoint

from lavis_xformer.models.masking import ordered_noise, random_masking
from lavis_xformer.models.precision import runs_in_half_precision

#: ``mae_source`` values whose M is a CLIP-ViT's encoding of the visible patches
CLIP_RECON_SOURCES = ("clip_vit", "frozen_clip_vit")


def encode_visible_patches(vit, image, mask_ratio: float, noise=None):
    """(features [B, 1 + visible, vit width] fp32, mask [B, N] with 1 = masked, ids_restore [B, N]): ``vit`` (LAVIS's
    EVA ViT) on the patches MAE's masking keeps. A ViT switched to half precision (``run_in_half_precision``) runs
    under its autocast, as its own forward would."""
    half = runs_in_half_precision(vit)
    autocast = torch.autocast(image.device.type, dtype=half) if half is not None else contextlib.nullcontext()
    with autocast:
        patches = vit.patch_embed(image) + vit.pos_embed[:, 1:]  # [B, N, width]
        if noise is None and mask_ratio == 0:
            noise = ordered_noise(image.shape[0], patches.shape[1], image.device)
        visible, mask, ids_restore = random_masking(patches, mask_ratio, noise)  # [B, visible, width]
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(image.shape[0], -1, -1)
        hidden = vit.pos_drop(torch.cat([cls, visible], dim=1))  # [B, 1 + visible, width]
        for block in vit.blocks:  # EVA's blocks; the built ViT has no relative position bias
            if vit.use_checkpoint and torch.is_grad_enabled():
                hidden = torch.utils.checkpoint.checkpoint(block, hidden, None, use_reentrant=False)
            else:
                hidden = block(hidden, None)
    return hidden.float(), mask, ids_restore
