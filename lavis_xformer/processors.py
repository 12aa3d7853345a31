"""Image processors: ``xformer_image_train`` (random resized crop + horizontal flip, the supplement's augmentation;
``hflip: False`` leaves the flip out, the supplement's Table 5 "w/o HFlip") and ``xformer_image_eval`` (resize), both
at 224 by default, registered in LAVIS's processor registry.

They output CLIP-normalised tensors (what the CLIP-ViT expects); the model re-normalises its MAE input itself, so
the statistics are fixed here. Text uses LAVIS's own ``blip_caption``.
Any PIL image mode is accepted: palette, grayscale, CMYK, 16/32-bit and alpha images are converted to 8-bit RGB
(alpha composited on white; high bit depths scaled by their format's range), so one odd file never stops a run.
Image paths from annotation files stay inside the dataset's root and name regular files (``image_path_problem``,
``resolved_image_problem``), unless ``run.allow_outside_image_paths``.
"""

import os
import stat
from typing import Optional

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
        return Image.fromarray(_high_bit_depth_to_uint8(image), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _high_bit_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """16/32-bit pixels to 0..255 by the format's range, not by the image's own (a choice; the per-image min-max
    stretch it replaces turned a uniform mid-grey black): ``I;16*`` is 16-bit data (0..65535, what Pillow opens 16-bit
    PNG and TIFF as); ``I`` is 16-bit data when a value exceeds 255, else 8-bit data (what ``convert("I")`` of an
    8-bit image gives); ``F`` is 0..1 when every value lies there, else 0..255. Values outside the range clip."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if array.size and 0.0 <= array.min() and array.max() <= 1.0 else 1.0
    elif image.mode == "I" and (not array.size or array.max() <= 255):
        scale = 1.0
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.nan_to_num(array * scale), 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Image paths: inside the dataset's root, regular files only
# ---------------------------------------------------------------------------------------------------------------
_OUTSIDE_ROOT_ALLOWED = [False]


def allow_outside_image_paths(allowed: bool) -> None:
    """``run.allow_outside_image_paths``: let annotation files name images outside their dataset's root (absolute
    paths, ``..``, symlinks leading out). Off by default: a file's content decides nothing about what is read."""
    _OUTSIDE_ROOT_ALLOWED[0] = bool(allowed)


def image_path_problem(root, name) -> Optional[str]:
    """Why an annotation's image ``name`` may not be read under ``root``, from the text alone (no file system access,
    cheap for millions of entries): an absolute path or one whose ``..`` leads out of the root; None if fine."""
    if root is None or _OUTSIDE_ROOT_ALLOWED[0] or not isinstance(name, str):
        return None
    if os.path.isabs(name):
        return f"{name!r} is an absolute path; image paths are relative to the dataset root {root}"
    if os.path.normpath(name).split(os.sep)[0] == os.pardir:
        return f"{name!r} leads out of the dataset root {root}"
    return None


def resolved_image_problem(root, name) -> Optional[str]:
    """Why the file an image path names may not be opened, checked on disk just before loading: a symlink leading out
    of the root, or not a regular file (a FIFO would block the run forever, a device or /proc file is no image)."""
    if root is None or not isinstance(name, str):
        return None
    path = os.path.join(str(root), name)
    problem = image_path_problem(root, name)
    if problem:
        return problem
    if not _OUTSIDE_ROOT_ALLOWED[0]:
        real, real_root = os.path.realpath(path), os.path.realpath(str(root))
        if os.path.commonpath([real, real_root]) != real_root:
            return f"{name!r} resolves to {real}, outside the dataset root {root} (a symlink leads out)"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # missing: the dataset's own open reports it
    if not stat.S_ISREG(mode):
        return f"{name!r} is not a regular file (a FIFO, device or folder): not opened"
    return None


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
