"""Head-to-head comparison of models on zero-shot VQA, captioning and retrieval benchmarks, through LAVIS's tasks
and evaluators.

    python -m lavis_xformer.analysis.compare \\
        --models blip2_opt:pretrain_opt2.7b xformer_opt:pretrain_opt2.7b \\
        --checkpoint xformer_opt:pretrain_opt2.7b=/ckpt/xformer_stage2.pth \\
        --benchmarks vqav2 gqa okvqa oc mci --out results/compare
    torchrun --nproc_per_node 8 -m lavis_xformer.analysis.compare ... # the same, questions shared by the ranks
    python -m lavis_xformer.analysis.compare --models blip2_baseline_opt:tiny xformer_opt:tiny \\
        --benchmarks shapes --limit 48 --out /tmp/cmp                  # offline, on the embedded shapes data
    python -m lavis_xformer.analysis.compare --models blip2=blip2_baseline:tiny xformer=xformer:tiny \\
        --benchmarks shapes_caption shapes_retrieval --limit 16 --out /tmp/cmp1  # stage-1 models (supplement Table 5)

Models are ``[label=]arch:model_type``; the first is the reference (deltas are ``other - reference``). Every model
answers the same questions with the same protocol through the benchmark's LAVIS task (``vqa_benchmarks``), captions
the same images or ranks the same gallery (``caption_retrieval``); rank 0 scores them (``vqa_scoring``,
``caption_retrieval``) and writes the report (``compare_report``); a finished (model, benchmark) is cached
(``compare_cache``), so an interrupted comparison resumes. The benchmarks, the scoring and the output files are
described in docs/evaluation.md.
"""

import argparse
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import lavis_xformer  # noqa: F401  (registers the plugin's models, tasks, builders; applies compat)
from lavis.common.registry import registry
from lavis.models import load_model_and_preprocess
from torch.utils.data import DataLoader, Subset

from lavis_xformer import checkpoints
from lavis_xformer.analysis import caption_retrieval, query_diversity, stats
from lavis_xformer.analysis.caption_retrieval import CaptionProtocol, RetrievalProtocol
from lavis_xformer.analysis.compare_cache import (
    DIVERSITY,
    cache_path,
    diversity_fingerprint,
    prediction_fingerprint,
    read_cache,
)
from lavis_xformer.analysis.compare_report import write_report
from lavis_xformer.analysis.vqa_benchmarks import (
    BENCHMARK_GROUPS,
    BENCHMARKS,
    DEFAULT_BENCHMARKS,
    PreparedBenchmark,
    Protocol,
    expand_benchmarks,
    prepare_benchmark,
)
from lavis_xformer.common import distributed, provenance
from lavis_xformer.common.atomic import atomic_write_json
from lavis_xformer.common.distributed import get_rank, get_world_size


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
# LAVIS's architecture -> the plugin's class with the same model types and weights, and a zero-shot predict_answers.
MODEL_ALIASES = {"blip2": "blip2_baseline", "blip2_opt": "blip2_baseline_opt", "blip2_t5": "blip2_baseline_t5"}


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
        """What the predictions depend on besides the benchmark and protocol (part of every cache fingerprint): the
        model, the checkpoint's content (sha256: a checkpoint rewritten with other weights is not reused, one
        copied or touched is) and the versions of the packages that compute (``common.provenance``; the git commit
        is recorded in ``provenance.json``, not keyed: a commit that changes no computation keeps the cache)."""
        return {
            "arch": self.load_arch(),
            "model_type": self.model_type,
            "checkpoint": provenance.checkpoint_identity(self.checkpoint),
            "packages": {k: v for k, v in provenance.environment()["packages"].items() if k != "pycocoevalcap"},
        }


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
    """Run the benchmark's LAVIS task over this rank's questions (images, for captioning); rank 0 gets everyone's
    predictions, sorted by id, as ``{"question_id", "prediction"}`` (``{"image_id", "prediction"}``). Retrieval:
    ``caption_retrieval.predict_retrieval``."""
    if prepared.kind == "retrieval":
        return caption_retrieval.predict_retrieval(model, vis_processor, prepared, batch_size, num_workers)
    prepared.dataset.vis_processor = vis_processor
    mine = shard(prepared.indices)
    if mine:
        loader = make_loader(prepared.dataset, mine, batch_size, num_workers)
        results = prepared.task.evaluation(model, loader, cuda_enabled=torch.device(device).type == "cuda")
    else:  # more ranks than questions: meet the others at the barrier that ends LAVIS's evaluation loop
        results = []
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    if prepared.kind == "caption":
        id_key, answer_key = "image_id", "caption"
    else:
        id_key, answer_key = "question_id", "pred_ans" if prepared.scoring == "gqa" else "answer"
    local = [{id_key: int(r[id_key]), "prediction": r[answer_key]} for r in results]
    gathered = gather_to_main(local)
    if gathered is None:
        return None
    by_id = {item[id_key]: item for item in gathered}
    if sorted(by_id) != sorted(prepared.question_ids):
        raise RuntimeError(f"{prepared.benchmark.name}: predictions do not cover the evaluated questions exactly")
    return [by_id[qid] for qid in sorted(by_id)]


# ---------------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ComparisonSettings:
    out_dir: Path
    protocol: Protocol = Protocol()
    caption_protocol: CaptionProtocol = CaptionProtocol()
    retrieval_protocol: RetrievalProtocol = RetrievalProtocol()
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


# What a model needs for each kind of benchmark.
NEEDED_METHOD = {"vqa": "predict_answers", "caption": "generate", "retrieval": "compute_sim_matrix"}


def load_model(spec: ModelSpec, device, seed: int, kinds: Sequence[str] = ("vqa",)):
    """The model in eval mode and its eval image processor. Built under ``seed``: weights a config leaves random
    (the offline ``tiny`` types) are then the same on every rank and in every run. ``kinds``: the benchmark kinds
    it will run, whose methods it must have."""
    arch = spec.load_arch()
    if arch != spec.arch:
        logging.info(
            "%s: loading LAVIS's %s weights through the plugin's %s (the same model types and weights)",
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
    for kind in dict.fromkeys(kinds):
        if not hasattr(model, NEEDED_METHOD[kind]):
            raise TypeError(
                f"{spec.label}: {type(model).__name__} has no {NEEDED_METHOD[kind]}, which {kind} benchmarks need"
                + ("; compare stage-2 (LLM) models on VQA" if kind == "vqa" else "; use a stage-1 model (xformer, blip2)")
            )
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
            overrides = settings.overrides.get(benchmark.name, ())
            if benchmark.kind == "vqa":
                prepared[benchmark.name] = prepare_benchmark(benchmark, protocol, overrides, settings.limit, settings.seed)
            else:
                kind_protocol = settings.caption_protocol if benchmark.kind == "caption" else settings.retrieval_protocol
                prepared[benchmark.name] = caption_retrieval.prepare(
                    benchmark, kind_protocol, overrides, settings.limit, settings.seed
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
        return prediction_fingerprint(spec, prepared[name], prepared[name].protocol or protocol, settings.seed)

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
        kinds = [prepared[name].kind for name in todo if name != DIVERSITY]
        model, vis_processor = load_model(spec, settings.device, settings.seed, kinds)
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


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lavis_xformer.analysis.compare",
        description="Compare models head to head on zero-shot VQA, captioning and retrieval benchmarks (see the module "
        "docstring).",
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
        "--limit",
        type=int,
        default=None,
        help="evaluate a seeded uniform sample of N questions (captioning, retrieval: images) per benchmark",
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
    parser.add_argument("--caption-num-beams", type=int, default=CaptionProtocol.num_beams)
    parser.add_argument("--caption-max-len", type=int, default=CaptionProtocol.max_len)
    parser.add_argument("--caption-min-len", type=int, default=CaptionProtocol.min_len)
    parser.add_argument(
        "--k-test", type=int, default=RetrievalProtocol.k_test, help="retrieval: ITM re-scores the best k ITC candidates"
    )
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
        caption_protocol=CaptionProtocol(args.caption_num_beams, args.caption_max_len, args.caption_min_len),
        retrieval_protocol=RetrievalProtocol(args.k_test),
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
