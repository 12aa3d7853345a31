"""The comparison's report: scores, paired statistics, the Markdown tables, per-question files and charts.

    write_report(specs, prepared, with_diversity, settings, skipped) -> comparison.json, comparison.md, accuracy.png,
        per_question/<benchmark>.jsonl, query_diversity.{json,png}

Rank 0 scores every cached prediction set (``vqa_scoring``; ``caption_retrieval`` for captions and rankings),
compares each model with the first (``stats``: paired bootstrap interval of the delta over questions, images or
retrieval queries; McNemar's exact test where an item is right or wrong) and writes the files atomically.
"""

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import List, Sequence

from lavis_xformer.analysis import caption_retrieval, figures, paired_scores, query_diversity, stats
from lavis_xformer.analysis.caption_retrieval import CAPTION_METRICS, METRIC_TITLES, RETRIEVAL_METRICS
from lavis_xformer.analysis.compare_cache import DIVERSITY, cache_path
from lavis_xformer.analysis.vqa_benchmarks import PreparedBenchmark
from lavis_xformer.analysis.vqa_scoring import score
from lavis_xformer.common import provenance
from lavis_xformer.common.atomic import atomic_write_json, atomic_write_text

def per_question_rows(prepared: PreparedBenchmark, specs, predictions, scores) -> List[dict]:
    questions = {
        int(prepared.dataset.annotation[i]["question_id"]): prepared.dataset.annotation[i] for i in prepared.indices
    }
    reference = scores[specs[0].label]
    rows = []
    for qid in prepared.question_ids:
        rows.append(
            {
                "question_id": qid,
                "question": questions[qid]["question"],
                "image": questions[qid].get("image"),
                "ground_truth": reference.ground_truth.get(qid),
                "answer_type": reference.answer_types.get(qid),
                "models": {
                    s.label: {"prediction": predictions[s.label][qid], "score": scores[s.label].per_question[qid]}
                    for s in specs
                },
            }
        )
    return rows


def benchmark_report(
    prepared: PreparedBenchmark, specs, scores, num_resamples: int, confidence: float, seed: int
) -> dict:
    reference = specs[0].label
    accuracy = {s.label: scores[s.label].accuracy for s in specs}
    report = {
        "title": prepared.benchmark.title,
        "builder": prepared.benchmark.builder,
        "split": prepared.benchmark.split,
        "task": prepared.benchmark.task,
        "num_questions": len(prepared.question_ids),
        "accuracy": accuracy,
        "per_answer_type": {s.label: scores[s.label].per_answer_type for s in specs},
        "delta": {},
        "statistics": {},
    }
    reference_scores = [scores[reference].per_question[q] for q in prepared.question_ids]
    report["per_answer_type_delta"] = {}
    for s in specs[1:]:
        report["delta"][s.label] = round(accuracy[s.label] - accuracy[reference], 2)
        report["per_answer_type_delta"][s.label] = {
            answer_type: round(value - scores[reference].per_answer_type[answer_type], 2)
            for answer_type, value in scores[s.label].per_answer_type.items()
            if answer_type in scores[reference].per_answer_type
        }
        other_scores = [scores[s.label].per_question[q] for q in prepared.question_ids]
        comparison = stats.compare_paired(reference_scores, other_scores, num_resamples, confidence, seed)
        report["statistics"][s.label] = {"reference": reference, **comparison.to_dict()}
    return report


def answer_type_rows(benchmark_report: dict, reference: str) -> List[str]:
    """The answer types worth a row of their own: all of them when there are several (VQAv2's yes/no, number,
    other), none when the benchmark has one (OC is all numbers)."""
    types = sorted(benchmark_report["per_answer_type"].get(reference, {}))
    return types if len(types) > 1 else []


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def _p_value(value: float) -> str:
    return f"{value:.3g}" if value >= 1e-4 else f"{value:.1e}"


def markdown_table(report: dict) -> str:
    specs = report["models"]
    labels = [m["label"] for m in specs]
    reference, others = labels[0], labels[1:]
    header = ["benchmark", "split", "questions", *labels]
    for label in others:
        header += [f"Δ {label}", "95% CI", "McNemar p (b/c)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    vqa = {name: b for name, b in report["benchmarks"].items() if b.get("kind", "vqa") == "vqa"}
    for name, b in vqa.items():
        row = [b["title"], b["split"], str(b["num_questions"]), *(f"{b['accuracy'][l]:.2f}" for l in labels)]
        for label in others:
            s = b["statistics"][label]
            m = s["mcnemar"]
            row += [
                _signed(b["delta"][label]),
                f"[{_signed(s['ci_low'])}, {_signed(s['ci_high'])}]",
                f"{_p_value(m['p_value'])} ({m['only_a_correct']}/{m['only_b_correct']})",
            ]
        lines.append("| " + " | ".join(row) + " |")
        for answer_type in answer_type_rows(b, reference):
            row = [f"{b['title']} · {answer_type}", "", ""]
            row += [f"{b['per_answer_type'][l].get(answer_type, float('nan')):.2f}" for l in labels]
            for label in others:
                row += [_signed(b["per_answer_type_delta"][label].get(answer_type, float("nan"))), "", ""]
            lines.append("| " + " | ".join(row) + " |")
    p = report["settings"]["protocol"]
    notes = [
        "",
        f"Reference: {reference}. Δ = model − reference, in accuracy points. Protocol: prompt {p['prompt']!r}, "
        f"{p['num_beams']} beams, length penalty {p['length_penalty']}, max {p['max_len']} new tokens.",
        f"95% CI: paired percentile bootstrap over questions ({report['settings']['bootstrap_resamples']} resamples, "
        f"seed {report['settings']['seed']}). McNemar: exact two-sided binomial test on the questions exactly one "
        f"model gets right (score ≥ {stats.CORRECT_AT}); b = only the reference right, c = only the other right.",
    ]
    if not vqa:
        lines, notes = [], []
    notes += caption_table(report, labels) + retrieval_table(report, labels)
    diversity = report.get("query_diversity")
    if diversity:
        notes += ["", "| model | query diversity | vs reference | images |", "|---|---|---|---|"]
        for entry in diversity["models"]:
            notes.append(
                f"| {entry['label']} | {entry['diversity']:.4f} | {entry['relative_to_reference_percent']:+.1f}% | "
                f"{entry['num_images']} |"
            )
        notes.append("")
        notes.append(
            "Query diversity: 1 − mean off-diagonal cosine similarity between a model's output queries, "
            "averaged over images (supplement, section 6)."
        )
    return "\n".join(["# Model comparison", *([""] if lines else []), *lines, *notes]) + "\n"


def _interval(s: dict) -> str:
    return f"[{_signed(s['ci_low'])}, {_signed(s['ci_high'])}]"


def caption_table(report: dict, labels: Sequence[str]) -> List[str]:
    """Captioning rows: one per metric (x100), the CIDEr delta with its interval over images."""
    captions = {n: b for n, b in report["benchmarks"].items() if b.get("kind") == "caption"}
    if not captions:
        return []
    others = labels[1:]  # every model after the first is compared with it
    header = ["benchmark", "split", "images", "metric", *labels]
    for label in others:
        header += [f"Δ {label}", "95% CI"]
    lines = ["", "## Captioning", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in captions.values():
        for metric in CAPTION_METRICS:
            row = [b["title"], b["split"], str(b["num_images"]), METRIC_TITLES[metric]]
            if metric in b["unavailable"]:
                row += ["skipped"] * len(labels) + ["", ""] * len(others)
            else:
                row += [f"{b['metrics'][l][metric]:.2f}" for l in labels]
                for label in others:
                    stat = b["statistics"][label] if metric == "CIDEr" else None
                    row += [_signed(b["delta"][label][metric]), _interval(stat) if stat else ""]
            lines.append("| " + " | ".join(row) + " |")
    skipped = {f"{METRIC_TITLES.get(m, m)}: skipped, {why}." for b in captions.values() for m, why in b["unavailable"].items()}
    p = report["settings"]["caption_protocol"]
    lines += ["", *sorted(skipped)] if skipped else []
    lines += [
        "",
        f"Scores x100 (pycocoevalcap, PTB tokenisation, against the dataset's reference captions). Protocol: "
        f"{p['num_beams']} beams, {p['min_len']} to {p['max_len']} tokens. 95% CI of the CIDEr Δ: paired percentile "
        f"bootstrap over images (per-image CIDEr, whose mean is the corpus CIDEr); BLEU-4 is a corpus statistic "
        "(no per-image unit), its Δ has no interval.",
    ]
    return lines


def retrieval_table(report: dict, labels: Sequence[str]) -> List[str]:
    """Retrieval rows: R@1/5/10 image→text (queries = images) and text→image (queries = texts)."""
    rankings = {n: b for n, b in report["benchmarks"].items() if b.get("kind") == "retrieval"}
    if not rankings:
        return []
    others = labels[1:]  # every model after the first is compared with it
    header = ["benchmark", "split", "queries", "metric", *labels]
    for label in others:
        header += [f"Δ {label}", "95% CI", "McNemar p (b/c)"]
    lines = ["", "## Retrieval", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in rankings.values():
        for metric in RETRIEVAL_METRICS:
            direction = "image→text" if metric.startswith("txt") else "text→image"
            queries = b["num_images"] if metric.startswith("txt") else b["num_texts"]
            row = [b["title"], b["split"], str(queries), f"{direction} R@{metric.split('_r')[1]}"]
            row += [f"{b['recall'][l][metric]:.2f}" for l in labels]
            for label in others:
                s = b["statistics"][label][metric]
                m = s["mcnemar"]
                row += [_signed(b["delta"][label][metric]), _interval(s),
                        f"{_p_value(m['p_value'])} ({m['only_a_correct']}/{m['only_b_correct']})"]
            lines.append("| " + " | ".join(row) + " |")
    k = report["settings"]["retrieval_k_test"]
    lines += [
        "",
        f"Recall in percent (LAVIS's retrieval ranking: ITC, the best k re-scored by ITM; k_test {k}, capped at the "
        "gallery). 95% CI: paired percentile bootstrap over the queries; McNemar on the queries exactly one model "
        "retrieves within k.",
    ]
    return lines


def caption_report(prepared, specs, scores, num_resamples: int, confidence: float, seed: int) -> dict:
    reference = specs[0].label
    image_ids = prepared.question_ids
    report = {
        "kind": "caption",
        "title": prepared.benchmark.title,
        "builder": prepared.benchmark.builder,
        "split": prepared.benchmark.split,
        "task": prepared.benchmark.task,
        "num_images": len(image_ids),
        "metrics": {s.label: scores[s.label].metrics for s in specs},  # x100
        "unavailable": scores[reference].unavailable,
        "delta": {},
        "statistics": {},
    }
    reference_cider = [scores[reference].per_image[i] / 100.0 for i in image_ids]
    for s in specs[1:]:
        mine = scores[s.label].metrics
        report["delta"][s.label] = {m: round(v - scores[reference].metrics[m], 2) for m, v in mine.items()}
        other_cider = [scores[s.label].per_image[i] / 100.0 for i in image_ids]
        delta, low, high = paired_scores.paired_interval(reference_cider, other_cider, num_resamples, confidence, seed)
        report["statistics"][s.label] = {
            "reference": reference, "metric": "CIDEr", "unit": "image", "mean_difference": delta,
            "ci_low": low, "ci_high": high, "confidence": confidence, "num_resamples": num_resamples, "seed": seed,
        }
    return report


def retrieval_report(prepared, specs, scores, num_resamples: int, confidence: float, seed: int) -> dict:
    reference = specs[0].label
    hits = scores[reference].hits
    report = {
        "kind": "retrieval",
        "title": prepared.benchmark.title,
        "builder": prepared.benchmark.builder,
        "split": prepared.benchmark.split,
        "task": prepared.benchmark.task,
        "num_images": len(hits["txt_r1"]),
        "num_texts": len(hits["img_r1"]),
        "k_test": prepared.protocol.k_test,
        "recall": {s.label: scores[s.label].recall for s in specs},  # percent
        "delta": {},
        "statistics": {},
    }
    for s in specs[1:]:
        report["delta"][s.label] = {
            m: round(scores[s.label].recall[m] - scores[reference].recall[m], 2) for m in RETRIEVAL_METRICS
        }
        report["statistics"][s.label] = {
            m: {"reference": reference, **stats.compare_paired(
                hits[m], scores[s.label].hits[m], num_resamples, confidence, seed).to_dict()}
            for m in RETRIEVAL_METRICS
        }
    return report


def caption_rows(prepared, specs, predictions, scores) -> List[dict]:
    return [
        {
            "image_id": i,
            "references": prepared.references[i],
            "models": {s.label: {"caption": predictions[s.label][i], "cider": scores[s.label].per_image[i]} for s in specs},
        }
        for i in prepared.question_ids
    ]


def retrieval_rows(prepared, specs, entries) -> List[dict]:
    """One row per image query (its best caption's rank) and per text query (its image's rank), 0-based."""
    dataset = prepared.dataset
    rows = [
        {"query": "image", "image": dataset.annotation[i]["image"],
         "models": {s.label: {"rank": entries[s.label]["text_ranks"][i]} for s in specs}}
        for i in range(len(dataset.image))
    ]
    rows += [
        {"query": "text", "text": dataset.text[t], "image": dataset.annotation[dataset.txt2img[t]]["image"],
         "models": {s.label: {"rank": entries[s.label]["image_ranks"][t]} for s in specs}}
        for t in range(len(dataset.text))
    ]
    return rows


def accuracy_groups(report: dict, labels: Sequence[str]) -> List[tuple]:
    """The bars of ``accuracy.png``: (benchmark, "all" or answer type, one accuracy per model of ``labels``);
    captioning: CIDEr (x100); retrieval: R@1 both ways."""
    groups = []
    for b in report["benchmarks"].values():
        if b.get("kind") == "caption":
            groups.append((b["title"], "CIDEr", [b["metrics"][l]["CIDEr"] for l in labels]))
            continue
        if b.get("kind") == "retrieval":
            groups += [(b["title"], f"{name} R@1", [b["recall"][l][m] for l in labels])
                       for name, m in (("i→t", "txt_r1"), ("t→i", "img_r1"))]
            continue
        groups.append((b["title"], "all", [b["accuracy"][l] for l in labels]))
        for answer_type in answer_type_rows(b, labels[0]):
            groups.append((b["title"], answer_type, [b["per_answer_type"][l].get(answer_type, 0.0) for l in labels]))
    return groups


def write_report(specs, prepared, with_diversity: bool, settings, skipped) -> dict:
    """Score every cached prediction set and write the tables, per-question files and charts."""
    out_dir = Path(settings.out_dir)
    report = {
        "models": [
            {
                "label": s.label,
                "arch": s.arch,
                "loaded_as": s.load_arch(),
                "model_type": s.model_type,
                "checkpoint": s.checkpoint,
                "identity": s.identity(),  # the checkpoint's sha256 and the package versions (the cache key)
            }
            for s in specs
        ],
        "reference": specs[0].label,
        "settings": {
            "protocol": asdict(settings.protocol),
            "caption_protocol": asdict(settings.caption_protocol),
            "retrieval_k_test": settings.retrieval_protocol.k_test,
            "limit": settings.limit,
            "seed": settings.seed,
            "bootstrap_resamples": settings.bootstrap_resamples,
            "confidence": settings.confidence,
            "correct_at": stats.CORRECT_AT,
        },
        "benchmarks": {},
        "skipped": skipped,
        "environment": provenance.environment(),  # packages, python, git commit (and whether the tree was dirty)
    }
    for name, p in prepared.items():
        entries = {s.label: json.loads(cache_path(out_dir, s, name).read_text())["predictions"] for s in specs}
        if p.kind == "caption":
            scores = {label: caption_retrieval.score_captions(p, entry) for label, entry in entries.items()}
            predictions = {label: {e["image_id"]: e["prediction"] for e in entry} for label, entry in entries.items()}
            rows = caption_rows(p, specs, predictions, scores)
            make = caption_report
        elif p.kind == "retrieval":
            scores = {label: caption_retrieval.score_retrieval(entry) for label, entry in entries.items()}
            rows = retrieval_rows(p, specs, entries)
            make = retrieval_report
        if p.kind != "vqa":
            atomic_write_text(out_dir / "per_question" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            report["benchmarks"][name] = make(
                p, specs, scores, settings.bootstrap_resamples, settings.confidence, settings.seed
            )
            continue
        predictions, scores = {}, {}
        for s in specs:
            entry = json.loads(cache_path(out_dir, s, name).read_text())
            predictions[s.label] = {item["question_id"]: item["prediction"] for item in entry["predictions"]}
            scores[s.label] = score(p, entry["predictions"], out_dir / "scoring" / name, s.label)
        rows = per_question_rows(p, specs, predictions, scores)
        atomic_write_text(out_dir / "per_question" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        report["benchmarks"][name] = benchmark_report(
            p, specs, scores, settings.bootstrap_resamples, settings.confidence, settings.seed
        )
    if with_diversity:
        results = [
            query_diversity.QueryDiversity.from_dict(
                json.loads(cache_path(out_dir, s, DIVERSITY).read_text())["result"]
            )
            for s in specs
        ]
        relative = {entry["label"]: entry for entry in query_diversity.relative_difference(results)}
        report["query_diversity"] = {
            "models": [{**r.to_dict(), **relative[r.label]} for r in results],
            "reference": specs[0].label,
        }
        figures.heatmap_png(results, out_dir / "query_diversity.png")
        atomic_write_json(out_dir / "query_diversity.json", report["query_diversity"])
    atomic_write_json(out_dir / "comparison.json", report)
    atomic_write_text(out_dir / "comparison.md", markdown_table(report))
    labels = [m["label"] for m in report["models"]]
    figures.accuracy_bars_png(labels, accuracy_groups(report, labels), out_dir / "accuracy.png")
    logging.info("comparison written to %s", out_dir / "comparison.md")
    return report
