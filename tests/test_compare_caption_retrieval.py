"""``compare`` on captioning and retrieval (``analysis.caption_retrieval``): two tiny stage-1 models on a few shapes
images give the captioning rows (CIDEr with its paired interval over images, BLEU-4, METEOR, SPICE or why it was
skipped) and the retrieval rows (R@1/5/10 both ways with intervals over queries), equal to what LAVIS's own scoring
gives for the cached outputs; a second call reads everything from the cache and evaluates no model.

METEOR is marked unavailable here (it starts a Java server that loads a paraphrase table: ~10 s a call), which also
exercises a skipped metric's row; its value is pycocoevalcap's (tests/test_paired_scores.py scores it)."""

import json

import pytest
from lavis.common.registry import registry
from lavis.tasks.retrieval import RetrievalTask

from lavis_xformer.analysis import caption_retrieval, compare, paired_scores
from lavis_xformer import tasks
from lavis_xformer.analysis.caption_retrieval import CaptionProtocol, RetrievalProtocol

MODELS = ("blip2=blip2_baseline:tiny", "xformer=xformer:tiny")  # stage-1 types: the supplement's Table 5
BENCHMARKS = ("shapes_caption", "shapes_retrieval")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """One comparison, then the same again (which must come from the cache); the number of model evaluations."""
    root = tmp_path_factory.mktemp("shapes")
    shapes = [f"shapes.root={root}", "shapes.num_train=0", "shapes.num_val=0", "shapes.num_test=6"]
    settings = compare.ComparisonSettings(
        out_dir=tmp_path_factory.mktemp("compare"),
        caption_protocol=CaptionProtocol(num_beams=1, max_len=5, min_len=1),
        retrieval_protocol=RetrievalProtocol(k_test=2),
        limit=3,
        num_workers=0,
        overrides={name: shapes for name in BENCHMARKS},
        bootstrap_resamples=200,
        query_diversity=False,
    )
    specs = compare.parse_model_specs(MODELS)
    calls = []
    real_predict = compare.predict

    def counting_predict(model, vis_processor, prepared, *args, **kwargs):
        calls.append(prepared.benchmark.name)
        return real_predict(model, vis_processor, prepared, *args, **kwargs)

    matrices = []  # what each model's compute_sim_matrix returned, in model order
    real_ranks = paired_scores.retrieval_ranks

    def recording_ranks(*args):
        matrices.append(args)
        return real_ranks(*args)

    real_unavailable = tasks.unavailable_caption_metrics

    def without_meteor():
        return {**real_unavailable(), "METEOR": "not run in this test"}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks, "unavailable_caption_metrics", without_meteor)
        patch.setattr(compare, "predict", counting_predict)
        patch.setattr(paired_scores, "retrieval_ranks", recording_ranks)
        first = compare.run_comparison(specs, BENCHMARKS, settings)
        evaluations_first = list(calls)
        second = compare.run_comparison(specs, BENCHMARKS, settings)
    return settings, specs, first, second, evaluations_first, calls[len(evaluations_first):], matrices


def test_caption_rows_with_a_cider_interval(comparison, monkeypatch):
    settings, specs, first, _, _, _, matrices = comparison
    caption = first.report["benchmarks"]["shapes_caption"]
    assert caption["kind"] == "caption" and caption["num_images"] == 3
    for label in ("blip2", "xformer"):
        assert {"CIDEr", "Bleu_4", "ROUGE_L"} <= set(caption["metrics"][label])
    assert caption["unavailable"]["METEOR"] == "not run in this test"
    stat = caption["statistics"]["xformer"]
    assert stat["metric"] == "CIDEr" and stat["ci_low"] <= stat["mean_difference"] <= stat["ci_high"]
    assert stat["mean_difference"] == pytest.approx(caption["delta"]["xformer"]["CIDEr"], abs=0.01)
    # the corpus scores are pycocoevalcap's on the cached captions, against the dataset's references
    prepared = caption_retrieval.prepare(compare.BENCHMARKS["shapes_caption"], settings.caption_protocol,
                                         settings.overrides["shapes_caption"], settings.limit, settings.seed)
    cached = json.loads(compare.cache_path(settings.out_dir, specs[1], "shapes_caption").read_text())["predictions"]
    real_unavailable = tasks.unavailable_caption_metrics
    monkeypatch.setattr(tasks, "unavailable_caption_metrics", lambda: {**real_unavailable(), "METEOR": "not run"})
    expected, _, _ = tasks.caption_metrics(prepared.references, {p["image_id"]: p["prediction"] for p in cached}, ())
    assert caption["metrics"]["xformer"]["CIDEr"] == pytest.approx(100 * expected["CIDEr"])
    assert caption["metrics"]["xformer"]["Bleu_4"] == pytest.approx(100 * expected["Bleu_4"])
    table = (settings.out_dir / "comparison.md").read_text()
    assert "## Captioning" in table and "| Shapes captions | test | 3 | CIDEr |" in table
    assert "| Shapes captions | test | 3 | METEOR | skipped | skipped |" in table
    assert "METEOR: skipped, not run in this test." in table


def test_retrieval_rows_equal_lavis_recalls(comparison, tmp_path, monkeypatch):
    settings, specs, first, _, _, _, matrices = comparison
    ret = first.report["benchmarks"]["shapes_retrieval"]
    assert ret["kind"] == "retrieval" and ret["num_images"] == 3 and ret["num_texts"] == 9  # 3 captions per image
    for label in ("blip2", "xformer"):
        assert set(ret["recall"][label]) == set(caption_retrieval.RETRIEVAL_METRICS)
    for metric, stat in ret["statistics"]["xformer"].items():
        assert stat["ci_low"] <= ret["delta"]["xformer"][metric] + 1e-9 and ret["delta"]["xformer"][metric] <= stat["ci_high"] + 1e-9
    # the model's own score matrices through LAVIS's RetrievalTask._report_metrics give the same recalls
    assert len(matrices) == 2
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))  # LAVIS appends evaluate.txt
    for label, (scores_i2t, scores_t2i, txt2img, img2txt) in zip(("blip2", "xformer"), matrices):
        assert scores_i2t.shape == (3, 9) and scores_t2i.shape == (9, 3)
        lavis = RetrievalTask._report_metrics(scores_i2t, scores_t2i, txt2img, img2txt)
        for metric in caption_retrieval.RETRIEVAL_METRICS:
            assert ret["recall"][label][metric] == pytest.approx(lavis[metric]), (label, metric)
    table = (settings.out_dir / "comparison.md").read_text()
    assert "## Retrieval" in table and "| Shapes retrieval | test | 9 | text→image R@1 |" in table
    assert (settings.out_dir / "accuracy.png").is_file()
    rows = (settings.out_dir / "per_question" / "shapes_retrieval.jsonl").read_text().splitlines()
    assert len(rows) == 3 + 9


def test_second_call_resumes_from_the_cache(comparison):
    _, _, first, second, evaluations_first, evaluations_second, _ = comparison
    assert sorted(evaluations_first) == sorted(BENCHMARKS * 2)  # each model once on each benchmark
    assert sorted(first.computed) == sorted(f"{m.split('=')[0]}/{b}" for m in MODELS for b in BENCHMARKS)
    assert evaluations_second == [] and second.computed == []
    assert second.report["benchmarks"] == first.report["benchmarks"]
