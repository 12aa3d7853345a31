"""MAE's random masking and the token gathering it needs, for any encoder.

    tokens [B, N, width] --random_masking(ratio, noise)--> visible [B, N * (1 - ratio), width], mask [B, N], ids_restore
    masked_patches(ids_restore, visible) -> [B, N - visible] indices of the hidden patches
"""

import contextlib
from typing import Optional

import torch


def gather_tokens(tokens, index):
    """``tokens[b, index[b, i]]`` for every b and i: the rows ``index`` ([B, n]) picks from [B, N, width] tokens."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def random_masking(tokens, mask_ratio: float, noise=None):
    """MAE's per-sample random masking (transformers' ``ViTMAEEmbeddings.random_masking``, for any encoder): keeps the
    ``int(N * (1 - mask_ratio))`` tokens of lowest ``noise``. Returns (visible tokens, mask [B, N] with 1 = masked,
    ids_restore)."""
    batch, length, _ = tokens.shape
    keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, length, device=tokens.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible = gather_tokens(tokens, ids_shuffle[:, :keep])
    mask = torch.ones(batch, length, device=tokens.device)
    mask[:, :keep] = 0
    return visible, torch.gather(mask, 1, ids_restore), ids_restore


def masked_patches(ids_restore, visible: int) -> Optional[torch.Tensor]:
    """[B, N - visible] indices of the patches MAE's masking hid, from its ``ids_restore`` (which un-shuffles
    [visible; masked]: the masked patches are the last ones of its inverse, the shuffle), so the shape never depends
    on the values (meta-device builds count FLOPs through it); None where nothing is masked."""
    if visible >= ids_restore.shape[1]:
        return None
    return torch.argsort(ids_restore, dim=1)[:, visible:]


def ordered_noise(batch: int, num_patches: int, device) -> torch.Tensor:
    """Masking noise that keeps the patches in their order: what ratio 0 uses, so no random number is drawn."""
    return torch.arange(num_patches, device=device, dtype=torch.float).expand(batch, -1)


@contextlib.contextmanager
def mask_ratio_of(mae_config, ratio: float):
    """transformers' ViTMAE reads ``config.mask_ratio`` at call time; set it for one call."""
    saved = mae_config.mask_ratio
    mae_config.mask_ratio = ratio
    try:
        yield
    finally:
        mae_config.mask_ratio = saved
