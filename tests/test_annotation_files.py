"""Annotation files of the wrong shape are refused when the dataset is built, naming the file, the entry index and
the field (they died with ~145-line tracebacks naming no file); an empty answer list is a bad sample, counted like
the others."""

import json

import pytest
from lavis.datasets.datasets.caption_datasets import CaptionDataset
from lavis.datasets.datasets.retrieval_datasets import RetrievalEvalDataset

import lavis_xformer  # noqa: F401  (applies compat: the checked BaseDataset.__init__)
from lavis_xformer.compat import AnnotationFileError
from lavis_xformer.datasets.robust import RobustDataset

CASES = {
    "top_level_object": ({"annotations": [{"image": "a.png", "image_id": 1, "caption": "x"}]},
                         r"the top level is a JSON dict, expected a list"),
    "list_of_strings": (["a.png", "b.png"], r"entry 0 is a JSON str"),
    "entry_without_image_id": ([{"image": "a.png", "image_id": 1, "caption": "x"}, {"image": "b.png", "caption": "y"}],
                               r"entry 1 has no 'image_id' field"),
    "list_as_image_id": ([{"image": "a.png", "image_id": [1, 2], "caption": "x"}],
                         r"entry 0: 'image_id' is a JSON list .* must be a string or an integer"),
    "number_as_image_path": ([{"image": 7, "image_id": 1, "caption": "x"}], r"entry 0: 'image' is a JSON int"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_wrongly_shaped_file_is_named_with_entry_and_field(tmp_path, case):
    content, message = CASES[case]
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(content))
    with pytest.raises(AnnotationFileError, match=message) as err:
        CaptionDataset(None, None, str(tmp_path), [str(path)])
    assert str(path) in str(err.value)


def test_deep_nesting_is_named_not_a_recursion_traceback(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(AnnotationFileError, match=r"deep.json is nested too deeply"):
        CaptionDataset(None, None, str(tmp_path), [str(path)])


def test_fields_a_class_reads_at_build_time_are_required(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": ["x"]}, {"image": "b.png"}]))
    with pytest.raises(AnnotationFileError, match=r"eval.json, entry 1 has no 'caption' field"):
        RetrievalEvalDataset(None, lambda text: text, str(tmp_path), [str(path)])


def test_a_good_file_builds_as_lavis_builds_it(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps([{"image": "a.png", "image_id": "x1", "caption": "a dog"},
                                {"image": "b.png", "image_id": 2, "caption": "a cat"}]))
    dataset = CaptionDataset(None, None, str(tmp_path), [str(path)])
    assert [a["instance_id"] for a in dataset.annotation] == ["0", "1"] and dataset.img_ids == {"x1": 0, 2: 1}


class _VQA(list):
    """Samples as LAVIS's VQA datasets return them: ``answers`` and ``weights``."""

    def __getitem__(self, index):
        answers = list.__getitem__(self, index)
        return {"text_input": "what is it?", "answers": answers, "weights": [1.0] * len(answers)}


def test_an_empty_answer_list_is_a_bad_sample_counted_and_replaced():
    dataset = RobustDataset(_VQA([["dog"], [], ["cat"]]), max_bad_fraction=0.9)
    dataset.start_epoch()
    assert dataset[1]["answers"] == ["cat"]  # replaced by the next usable sample
    assert dataset.stats()["bad"] == 1
