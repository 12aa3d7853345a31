"""Image processors: registered with the paper's defaults, the supplement's augmentation, every image mode to 8-bit RGB."""


import numpy as np
import pytest
import torch
from lavis.common.registry import registry
from lavis.models import load_model_and_preprocess
from omegaconf import OmegaConf
from PIL import Image

from lavis_xformer.processors import XFormerImageEvalProcessor, XFormerImageTrainProcessor, to_rgb


CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)


def test_processors_are_registered_with_paper_defaults():
    train = registry.get_processor_class("xformer_image_train").from_config(OmegaConf.create({}))
    evaluate = registry.get_processor_class("xformer_image_eval").from_config(OmegaConf.create({}))
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    assert train(image).shape == evaluate(image).shape == (3, 224, 224)
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    # CLIP normalisation: pure red maps to (1 - mean) / std in channel 0.
    expected = (torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1) - CLIP_MEAN) / CLIP_STD
    torch.testing.assert_close(evaluate(image)[:, :1, :1], expected, rtol=1e-4, atol=1e-4)


def test_train_processor_flips_horizontally_half_the_time():
    processor = XFormerImageTrainProcessor(image_size=8, min_scale=1.0, max_scale=1.0)
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, :4] = 255  # white left half
    image = Image.fromarray(array)
    torch.manual_seed(0)
    flips = 0
    for _ in range(200):
        out = processor(image)
        flips += int(out[0, 4, 0] < out[0, 4, 7])
    assert 60 < flips < 140


def test_hflip_false_never_flips_and_keeps_the_crop_and_normalisation():
    """Supplement Table 5 "w/o HFlip": ``hflip: False`` in the processor config."""
    config = OmegaConf.create({"image_size": 8, "min_scale": 1.0, "max_scale": 1.0, "hflip": False})
    processor = registry.get_processor_class("xformer_image_train").from_config(config)
    assert [type(t).__name__ for t in processor.transform.transforms] == ["RandomResizedCrop", "ToTensor", "Normalize"]
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, :4] = 255  # white left half
    image = Image.fromarray(array)
    torch.manual_seed(0)
    outputs = [processor(image) for _ in range(100)]
    assert all(out[0, 4, 0] > out[0, 4, 7] for out in outputs)  # never flipped
    torch.testing.assert_close(outputs[0], XFormerImageEvalProcessor(image_size=8)(image), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="hflip must be True or False"):
        XFormerImageTrainProcessor.from_config(OmegaConf.create({"hflip": "no"}))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_image_mode_becomes_8bit_rgb(mode):
    if mode == "I;16":
        image = Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16))
        assert image.mode == "I;16"
    else:
        image = Image.new("RGB", (8, 8), (10, 200, 30)).convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    assert XFormerImageEvalProcessor(image_size=16)(image).shape == (3, 16, 16)
    if mode == "I;16":  # 16-bit data is rescaled by the format's range (0..65535), not clipped to white
        values = np.asarray(rgb)[..., 0]
        expected = np.round(np.arange(64).reshape(8, 8) * 1000 * 255 / 65535).astype(np.uint8)
        assert np.array_equal(values, expected) and len(np.unique(values)) > 32
    if mode in ("I", "F"):  # 8-bit data in a wide mode keeps its values
        assert abs(int(np.asarray(rgb).max()) - int(np.asarray(image.convert("L")).max())) <= 1  # (PIL truncates)


def test_alpha_is_composited_on_white_and_bad_images_are_refused():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(transparent)).min() == 255
    with pytest.raises(ValueError, match="zero size"):
        to_rgb(Image.new("RGB", (0, 4)))
    with pytest.raises(ValueError, match="expected a PIL image"):
        to_rgb(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="custom mean/std are not supported"):
        XFormerImageTrainProcessor.from_config(OmegaConf.create({"mean": [0.5, 0.5, 0.5]}))


def test_load_model_and_preprocess_offline():
    model, vis_processors, txt_processors = load_model_and_preprocess("xformer", "tiny", is_eval=True)
    image = vis_processors["eval"](Image.new("RGB", (50, 40), (0, 0, 255))).unsqueeze(0)
    assert image.shape == (1, 3, 32, 32)
    assert txt_processors["eval"]("A Red   Circle!") == "a red circle"
    assert model.encode_image(image).shape == (1, 8, 32)
