"""Bad data through LAVIS's own CaptionDataset, wrapped by RobustDataset: convertible samples are converted,
unusable ones skipped with a warning and counted, and the limit stops the run with a clear error."""

import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lavis.datasets.datasets.caption_datasets import CaptionDataset
from lavis.processors.blip_processors import BlipCaptionProcessor
from PIL import Image

from lavis_xformer.datasets.robust import BadSampleLimitExceeded, RobustDataset
from lavis_xformer.processors import XFormerImageEvalProcessor, XFormerImageTrainProcessor

GOOD_KINDS = ["rgb", "grayscale", "cmyk_jpeg", "rgba", "uint16", "palette", "overlong_caption"]
BAD_KINDS = ["missing", "truncated", "undecodable", "zero_bytes", "giant", "empty_caption", "non_utf8_caption"]


def write_dataset(root, kinds, copies=1):
    rng = np.random.default_rng(0)
    annotations = []
    for copy in range(copies):
        for kind in kinds:
            name = f"{kind}_{copy}.png"
            path = root / name
            caption = "a red circle"
            rgb = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
            if kind in ("rgb", "overlong_caption", "empty_caption", "non_utf8_caption"):
                rgb.save(path)
            elif kind == "grayscale":
                rgb.convert("L").save(path)
            elif kind == "cmyk_jpeg":
                name = f"{kind}_{copy}.jpg"
                rgb.convert("CMYK").save(root / name)
            elif kind == "rgba":
                rgb.convert("RGBA").save(path)
            elif kind == "uint16":
                Image.fromarray((rng.integers(0, 65535, (24, 24))).astype(np.uint16)).save(path)
            elif kind == "palette":
                rgb.convert("P").save(path)
            elif kind == "truncated":
                rgb.save(path)
                path.write_bytes(path.read_bytes()[:60])
            elif kind == "undecodable":
                path.write_bytes(b"this is not an image" * 10)
            elif kind == "zero_bytes":
                path.write_bytes(b"")
            elif kind == "giant":
                Image.new("L", (400, 400)).save(path)  # over the lowered decompression-bomb limit in the test
            if kind == "overlong_caption":
                caption = " ".join(["circle"] * 5000)
            elif kind == "empty_caption":
                caption = "   "
            elif kind == "non_utf8_caption":
                caption = "a red \udc80 circle"  # a lone surrogate: what a mis-decoded byte becomes
            annotations.append({"image": name, "caption": caption, "image_id": f"{kind}_{copy}"})
    ann_path = root / "annotations.json"
    ann_path.write_text(json.dumps(annotations))
    return CaptionDataset(XFormerImageTrainProcessor(image_size=32), BlipCaptionProcessor(max_words=30), str(root), [str(ann_path)])


@pytest.fixture
def small_bomb_limit(monkeypatch):
    # A "giant" image: PIL refuses anything over twice MAX_IMAGE_PIXELS as a decompression bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 400 // 3)


def test_every_bad_kind_is_skipped_and_counted_and_good_ones_converted(tmp_path, caplog, small_bomb_limit):
    dataset = RobustDataset(write_dataset(tmp_path, GOOD_KINDS + BAD_KINDS), max_bad_fraction=0.9, min_samples_before_limit=1)
    with caplog.at_level(logging.WARNING, logger="lavis_xformer.datasets.robust"):
        samples = [dataset[i] for i in range(len(GOOD_KINDS))]  # the good ones, each loads directly
        assert dataset.stats()["bad"] == 0
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=dataset.collater, num_workers=0)
        batches = list(loader)
    assert all(s["image"].shape == (3, 32, 32) for s in samples)
    assert len(samples[GOOD_KINDS.index("overlong_caption")]["text_input"].split()) == 30
    # every batch full: bad samples were replaced, not dropped
    assert [b["image"].shape[0] for b in batches] == [4, 4, 4, 2]
    stats = dataset.stats()
    assert stats["bad"] >= len(BAD_KINDS)  # each bad sample seen at least once (replacements may retry it)
    warned = " ".join(r.message for r in caplog.records)
    for kind in BAD_KINDS:
        assert f"{kind}_0" in warned, f"no warning names the {kind} sample"
    for reason in ("FileNotFoundError", "truncated", "is empty", "not valid UTF-8", "DecompressionBombError", "UnidentifiedImageError"):
        assert reason in warned


def test_worker_processes_add_to_the_shared_counts(tmp_path, small_bomb_limit):
    dataset = RobustDataset(write_dataset(tmp_path, GOOD_KINDS + BAD_KINDS), max_bad_fraction=0.9, min_samples_before_limit=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=7, collate_fn=dataset.collater, num_workers=2)
    assert sum(b["image"].shape[0] for b in loader) == len(dataset)
    assert dataset.stats()["bad"] >= len(BAD_KINDS) and dataset.stats()["attempted"] > len(dataset)
    dataset.start_epoch()
    assert dataset.stats()["bad"] == 0 and dataset.stats()["bad_total"] >= len(BAD_KINDS)


def test_bad_fraction_over_the_limit_stops_with_a_clear_error(tmp_path, small_bomb_limit):
    dataset = RobustDataset(write_dataset(tmp_path, GOOD_KINDS + BAD_KINDS), max_bad_fraction=0.01, min_samples_before_limit=5)
    with pytest.raises(BadSampleLimitExceeded, match=r"samples this epoch were unusable .*> max_bad_fraction 1.0%"):
        for i in range(len(dataset)):
            dataset[i]


def test_a_dataset_with_no_usable_sample_says_so(tmp_path):
    dataset = RobustDataset(write_dataset(tmp_path, ["missing", "undecodable"]), max_bad_fraction=0.99, min_samples_before_limit=1000)
    with pytest.raises(BadSampleLimitExceeded, match="no usable sample in the whole dataset"):
        dataset[0]


# ------------------------------------------------------------------------------------------------------------------
# Property-based: processors and captions never crash other than with the documented errors
# ------------------------------------------------------------------------------------------------------------------
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "F", "I;16"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), width=st.integers(1, 64), height=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_processors_accept_any_image_mode_and_size(mode, width, height, seed):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (height, width)).astype(np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)
    for processor in (XFormerImageTrainProcessor(image_size=16), XFormerImageEvalProcessor(image_size=16)):
        out = processor(image)
        assert out.shape == (3, 16, 16) and torch.isfinite(out).all()


@settings(max_examples=200, deadline=None)
@given(caption=st.text(max_size=300))
def test_any_caption_is_either_usable_or_a_documented_value_error(caption):
    from lavis_xformer.datasets.robust import check_sample

    processed = BlipCaptionProcessor(max_words=30)(caption)
    try:
        check_sample({"text_input": processed})
    except ValueError as err:
        assert "text_input is empty" in str(err) or "not valid UTF-8" in str(err)
    else:
        assert processed.strip() and len(processed.split()) <= 30
