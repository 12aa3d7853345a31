"""Bad inputs fail with one clear error: malformed annotations, over-long questions, integer or non-finite images,
bad files counted once, the bad-sample limit on small datasets."""

import tempfile

import pytest
import torch
from lavis.datasets.datasets.caption_datasets import CaptionDataset

from lavis_xformer.compat import AnnotationFileError
from lavis_xformer.datasets.robust import BadSampleLimitExceeded, RobustDataset
from lavis_xformer.models.builders import build_bert_tokenizer, no_hub
from test_robust_data import write_dataset
from test_stage2 import images, tiny


@pytest.fixture(scope="module")
def opt_model():
    torch.manual_seed(0)
    return tiny("xformer_opt").eval()


# =================================================================================================================
# Inputs
# =================================================================================================================
def test_malformed_annotation_file_is_named(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text("[]")
    bad.write_text('[{"image": "a.png", "caption": "x"},\n{"image": ')
    with pytest.raises(AnnotationFileError, match=rf"annotation file {bad} is not valid JSON \(line 2"):
        CaptionDataset(None, None, str(tmp_path), [str(good), str(bad)])


def test_overlong_question_is_truncated_not_an_index_error(opt_model):
    positions = opt_model.opt_model.config.max_position_embeddings
    question = " ".join(["what"] * (positions + 50))
    answers = opt_model.predict_answers({"image": images(1), "text_input": [question]}, max_len=3)
    assert len(answers) == 1 and isinstance(answers[0], str)
    captions = opt_model.generate({"image": images(1), "prompt": [question]}, max_length=3)
    assert len(captions) == 1


@pytest.mark.parametrize("arch", ["xformer_opt", "xformer"])
def test_integer_and_non_finite_images_are_refused(opt_model, arch):
    model = opt_model if arch == "xformer_opt" else tiny("xformer").eval()
    uint8 = (images(2) * 50 + 100).clamp(0, 255).to(torch.uint8)
    nan = images(2)
    nan[1, 0, 0, 0] = float("nan")
    inf = images(2)
    inf[0, 1, 2, 3] = float("inf")
    call = (lambda image: model.predict_answers({"image": image, "text_input": ["what?", "how?"]})) \
        if arch == "xformer_opt" else (lambda image: model({"image": image, "text_input": ["a", "b"]}))
    with pytest.raises(ValueError, match="dtype torch.uint8; the models take float images"):
        call(uint8)
    with pytest.raises(ValueError, match=r"NaN or inf values \(batch items \[1\]\)"):
        call(nan)
    with pytest.raises(ValueError, match=r"NaN or inf values \(batch items \[0\]\)"):
        call(inf)


def test_offline_paper_scale_tokenizer_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with no_hub():
        tokenizer = build_bert_tokenizer("bert-base-uncased")
    assert len(tokenizer) == 30522 + 1  # bert-base-uncased's size and the [DEC] token
    assert list(tmp_path.iterdir()) == []


def test_each_bad_file_counts_once_per_epoch(tmp_path):
    """8 bad files, 4 of them adjacent (each retried as its bad neighbour's replacement): 8 bad per epoch, not 18."""
    kinds = ["rgb", "missing", "missing", "missing", "missing", "rgb", "missing", "rgb", "missing", "rgb",
             "missing", "rgb", "missing", "rgb"]
    dataset = RobustDataset(write_dataset(tmp_path, kinds), max_bad_fraction=0.99, min_samples_before_limit=1)
    for epoch in range(2):
        dataset.start_epoch()
        for index in range(len(dataset)):
            dataset[index]
        assert dataset.stats()["bad"] == 8
    assert dataset.stats()["bad_total"] == 16


def test_absolute_bad_sample_limit_works_on_a_small_dataset(tmp_path):
    kinds = ["rgb"] * 6 + ["missing", "rgb", "missing", "rgb"]
    dataset = RobustDataset(write_dataset(tmp_path, kinds), max_bad_fraction=0.5, max_bad_samples=1)
    with pytest.raises(BadSampleLimitExceeded, match=r"2 of \d+ samples this epoch were unusable \(> max_bad_samples 1\)"):
        for index in range(len(dataset)):
            dataset[index]


def test_image_value_check_tells_finite_values_overflowing_the_sum_from_nan_and_inf():
    from lavis_xformer.models.inputs import check_image_values

    huge = torch.full((2, 3, 4, 4), 3.0e38)  # finite, but its sum is inf
    assert not torch.isfinite(huge.sum())
    assert check_image_values(huge) is huge
    huge[1, 2, 3, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"NaN or inf values \(batch items \[1\]\)"):
        check_image_values(huge)
