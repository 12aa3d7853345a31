"""Scoring a benchmark's predictions as LAVIS's tasks do, keeping the per-question scores the paired tests need.

    score(prepared, predictions [{"question_id", "prediction"}], workdir, label) -> BenchmarkScores

VQA-style benchmarks go through the official ``VQA`` / ``VQAEval`` of ``lavis.common.vqa_tools`` (what
``VQATask._report_metrics`` runs), on the official files restricted to the evaluated questions; GQA follows
``GQATask._report_metrics`` (VQAEval's normalisation of the prediction, then exact match).
"""

import contextlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from lavis.common.vqa_tools.vqa import VQA
from lavis.common.vqa_tools.vqa_eval import VQAEval

from lavis_xformer.analysis.vqa_benchmarks import PreparedBenchmark
from lavis_xformer.common.atomic import atomic_write_json

@dataclass
class BenchmarkScores:
    accuracy: float  #: percent, as the evaluator reports it
    per_answer_type: Dict[str, float]  #: percent per answer type (VQA-style benchmarks)
    per_question: Dict[int, float]  #: question_id -> score in [0, 1]
    ground_truth: Dict[int, List[str]] = field(default_factory=dict)
    answer_types: Dict[int, str] = field(default_factory=dict)


def official_files_for(prepared: PreparedBenchmark, workdir: Path):
    """The official question/annotation files, restricted to the evaluated questions when they are a subset
    (VQA.loadRes insists that a result file answers every question of the files)."""
    if not prepared.question_file or not prepared.annotation_file:
        raise ValueError(
            f"{prepared.benchmark.name}: the dataset has no official VQA question/annotation files to score with"
        )
    questions = json.loads(Path(prepared.question_file).read_text())
    wanted = set(prepared.question_ids)
    if {q["question_id"] for q in questions["questions"]} == wanted:
        return prepared.question_file, prepared.annotation_file
    annotations = json.loads(Path(prepared.annotation_file).read_text())
    questions["questions"] = [q for q in questions["questions"] if q["question_id"] in wanted]
    annotations["annotations"] = [a for a in annotations["annotations"] if a["question_id"] in wanted]
    if len(annotations["annotations"]) != len(wanted):
        raise ValueError(f"{prepared.benchmark.name}: the official files lack some evaluated questions")
    question_file = atomic_write_json(workdir / "questions.json", questions)
    annotation_file = atomic_write_json(workdir / "annotations.json", annotations)
    return str(question_file), str(annotation_file)


def score_vqa(prepared: PreparedBenchmark, predictions: List[dict], workdir: Path, label: str) -> BenchmarkScores:
    """LAVIS's official VQA evaluation (what ``VQATask._report_metrics`` runs), keeping the per-question scores."""
    question_file, annotation_file = official_files_for(prepared, workdir)
    result_file = atomic_write_json(
        workdir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}_vqa_result.json",
        [{"question_id": p["question_id"], "answer": p["prediction"]} for p in predictions],
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the evaluator prints progress bars
        vqa = VQA(annotation_file, question_file)
        ground_truth = {qid: [a["answer"] for a in vqa.qa[qid]["answers"]] for qid in prepared.question_ids}
        answer_types = {qid: vqa.qa[qid]["answer_type"] for qid in prepared.question_ids}
        result = vqa.loadRes(resFile=str(result_file), quesFile=question_file)
        evaluator = VQAEval(vqa, result, n=2)
        evaluator.evaluate()
    return BenchmarkScores(
        accuracy=evaluator.accuracy["overall"],
        per_answer_type=dict(sorted(evaluator.accuracy["perAnswerType"].items())),
        per_question={qid: evaluator.evalQA[qid] / 100.0 for qid in prepared.question_ids},
        ground_truth=ground_truth,
        answer_types=answer_types,
    )


def score_gqa(prepared: PreparedBenchmark, predictions: List[dict]) -> BenchmarkScores:
    """LAVIS's ``GQATask._report_metrics`` rule per question: normalise the generated answer with VQAEval's
    punctuation and digit/article processing, then exact match with the ground truth."""
    normalizer = VQAEval()
    truth = {
        int(prepared.dataset.annotation[i]["question_id"]): prepared.dataset.annotation[i]["answer"]
        for i in prepared.indices
    }
    per_question = {}
    for p in predictions:
        answer = p["prediction"]
        if prepared.task.inference_method == "generate":
            answer = normalizer.processDigitArticle(normalizer.processPunctuation(answer))
        per_question[p["question_id"]] = 1.0 if answer == truth[p["question_id"]] else 0.0
    accuracy = round(100.0 * sum(per_question.values()) / len(per_question), 2)
    return BenchmarkScores(accuracy, {}, per_question, {qid: [a] for qid, a in truth.items()})


def score(prepared: PreparedBenchmark, predictions: List[dict], workdir: Path, label: str) -> BenchmarkScores:
    if prepared.scoring == "gqa":
        return score_gqa(prepared, predictions)
    return score_vqa(prepared, predictions, workdir, label)
