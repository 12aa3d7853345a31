"""An empty or whitespace-only question is not answered (it was: ``'�����'``, the LLM continuing the prompt alone):
the annotation entries holding one are named (file and entry index) when the dataset is built, and are bad samples,
replaced and counted like the others; a direct model call with one raises one ``ValueError``."""

import json
import logging

import pytest
import torch
from lavis.datasets.datasets.base_dataset import BaseDataset
from lavis.processors.blip_processors import BlipQuestionProcessor

import lavis_xformer  # noqa: F401  (applies compat: the checked BaseDataset.__init__)
from lavis_xformer.datasets.robust import RobustDataset
from test_stage2 import images, tiny


class _QuestionsOnly(BaseDataset):
    """A VQA dataset without images: LAVIS's sample fields for a question and its answers."""

    def __getitem__(self, index):
        entry = self.annotation[index]
        return {"text_input": self.text_processor(entry["question"]), "answers": entry["answer"], "weights": [1.0]}


def test_empty_questions_are_named_at_build_and_counted_as_bad_samples(tmp_path, caplog):
    path = tmp_path / "vqa_train.json"
    questions = ["what colour is it?", "", "how many?", "   \t", "where?"]
    path.write_text(json.dumps([{"question": q, "answer": ["x"], "image": "a.png"} for q in questions]))
    with caplog.at_level(logging.WARNING):
        dataset = _QuestionsOnly(None, BlipQuestionProcessor(), str(tmp_path), [str(path)])
    built = [r.getMessage() for r in caplog.records if "empty 'question'" in r.getMessage()]
    assert len(built) == 1 and str(path) in built[0] and "2 entries" in built[0] and "(entry 1, 3)" in built[0]

    robust = RobustDataset(dataset, max_bad_fraction=0.9)
    robust.start_epoch()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = [robust[index]["text_input"] for index in range(len(questions))]
    assert loaded == ["what colour is it?", "how many?", "how many?", "where?", "where?"]  # replaced by the next
    assert robust.stats()["bad"] == 2
    assert sum("'question' is empty" in r.getMessage() for r in caplog.records) == 2


@pytest.fixture(scope="module")
def opt_model():
    torch.manual_seed(0)
    return tiny("xformer_opt").eval()


@pytest.mark.parametrize("question", ["", "  ", "\n"])
def test_a_model_refuses_an_empty_question(opt_model, question):
    with pytest.raises(ValueError, match=r"empty questions \(batch items \[1\]\)"):
        opt_model.predict_answers({"image": images(2), "text_input": ["what?", question]}, max_len=3)
