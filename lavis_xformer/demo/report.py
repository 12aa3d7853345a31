"""The demo's report: parameter counts, the side-by-side table (printed and Markdown) read from LAVIS's output
folders, example answers, and the figures (loss curves, MAE reconstructions; drawn by ``analysis.figures``)."""

import json
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional

from lavis_xformer.analysis import stats
from lavis_xformer.demo.pipeline import (
    ANSWER_TYPE_OF,
    MODELS,
    STAGES,
    TRAINED,
    Console,
    DemoError,
    DemoSettings,
    RunResult,
    data_folder,
    epoch_stats,
    eval_metrics,
    last_checkpoint,
    model_section,
)
from lavis_xformer.common.meta import build_on_meta, count_parameters
from lavis_xformer.demo.views import (  # noqa: F401  (re-exported: the report's public names before the split)
    training_curve,
    loss_curves,
    unpatchify,
    reconstruct,
    load_test_images,
    trained_stage1_model,
    query_diversity_by_seed,
    registry_processor,
    make_reconstruction_grid,
)

# The table: (key, label, format). Formats: "params", "loss", "recall", "acc", "score" (4 decimals).
METRICS = (
    ("params_stage1_trainable", "params, stage 1 trainable", "params"),
    ("params_stage1_total", "params, stage 1 total", "params"),
    ("stage1_loss", "stage 1 final loss (sum of the terms)", "loss"),
    ("stage1_loss_itc", "  ITC", "loss"),
    ("stage1_loss_itm", "  ITM", "loss"),
    ("stage1_loss_lm", "  ITG", "loss"),
    ("stage1_loss_rec", "  reconstruction", "loss"),
    ("stage1_loss_rec_first", "  reconstruction, first epoch", "loss"),
    ("txt_r1", "retrieval image->text R@1", "recall"),
    ("txt_r5", "retrieval image->text R@5", "recall"),
    ("txt_r10", "retrieval image->text R@10", "recall"),
    ("img_r1", "retrieval text->image R@1", "recall"),
    ("img_r5", "retrieval text->image R@5", "recall"),
    ("img_r10", "retrieval text->image R@10", "recall"),
    ("query_diversity", "query diversity, image vs text queries", "score"),
    ("params_stage2_trainable", "params, stage 2 trainable", "params"),
    ("params_stage2_total", "params, stage 2 total", "params"),
    ("stage2_loss_lm", "stage 2 final LM loss", "loss"),
    ("vqa_overall", "zero-shot VQA, overall", "acc"),
    ("vqa_counting", "zero-shot VQA, counting", "acc"),
    ("vqa_identification", "zero-shot VQA, identification", "acc"),
    ("vqa_ft_loss", "VQA fine-tuning final answer loss", "loss"),
    ("vqa_ft_overall", "fine-tuned VQA accuracy, overall", "acc"),
    ("vqa_ft_counting", "fine-tuned VQA accuracy, counting", "acc"),
    ("vqa_ft_identification", "fine-tuned VQA accuracy, identification", "acc"),
)
NOT_APPLICABLE = {("blip2", "stage1_loss_rec"), ("blip2", "stage1_loss_rec_first")}  # BLIP-2 has no MAE
NO_DELTA = {"stage1_loss"}  # X-Former's sum has one term more: compare the terms
TABLE_GROUPS = (
    ("Stage 1 (pre-training)", ("params_stage1_trainable", "params_stage1_total", "stage1_loss", "stage1_loss_itc",
                                "stage1_loss_itm", "stage1_loss_lm", "stage1_loss_rec", "stage1_loss_rec_first")),
    ("Zero-shot retrieval (shapes test split)", ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")),
    ("Query diversity (supplement section 6; stage 1, shapes test split)", ("query_diversity",)),
    ("Stage 2 and zero-shot VQA (shapes test split)", ("params_stage2_trainable",
                                                                       "params_stage2_total", "stage2_loss_lm",
                                                                       "vqa_overall", "vqa_counting",
                                                                       "vqa_identification")),
    ("VQA fine-tuned with the answers (shapes test split)", ("vqa_ft_loss", "vqa_ft_overall", "vqa_ft_counting",
                                                             "vqa_ft_identification")),
)
# The headline: (row key, label, which VQA run and which answer type it scores, or None for retrieval).
HEADLINE = (
    ("vqa_ft_overall", "VQA fine-tuned, overall", ("vqa_ft", None)),
    ("vqa_ft_counting", "VQA fine-tuned, counting", ("vqa_ft", "number")),
    ("vqa_ft_identification", "VQA fine-tuned, identification", ("vqa_ft", "yes/no")),
    ("txt_r1", "retrieval image->text R@1", None),
    ("img_r1", "retrieval text->image R@1", None),
    ("vqa_overall", "zero-shot VQA, overall", ("vqa", None)),
)
SIGNIFICANCE = 0.05
STANDINS_NOTE = (
    "The frozen encoders are stand-ins for the paper's hub weights, pretrained once by the demo on the shapes "
    "training split and frozen in every run of every seed (demo/standins.py): the CLIP-ViT (CLIP's contrastive "
    "objective; the same file for both models), the MAE (X-Former; MAE's objective) and the OPT (both models; a "
    "text LM that learnt to read a caption placed where the visual prefix goes). Zero-shot VQA asks the stage-2 "
    "prefix, trained to make the OPT caption the image, to make it answer; the headline is VQA after fine-tuning "
    "with the answers. An image-blind model scores the baselines: the training split's majority answer per question "
    "type, and at most the best constant answer per type on the test split. The tables measure these tiny models, "
    "not the paper."
)
STATISTICS_NOTE = (
    "Means over seeds with Student's t 95% interval over the seeds (each seed retrains every trainable stage of "
    "both models). VQA rows: the paired test pools the per-question outcomes of all seeds (question x seed pairs, "
    "both models answering the same question after training with the same seed) and reports the percentile "
    "bootstrap 95% interval of the difference and McNemar's exact test (analysis/stats.py); pooling gives the "
    "test the power of every answer while the t interval over seeds shows the seed-to-seed spread. Retrieval rows: "
    "the paired t-test of the per-seed differences. Significant = p < 0.05."
)


# ================================================================================================================
# Parameters
# ================================================================================================================
def parameter_counts(settings: DemoSettings) -> Dict[str, Dict[str, int]]:
    counts = {}
    for model in MODELS:
        counts[model.key] = {}
        for stage in (STAGES[0], STAGES[2]):
            count = count_parameters(build_on_meta(**model_section(settings.lavis_config(stage, model, standins=False))))
            counts[model.key][f"params_{stage.key}_trainable"] = count.trainable
            counts[model.key][f"params_{stage.key}_total"] = count.total
    return counts


# ================================================================================================================
# The table
# ================================================================================================================
def collect_rows(results: Dict[str, Dict[str, RunResult]], counts) -> List[dict]:
    """One seed's row per model: every ``METRICS`` key, read from LAVIS's output folders."""
    rows = []
    for model in MODELS:
        runs = results[model.key]
        stage1_epochs = epoch_stats(runs["stage1"].job_dir)
        stage1, stage2 = stage1_epochs[-1], epoch_stats(runs["stage2"].job_dir)[-1]
        retrieval = eval_metrics(runs["retrieval"].job_dir)
        row = {"model": model.label, "key": model.key, **counts[model.key]}
        row["stage1_loss"] = stage1["train_loss"]
        for term in ("itc", "itm", "lm", "rec"):
            row[f"stage1_loss_{term}"] = stage1.get(f"train_loss_{term}")
        row["stage1_loss_rec_first"] = stage1_epochs[0].get("train_loss_rec")
        row.update({k: retrieval[k] for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")})
        row["stage2_loss_lm"] = stage2.get("train_loss_lm", stage2["train_loss"])
        row["vqa_ft_loss"] = epoch_stats(runs["vqa_ft"].job_dir)[-1]["train_loss"]
        for stage in ("vqa", "vqa_ft"):
            vqa = eval_metrics(runs[stage].job_dir)
            row[f"{stage}_overall"] = vqa["agg_metrics"]
            for key, answer_type in ANSWER_TYPE_OF.items():
                row[f"{stage}_{key[len('vqa_'):]}"] = vqa.get(answer_type)
        rows.append(row)
    return rows


def mean_rows(rows_by_seed: Dict[int, List[dict]]) -> List[dict]:
    """Each model's row averaged over the seeds (None stays None)."""
    means = []
    for index, model in enumerate(MODELS):
        seed_rows = [rows[index] for rows in rows_by_seed.values()]
        row = {"model": model.label, "key": model.key}
        for key, _, _ in METRICS:
            values = [r[key] for r in seed_rows]
            row[key] = None if any(v is None for v in values) else sum(values) / len(values)
        means.append(row)
    return means


# ================================================================================================================
# Per-question scores, baselines and the multi-seed comparison
# ================================================================================================================
def score_answers(folder: Path, answers: Dict[int, str], workdir: Path) -> Dict[int, dict]:
    """``{question_id: {"score": official VQA accuracy in [0, 1], "answer_type": ...}}`` for the test split's
    questions, by LAVIS's own ``VQA`` / ``VQAEval`` (what the VQA task's metrics are computed with)."""
    import contextlib
    import io

    from lavis.common.vqa_tools.vqa import VQA
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    from lavis_xformer.datasets import shapes

    question_file = shapes.annotation_path(folder, "vqa_test_questions")
    annotation_file = shapes.annotation_path(folder, "vqa_test_annotations")
    workdir.mkdir(parents=True, exist_ok=True)
    result_file = workdir / "answers.json"
    result_file.write_text(json.dumps([{"question_id": q, "answer": a} for q, a in answers.items()]))
    with contextlib.redirect_stdout(io.StringIO()):  # the evaluator prints progress
        vqa = VQA(str(annotation_file), str(question_file))
        evaluator = VQAEval(vqa, vqa.loadRes(resFile=str(result_file), quesFile=str(question_file)), n=2)
        evaluator.evaluate()
    return {q: {"score": evaluator.evalQA[q] / 100.0, "answer_type": vqa.qa[q]["answer_type"]} for q in answers}


def predicted_answers(job_dir: Path) -> Dict[int, str]:
    """The answers of a VQA run (LAVIS's ``result/*vqa_result.json``)."""
    files = sorted((Path(job_dir) / "result").glob("*vqa_result.json"))
    if not files:
        raise DemoError(f"no result/*vqa_result.json in {job_dir}: the VQA run wrote no answers")
    return {int(p["question_id"]): p["answer"] for p in json.loads(files[-1].read_text())}


def baselines(folder: Path, workdir: Path) -> dict:
    """What a model that ignores the image scores: the training split's most frequent answer per answer type
    (counting, identification) given to every test question of that type; the best constant answer per type
    chosen on the test split itself (an upper bound of any image-blind constant answer: a small test split's
    answer mix can differ from the training split's); and chance retrieval R@1."""
    from collections import Counter

    from lavis_xformer.datasets import shapes

    by_type: Dict[str, Counter] = {}
    for qa in shapes.read_annotation(folder, "vqa_train"):  # the train file has no answer types: yes/no or a number
        answer_type = "yes/no" if qa["answer"][0] in ("yes", "no") else "number"
        by_type.setdefault(answer_type, Counter())[qa["answer"][0]] += 1
    majority = {answer_type: counts.most_common(1)[0][0] for answer_type, counts in by_type.items()}
    test_types = {q["question_id"]: q["answer_type"]
                  for q in shapes.read_annotation(folder, "vqa_test_annotations")["annotations"]}
    scores = score_answers(folder, {q: majority[t] for q, t in test_types.items()}, workdir)
    accuracy = {"overall": 100 * sum(s["score"] for s in scores.values()) / len(scores)}
    for key, answer_type in ANSWER_TYPE_OF.items():
        typed = [s["score"] for s in scores.values() if s["answer_type"] == answer_type]
        accuracy[key[len("vqa_"):]] = 100 * sum(typed) / len(typed)
    test_answers: Dict[str, Counter] = {}
    for annotation in shapes.read_annotation(folder, "vqa_test_annotations")["annotations"]:
        test_answers.setdefault(annotation["answer_type"], Counter())[annotation["multiple_choice_answer"]] += 1
    best_constant = {t: counts.most_common(1)[0] for t, counts in test_answers.items()}
    best_accuracy = {"overall": 100 * sum(n for _, n in best_constant.values()) / len(scores)}
    for key, answer_type in ANSWER_TYPE_OF.items():
        best_accuracy[key[len("vqa_"):]] = 100 * best_constant[answer_type][1] / sum(test_answers[answer_type].values())
    num_images = len(shapes.read_annotation(folder, "scenes_test"))
    return {"majority_answer": majority, "majority_accuracy": accuracy,
            "best_constant_answer": {t: answer for t, (answer, _) in best_constant.items()},
            "best_constant_accuracy": best_accuracy, "chance_r1": 100.0 / num_images,
            "num_test_images": num_images, "num_test_questions": len(scores)}


def vqa_outcomes(results, folder: Path, workdir: Path) -> Dict[str, Dict[str, List[dict]]]:
    """Per-question scores of every VQA run: ``{stage: {model key: [per-seed {question_id: score record}]}}``."""
    outcomes = {}
    for stage in ("vqa", "vqa_ft"):
        outcomes[stage] = {}
        for model in MODELS:
            outcomes[stage][model.key] = [
                score_answers(folder, predicted_answers(runs[model.key][stage].job_dir),
                              workdir / f"seed{seed}" / model.key / stage)
                for seed, runs in results.items()
            ]
    return outcomes


def pooled_scores(per_seed: List[Dict[int, dict]], answer_type: Optional[str]) -> List[float]:
    """The scores of every (seed, question) in a fixed order, restricted to one answer type (None: all)."""
    return [seed_scores[q]["score"] for seed_scores in per_seed for q in sorted(seed_scores)
            if answer_type is None or seed_scores[q]["answer_type"] == answer_type]


def headline(rows_by_seed: Dict[int, List[dict]], outcomes, baseline: dict) -> List[dict]:
    """Each ``HEADLINE`` metric: per-model mean and t interval over seeds, the difference X-Former - BLIP-2 with
    its t interval over seeds, the paired test, the baseline it has to beat and one verdict sentence."""
    xformer, blip2 = (MODELS[0].key, MODELS[1].key)
    lines = []
    for key, label, vqa in HEADLINE:
        per_model = {m.key: [rows[i][key] for rows in rows_by_seed.values()] for i, m in enumerate(MODELS)}
        line = {"key": key, "label": label, "seeds": len(rows_by_seed)}
        for model in MODELS:
            mean, low, high = stats.mean_t_interval(per_model[model.key])
            line[model.key] = {"per_seed": per_model[model.key], "mean": mean, "t_low": low, "t_high": high}
        differences = [a - b for a, b in zip(per_model[xformer], per_model[blip2])]
        mean, low, high = stats.mean_t_interval(differences)
        line["difference"] = {"per_seed": differences, "mean": mean, "t_low": low, "t_high": high}
        if vqa is not None:
            stage, answer_type = vqa
            test = stats.compare_paired(pooled_scores(outcomes[stage][blip2], answer_type),
                                        pooled_scores(outcomes[stage][xformer], answer_type))
            line["test"] = {"name": "McNemar exact (pooled seeds x questions)", "p_value": test.mcnemar.p_value,
                            "bootstrap_low": test.ci_low, "bootstrap_high": test.ci_high,
                            "pairs": test.num_questions, "only_xformer_correct": test.mcnemar.only_b_correct,
                            "only_blip2_correct": test.mcnemar.only_a_correct}
            line["baseline"] = {"name": "majority answer", "value": baseline["majority_accuracy"][key.split("_")[-1]],
                                "best_constant": baseline["best_constant_accuracy"][key.split("_")[-1]]}
        else:
            line["test"] = {"name": "paired t-test over seeds",
                            "p_value": stats.paired_t_p_value(per_model[blip2], per_model[xformer])}
            line["baseline"] = {"name": "chance", "value": baseline["chance_r1"]}
        line["verdict"] = verdict(line)
        lines.append(line)
    return lines


def verdict(line: dict) -> str:
    """One sentence: the difference, its interval and whether the paired test finds it significant."""
    difference, test = line["difference"], line["test"]
    p = test["p_value"]
    if "bootstrap_low" in test:
        interval = f"bootstrap 95% CI [{test['bootstrap_low']:+.2f}, {test['bootstrap_high']:+.2f}]"
    elif difference["t_low"] is not None:
        interval = f"t 95% CI over seeds [{difference['t_low']:+.2f}, {difference['t_high']:+.2f}]"
    else:
        interval = "no interval from one seed"
    if p is None:
        finding = "untested (one seed)"
    elif p < SIGNIFICANCE:
        finding = f"significant at {SIGNIFICANCE} ({test['name']} p = {p:.3g})"
    else:
        finding = f"not significant at {SIGNIFICANCE} ({test['name']} p = {p:.3g})"
    beats = [m.label for m in MODELS if line[m.key]["mean"] > line["baseline"]["value"]]
    above = (f"{' and '.join(beats)} above" if beats else "neither model above") + \
        f" the {line['baseline']['name']} baseline ({line['baseline']['value']:.1f})"
    if "best_constant" in line["baseline"]:
        best = [m.label for m in MODELS if line[m.key]["mean"] > line["baseline"]["best_constant"]]
        above += (f", {' and '.join(best) if best else 'neither'} above the best constant answer on the test split "
                  f"({line['baseline']['best_constant']:.1f})")
    return (f"{line['label']}: X-Former - BLIP-2 = {difference['mean']:+.2f} ({interval}), {finding}; {above}.")


def baseline_cell(baseline: dict) -> str:
    """``43.8 majority answer / 52.6 best constant`` (VQA), ``1.6 chance`` (retrieval)."""
    cell = f"{baseline['value']:.1f} {baseline['name']}"
    return cell + (f" / {baseline['best_constant']:.1f} best constant" if "best_constant" in baseline else "")


def headline_table(lines: List[dict]) -> str:
    """Metrics down; each model's mean [t interval]; the difference; the paired test's p; the baseline."""
    def with_interval(entry):
        if entry["t_low"] is None:
            return f"{entry['mean']:.2f}"
        return f"{entry['mean']:.2f} [{entry['t_low']:.2f}, {entry['t_high']:.2f}]"

    header = ["metric (mean [t 95% CI], seeds)", *(m.label for m in MODELS), "Δ X-Former − BLIP-2", "p", "baseline"]
    body = []
    for line in lines:
        p = line["test"]["p_value"]
        body.append([line["label"], *(with_interval(line[m.key]) for m in MODELS),
                     with_interval(line["difference"]),
                     "—" if p is None else f"{p:.3g}",
                     baseline_cell(line["baseline"])])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    rendered = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                for r in [header] + body]
    rendered.insert(1, "-" * len(rendered[0]))
    return "\n".join(rendered)


def format_value(value, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "params":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}K"
    if kind == "loss":
        return f"{value:.3f}"
    if kind == "recall":
        return f"{value:.1f}"
    if kind == "score":
        return f"{value:.4f}"
    return f"{value:.2f}"


def format_delta(a, b, kind: str, key: str = "") -> str:
    if a is None or b is None or kind == "params" or key in NO_DELTA:
        return ""
    return {"loss": f"{a - b:+.3f}", "score": f"{a - b:+.4f}"}.get(kind, f"{a - b:+.2f}")


def text_table(rows: List[dict]) -> str:
    """Metrics down, models side by side, then X-Former - BLIP-2."""
    labels = [row["model"] for row in rows]
    header = ["metric", *labels, f"Δ {labels[0]} − {labels[1]}"]
    body = []
    for key, label, kind in METRICS:
        values = [row[key] for row in rows]
        body.append([label, *(format_value(v, kind) for v in values), format_delta(values[0], values[1], kind, key)])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    rows = report["rows"]  # the means over seeds
    labels = {key: label for key, label, _ in METRICS}
    kinds = {key: kind for key, _, kind in METRICS}
    parts = [
        "# X-Former vs BLIP-2 on the shapes data",
        "",
        f"`python -m lavis_xformer.demo{' --smoke' if report['settings']['smoke'] else ''}` "
        f"({report['settings']['device']}, seeds {report['settings']['seeds']}, "
        f"{report['timings']['total_seconds']:.0f}s). Both models are the `tiny` types, trained by LAVIS's runner "
        "on the same data with the same settings and seeds; stage 2 starts from each model's own stage-1 "
        "checkpoint, VQA fine-tuning from its stage-2 checkpoint. " + STANDINS_NOTE + " Losses are the last "
        "epoch's averages; retrieval is LAVIS's (R@K in %, ITC ranking re-scored by ITM on the top k); VQA is the "
        "official VQA accuracy with the paper's protocol (prompt \"Question: {} Short answer:\", 5 beams, length "
        "penalty 0), counting = the \"how many\" questions, identification = \"is there a ...\".",
        "",
        "## Headline: X-Former vs BLIP-2 over the seeds",
        "",
        STATISTICS_NOTE,
        "",
        "```",
        headline_table(report["headline"]),
        "```",
        "",
        *(f"* {line['verdict']}" for line in report["headline"]),
        "",
        f"Baselines: the majority answer per type of the training split "
        f"({', '.join(f'{t}: {a}' for t, a in sorted(report['baselines']['majority_answer'].items()))}) scores "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["baselines"]["majority_accuracy"].items())
        + "; the best constant answer per type chosen on the test split itself ("
        + ", ".join(f"{t}: {a}" for t, a in sorted(report["baselines"]["best_constant_answer"].items()))
        + ") scores " + ", ".join(f"{k} {v:.2f}" for k, v in report["baselines"]["best_constant_accuracy"].items())
        + f"; chance retrieval R@1 is {report['baselines']['chance_r1']:.2f} "
        f"({report['baselines']['num_test_images']} test images, {report['baselines']['num_test_questions']} "
        "questions).",
        "",
        f"The tables below are the means over the {len(report['settings']['seeds'])} seeds (every seed's values: "
        "`demo_results.json`, `seeds`).",
    ]
    for title, keys in TABLE_GROUPS:
        parts += ["", f"## {title}", "", "| model | " + " | ".join(labels[k].strip() for k in keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        for row in rows:
            parts.append(f"| {row['model']} | " + " | ".join(format_value(row[k], kinds[k]) for k in keys) + " |")
    examples = report.get("examples") or []
    if examples:
        parts += ["", "## Example answers (VQA, first test images)", "",
                  "| question | answer | " + " | ".join(r["model"] for r in rows) + " |",
                  "|---|---|" + "---|" * len(rows)]
        for example in examples:
            answers = " | ".join(f"`{example['predictions'].get(r['model'], '')}`" for r in rows)
            parts.append(f"| {example['question']} | {example['answer']} | {answers} |")
    parts += ["", "Figures: `loss_curves.png` (every seed), `reconstructions.png` (seed 0).", ""]
    return "\n".join(parts)


def vqa_examples(results, folder: Path, count: int = 6) -> List[dict]:
    """The first questions of the test split with each model's answer after fine-tuning (one seed's results)."""
    from lavis_xformer.datasets import shapes

    questions = {q["question_id"]: q for q in shapes.read_annotation(folder, "vqa_test")}
    predictions = {model.label: predicted_answers(results[model.key]["vqa_ft"].job_dir) for model in MODELS}
    shared = sorted(set.intersection(*(set(p) for p in predictions.values())))
    return [
        {
            "question_id": qid,
            "question": questions[qid]["question"],
            "answer": questions[qid]["answer"][0],
            "predictions": {label: answers[qid] for label, answers in predictions.items()},
        }
        for qid in shared[:count]
        if qid in questions
    ]

# ================================================================================================================
# The report
# ================================================================================================================
def write_report(settings: DemoSettings, results: Dict[int, Dict[str, Dict[str, RunResult]]], counts,
                 standins: dict, console: Console, start: float) -> dict:
    """Read every seed's outputs, write ``demo_results.{json,md}`` and the figures, print the tables; ``standins``:
    what the stand-in encoders' pretraining reported (``clip_standin``, ``mae_standin``, ``llm_standin``)."""
    rows_by_seed = {seed: collect_rows(runs, counts) for seed, runs in results.items()}
    for seed, per_model in query_diversity_by_seed(settings, results).items():
        for row in rows_by_seed[seed]:
            row["query_diversity"] = per_model[row["key"]]
    rows = mean_rows(rows_by_seed)
    folder = data_folder(settings.lavis_config(STAGES[3], MODELS[0]))
    scoring = settings.out_dir / "scoring"
    baseline = baselines(folder, scoring / "majority")
    lines = headline(rows_by_seed, vqa_outcomes(results, folder, scoring), baseline)
    epochs = {seed: {m.key: {s: epoch_stats(runs[m.key][s].job_dir) for s in TRAINED} for m in MODELS}
              for seed, runs in results.items()}
    first_seed = settings.seeds[0]
    files = {
        "json": settings.out_dir / "demo_results.json",
        "markdown": settings.out_dir / "demo_results.md",
        "loss_curves": loss_curves(
            {seed: {m.key: {s: training_curve(runs[m.key][s].job_dir) for s in TRAINED} for m in MODELS}
             for seed, runs in results.items()},
            settings.out_dir / "loss_curves.png"),
    }
    grid = make_reconstruction_grid(
        settings, last_checkpoint(results[first_seed]["xformer"]["stage1"].job_dir),
        settings.out_dir / "reconstructions.png"
    )
    if grid is not None:
        files["reconstructions"] = grid
    timings = {f"seed{seed}/{model}/{stage}": round(r.seconds, 1)
               for seed, per_model in results.items() for model, runs in per_model.items() for stage, r in runs.items()}
    timings["total_seconds"] = round(time.time() - start, 1)
    report = {
        "headline": lines,
        "baselines": baseline,
        "rows": rows,
        "seeds": {str(seed): seed_rows for seed, seed_rows in rows_by_seed.items()},
        "metrics": {key: label.strip() for key, label, _ in METRICS},
        "not_applicable": sorted(f"{model}/{key}" for model, key in NOT_APPLICABLE),
        "settings": {
            "smoke": settings.smoke, "device": settings.run_device, "jobs": settings.jobs, "seeds": settings.seeds,
            "config_dir": str(settings.config_dir), "options": settings.options,
        },
        "runs": {str(seed): {model: {stage: str(r.job_dir) for stage, r in runs.items()}
                             for model, runs in per_model.items()} for seed, per_model in results.items()},
        "epochs": {str(seed): per_model for seed, per_model in epochs.items()},
        **standins,
        "examples": vqa_examples(results[first_seed], folder),
        "timings": timings,
        "files": {k: str(v) for k, v in files.items()},
    }
    files["json"].write_text(json.dumps(report, indent=1) + "\n")
    files["markdown"].write_text(markdown_report(report))
    console.say(f"Means over {len(settings.seeds)} seeds ({settings.seeds}):")
    console.say(text_table(rows))
    console.say("")
    console.say("Headline: X-Former vs BLIP-2 over the seeds\n" + textwrap.fill(STATISTICS_NOTE, 118) + "\n")
    console.say(headline_table(lines))
    console.say("")
    for line in lines:
        console.say(textwrap.fill(line["verdict"], 118, subsequent_indent="    "))
    console.say("")
    console.say(
        "Loss: last epoch's average; retrieval: R@K in % (LAVIS, ITC top-k re-scored by ITM); VQA: official accuracy "
        "(counting = 'how many', identification = 'is there a').\n" + textwrap.fill(STANDINS_NOTE, 118)
    )
    for key, path in files.items():
        console.say(f"{key:>15}: {path}")
    console.say(f"{'total time':>15}: {timings['total_seconds']:.0f}s")
    return report
