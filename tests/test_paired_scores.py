"""Per-item captioning and retrieval scores (``analysis.paired_scores``): their means are LAVIS's / pycocoevalcap's
reported metrics, and the paired interval brackets the observed difference."""

import numpy as np
import pytest
from lavis.common.registry import registry
from lavis.tasks.retrieval import RetrievalTask

from lavis_xformer.analysis import paired_scores
from lavis_xformer.tasks import caption_scores


def test_retrieval_hits_average_to_lavis_recalls(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))  # LAVIS appends evaluate.txt
    rng = np.random.default_rng(0)
    images, texts = 12, 36
    img2txt = {i: [3 * i, 3 * i + 1, 3 * i + 2] for i in range(images)}
    txt2img = {t: t // 3 for t in range(texts)}
    scores_i2t = rng.normal(size=(images, texts)) + 1.5 * np.eye(images).repeat(3, axis=1)
    scores_t2i = scores_i2t.T + rng.normal(scale=0.5, size=(texts, images))
    lavis = RetrievalTask._report_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
    hits = paired_scores.retrieval_hits(scores_i2t, scores_t2i, txt2img, img2txt)
    for name in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert 100.0 * hits[name].mean() == pytest.approx(lavis[name]), name
    assert hits["txt_r1"].shape == (images,) and hits["img_r1"].shape == (texts,)


def test_per_image_cider_averages_to_the_corpus_cider():
    references = {1: ["two red circles", "a picture of two red circles"], 2: ["a blue square", "an image showing a blue square"],
                  3: ["a green triangle and a red circle", "a picture of a green triangle and a red circle"]}
    captions = {1: "two red circles", 2: "a red square", 3: "a green triangle"}
    corpus, per_image = paired_scores.cider_per_image(references, captions)
    assert corpus == pytest.approx(caption_scores(references, captions)["CIDEr"])
    assert corpus == pytest.approx(np.mean(list(per_image.values())))
    assert per_image[1] > per_image[2]


def test_paired_interval_brackets_the_difference():
    rng = np.random.default_rng(1)
    a = rng.random(200)
    b = a + 0.05 + rng.normal(scale=0.05, size=200)
    delta, low, high = paired_scores.paired_interval(a, b, num_resamples=2000)
    assert low < delta < high and delta == pytest.approx(100 * (b.mean() - a.mean())) and low > 0
