"""The head-to-head comparison (``python -m lavis_xformer.analysis.compare``), its statistics and the query-diversity analysis.

* two tiny models on the embedded shapes data: both rows, delta = difference of the rows, statistics equal to a
  direct computation from the per-question file, cache reuse on rerun;
* scripted "oracle" models (right on a known share of questions) make the statistics non-trivial and let a run be
  interrupted and resumed;
* a known prediction file scores exactly as LAVIS's own VQA (official accuracy) and GQA evaluators score it.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lavis.common.registry import registry
from lavis.models import load_model
from lavis.models.base_model import BaseModel
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
from PIL import Image

from lavis_xformer.analysis import compare, figures, query_diversity, stats, vqa_scoring
from lavis_xformer.common import atomic
from lavis_xformer.paths import model_config_path

REPO = Path(__file__).resolve().parents[1]
TINY_PAIR = ("blip2_baseline_opt:tiny", "xformer_opt:tiny")


# ---------------------------------------------------------------------------------------------------------------
# Data and scripted models
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shapes_overrides(tmp_path_factory):
    """Dataset-config overrides for a small shapes set (16 test images, 48 questions) in a private folder."""
    root = tmp_path_factory.mktemp("shapes")
    return [f"shapes.root={root}", "shapes.num_train=0", "shapes.num_val=0", "shapes.num_test=16"]


def cli_options(overrides):
    return ["--options", *(f"shapes.{o}" for o in overrides)]


NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six"}


class Oracle(BaseModel):
    """Answers from the ground truth on a fixed share of questions (spelled as a model might: "Two.", "Yes"),
    and "purple" on the others. ``knows`` decides which; the subclasses differ there."""

    truth = {}  # question_id -> ground-truth answer; set by the tests
    calls = []  # (model, predict_answers keyword arguments) for every batch
    fail_for = {}  # model class name -> question ids whose batch raises (an interrupted run)

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    @classmethod
    def from_config(cls, cfg):
        return cls()

    def knows(self, question_id: int) -> bool:
        raise NotImplementedError

    def predict_answers(self, samples, **kwargs):
        Oracle.calls.append((type(self).__name__, {k: v for k, v in kwargs.items() if k != "answer_list"}))
        answers = []
        for question_id in samples["question_id"].tolist():
            if question_id in Oracle.fail_for.get(type(self).__name__, ()):
                raise RuntimeError("interrupted")
            truth = Oracle.truth[question_id]
            answers.append(NUMBER_WORDS.get(truth, truth).capitalize() + "." if self.knows(question_id) else "purple")
        return answers


@registry.register_model("compare_test_oracle_good")
class GoodOracle(Oracle):
    PRETRAINED_MODEL_CONFIG_DICT = {"scripted": model_config_path("xformer/xformer_tiny.yaml")}

    def knows(self, question_id):
        return (question_id * 2654435761) % 97 < 78  # about 80%


@registry.register_model("compare_test_oracle_poor")
class PoorOracle(Oracle):
    PRETRAINED_MODEL_CONFIG_DICT = {"scripted": model_config_path("xformer/xformer_tiny.yaml")}

    def knows(self, question_id):
        return (question_id * 40503 + 17) % 89 < 45  # about 50%, independently of GoodOracle


ORACLES = [
    compare.ModelSpec("poor", "compare_test_oracle_poor", "scripted"),
    compare.ModelSpec("good", "compare_test_oracle_good", "scripted"),
]


def ground_truth(prepared):
    return {a["question_id"]: a["answer"][0] for a in prepared.dataset.annotation}


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def direct_statistics(rows, reference, other, num_resamples, seed):
    """The table's statistics recomputed from a per-question file, step by step."""
    from scipy.stats import binomtest

    a = np.array([row["models"][reference]["score"] for row in rows])
    b = np.array([row["models"][other]["score"] for row in rows])
    only_a = sum(1 for x, y in zip(a, b) if x >= 0.5 and y < 0.5)
    only_b = sum(1 for x, y in zip(a, b) if x < 0.5 and y >= 0.5)
    p_value = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(num_resamples):
        idx = rng.integers(0, len(a), size=len(a))
        differences.append(100.0 * (b[idx].mean() - a[idx].mean()))
    low, high = np.percentile(differences, [2.5, 97.5])
    return {
        "accuracy_a": 100 * a.mean(),
        "accuracy_b": 100 * b.mean(),
        "only_a": only_a,
        "only_b": only_b,
        "p_value": p_value,
        "ci_low": low,
        "ci_high": high,
    }


def check_statistics(report, rows, num_resamples, seed=0):
    labels = [m["label"] for m in report["models"]]
    reference, other = labels
    b = (
        report["benchmarks"]["shapes"]
        if "shapes" in report["benchmarks"]
        else next(iter(report["benchmarks"].values()))
    )
    stat = b["statistics"][other]
    direct = direct_statistics(rows, reference, other, num_resamples, seed)
    assert b["delta"][other] == pytest.approx(b["accuracy"][other] - b["accuracy"][reference], abs=1e-9)
    assert b["accuracy"][reference] == pytest.approx(direct["accuracy_a"], abs=0.01)
    assert b["accuracy"][other] == pytest.approx(direct["accuracy_b"], abs=0.01)
    assert (stat["mcnemar"]["only_a_correct"], stat["mcnemar"]["only_b_correct"]) == (
        direct["only_a"],
        direct["only_b"],
    )
    assert stat["mcnemar"]["p_value"] == pytest.approx(direct["p_value"], rel=1e-9)
    assert (stat["ci_low"], stat["ci_high"]) == pytest.approx((direct["ci_low"], direct["ci_high"]), abs=1e-9)
    return stat


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------
def test_two_tiny_models_on_shapes(tmp_path, shapes_overrides):
    out = tmp_path / "comparison"
    argv = [
        "--models",
        *TINY_PAIR,
        "--benchmarks",
        "shapes",
        "--limit",
        "12",
        "--out",
        str(out),
        "--batch-size",
        "12",
        "--num-workers",
        "0",
        "--num-beams",
        "2",
        "--max-len",
        "4",
        "--diversity-images",
        "6",
        "--bootstrap-resamples",
        "300",
        "--device",
        "cpu",
        *cli_options(shapes_overrides),
    ]
    result = compare.main(argv)
    assert sorted(result.computed) == sorted(f"{m}/{n}" for m in TINY_PAIR for n in ("shapes", "query_diversity"))

    report = json.loads((out / "comparison.json").read_text())
    shapes = report["benchmarks"]["shapes"]
    assert set(shapes["accuracy"]) == set(TINY_PAIR) and shapes["num_questions"] == 12
    assert set(shapes["per_answer_type"][TINY_PAIR[0]]) == {"number", "yes/no"}
    assert report["settings"]["protocol"]["num_beams"] == 2 and report["settings"]["protocol"]["length_penalty"] == 0.0

    rows = read_rows(out / "per_question" / "shapes.jsonl")
    assert len(rows) == 12 and all(set(row["models"]) == set(TINY_PAIR) for row in rows)
    check_statistics(report, rows, 300)
    # Both models answered the same questions, and the cache holds each one's predictions for exactly those.
    for label in TINY_PAIR:
        cached = json.loads(compare.cache_path(out, compare.parse_model_specs([label])[0], "shapes").read_text())
        assert [p["question_id"] for p in cached["predictions"]] == [row["question_id"] for row in rows]

    markdown = (out / "comparison.md").read_text()
    assert all(label in markdown for label in TINY_PAIR) and "Shapes VQA · yes/no" in markdown
    diversity = json.loads((out / "query_diversity.json").read_text())
    assert [m["label"] for m in diversity["models"]] == list(TINY_PAIR)
    assert all(np.array(m["mean_similarity"]).shape == (8, 8) and m["num_images"] == 6 for m in diversity["models"])
    for png in ("accuracy.png", "query_diversity.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 100

    # A rerun finds every benchmark cached: nothing is computed, the report is the same.
    again = compare.main(argv)
    assert again.computed == []
    assert json.loads((out / "comparison.json").read_text()) == report


def test_oracles_resume_after_an_interruption(tmp_path, shapes_overrides):
    settings = compare.ComparisonSettings(
        out_dir=tmp_path / "out",
        num_workers=0,
        batch_size=16,
        overrides={"shapes": shapes_overrides},
        bootstrap_resamples=400,
        query_diversity=False,
    )
    prepared = compare.prepare_benchmark(compare.BENCHMARKS["shapes"], settings.protocol, shapes_overrides)
    Oracle.truth = ground_truth(prepared)
    Oracle.calls.clear()
    # The poor model's last batch fails: the run stops after the good model's benchmark was finished and cached.
    Oracle.fail_for = {"PoorOracle": {max(Oracle.truth)}}
    with pytest.raises(RuntimeError, match="interrupted"):
        compare.run_comparison(ORACLES[::-1], ["shapes"], settings)
    assert compare.cache_path(settings.out_dir, ORACLES[1], "shapes").is_file()
    assert not compare.cache_path(settings.out_dir, ORACLES[0], "shapes").exists()

    Oracle.fail_for = {}
    Oracle.calls.clear()
    result = compare.run_comparison(ORACLES[::-1], ["shapes"], settings)
    assert result.computed == ["poor/shapes"]  # resumed where it stopped
    assert {name for name, _ in Oracle.calls} == {"PoorOracle"}

    # The same predictions with "poor" as the reference, and every model had the same protocol.
    Oracle.calls.clear()
    result = compare.run_comparison(ORACLES, ["shapes"], settings)
    assert result.computed == []
    report = result.report
    shapes = report["benchmarks"]["shapes"]
    rows = read_rows(settings.out_dir / "per_question" / "shapes.jsonl")
    assert len(rows) == 48
    stat = check_statistics(report, rows, 400)
    assert (
        stat["mcnemar"]["only_a_correct"] > 0 and stat["mcnemar"]["only_b_correct"] > stat["mcnemar"]["only_a_correct"]
    )
    assert stat["ci_low"] < shapes["delta"]["good"] < stat["ci_high"]
    # Spelled-out numbers and "Yes." count as right: VQAEval normalises every model's answers alike.
    known = [row for row in rows if GoodOracle().knows(row["question_id"])]
    assert known and all(row["models"]["good"]["score"] == 1.0 for row in known)
    assert shapes["accuracy"]["good"] == pytest.approx(100.0 * len(known) / len(rows), abs=0.01)

    # Changing the protocol invalidates the cache of every model.
    changed = compare.ComparisonSettings(**{**settings.__dict__, "protocol": compare.Protocol(prompt="Q: {} A:")})
    Oracle.calls.clear()
    result = compare.run_comparison(ORACLES, ["shapes"], changed)
    assert sorted(result.computed) == ["good/shapes", "poor/shapes"]
    protocols = {json.dumps(kwargs, sort_keys=True) for _, kwargs in Oracle.calls}
    assert len(protocols) == 1
    (protocol,) = [kwargs for _, kwargs in Oracle.calls[:1]]
    assert (protocol["prompt"], protocol["num_beams"], protocol["length_penalty"]) == ("Q: {} A:", 5, 0.0)


def write_coco_instances(folder):
    """Six images with a few COCO objects each (and the images themselves)."""
    scenes = {1: {1: 2, 2: 1}, 2: {3: 4}, 3: {1: 1, 3: 2, 4: 1}, 4: {2: 3}, 5: {4: 2, 1: 5}, 6: {3: 1}}
    names = {1: "person", 2: "dog", 3: "wine glass", 4: "knife"}
    annotations = []
    for image_id, objects in scenes.items():
        Image.new("RGB", (8, 8)).save(folder / f"{image_id}.jpg")
        for category, count in objects.items():
            annotations += [
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "iscrowd": 0}
            ] * count
    path = folder / "instances_val2014.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": f"{i}.jpg"} for i in scenes],
                "annotations": annotations,
                "categories": [{"id": i, "name": n} for i, n in names.items()],
            }
        )
    )
    return path


def test_oc_and_mci_through_the_comparison(tmp_path):
    coco = write_coco_instances(tmp_path)
    source = [
        f"finegrained.annotations={coco}",
        f"finegrained.images={tmp_path}",
        f"finegrained.root={tmp_path / 'derived'}",
        "finegrained.questions_per_image=2",
    ]
    settings = compare.ComparisonSettings(
        out_dir=tmp_path / "out",
        num_workers=0,
        query_diversity=False,
        overrides={"oc_coco": source, "mci_coco": source},
        bootstrap_resamples=100,
    )
    Oracle.truth, Oracle.fail_for = {}, {}
    for name in ("oc_coco", "mci_coco"):
        prepared = compare.prepare_benchmark(compare.BENCHMARKS[name], settings.protocol, source)
        Oracle.truth.update(ground_truth(prepared))  # OC and MCI share question ids: each run reads its own
        Oracle.calls.clear()
        report = compare.run_comparison(ORACLES, [name], settings).report
        benchmark = report["benchmarks"][name]
        rows = read_rows(settings.out_dir / "per_question" / f"{name}.jsonl")
        assert benchmark["task"] == "xformer_finegrained" and benchmark["num_questions"] == len(rows) > 0
        expected_type = {"oc_coco": "number", "mci_coco": "yes/no"}[name]
        assert set(benchmark["per_answer_type"]["good"]) == {expected_type}
        # "Two." and "Yes." are right for every model: the same normalisation for all.
        for row in rows:
            for label, spec_cls in (("good", GoodOracle), ("poor", PoorOracle)):
                assert row["models"][label]["score"] == (1.0 if spec_cls().knows(row["question_id"]) else 0.0)
        check_statistics(report, rows, 100)
        assert {kwargs["prompt"] for _, kwargs in Oracle.calls} == {"Question: {} Short answer:"}
        assert f"| {benchmark['title']} | test |" in (settings.out_dir / "comparison.md").read_text()


def test_known_prediction_file_scores_as_the_official_vqa_evaluator(tmp_path, shapes_overrides, monkeypatch):
    prepared = compare.prepare_benchmark(compare.BENCHMARKS["shapes"], compare.Protocol(), shapes_overrides)
    truth = ground_truth(prepared)
    spellings = {"yes": ["yes", "Yes.", "yes!"], "no": ["no", "No", "nope"]}
    predictions = []
    for i, (qid, answer) in enumerate(sorted(truth.items())):
        if answer in spellings:
            prediction = spellings[answer][i % 3]
        else:
            prediction = [answer, NUMBER_WORDS[answer], "the " + answer, str(int(answer) + 1)][i % 4]
        predictions.append({"question_id": qid, "prediction": prediction})
    ours = vqa_scoring.score_vqa(prepared, predictions, tmp_path / "scoring", "known")

    # LAVIS's VQATask._report_metrics on the same file (LAVIS's result format) with the same official files.
    result_file = tmp_path / "known_vqa_result.json"
    result_file.write_text(
        json.dumps([{"question_id": p["question_id"], "answer": p["prediction"]} for p in predictions])
    )
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    official = prepared.task._report_metrics(result_file=str(result_file), split="test")
    assert ours.accuracy == official["agg_metrics"]
    assert ours.per_answer_type == {t: official[t] for t in ("number", "yes/no")}
    assert 0 < ours.accuracy < 100  # "nope" and the off-by-one counts are wrong

    # With --limit, the same evaluator on the sampled questions: the mean of their full-set scores.
    sampled = compare.prepare_benchmark(
        compare.BENCHMARKS["shapes"], compare.Protocol(), shapes_overrides, limit=20, seed=3
    )
    subset = vqa_scoring.score_vqa(
        sampled,
        [p for p in predictions if p["question_id"] in set(sampled.question_ids)],
        tmp_path / "scoring_subset",
        "known",
    )
    expected = 100.0 * np.mean([ours.per_question[q] for q in sampled.question_ids])
    assert subset.accuracy == pytest.approx(expected, abs=0.005)


def test_gqa_is_scored_as_lavis_gqa_task(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "n1.jpg")
    questions = [
        {"image": "n1.jpg", "question": q, "question_id": i, "answer": a}
        for i, (q, a) in enumerate(
            [
                ("Is it red?", "yes"),
                ("What is it?", "the table"),
                ("How many?", "2"),
                ("Which side?", "left"),
                ("Color?", "white"),
            ]
        )
    ]
    annotation = tmp_path / "testdev_balanced_questions.json"
    annotation.write_text(json.dumps(questions))
    prepared = compare.prepare_benchmark(
        compare.BENCHMARKS["gqa"],
        compare.Protocol(),
        [f"build_info.annotations.val.storage=[{annotation}]", f"build_info.images.storage={images}"],
    )
    predictions = [
        {"question_id": i, "prediction": p} for i, p in enumerate(["Yes.", "the table", "two", "right", "white"])
    ]
    ours = vqa_scoring.score_gqa(prepared, predictions)
    result_file = tmp_path / "gqa_result.json"
    result_file.write_text(
        json.dumps(
            [
                {
                    "question_id": p["question_id"],
                    "pred_ans": p["prediction"],
                    "gt_ans": questions[p["question_id"]]["answer"],
                }
                for p in predictions
            ]
        )
    )
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    official = prepared.task._report_metrics(result_file=str(result_file), split="val")
    assert ours.accuracy == pytest.approx(official["agg_metrics"])
    # LAVIS normalises the prediction only ("the table" loses its article, the ground truth keeps it).
    assert [ours.per_question[i] for i in range(5)] == [1.0, 0.0, 1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
def test_mcnemar_matches_scipy_binomial_test():
    from scipy.stats import binomtest

    for k, n in [(0, 1), (3, 10), (5, 10), (0, 25), (40, 100), (130, 300), (4000, 9000)]:
        assert stats.binomial_two_sided_p(k, n) == pytest.approx(binomtest(k, n, 0.5).pvalue, rel=1e-9)
    assert stats.binomial_two_sided_p(0, 0) == 1.0
    a = [True, True, False, False, True, False]
    b = [True, False, True, True, True, True]
    result = stats.mcnemar_exact(a, b)
    assert (result.only_a_correct, result.only_b_correct) == (1, 3)
    assert result.p_value == pytest.approx(binomtest(1, 4, 0.5).pvalue)


def test_bootstrap_interval():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.5).astype(float)
    b = (rng.random(300) < 0.6).astype(float)
    low, high = stats.paired_bootstrap_ci(a, b, num_resamples=2000, seed=7)
    assert low < 100 * (b - a).mean() < high
    assert (low, high) == stats.paired_bootstrap_ci(a, b, num_resamples=2000, seed=7)  # seeded
    # Chunked draws equal one draw per resample.
    loop_rng = np.random.default_rng(7)
    looped = [100 * (b - a)[loop_rng.integers(0, 300, size=300)].mean() for _ in range(2000)]
    assert np.allclose(stats.bootstrap_differences(a, b, 2000, seed=7), looped)
    assert stats.paired_bootstrap_ci(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="equal length"):
        stats.compare_paired([1.0, 0.0], [1.0])


def test_t_interval_over_seeds_and_paired_t_test():
    # known values: mean 2, sd 1, n 3 -> half width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    mean, low, high = stats.mean_t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.302652729749464 / 3 ** 0.5)
    assert mean - low == pytest.approx(high - mean)
    assert stats.mean_t_interval([5.0]) == (5.0, None, None)  # one seed: no spread, no interval
    assert stats.mean_t_interval([1.0, 2.0, 3.0], confidence=0.5)[2] < high
    with pytest.raises(ValueError, match="non-empty"):
        stats.mean_t_interval([])
    from scipy.stats import ttest_rel

    a, b = [10.0, 12.0, 11.0, 13.0], [11.0, 15.0, 11.5, 16.0]
    assert stats.paired_t_p_value(a, b) == pytest.approx(ttest_rel(b, a).pvalue)
    assert stats.paired_t_p_value(a, a) == 1.0 and stats.paired_t_p_value(a, [x + 1 for x in a]) == 0.0
    assert stats.paired_t_p_value([1.0], [2.0]) is None


# ---------------------------------------------------------------------------------------------------------------
# Command line pieces
# ---------------------------------------------------------------------------------------------------------------
def test_model_specs_benchmarks_and_options():
    specs = compare.parse_model_specs(["blip2_opt:pretrain_opt2.7b", "ours=xformer_opt:tiny"], ["ours=/w/x.pth"])
    assert [(s.label, s.arch, s.model_type, s.checkpoint) for s in specs] == [
        ("blip2_opt:pretrain_opt2.7b", "blip2_opt", "pretrain_opt2.7b", None),
        ("ours", "xformer_opt", "tiny", "/w/x.pth"),
    ]
    assert specs[0].load_arch() == "blip2_baseline_opt"  # LAVIS's weights, with zero-shot VQA generation
    assert specs[1].slug == "ours"
    with pytest.raises(ValueError, match="arch:model_type"):
        compare.parse_model_specs(["xformer_opt"])
    with pytest.raises(ValueError, match="twice"):
        compare.parse_model_specs(["xformer_opt:tiny", "xformer_opt:tiny"])
    with pytest.raises(ValueError, match="LABEL=PATH"):
        compare.parse_model_specs(["xformer_opt:tiny"], ["other=/x.pth"])
    with pytest.raises(ValueError, match="not registered"):
        compare.parse_model_specs(["no_such_model:tiny"])
    assert [b.name for b in compare.expand_benchmarks(["vqav2", "oc", "mci", "oc_coco"])] == [
        "vqav2",
        "oc_coco",
        "oc_vcr",
        "mci_coco",
        "mci_vcr",
    ]
    with pytest.raises(ValueError, match="unknown benchmark"):
        compare.expand_benchmarks(["vqa3"])
    assert compare.split_overrides(["vqav2.build_info.images.storage=/d", "shapes.shapes.seed=1"]) == {
        "vqav2": ["build_info.images.storage=/d"],
        "shapes": ["shapes.seed=1"],
    }
    with pytest.raises(ValueError, match="BENCHMARK.key=value"):
        compare.split_overrides(["images=/d"])


def test_missing_data_is_reported_or_skipped(tmp_path, shapes_overrides):
    with pytest.raises(FileNotFoundError, match="--options vqav2"):
        compare.prepare_benchmark(
            compare.BENCHMARKS["vqav2"], compare.Protocol(), [f"build_info.images.storage={tmp_path}/nowhere"]
        )
    settings = compare.ComparisonSettings(
        out_dir=tmp_path,
        overrides={"shapes": shapes_overrides, "okvqa": [f"build_info.images.storage={tmp_path}/nowhere"]},
        skip_missing=True,
        query_diversity=False,
        num_workers=0,
        batch_size=16,
        bootstrap_resamples=50,
    )
    prepared = compare.prepare_benchmark(compare.BENCHMARKS["shapes"], settings.protocol, shapes_overrides)
    Oracle.truth, Oracle.fail_for = ground_truth(prepared), {}
    result = compare.run_comparison(ORACLES, ["okvqa", "shapes"], settings)
    assert list(result.skipped) == ["okvqa"] and list(result.report["benchmarks"]) == ["shapes"]


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "cache" / "entry.json"
    atomic.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["entry.json"]


# ---------------------------------------------------------------------------------------------------------------
# Query diversity
# ---------------------------------------------------------------------------------------------------------------
def test_diversity_figure():
    identical = torch.ones(2, 4, 3)
    orthogonal = torch.eye(4).expand(2, 4, 4)
    assert query_diversity.diversity(
        query_diversity.cosine_similarity_matrices(identical).mean(0).numpy()
    ) == pytest.approx(0.0, abs=1e-6)
    assert query_diversity.diversity(
        query_diversity.cosine_similarity_matrices(orthogonal).mean(0).numpy()
    ) == pytest.approx(1.0)


def test_output_queries_are_each_models_query_outputs(tmp_path, process_group):
    torch.manual_seed(0)
    image = torch.randn(2, 3, 32, 32)
    blip2 = load_model("blip2_baseline", "tiny", is_eval=True)
    expected = Blip2Qformer.extract_features(blip2, {"image": image}, mode="image").image_embeds
    assert torch.allclose(query_diversity.output_queries(blip2, image), expected, atol=1e-6)
    xformer = load_model("xformer", "tiny", is_eval=True)
    assert torch.allclose(query_diversity.output_queries(xformer, image), xformer.encode_image(image), atol=1e-6)

    result = query_diversity.measure(xformer, [image, image], "xformer")
    assert result.num_images == 4 and result.mean_similarity.shape == (8, 8)
    single = query_diversity.cosine_similarity_matrices(xformer.encode_image(image)).mean(0).double().numpy()
    assert np.allclose(result.mean_similarity, single, atol=1e-6)
    path = figures.heatmap_png([result, query_diversity.measure(blip2, [image], "blip2")], tmp_path / "q.png")
    with Image.open(path) as png:
        assert png.size[0] > png.size[1] > 100
    svg = path.with_suffix(".svg").read_text()  # every figure is also written as SVG
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg


# ---------------------------------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------------------------------
def test_torchrun_shards_and_gathers_like_one_process(tmp_path, shapes_overrides):
    """Two gloo ranks on the CPU share the questions; rank 0's predictions equal a one-process run's."""
    common = [
        "--models",
        *TINY_PAIR,
        "--benchmarks",
        "shapes",
        "--limit",
        "10",
        "--batch-size",
        "5",
        "--num-workers",
        "0",
        "--num-beams",
        "1",
        "--max-len",
        "3",
        "--diversity-images",
        "4",
        "--bootstrap-resamples",
        "50",
        "--device",
        "cpu",
        *cli_options(shapes_overrides),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lavis_xformer.analysis.compare",
        *common,
        "--out",
        str(tmp_path / "torchrun"),
    ]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    compare.main([*common, "--out", str(tmp_path / "single")])
    for label in TINY_PAIR:
        spec = compare.parse_model_specs([label])[0]
        for name in ("shapes", "query_diversity"):
            distributed = json.loads(compare.cache_path(tmp_path / "torchrun", spec, name).read_text())
            single = json.loads(compare.cache_path(tmp_path / "single", spec, name).read_text())
            if name == "shapes":
                assert distributed["predictions"] == single["predictions"]
                assert len(single["predictions"]) == 10
            else:
                assert distributed["result"]["num_images"] == single["result"]["num_images"] == 4
                assert np.allclose(
                    distributed["result"]["mean_similarity"], single["result"]["mean_similarity"], atol=1e-5
                )


def test_checkpoint_weights_are_loaded(tmp_path):
    """--checkpoint LABEL=PATH: the model is built, then the file's weights replace the built ones."""
    torch.manual_seed(123)
    source = load_model("xformer_opt", "tiny")
    path = tmp_path / "stage2.pth"
    torch.save({"model": source.state_dict()}, path)
    (spec,) = compare.parse_model_specs(["ours=xformer_opt:tiny"], [f"ours={path}"])
    model, _ = compare.load_model(spec, "cpu", seed=0)
    for (name, loaded), expected in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(loaded, expected), name
    assert spec.identity()["checkpoint"]["size"] == path.stat().st_size  # part of every cache fingerprint
    assert spec.identity()["checkpoint"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
