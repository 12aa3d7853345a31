"""Building an arm: the tiny X-Former config with ``BASE_MODEL`` and the arm's overrides, the frozen stand-ins, and
the two things the experiment adds around the model (nothing inside ``models/`` changes):

* ``PooledClip``: the control's CLIP-ViT, which hands the Q-Former its pooled global embedding alone;
* ``PretokenizedTokenizer``: the captions tokenized once instead of at every step (same ids, same padding).
"""

from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

from lavis_xformer.experiment.design import BASE_MODEL, CLIP_POOL, Arm, ExperimentSize
from lavis_xformer.paths import model_config_path


def model_config(arm: Arm, size: ExperimentSize, clip_weights: Optional[Path] = None,
                 mae_weights: Optional[Path] = None, image_size: Optional[int] = None):
    """The arm's typed ``XFormerConfig``: the ``tiny`` type's sizes, ``BASE_MODEL``, the arm's overrides, the model's
    image size (the arm's, or ``size.model_px``), the MAE at ``size.model_px``, and the stand-ins' files."""
    from omegaconf import OmegaConf

    from lavis_xformer.models.config import XFormerConfig

    fields = OmegaConf.to_container(OmegaConf.load(model_config_path("xformer/xformer_tiny.yaml")).model)
    fields.update(BASE_MODEL)
    fields.update(image_size=size.model_px, mae_image_size=size.model_px)
    fields.update(arm.overrides)
    if image_size is not None:
        fields["image_size"] = image_size
    fields.update(vit_weights=str(clip_weights) if clip_weights else None,
                  mae_weights=str(mae_weights) if mae_weights else None)
    return XFormerConfig.from_lavis_cfg(fields)


class PooledClip(nn.Module):
    """A frozen CLIP-ViT whose output is one token, [B, 1, width], pooled as the stand-in's contrastive loss pooled
    (``design.CLIP_POOL``: the mean of every token, or the class token). The control: a Q-Former that reads only
    CLIP's global embedding cannot see where anything is."""

    def __init__(self, vit: nn.Module, pool: str):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool={pool!r}: choose 'mean' or 'cls'")
        self.vit, self.pool = vit, pool
        self.num_features = vit.num_features

    def forward(self, image):
        tokens = self.vit(image)
        return tokens[:, :1] if self.pool == "cls" else tokens.mean(dim=1, keepdim=True)


class PretokenizedTokenizer:
    """The model's tokenizer with ``texts`` encoded once (``padding="max_length"``, ``max_length``): a call on known
    texts with those settings returns the stored ids cut to the batch's longest caption (less text compute, the same
    losses); anything else goes to the tokenizer itself."""

    def __init__(self, tokenizer, texts: Iterable[str], max_length: int):
        from transformers import BatchEncoding

        self.tokenizer, self.max_length, self._encoding = tokenizer, max_length, BatchEncoding
        unique = sorted(set(texts))
        encoded = tokenizer(unique, padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
        self.rows: Dict[str, int] = {text: i for i, text in enumerate(unique)}
        self.input_ids, self.attention_mask = encoded.input_ids, encoded.attention_mask

    def __call__(self, texts, padding=None, truncation=None, max_length=None, return_tensors=None, **kwargs):
        known = isinstance(texts, (list, tuple)) and all(t in self.rows for t in texts)
        if known and padding == "max_length" and max_length == self.max_length and return_tensors == "pt" \
                and not kwargs:
            rows = torch.tensor([self.rows[t] for t in texts])
            width = int(self.attention_mask[rows].sum(1).max())  # the batch's longest caption: padded positions
            # are masked in every attention (and -100 in ITG's labels), so the losses are those of max_length padding
            return self._encoding({"input_ids": self.input_ids[rows, :width],
                                   "attention_mask": self.attention_mask[rows, :width]})
        return self.tokenizer(texts, padding=padding, truncation=truncation, max_length=max_length,
                              return_tensors=return_tensors, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self):
        return len(self.tokenizer)


def build_arm(arm: Arm, size: ExperimentSize, standins: Dict[str, str], seed: int):
    """The arm's stage-1 model with its frozen stand-ins; the trainable parts initialised from ``seed`` (so every arm of
    a seed starts its shared BLIP-2 parts from the same weights)."""
    from lavis_xformer.models.xformer import XFormer

    image_size = arm_image_size(arm, size)
    config = model_config(arm, size, clip_weights=Path(standins[f"clip{image_size}"]),
                          mae_weights=Path(standins["mae"]) if arm.overrides.get("use_mae", True) else None)
    torch.manual_seed(seed)
    model = XFormer(config)
    if arm.clip_tokens == "pooled":
        model.visual_encoder = PooledClip(model.visual_encoder, CLIP_POOL)
    elif arm.clip_tokens != "all":
        raise ValueError(f"arm {arm.name}: clip_tokens={arm.clip_tokens!r}; choose 'all' or 'pooled'")
    return model


def arm_image_size(arm: Arm, size: ExperimentSize) -> int:
    """The pixels the arm's CLIP-ViT sees."""
    return arm.overrides.get("image_size", size.model_px)

