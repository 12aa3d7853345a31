"""Head-to-head comparison of models on zero-shot VQA benchmarks, through LAVIS's tasks and evaluators.

    python -m lavis_xformer.analysis.compare \\
        --models blip2_opt:pretrain_opt2.7b xformer_opt:pretrain_opt2.7b \\
        --checkpoint xformer_opt:pretrain_opt2.7b=/ckpt/xformer_stage2.pth \\
        --benchmarks vqav2 gqa okvqa oc mci --out results/compare
    torchrun --nproc_per_node 8 -m lavis_xformer.analysis.compare ... # the same, questions shared by the ranks
    python -m lavis_xformer.analysis.compare --models blip2_baseline_opt:tiny xformer_opt:tiny \\
        --benchmarks shapes --limit 48 --out /tmp/cmp                  # offline, on the embedded shapes data

Models are ``[label=]arch:model_type`` (the label defaults to ``arch:model_type``; give one to compare the same
architecture with different ``--checkpoint LABEL=PATH`` weights). LAVIS's ``blip2_opt`` / ``blip2_t5`` are loaded as
the plugin's ``blip2_baseline_opt`` / ``blip2_baseline_t5``: the same classes and released weights, with the
zero-shot VQA generation LAVIS 1.0.2's ``Blip2OPT`` lacks. The first model is the reference: deltas are
``other - reference``.

Every model answers the same questions (``--limit N``: a uniform sample of N, seeded by ``--seed``, identical for
every model) with the same protocol (the paper's 5 beams and length penalty 0; at most 10 new tokens, a choice; the
prompt "Question: {} Short answer:", the demo stand-in LLM's format, where the paper writes "Short Answer:"), run by
LAVIS's task for the benchmark (``valid_step`` -> ``predict_answers``). Each model
sees images through its own eval processor, and questions through LAVIS's ``blip_question`` processor.

Benchmarks (LAVIS builders; data found where LAVIS's dataset configs point, under its ``cache_root``; change paths
with ``--options BENCHMARK.key=value``, e.g. ``--options vqav2.build_info.images.storage=/data/coco/images``):

=============  ==============================  ===========  =======================  =================================
name           builder                         split        task                     scoring
=============  ==============================  ===========  =======================  =================================
vqav2          coco_vqa (eval config)          val          xformer_vqa              official VQA accuracy, per type
gqa            gqa (balanced_testdev config)   val=testdev  xformer_gqa              LAVIS's GQA exact match
okvqa          ok_vqa                          test         xformer_vqa              official VQA accuracy
oc_coco ...    xformer_{oc,mci}_{coco,vcr}     test         xformer_finegrained      official VQA accuracy = exact match
shapes         xformer_shapes_vqa              test         xformer_vqa              official VQA accuracy, per type
=============  ==============================  ===========  =======================  =================================

``oc`` stands for ``oc_coco oc_vcr`` and ``mci`` for ``mci_coco mci_vcr``. VQA accuracy comes from
``lavis.common.vqa_tools`` (``VQA`` + ``VQAEval``) on the benchmark's official question/annotation files (restricted
to the evaluated questions when ``--limit`` is given); GQA is scored as LAVIS's ``GQATask`` scores it (VQAEval's
punctuation and digit/article normalisation of the prediction, then exact match).

Output in ``--out``:

* ``comparison.md`` / ``comparison.json`` -- per benchmark: accuracy per model, delta, for VQA-style benchmarks the
  accuracy per answer type (VQAv2: yes/no, number, other), and the paired statistics of ``analysis.stats``
  (bootstrap 95% interval of the delta, McNemar's exact test);
* ``per_question/<benchmark>.jsonl`` -- every question with its ground truth and each model's prediction and score;
* ``accuracy.png`` -- the accuracies as grouped bars;
* ``query_diversity.json`` / ``query_diversity.png`` -- ``analysis.query_diversity`` per model;
* ``cache/<model>/<benchmark>.json`` -- one file per finished (model, benchmark): the predictions and what produced
  them. A rerun with the same settings reads them instead of recomputing, so an interrupted comparison resumes
  with the first unfinished benchmark (``--recompute`` ignores them); files are written atomically.
"""

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import lavis_xformer  # noqa: F401  (registers the plugin's models, tasks, builders; applies compat)
from lavis.common.registry import registry
from lavis.common.vqa_tools.vqa import VQA
from lavis.common.vqa_tools.vqa_eval import VQAEval
from lavis.datasets.builders.base_dataset_builder import load_dataset_config
from lavis.models import load_model_and_preprocess
from lavis.tasks.vqa import GQATask
from torch.utils.data import DataLoader, Subset

from lavis_xformer import checkpoints
from lavis_xformer.analysis import figures, query_diversity, stats
from lavis_xformer.common import distributed
from lavis_xformer.common.distributed import get_rank, get_world_size
from lavis_xformer.datasets.finegrained import resolve_path

CACHE_FORMAT = 1
DIVERSITY = "query_diversity"  # the cache entry of the query-diversity analysis

# ---------------------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str  #: how tables name it
    builder: str  #: LAVIS dataset builder
    config_type: str  #: key of the builder's DATASET_CONFIG_DICT
    split: str
    task: str  #: registered LAVIS task that runs it


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("vqav2", "VQAv2", "coco_vqa", "eval", "val", "xformer_vqa"),
        Benchmark("gqa", "GQA", "gqa", "balanced_testdev", "val", "xformer_gqa"),
        Benchmark("okvqa", "OK-VQA", "ok_vqa", "default", "test", "xformer_vqa"),
        Benchmark("oc_coco", "OC (COCO)", "xformer_oc_coco", "default", "test", "xformer_finegrained"),
        Benchmark("oc_vcr", "OC (VCR)", "xformer_oc_vcr", "default", "test", "xformer_finegrained"),
        Benchmark("mci_coco", "MCI (COCO)", "xformer_mci_coco", "default", "test", "xformer_finegrained"),
        Benchmark("mci_vcr", "MCI (VCR)", "xformer_mci_vcr", "default", "test", "xformer_finegrained"),
        Benchmark("shapes", "Shapes VQA", "xformer_shapes_vqa", "default", "test", "xformer_vqa"),
    )
}
BENCHMARK_GROUPS = {"oc": ("oc_coco", "oc_vcr"), "mci": ("mci_coco", "mci_vcr")}
DEFAULT_BENCHMARKS = ("vqav2", "gqa", "okvqa", "oc", "mci")


def expand_benchmarks(names: Sequence[str]) -> List[Benchmark]:
    expanded = []
    for name in names:
        for member in BENCHMARK_GROUPS.get(name, (name,)):
            if member not in BENCHMARKS:
                valid = sorted(BENCHMARKS) + sorted(BENCHMARK_GROUPS)
                raise ValueError(f"unknown benchmark {name!r}; choose from {valid}")
            if BENCHMARKS[member] not in expanded:
                expanded.append(BENCHMARKS[member])
    return expanded


# ---------------------------------------------------------------------------------------------------------------
# Models and protocol
# ---------------------------------------------------------------------------------------------------------------
# LAVIS's architecture -> the plugin's class with the same model types and weights, and a zero-shot predict_answers.
MODEL_ALIASES = {"blip2_opt": "blip2_baseline_opt", "blip2_t5": "blip2_baseline_t5"}


@dataclass(frozen=True)
class ModelSpec:
    label: str
    arch: str
    model_type: str
    checkpoint: Optional[str] = None

    @property
    def slug(self) -> str:
        """The label as a folder name."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label)

    def load_arch(self) -> str:
        alias = MODEL_ALIASES.get(self.arch)
        if alias is not None and registry.get_model_class(alias) is not None:
            if self.model_type in registry.get_model_class(alias).PRETRAINED_MODEL_CONFIG_DICT:
                return alias
        return self.arch

    def identity(self) -> dict:
        """What the predictions depend on besides the benchmark and protocol (part of every cache fingerprint)."""
        checkpoint = None
        if self.checkpoint:
            path = Path(self.checkpoint)
            checkpoint = {"path": str(path.resolve())}
            if path.is_file():
                stat = path.stat()
                checkpoint.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        return {"arch": self.load_arch(), "model_type": self.model_type, "checkpoint": checkpoint}


def parse_model_specs(entries: Sequence[str], checkpoint_entries: Sequence[str] = ()) -> List[ModelSpec]:
    """``[label=]arch:model_type`` entries and ``LABEL=PATH`` checkpoints -> ModelSpecs (labels unique)."""
    parsed = []
    for entry in entries:
        label, sep, name = entry.partition("=") if "=" in entry else ("", "", entry)
        arch, colon, model_type = name.partition(":")
        if not colon or not arch or not model_type or (sep and not label):
            raise ValueError(f"--models entry {entry!r} is not [label=]arch:model_type (e.g. xformer_opt:tiny)")
        parsed.append((label or name, arch, model_type))
    labels = [label for label, _, _ in parsed]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"model labels {duplicates} appear twice; name them: --models base=arch:type ours=arch:type")
    weights = {}
    for entry in checkpoint_entries:
        label, sep, path = entry.partition("=")
        if not sep or not path or label not in labels:
            raise ValueError(f"--checkpoint {entry!r} is not LABEL=PATH with LABEL one of {labels}")
        weights[label] = path
    for label, arch, _ in parsed:
        if registry.get_model_class(MODEL_ALIASES.get(arch, arch)) is None and registry.get_model_class(arch) is None:
            raise ValueError(f"model architecture {arch!r} is not registered; known: {sorted(registry.list_models())}")
    return [ModelSpec(label, arch, model_type, weights.get(label)) for label, arch, model_type in parsed]


@dataclass(frozen=True)
class Protocol:
    """How every model answers: LAVIS's VQA task settings (``run:`` keys) plus the length penalty."""

    prompt: str = "Question: {} Short answer:"
    num_beams: int = 5
    length_penalty: float = 0.0
    max_len: int = 10
    min_len: int = 1
    inference_method: str = "generate"
    num_ans_candidates: int = 128

    def run_cfg(self):
        return OmegaConf.create({**asdict(self), "evaluate": True})


# ---------------------------------------------------------------------------------------------------------------
# Benchmark preparation: LAVIS task + dataset, and the questions every model answers
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedBenchmark:
    benchmark: Benchmark
    task: object  #: the LAVIS task (VQATask / GQATask subclass) that runs and scores it
    dataset: object  #: LAVIS eval dataset of the split
    indices: List[int]  #: dataset positions evaluated, ascending
    question_ids: List[int]
    question_file: Optional[str] = None  #: official VQA files (VQA-style scoring)
    annotation_file: Optional[str] = None

    @property
    def scoring(self) -> str:
        return "gqa" if isinstance(self.task, GQATask) else "vqa"

    def question_ids_digest(self) -> str:
        return hashlib.sha1(json.dumps(self.question_ids).encode()).hexdigest()


def dataset_config(benchmark: Benchmark, overrides: Sequence[str] = ()):
    """The builder's default dataset config, LAVIS's question processor, and the user's overrides."""
    builder_cls = registry.get_builder_class(benchmark.builder)
    if builder_cls is None:
        raise ValueError(f"dataset builder {benchmark.builder!r} is not registered")
    cfg = load_dataset_config(builder_cls.default_config_path(benchmark.config_type))
    cfg = OmegaConf.merge(cfg, {"text_processor": {"eval": {"name": "blip_question"}}})
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    build_info = cfg.get("build_info", None)
    if build_info is not None and benchmark.split in build_info.annotations:
        # Only the evaluated split: GQA's default config would otherwise load its 1.4 GB train questions.
        build_info.annotations = {benchmark.split: build_info.annotations[benchmark.split]}
    return cfg


def missing_inputs(benchmark: Benchmark, cfg) -> List[str]:
    """Files the benchmark needs that are not there (generated data -- shapes, derived OC/MCI files -- excepted)."""
    if "shapes" in cfg:
        return []
    if "finegrained" in cfg:
        wanted = [cfg.finegrained.annotations, cfg.finegrained.images]
    else:
        info = cfg.build_info
        if benchmark.split not in info.annotations:
            return [f"build_info.annotations.{benchmark.split} (not in the dataset config)"]
        storage = info.annotations[benchmark.split].storage
        wanted = ([storage] if isinstance(storage, str) else list(storage)) + [info.get(cfg.data_type).storage]
    return [str(resolve_path(p)) for p in wanted if not resolve_path(p).exists()]


def prepare_benchmark(
    benchmark: Benchmark, protocol: Protocol, overrides: Sequence[str] = (), limit: Optional[int] = None, seed: int = 0
) -> PreparedBenchmark:
    """Set up the benchmark's LAVIS task from the protocol and build its dataset with the task (which also picks
    up the official question/annotation files and answer list, as in a LAVIS evaluation run)."""
    cfg = dataset_config(benchmark, overrides)
    missing = missing_inputs(benchmark, cfg)
    if missing:
        raise FileNotFoundError(
            f"{benchmark.name}: not found: {', '.join(missing)}. Put the data where LAVIS's dataset config points "
            f"(relative paths are under cache_root {registry.get_path('cache_root')}) or override the paths with "
            f"--options {benchmark.name}.<config key>=<path>"
        )
    task = registry.get_task_class(benchmark.task).setup_task(SimpleNamespace(run_cfg=protocol.run_cfg()))
    datasets = task.build_datasets(SimpleNamespace(datasets_cfg={benchmark.builder: cfg}))
    splits = datasets[benchmark.builder]
    if benchmark.split not in splits:
        raise ValueError(
            f"{benchmark.name}: builder {benchmark.builder} built splits {sorted(splits)}, not {benchmark.split}"
        )
    dataset = splits[benchmark.split]
    indices = list(range(len(dataset)))
    if limit is not None and limit < len(indices):
        indices = sorted(random.Random(seed).sample(indices, limit))
    question_ids = [int(dataset.annotation[i]["question_id"]) for i in indices]
    return PreparedBenchmark(
        benchmark=benchmark,
        task=task,
        dataset=dataset,
        indices=indices,
        question_ids=question_ids,
        question_file=task.ques_files.get(benchmark.split),
        annotation_file=task.anno_files.get(benchmark.split),
    )


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` so that ``path`` holds either its old content or all of the new one, even after a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return path


def atomic_write_json(path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def cache_path(out_dir, spec: ModelSpec, name: str) -> Path:
    return Path(out_dir) / "cache" / spec.slug / f"{name}.json"


def prediction_fingerprint(spec: ModelSpec, prepared: PreparedBenchmark, protocol: Protocol, seed: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "model": spec.identity(),
        "build_seed": seed,
        "benchmark": prepared.benchmark.name,
        "builder": prepared.benchmark.builder,
        "split": prepared.benchmark.split,
        "protocol": asdict(protocol),
        "num_questions": len(prepared.question_ids),
        "question_ids_sha1": prepared.question_ids_digest(),
    }


def read_cache(path: Path, fingerprint: dict) -> Optional[dict]:
    """The cached entry if it was produced by exactly these settings, else None."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except json.JSONDecodeError:
        logging.warning("%s is unreadable; recomputing", path)
        return None
    if entry.get("fingerprint") != fingerprint:
        logging.warning("%s was produced with other settings; recomputing", path)
        return None
    return entry


# ---------------------------------------------------------------------------------------------------------------
# Inference (every rank)
# ---------------------------------------------------------------------------------------------------------------
def gather_to_main(items: list) -> Optional[list]:
    """Concatenate every rank's list on rank 0 (None elsewhere); the list itself in one process."""
    gathered = distributed.gather_objects(list(items))
    return [item for part in gathered for item in part] if get_rank() == 0 else None


def shard(indices: Sequence[int]) -> List[int]:
    """This rank's share: every world_size-th index from its rank (as DistributedSampler without padding)."""
    return list(indices[get_rank() :: get_world_size()])


def make_loader(dataset, indices, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=dataset.collater,
        drop_last=False,
    )


def predict(
    model, vis_processor, prepared: PreparedBenchmark, device, batch_size: int, num_workers: int
) -> Optional[List[dict]]:
    """Run the benchmark's LAVIS task over this rank's questions; rank 0 gets everyone's predictions, sorted by
    question id, as ``{"question_id", "prediction"}``."""
    prepared.dataset.vis_processor = vis_processor
    mine = shard(prepared.indices)
    if mine:
        loader = make_loader(prepared.dataset, mine, batch_size, num_workers)
        results = prepared.task.evaluation(model, loader, cuda_enabled=torch.device(device).type == "cuda")
    else:  # more ranks than questions: meet the others at the barrier that ends LAVIS's evaluation loop
        results = []
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    answer_key = "pred_ans" if prepared.scoring == "gqa" else "answer"
    local = [{"question_id": int(r["question_id"]), "prediction": r[answer_key]} for r in results]
    gathered = gather_to_main(local)
    if gathered is None:
        return None
    by_id = {item["question_id"]: item for item in gathered}
    if sorted(by_id) != sorted(prepared.question_ids):
        raise RuntimeError(f"{prepared.benchmark.name}: predictions do not cover the evaluated questions exactly")
    return [by_id[qid] for qid in sorted(by_id)]


# ---------------------------------------------------------------------------------------------------------------
# Scoring (rank 0)
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
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
    for name, b in report["benchmarks"].items():
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
    return "\n".join(["# Model comparison", "", *lines, *notes]) + "\n"


def accuracy_groups(report: dict, labels: Sequence[str]) -> List[tuple]:
    """The bars of ``accuracy.png``: (benchmark, "all" or answer type, one accuracy per model of ``labels``)."""
    groups = []
    for b in report["benchmarks"].values():
        groups.append((b["title"], "all", [b["accuracy"][l] for l in labels]))
        for answer_type in answer_type_rows(b, labels[0]):
            groups.append((b["title"], answer_type, [b["per_answer_type"][l].get(answer_type, 0.0) for l in labels]))
    return groups


# ---------------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ComparisonSettings:
    out_dir: Path
    protocol: Protocol = Protocol()
    limit: Optional[int] = None
    seed: int = 0
    batch_size: int = 8
    num_workers: int = 2
    device: str = "cpu"
    overrides: Dict[str, List[str]] = field(default_factory=dict)  #: benchmark -> dotlist for its dataset config
    skip_missing: bool = False
    recompute: bool = False
    bootstrap_resamples: int = stats.DEFAULT_RESAMPLES
    confidence: float = stats.DEFAULT_CONFIDENCE
    query_diversity: bool = True
    diversity_images: int = 256
    diversity_benchmark: Optional[str] = None


@dataclass
class ComparisonResult:
    report: Optional[dict]  #: None on ranks other than 0
    computed: List[str]  #: "label/benchmark" entries computed in this run (the others came from the cache)
    skipped: Dict[str, str]  #: benchmark -> why it was skipped


def load_model(spec: ModelSpec, device, seed: int):
    """The model in eval mode and its eval image processor. Built under ``seed``: weights a config leaves random
    (the offline ``tiny`` types) are then the same on every rank and in every run."""
    arch = spec.load_arch()
    if arch != spec.arch:
        logging.info(
            "%s: loading LAVIS's %s weights through the plugin's %s (zero-shot VQA generation)",
            spec.label,
            spec.arch,
            arch,
        )
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model, vis_processors, _ = load_model_and_preprocess(arch, spec.model_type, is_eval=True, device=device)
    if spec.checkpoint:
        checkpoints.load_model_weights(model, spec.checkpoint)
    if not hasattr(model, "predict_answers"):
        raise TypeError(f"{spec.label}: {type(model).__name__} has no predict_answers; compare stage-2 (LLM) models")
    return model.eval(), vis_processors["eval"]


def diversity_indices(prepared: PreparedBenchmark, count: int, seed: int) -> List[int]:
    """One question per image (its first), for ``count`` images drawn with ``seed``: the images whose queries
    the diversity analysis averages over."""
    first_by_image = {}
    for i in prepared.indices:
        first_by_image.setdefault(prepared.dataset.annotation[i]["image"], i)
    chosen = sorted(first_by_image.values())
    if len(chosen) > count:
        chosen = sorted(random.Random(f"query_diversity:{seed}").sample(chosen, count))
    return chosen


def measure_diversity(model, vis_processor, prepared: PreparedBenchmark, indices, spec, settings) -> Optional[dict]:
    prepared.dataset.vis_processor = vis_processor
    loader = make_loader(prepared.dataset, shard(indices), settings.batch_size, settings.num_workers)
    result = query_diversity.measure(model, (batch["image"] for batch in loader), spec.label, settings.device)
    return result.to_dict() if get_rank() == 0 else None


def run_comparison(
    specs: Sequence[ModelSpec], benchmark_names: Sequence[str], settings: ComparisonSettings
) -> ComparisonResult:
    """Evaluate every model on every benchmark (or read the cache), then score and report on rank 0."""
    if len(specs) < 2:
        raise ValueError("a comparison needs at least two models")
    out_dir = Path(settings.out_dir)
    is_main = get_rank() == 0
    protocol = settings.protocol

    prepared: Dict[str, PreparedBenchmark] = {}
    skipped: Dict[str, str] = {}
    for benchmark in expand_benchmarks(benchmark_names):
        try:
            prepared[benchmark.name] = prepare_benchmark(
                benchmark, protocol, settings.overrides.get(benchmark.name, ()), settings.limit, settings.seed
            )
        except FileNotFoundError as error:
            if not settings.skip_missing:
                raise
            logging.warning("skipping %s: %s", benchmark.name, error)
            skipped[benchmark.name] = str(error)
    if not prepared:
        raise FileNotFoundError(f"no benchmark has its data: {skipped}")

    diversity_source, diversity_images = None, []
    if settings.query_diversity:
        name = settings.diversity_benchmark or next(iter(prepared))
        if name not in prepared:
            raise ValueError(f"--diversity-benchmark {name} is not among the evaluated benchmarks {sorted(prepared)}")
        diversity_source = prepared[name]
        diversity_images = diversity_indices(diversity_source, settings.diversity_images, settings.seed)
    work = list(prepared) + ([DIVERSITY] if diversity_source is not None else [])

    def fingerprint(spec: ModelSpec, name: str) -> dict:
        if name == DIVERSITY:
            return diversity_fingerprint(spec, diversity_source, diversity_images, settings.seed)
        return prediction_fingerprint(spec, prepared[name], protocol, settings.seed)

    computed = []
    for spec in specs:
        # Rank 0 decides what the cache lacks; every rank then runs exactly that work.
        todo = []
        if is_main:
            todo = [
                name
                for name in work
                if settings.recompute or read_cache(cache_path(out_dir, spec, name), fingerprint(spec, name)) is None
            ]
        todo = distributed.broadcast_from_main(todo)
        if not todo:
            logging.info("%s: everything is cached", spec.label)
            continue
        model, vis_processor = load_model(spec, settings.device, settings.seed)
        try:
            for name in todo:
                start = time.time()
                if name == DIVERSITY:
                    entry = measure_diversity(model, vis_processor, diversity_source, diversity_images, spec, settings)
                else:
                    entry = predict(
                        model, vis_processor, prepared[name], settings.device, settings.batch_size, settings.num_workers
                    )
                if is_main:
                    payload = {
                        "fingerprint": fingerprint(spec, name),
                        "label": spec.label,
                        "seconds": round(time.time() - start, 2),
                    }
                    payload["result" if name == DIVERSITY else "predictions"] = entry
                    atomic_write_json(cache_path(out_dir, spec, name), payload)
                    logging.info("%s / %s done in %.1fs", spec.label, name, time.time() - start)
                computed.append(f"{spec.label}/{name}")
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    report = None
    if is_main:
        report = write_report(specs, prepared, diversity_source is not None, settings, skipped)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return ComparisonResult(report, computed, skipped)


def diversity_fingerprint(spec: ModelSpec, source: PreparedBenchmark, indices: List[int], seed: int) -> dict:
    images = [source.dataset.annotation[i]["image"] for i in indices]
    return {
        "format": CACHE_FORMAT,
        "model": spec.identity(),
        "build_seed": seed,
        "benchmark": source.benchmark.name,
        "images_sha1": hashlib.sha1(json.dumps(images).encode()).hexdigest(),
    }


def write_report(specs, prepared, with_diversity: bool, settings: ComparisonSettings, skipped) -> dict:
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
            }
            for s in specs
        ],
        "reference": specs[0].label,
        "settings": {
            "protocol": asdict(settings.protocol),
            "limit": settings.limit,
            "seed": settings.seed,
            "bootstrap_resamples": settings.bootstrap_resamples,
            "confidence": settings.confidence,
            "correct_at": stats.CORRECT_AT,
        },
        "benchmarks": {},
        "skipped": skipped,
    }
    for name, p in prepared.items():
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


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lavis_xformer.analysis.compare",
        description="Compare models head to head on zero-shot VQA benchmarks (see the module docstring).",
    )
    parser.add_argument(
        "--models", nargs="+", required=True, help="[label=]arch:model_type, the first is the reference"
    )
    parser.add_argument(
        "--checkpoint",
        nargs="+",
        default=[],
        action="extend",
        metavar="LABEL=PATH",
        help="weights to load into a model",
    )
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=list(DEFAULT_BENCHMARKS),
        help=f"of {sorted(BENCHMARKS)} and {sorted(BENCHMARK_GROUPS)}",
    )
    parser.add_argument("--out", required=True, help="output folder (also holds the cache that makes reruns resume)")
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate a seeded uniform sample of N questions per benchmark"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the --limit sample, the bootstrap, the diversity images, and of weights a config leaves random",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", default=Protocol.prompt)
    parser.add_argument("--num-beams", type=int, default=Protocol.num_beams)
    parser.add_argument("--length-penalty", type=float, default=Protocol.length_penalty)
    parser.add_argument("--max-len", type=int, default=Protocol.max_len)
    parser.add_argument("--min-len", type=int, default=Protocol.min_len)
    parser.add_argument(
        "--options",
        nargs="+",
        default=[],
        action="extend",
        metavar="BENCHMARK.KEY=VALUE",
        help="override a benchmark's dataset config, e.g. vqav2.build_info.images.storage=/data/coco/images",
    )
    parser.add_argument(
        "--skip-missing", action="store_true", help="skip benchmarks whose data is missing instead of failing"
    )
    parser.add_argument("--recompute", action="store_true", help="ignore cached predictions")
    parser.add_argument("--bootstrap-resamples", type=int, default=stats.DEFAULT_RESAMPLES)
    parser.add_argument("--confidence", type=float, default=stats.DEFAULT_CONFIDENCE)
    parser.add_argument("--no-query-diversity", dest="query_diversity", action="store_false")
    parser.add_argument("--diversity-images", type=int, default=256)
    parser.add_argument(
        "--diversity-benchmark", default=None, help="whose images the query diversity uses (default: the first)"
    )
    return parser.parse_args(argv)


def split_overrides(options: Sequence[str]) -> Dict[str, List[str]]:
    """``BENCHMARK.key=value`` -> {benchmark: ["key=value"]}."""
    overrides: Dict[str, List[str]] = {}
    for option in options:
        name, dot, rest = option.partition(".")
        if not dot or "=" not in rest or name not in BENCHMARKS:
            raise ValueError(
                f"--options {option!r} is not BENCHMARK.key=value with BENCHMARK one of {sorted(BENCHMARKS)}"
            )
        overrides.setdefault(name, []).append(rest)
    return overrides


def main(argv=None) -> ComparisonResult:
    args = parse_args(argv)
    distributed.init_distributed_mode(OmegaConf.create({"device": args.device}))
    device = args.device
    if torch.device(device).type == "cuda" and distributed.launch_env() is not None:
        device = f"cuda:{torch.cuda.current_device()}"
    logging.basicConfig(
        level=logging.INFO if get_rank() == 0 else logging.WARNING, format="%(asctime)s %(levelname)s %(message)s"
    )
    settings = ComparisonSettings(
        out_dir=Path(args.out),
        protocol=Protocol(
            prompt=args.prompt,
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            max_len=args.max_len,
            min_len=args.min_len,
        ),
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        overrides=split_overrides(args.options),
        skip_missing=args.skip_missing,
        recompute=args.recompute,
        bootstrap_resamples=args.bootstrap_resamples,
        confidence=args.confidence,
        query_diversity=args.query_diversity,
        diversity_images=args.diversity_images,
        diversity_benchmark=args.diversity_benchmark,
    )
    specs = parse_model_specs(args.models, args.checkpoint)
    result = run_comparison(specs, args.benchmarks, settings)
    if result.report is not None:
        print((Path(args.out) / "comparison.md").read_text())
    return result


def cli() -> None:
    """Console-script entry point (``lavis-xformer-compare``): a run that finishes exits 0."""
    main()


if __name__ == "__main__":
    main()
