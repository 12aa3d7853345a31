"""The VQA benchmarks a comparison runs, and their preparation through LAVIS's own builders and tasks.

    Benchmark (table row) -> prepare_benchmark(benchmark, protocol) -> PreparedBenchmark (task, dataset, questions)

``BENCHMARKS`` is the table (builder, split, task of each); ``Protocol`` is how every model answers (LAVIS's VQA task
settings). A prepared benchmark holds the LAVIS task and eval dataset, the evaluated questions (all, or a seeded
sample of ``limit``) and the official question/annotation files its scoring reads.
"""

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import List, Optional, Sequence

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import load_dataset_config
from lavis.tasks.vqa import GQATask
from omegaconf import OmegaConf

from lavis_xformer.datasets.finegrained import resolve_path

@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str  #: how tables name it
    builder: str  #: LAVIS dataset builder
    config_type: str  #: key of the builder's DATASET_CONFIG_DICT
    split: str
    task: str  #: registered LAVIS task that runs it
    kind: str = "vqa"  #: "vqa", "caption" or "retrieval" (``caption_retrieval`` prepares and scores the latter two)


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
        Benchmark("coco_caption", "COCO captions (Karpathy)", "coco_caption", "default", "test",
                  "xformer_captioning", "caption"),
        Benchmark("nocaps", "NoCaps", "nocaps", "default", "val", "xformer_captioning", "caption"),
        Benchmark("shapes_caption", "Shapes captions", "xformer_shapes_caption", "default", "test",
                  "xformer_captioning", "caption"),
        Benchmark("coco_retrieval", "COCO 5k retrieval", "coco_retrieval", "default", "test", "retrieval", "retrieval"),
        Benchmark("flickr30k", "Flickr30k 1k retrieval", "flickr30k", "default", "test", "retrieval", "retrieval"),
        Benchmark("shapes_retrieval", "Shapes retrieval", "xformer_shapes_retrieval", "default", "test", "retrieval",
                  "retrieval"),
    )
}


BENCHMARK_GROUPS = {
    "oc": ("oc_coco", "oc_vcr"),
    "mci": ("mci_coco", "mci_vcr"),
    "captioning": ("coco_caption", "nocaps"),
    "retrieval": ("coco_retrieval", "flickr30k"),
}


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


@dataclass
class PreparedBenchmark:
    benchmark: Benchmark
    task: object  #: the LAVIS task (VQATask / GQATask subclass) that runs and scores it
    dataset: object  #: LAVIS eval dataset of the split
    indices: List[int]  #: dataset positions evaluated, ascending
    question_ids: List[int]
    question_file: Optional[str] = None  #: official VQA files (VQA-style scoring)
    annotation_file: Optional[str] = None
    references: Optional[dict] = None  #: captioning: image_id -> reference captions
    protocol: Optional[object] = None  #: captioning / retrieval: the protocol the task was set up with

    @property
    def kind(self) -> str:
        return self.benchmark.kind

    @property
    def scoring(self) -> str:
        return "gqa" if isinstance(self.task, GQATask) else "vqa"

    def question_ids_digest(self) -> str:
        return hashlib.sha1(json.dumps(self.question_ids).encode()).hexdigest()


def dataset_config(benchmark: Benchmark, overrides: Sequence[str] = ()):
    """The builder's default dataset config, LAVIS's question (VQA) or caption processor, and the user's
    overrides."""
    builder_cls = registry.get_builder_class(benchmark.builder)
    if builder_cls is None:
        raise ValueError(f"dataset builder {benchmark.builder!r} is not registered")
    cfg = load_dataset_config(builder_cls.default_config_path(benchmark.config_type))
    text_processor = "blip_question" if benchmark.kind == "vqa" else "blip_caption"
    cfg = OmegaConf.merge(cfg, {"text_processor": {"eval": {"name": text_processor}}})
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


def require_inputs(benchmark: Benchmark, cfg) -> None:
    """FileNotFoundError naming every file the benchmark's dataset config points to that is not there, and how to fix it."""
    missing = missing_inputs(benchmark, cfg)
    if missing:
        raise FileNotFoundError(
            f"{benchmark.name}: not found: {', '.join(missing)}. Put the data where LAVIS's dataset config points "
            f"(relative paths are under cache_root {registry.get_path('cache_root')}) or override the paths with "
            f"--options {benchmark.name}.<config key>=<path>"
        )


def prepare_benchmark(
    benchmark: Benchmark, protocol: Protocol, overrides: Sequence[str] = (), limit: Optional[int] = None, seed: int = 0
) -> PreparedBenchmark:
    """Set up the benchmark's LAVIS task from the protocol and build its dataset with the task (which also picks
    up the official question/annotation files and answer list, as in a LAVIS evaluation run)."""
    cfg = dataset_config(benchmark, overrides)
    require_inputs(benchmark, cfg)
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
