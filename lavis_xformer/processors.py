"""Image processors: ``xformer_image_train`` (random resized crop + horizontal flip, the supplement's augmentation;
``hflip: False`` leaves the flip out, the supplement's Table 5 "w/o HFlip") and ``xformer_image_eval`` (resize), both
at 224 by default, registered in LAVIS's processor registry.

They output CLIP-normalised tensors (what the CLIP-ViT expects); the model re-normalises its MAE input itself, so
the statistics are fixed here. Text uses LAVIS's own ``blip_caption``.
Any PIL image mode is accepted: palette, grayscale, CMYK, 16-bit and alpha images are converted to 8-bit RGB
(alpha composited on white), so one odd file never stops a run.
"""

import numpy as np
from lavis.common.registry import registry
from lavis.processors.blip_processors import Blip2ImageTrainProcessor, BlipImageEvalProcessor
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB; raises ``ValueError`` for an empty image or a non-image."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size ({image.width}x{image.height})")
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Scale high-bit-depth data to 0..255 instead of letting PIL clip it.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if high == low else (array - low) / (high - low) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _refuse_custom_stats(cfg, name):
    if cfg.get("mean", None) is not None or cfg.get("std", None) is not None:
        raise ValueError(
            f"{name}: custom mean/std are not supported; the model re-normalises its MAE input assuming the "
            "CLIP statistics these processors use"
        )


@registry.register_processor("xformer_image_train")
class XFormerImageTrainProcessor(Blip2ImageTrainProcessor):
    """LAVIS's BLIP-2 train transform (random resized crop, horizontal flip, CLIP normalisation); ``hflip=False``
    drops the flip and keeps the rest as it is."""

    def __init__(self, image_size=224, min_scale=0.5, max_scale=1.0, hflip=True):
        super().__init__(image_size=image_size, min_scale=min_scale, max_scale=max_scale)
        if not hflip:
            steps = [t for t in self.transform.transforms if not isinstance(t, transforms.RandomHorizontalFlip)]
            self.transform = transforms.Compose(steps)

    def __call__(self, item):
        return self.transform(to_rgb(item))

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cfg if cfg is not None else OmegaConf.create()
        _refuse_custom_stats(cfg, "xformer_image_train")
        hflip = cfg.get("hflip", True)
        if not isinstance(hflip, bool):
            raise ValueError(f"xformer_image_train: hflip must be True or False, got {hflip!r}")
        return cls(cfg.get("image_size", 224), cfg.get("min_scale", 0.5), cfg.get("max_scale", 1.0), hflip)


@registry.register_processor("xformer_image_eval")
class XFormerImageEvalProcessor(BlipImageEvalProcessor):
    def __init__(self, image_size=224):
        super().__init__(image_size=image_size)

    def __call__(self, item):
        return self.transform(to_rgb(item))

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cfg if cfg is not None else OmegaConf.create()
        _refuse_custom_stats(cfg, "xformer_image_eval")
        return cls(cfg.get("image_size", 224))
