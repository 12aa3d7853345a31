"""The experiment's data, in memory: shapes scenes drawn per (seed, split), rendered at ``image_px`` and averaged 2x2
for the 32-px arms, their captions (set-only for the CLIP stand-ins, count-and-position for the Q-Formers) and their
answer-balanced questions (``datasets.shapes``). A split is a function of (seed, split, size) alone."""

import random
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from lavis_xformer.datasets import shapes
from lavis_xformer.experiment.design import ExperimentSize
from lavis_xformer.models.xformer import CLIP_MEAN, CLIP_STD

SPLIT_SIZES = {"pretrain": "num_pretrain", "train": "num_train", "test": "num_test"}


@dataclass
class Split:
    """One split: raw images at full size (uint8), captions, questions (image index, type, target, answer)."""

    pixels: torch.Tensor  # [N, 3, image_px, image_px] uint8
    set_captions: List[str]
    detail_captions: List[str]
    questions: List[Tuple[int, str, str, str]]
    scenes: list

    def images(self, size: int) -> torch.Tensor:
        """CLIP-normalised float images at ``size`` px (area-averaged from the drawn size): [N, 3, size, size]."""
        return normalise(self.pixels, size)


def normalise(pixels: torch.Tensor, size: int) -> torch.Tensor:
    x = pixels.float() / 255.0
    if x.shape[-1] != size:
        x = F.adaptive_avg_pool2d(x, size)  # 64 -> 32: each pixel the mean of a 2x2 block
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def make_split(seed: int, split: str, size: ExperimentSize, blank: bool = False) -> Split:
    """Scenes of ``split`` for ``seed`` (``random.Random`` seeded by both: a fresh test set per seed), rendered, captioned
    and questioned. ``blank=True`` draws the same scenes but renders empty images (a fact removed from the pixels,
    for tests of the readout)."""
    count = getattr(size, SPLIT_SIZES[split])
    rng = random.Random(f"lavis_xformer.experiment:{seed}:{split}")
    spec = shapes.ShapesSpec(seed=seed, image_size=size.image_px, min_objects=size.min_objects,
                             max_objects=size.max_objects, num_train=0, num_val=0, num_test=0)
    scenes = [shapes.sample_scene(rng, spec) for _ in range(count)]
    pixels = np.stack([np.asarray(shapes.render([] if blank else s, size.image_px)) for s in scenes])
    facts = [shapes.facts(s, size.image_px) for s in scenes]
    return Split(
        pixels=torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
        set_captions=[shapes.set_caption(s) for s in scenes],
        detail_captions=[shapes.detail_caption(s, size.image_px) for s in scenes],
        questions=shapes.balanced_questions(facts, rng),
        scenes=scenes,
    )
