"""The experiment's data and readout: balanced planted facts, the captions' information content, the probe seeing a
fact when the images show it and not when they do not, and the control's pooling losing position."""

import random
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from lavis_xformer.datasets import shapes
from lavis_xformer.experiment.data import make_split
from lavis_xformer.experiment.design import SMOKE
from lavis_xformer.experiment.probe import blind_baseline, probe_accuracies

SIZE = replace(SMOKE, num_train=600, num_test=400)


@pytest.fixture(scope="module")
def splits():
    return make_split(0, "train", SIZE), make_split(0, "test", SIZE)


def test_set_captions_say_what_occurs_and_nothing_of_counts_plurals_or_positions():
    rng = random.Random(3)
    spec = shapes.ShapesSpec(image_size=64, min_objects=2, max_objects=6)
    for _ in range(200):
        scene = shapes.sample_scene(rng, spec)
        text = shapes.set_caption(scene)
        words = set(re.findall(r"[a-z]+", text))
        assert not words & {"a", "one", "two", "three", "four", "five", "six", "top", "bottom", "left", "right"}
        assert not any(w.endswith("s") for w in words)  # no plural
        assert {f"{o.color} {o.shape}" for o in scene} == set(re.split(r", | and ", text))
        detail = shapes.detail_caption(scene, 64)
        for quadrant in {shapes.quadrant(o, 64) for o in scene}:
            assert quadrant in detail
        counts = {(o.color, o.shape): sum((p.color, p.shape) == (o.color, o.shape) for p in scene) for o in scene}
        for (color, shape), n in counts.items():
            assert f"{shapes.NUMBER_WORDS[n]} {color} {shape}{'s' if n > 1 else ''}" in detail


def test_questions_are_answer_balanced_and_fresh_per_seed(splits):
    train, test = splits
    for qtype, answers in shapes.QUESTION_TYPES.items():
        counts = [sum(q[1] == qtype and q[3] == a for q in test.questions) for a in answers]
        assert len(set(counts)) == 1 and counts[0] > 0, (qtype, counts)
    other = make_split(1, "test", SIZE)
    assert not torch.equal(other.pixels, test.pixels)  # a fresh test set per seed
    assert torch.equal(make_split(0, "test", SIZE).pixels, test.pixels)  # and the same one on a rerun
    baseline = blind_baseline(train.questions, test.questions)
    for qtype, answers in shapes.QUESTION_TYPES.items():  # balanced: an image-blind guess is near chance
        assert abs(baseline[qtype] - 100 / len(answers)) < 15, (qtype, baseline[qtype])


def _pixel_features(split):
    """A fixed encoder that carries colour and place linearly: each palette colour's share of every 8x8 cell."""
    masks = torch.stack([(split.pixels == torch.tensor(rgb).view(1, 3, 1, 1)).all(1).float()
                         for rgb in shapes.COLORS.values()], dim=1)  # [N, 4 colours, H, W]
    return torch.nn.functional.adaptive_avg_pool2d(masks, 8).flatten(1).double().numpy()


def test_probe_sees_a_planted_fact_when_the_images_show_it_and_not_when_removed(splits):
    train, test = splits
    present = probe_accuracies(_pixel_features(train), train.questions, _pixel_features(test), test.questions)
    blank_train, blank_test = make_split(0, "train", SIZE, blank=True), make_split(0, "test", SIZE, blank=True)
    assert blank_test.questions == test.questions  # the same questions about the same scenes, nothing drawn
    removed = probe_accuracies(_pixel_features(blank_train), train.questions, _pixel_features(blank_test),
                               test.questions)
    baseline = blind_baseline(train.questions, test.questions)
    for qtype in ("count_colour", "quadrant"):  # what colour and place alone tell
        assert present[qtype] > baseline[qtype] + 12, (qtype, present[qtype], baseline[qtype])
    for qtype, answers in shapes.QUESTION_TYPES.items():  # nothing to read: the image-blind guess, about chance
        assert abs(removed[qtype] - baseline[qtype]) < 6, (qtype, removed[qtype], baseline[qtype])
        assert abs(removed[qtype] - 100 / len(answers)) < 15, (qtype, removed[qtype])


def test_the_controls_pooled_embedding_loses_the_position_that_all_tokens_carry(splits):
    from lavis_xformer.experiment.design import ARMS
    from lavis_xformer.experiment.models import PooledClip, model_config
    from lavis_xformer.models.builders import build_clip_vit

    train, test = splits
    vit = build_clip_vit(model_config(ARMS[0], SIZE)).float().eval()  # the random frozen stand-in of the config
    pooled = PooledClip(vit, "mean")
    with torch.no_grad():
        def features(module, split):
            return module(split.images(32)).flatten(1).double().numpy()

        every = probe_accuracies(features(vit, train), train.questions, features(vit, test), test.questions)
        one = probe_accuracies(features(pooled, train), train.questions, features(pooled, test), test.questions)
    assert every["quadrant"] > one["quadrant"] + 10, (every, one)
