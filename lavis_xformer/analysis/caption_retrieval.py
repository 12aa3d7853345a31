"""Captioning and retrieval benchmarks of a comparison: preparation through LAVIS's builders and tasks, inference,
and the scores with their per-item units (what the paired bootstrap resamples).

    prepare(benchmark, protocol, overrides, limit, seed)      -> PreparedBenchmark (kind "caption" or "retrieval")
    predict_retrieval(model, vis_processor, prepared, ...)    -> {"text_ranks": [n_images], "image_ranks": [n_texts]}
    score_captions(prepared, predictions) -> CaptionScores    CIDEr, BLEU-4, METEOR, SPICE x100; CIDEr per image
    score_retrieval(prepared, entry)      -> RetrievalScores  R@1/5/10 both ways in percent; 0/1 per query

Captioning runs the plugin's ``xformer_captioning`` task (LAVIS's ``captioning``: the model's ``generate`` with the
protocol's beams and lengths; its ``valid_step`` is what ``compare.predict`` calls) and is scored by pycocoevalcap
(``tasks.caption_metrics``) against the evaluated images' own reference captions in the dataset's annotation (a
choice: LAVIS's COCO task downloads the same Karpathy captions as a COCO ground-truth file; here they are read from
the annotation, so the comparison runs offline and on any LAVIS caption eval dataset). Retrieval runs the model's
``compute_sim_matrix`` as LAVIS's ``retrieval`` task does (ITC ranking, the best ``k_test`` re-scored by ITM) and
ranks as its ``_report_metrics`` (``paired_scores.retrieval_ranks``); the cache keeps the ranks, not the matrices.
Both take stage-1 models (``xformer``, ``blip2_baseline``: the supplement's Table 5) and, for captioning, stage-2
ones.
"""

import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from lavis.common.registry import registry
from lavis.datasets.datasets.coco_caption_datasets import COCOCapEvalDataset, NoCapsEvalDataset
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lavis_xformer.analysis import paired_scores
from lavis_xformer.analysis.vqa_benchmarks import Benchmark, PreparedBenchmark, dataset_config, require_inputs
from lavis_xformer.common.distributed import get_rank

CAPTION_METRICS = ("CIDEr", "Bleu_4", "METEOR", "SPICE")  # the table's rows; CIDEr carries the paired interval
METRIC_TITLES = {"CIDEr": "CIDEr", "Bleu_4": "BLEU-4", "METEOR": "METEOR", "SPICE": "SPICE"}
RETRIEVAL_METRICS = tuple(f"{d}_r{k}" for d in ("txt", "img") for k in paired_scores.RECALL_AT)


@dataclass(frozen=True)
class CaptionProtocol:
    """How every model captions: LAVIS's captioning task settings (BLIP-2's COCO caption evaluation: beam 5, 8 to
    30 tokens, lavis/projects/blip2/eval/caption_coco_eval.yaml)."""

    num_beams: int = 5
    max_len: int = 30
    min_len: int = 8

    def run_cfg(self):
        return OmegaConf.create({**asdict(self), "evaluate": True, "report_metric": False})


@dataclass(frozen=True)
class RetrievalProtocol:
    """How every model retrieves: LAVIS's retrieval task setting. ``k_test``: ITM re-scores the best k ITC
    candidates (128 in BLIP-2's retrieval evaluation), capped at the evaluated images and texts."""

    k_test: int = 128


def caption_image_id(dataset, ann) -> int:
    """The ``image_id`` the dataset's ``__getitem__`` gives an annotation (LAVIS: COCO parses the file name,
    NoCaps reads ``img_id``, its other caption eval datasets ``image_id``)."""
    if isinstance(dataset, COCOCapEvalDataset):
        return int(ann["image"].split("/")[-1].strip(".jpg").split("_")[-1])
    if isinstance(dataset, NoCapsEvalDataset):
        return int(ann["img_id"])
    return int(ann["image_id"])


def build_split(benchmark: Benchmark, task, cfg):
    datasets = task.build_datasets(SimpleNamespace(datasets_cfg={benchmark.builder: cfg}))
    splits = datasets[benchmark.builder]
    if benchmark.split not in splits:
        raise ValueError(
            f"{benchmark.name}: builder {benchmark.builder} built splits {sorted(splits)}, not {benchmark.split}"
        )
    return splits[benchmark.split]


def sample(indices: List[int], limit: Optional[int], seed: int) -> List[int]:
    """All, or a seeded uniform sample of ``limit`` (ascending): the rule of the VQA benchmarks' ``--limit``."""
    if limit is not None and limit < len(indices):
        return sorted(random.Random(seed).sample(indices, limit))
    return indices


def restricted_retrieval_dataset(dataset, indices: List[int]):
    """The retrieval eval dataset over the chosen images only (their captions are the texts), built by the
    dataset's own class from the restricted annotation, so ``text`` / ``img2txt`` / ``txt2img`` are LAVIS's."""
    if len(indices) == len(dataset.annotation):
        return dataset
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "annotation.json")
        with open(path, "w") as f:
            json.dump([dataset.annotation[i] for i in indices], f)
        return type(dataset)(dataset.vis_processor, dataset.text_processor, dataset.vis_root, [path])


def prepare(benchmark: Benchmark, protocol, overrides: Sequence[str] = (), limit: Optional[int] = None,
            seed: int = 0) -> PreparedBenchmark:
    """Set up the benchmark's LAVIS task and dataset; ``limit`` samples images (captioning: the captioned images;
    retrieval: the gallery, with every caption of the chosen images as the texts)."""
    cfg = dataset_config(benchmark, overrides)
    require_inputs(benchmark, cfg)
    if benchmark.kind == "caption":
        task = registry.get_task_class(benchmark.task).setup_task(SimpleNamespace(run_cfg=protocol.run_cfg()))
        dataset = build_split(benchmark, task, cfg)
        indices = sample(list(range(len(dataset))), limit, seed)
        references = {}
        for i in indices:
            ann = dataset.annotation[i]
            captions = ann.get("caption")
            if not captions:
                raise ValueError(f"{benchmark.name}: annotation {i} has no reference captions (a `caption` list)")
            references[caption_image_id(dataset, ann)] = [captions] if isinstance(captions, str) else list(captions)
        if len(references) != len(indices):
            raise ValueError(f"{benchmark.name}: several annotations share an image_id; captioning scores one per image")
        image_ids = sorted(references)
        return PreparedBenchmark(benchmark, task, dataset, indices, image_ids, references=references, protocol=protocol)
    if benchmark.kind == "retrieval":
        task = registry.get_task_class(benchmark.task).setup_task(SimpleNamespace(run_cfg=OmegaConf.create({})))
        full = build_split(benchmark, task, cfg)
        indices = sample(list(range(len(full))), limit, seed)
        dataset = restricted_retrieval_dataset(full, indices)
        k_test = min(protocol.k_test, len(dataset.image), len(dataset.text))
        task.cfg = OmegaConf.create({"k_test": k_test})  # what RetrievalTask hands compute_sim_matrix
        # positions in the restricted dataset; the ids (the cache's key) are the images' positions in the full split
        return PreparedBenchmark(benchmark, task, dataset, list(range(len(dataset))), list(indices),
                                 protocol=RetrievalProtocol(k_test))
    raise ValueError(f"{benchmark.name}: kind {benchmark.kind!r} is neither 'caption' nor 'retrieval'")


def predict_retrieval(model, vis_processor, prepared: PreparedBenchmark, batch_size: int, num_workers: int) -> Optional[dict]:
    """The model's ``compute_sim_matrix`` over the gallery (every rank reads all images; it shares the ITM
    re-scoring among ranks itself), then the ranks on rank 0 (None elsewhere)."""
    prepared.dataset.vis_processor = vis_processor
    loader = DataLoader(prepared.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=prepared.dataset.collater)  # LAVIS reads loader.dataset.text / .image
    with torch.no_grad():  # as LAVIS's runner evaluates
        scores_i2t, scores_t2i = model.compute_sim_matrix(loader, task_cfg=prepared.task.cfg)
    if get_rank() != 0:
        return None
    dataset = prepared.dataset
    text_ranks, image_ranks = paired_scores.retrieval_ranks(scores_i2t, scores_t2i, dataset.txt2img, dataset.img2txt)
    return {"text_ranks": text_ranks.tolist(), "image_ranks": image_ranks.tolist()}


@dataclass
class CaptionScores:
    metrics: Dict[str, float]  #: metric -> corpus score x100
    per_image: Dict[int, float]  #: image_id -> CIDEr x100 (their mean is the corpus CIDEr)
    unavailable: Dict[str, str]  #: metric -> why it was not computed (e.g. SPICE: no Java)


def score_captions(prepared: PreparedBenchmark, predictions: List[dict]) -> CaptionScores:
    from lavis_xformer.tasks import caption_metrics

    captions = {int(p["image_id"]): p["prediction"] for p in predictions}
    scores, per_image, unavailable = caption_metrics(prepared.references, captions, per_image=("CIDEr",))
    return CaptionScores(
        metrics={name: 100.0 * value for name, value in scores.items()},
        per_image={i: 100.0 * value for i, value in per_image["CIDEr"].items()},
        unavailable=unavailable,
    )


@dataclass
class RetrievalScores:
    recall: Dict[str, float]  #: txt_r1 ... img_r10, percent (LAVIS's names)
    hits: Dict[str, np.ndarray]  #: the same names -> 0/1 per query (images for txt_*, texts for img_*)


def score_retrieval(entry: dict) -> RetrievalScores:
    hits = paired_scores.hits_at(entry["text_ranks"], entry["image_ranks"])
    return RetrievalScores({name: 100.0 * float(h.mean()) for name, h in hits.items()}, hits)
