"""Fine-grained visual perception: Object Counting (OC) and Multi-Class Identification (MCI).

The benchmark of GVT (Wang et al., "What makes for good visual tokenizers for large language models?", 2023; the
X-Former paper's reference [36] and Table 3): zero-shot questions about the objects of COCO and VCR images,

* OC:  "How many {objects} are there in the image?" -> the number of instances, as digits ("3");
* MCI: "Does {object} exist in the image?"          -> "yes" / "no".

Here the questions are *derived* from the instance annotations a user points the builder to, deterministically:

Sampling rule (``DerivationRule``; every draw comes from a ``random.Random`` seeded with ``(seed, task, image)``, so
an image's questions do not depend on which other images are in the file, and no global random state is touched):

* Images are taken in ascending ``image_id`` order (COCO ids; for VCR, the position of the image file name in the
  sorted list of distinct names). ``max_images`` keeps a uniform sample of that many eligible images (seeded).
* OC: the candidates of an image are its categories with ``1 <= instances <= max_count`` and no crowd annotation
  (a COCO ``iscrowd`` region stands for an uncounted number of instances). ``questions_per_image`` of them are
  drawn without replacement; the answer is the instance count. Absent categories are never asked (that is MCI).
* MCI: for each image, ``questions_per_image`` categories present in it (positives, crowd regions included) and
  as many categories absent from it (negatives) are drawn without replacement; negatives are drawn uniformly from
  the *vocabulary* (COCO: every category of the file; VCR: every object name that occurs anywhere in the file)
  minus the image's categories. An image that cannot give ``k`` of both gives ``k = min(#present, #absent,
  questions_per_image)`` of each, so yes and no are exactly balanced over the whole set.
* Question ids are ``image_id * 100 + slot``; each image's questions are ordered by category name.
* OC names the category in the plural ("people", "wine glasses"), MCI in the singular, as COCO spells it.

Source layouts (``finegrained.annotations`` and ``finegrained.images``; relative paths are under LAVIS's
``env.cache_root``, as for every LAVIS dataset):

* ``coco``: a COCO instances file (``annotations/instances_val2014.json`` or ``instances_val2017.json``: ``images``
  with ``id``/``file_name``, ``annotations`` with ``image_id``/``category_id``/``iscrowd``, ``categories`` with
  ``id``/``name``); ``images`` is the folder holding the ``file_name`` files (``coco/images/val2014``).
* ``vcr``: a VCR 1.0 annotation file (``val.jsonl``: one JSON object per line with ``img_fn``, e.g.
  ``lsmdc_1054_Harry_Potter_and_the_prisoner_of_azkaban/1054_..._00.01.46.736-00.01.50.168@0.jpg``, and
  ``objects``, the names of the image's detected objects, one per box, e.g. ``["person", "person", "chair"]``); a
  JSON list of such objects is read too. Lines about the same image are read once. ``images`` is the
  ``vcr1images`` folder. VCR's objects are COCO categories, so the same vocabulary rules apply.

Derived files (LAVIS's coco_vqa format plus the official VQA question and annotation files, so that LAVIS's
``COCOVQAEvalDataset`` reads them and LAVIS's VQA evaluator scores them; see ``generate``) go to
``<finegrained.root>/<task>_<source>-v<N>-<hash of the settings>/`` and are rebuilt when the source file changes.

Scoring is LAVIS's official VQA accuracy (``lavis.common.vqa_tools.vqa_eval.VQAEval``). Every ground-truth answer
is given ten times, as VQAv2's ten annotators, so a question scores 100 exactly when the normalised prediction
equals the answer: accuracy in % as the paper reports it. VQAEval normalises predictions identically for every
model: lower case, punctuation removed, articles dropped and number words up to ten mapped to digits ("two" ->
"2", "none"/"zero" -> "0"), which is why answers are written as digits and ``max_count`` defaults to 10.
"""

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset, COCOVQAEvalDataset
from omegaconf import OmegaConf

from lavis_xformer.paths import dataset_config_path

# Bump when the derivation's output changes: the folder name carries it, so older files are never reused silently.
FORMAT_VERSION = 1

TASKS = ("oc", "mci")
SOURCE_FORMATS = ("coco", "vcr")
SPLIT = "test"  # the only split: a zero-shot benchmark
OC_TEMPLATE = "How many {objects} are there in the image?"
MCI_TEMPLATE = "Does {object} exist in the image?"
ANSWERS_PER_QUESTION = 10  # as VQAv2's ten annotators: the official VQA accuracy then is exact match
QUESTION_ID_STRIDE = 100  # question_id = image_id * 100 + slot

# English plurals of COCO's category names that the suffix rule below gets wrong.
IRREGULAR_PLURALS = {
    "person": "people",
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "broccoli": "broccoli",
}


def plural(name: str) -> str:
    """ "wine glass" -> "wine glasses", "person" -> "people": the last word is pluralised."""
    head, _, last = name.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


# ---------------------------------------------------------------------------------------------------------------
# Reading the sources
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageObjects:
    """What an image holds: instance counts per category name, and the categories with crowd regions."""

    image_id: int
    image: str  #: path relative to the images folder
    counts: Dict[str, int]
    crowd: FrozenSet[str] = frozenset()

    @property
    def present(self) -> List[str]:
        return sorted(set(self.counts) | self.crowd)


@dataclass(frozen=True)
class ObjectAnnotations:
    images: List[ImageObjects]  #: in ascending image_id order
    vocabulary: List[str]  #: every category name a negative may be drawn from, sorted


def read_coco_instances(path) -> ObjectAnnotations:
    """A COCO instances file; images without any annotation are kept (they give no question)."""
    data = json.loads(Path(path).read_text())
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: not a COCO instances file (no {key!r}); expected instances_*.json")
    names = {category["id"]: category["name"] for category in data["categories"]}
    counts = {image["id"]: Counter() for image in data["images"]}
    crowd = {image["id"]: set() for image in data["images"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in counts:
            raise ValueError(f"{path}: annotation {ann.get('id')} refers to image {ann['image_id']}, not in 'images'")
        name = names[ann["category_id"]]
        if ann.get("iscrowd", 0):
            crowd[ann["image_id"]].add(name)
        else:
            counts[ann["image_id"]][name] += 1
    images = [
        ImageObjects(image["id"], image["file_name"], dict(counts[image["id"]]), frozenset(crowd[image["id"]]))
        for image in sorted(data["images"], key=lambda image: image["id"])
    ]
    return ObjectAnnotations(images, sorted(set(names.values())))


def _vcr_records(path) -> List[dict]:
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_vcr_annotations(path) -> ObjectAnnotations:
    """A VCR annotation file (``val.jsonl``); ``image_id`` is the image's rank among the sorted file names."""
    objects_by_image: Dict[str, List[str]] = {}
    for number, record in enumerate(_vcr_records(path), start=1):
        if "img_fn" not in record or "objects" not in record:
            raise ValueError(f"{path}: record {number} has no 'img_fn'/'objects'; expected VCR's val.jsonl layout")
        objects_by_image.setdefault(record["img_fn"], list(record["objects"]))
    images = [
        ImageObjects(image_id, image, dict(Counter(objects_by_image[image])))
        for image_id, image in enumerate(sorted(objects_by_image))
    ]
    vocabulary = sorted({name for names in objects_by_image.values() for name in names})
    return ObjectAnnotations(images, vocabulary)


READERS = {"coco": read_coco_instances, "vcr": read_vcr_annotations}


# ---------------------------------------------------------------------------------------------------------------
# Deriving questions
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DerivationRule:
    """How questions are sampled (module docstring). Every field is part of the derived data's identity."""

    seed: int = 0  #: base seed; each image draws from its own generator seeded with (seed, task, image)
    questions_per_image: int = 1  #: OC: categories asked per image; MCI: yes/no pairs per image
    max_count: int = 10  #: OC: categories with more instances are not asked (VQAEval maps words up to "ten")
    max_images: Optional[int] = None  #: keep a seeded uniform sample of this many eligible images (None: all)

    def __post_init__(self):
        if not 1 <= self.questions_per_image <= QUESTION_ID_STRIDE // 2:
            raise ValueError(
                f"questions_per_image must lie in [1, {QUESTION_ID_STRIDE // 2}], got {self.questions_per_image}"
            )
        if self.max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {self.max_count}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1 or null, got {self.max_images}")


def _image_rng(rule: DerivationRule, task: str, image: ImageObjects) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and PYTHONHASHSEED.
    # It keeps the module's first name (lavis_xformer.finegrained), so the derived questions stay the same.
    return random.Random(f"lavis_xformer.finegrained:{rule.seed}:{task}:{image.image}")


def _oc_candidates(image: ImageObjects, rule: DerivationRule) -> List[str]:
    return sorted(name for name, n in image.counts.items() if 1 <= n <= rule.max_count and name not in image.crowd)


def _keep_sample(images: List[ImageObjects], rule: DerivationRule, task: str) -> List[ImageObjects]:
    if rule.max_images is None or len(images) <= rule.max_images:
        return images
    rng = random.Random(f"lavis_xformer.finegrained:{rule.seed}:{task}:images")
    kept = set(rng.sample(range(len(images)), rule.max_images))
    return [image for index, image in enumerate(images) if index in kept]


def _question(image: ImageObjects, slot: int, question: str, answer: str, name: str, **extra) -> dict:
    return {
        "question_id": image.image_id * QUESTION_ID_STRIDE + slot,
        "image_id": image.image_id,
        "image": image.image,
        "question": question,
        "answer": answer,
        "object": name,
        **extra,
    }


def derive_oc(annotations: ObjectAnnotations, rule: DerivationRule = DerivationRule()) -> List[dict]:
    """Object Counting questions (one dict per question: question_id, image_id, image, question, answer, object)."""
    eligible = [image for image in annotations.images if _oc_candidates(image, rule)]
    questions = []
    for image in _keep_sample(eligible, rule, "oc"):
        candidates = _oc_candidates(image, rule)
        asked = sorted(_image_rng(rule, "oc", image).sample(candidates, min(rule.questions_per_image, len(candidates))))
        for slot, name in enumerate(asked):
            count = image.counts[name]
            questions.append(_question(image, slot, OC_TEMPLATE.format(objects=plural(name)), str(count), name))
    return questions


def _mci_choices(image: ImageObjects, vocabulary: List[str], rule: DerivationRule):
    """(present, absent, k): the image's categories, the vocabulary's others, and how many pairs it can give."""
    present = image.present
    absent = [name for name in vocabulary if name not in set(present)]
    return present, absent, min(rule.questions_per_image, len(present), len(absent))


def derive_mci(annotations: ObjectAnnotations, rule: DerivationRule = DerivationRule()) -> List[dict]:
    """Multi-Class Identification questions, exactly as many "yes" as "no"."""
    vocabulary = annotations.vocabulary
    eligible = [image for image in annotations.images if _mci_choices(image, vocabulary, rule)[2] > 0]
    questions = []
    for image in _keep_sample(eligible, rule, "mci"):
        present, absent, k = _mci_choices(image, vocabulary, rule)
        rng = _image_rng(rule, "mci", image)
        positives, negatives = rng.sample(present, k), rng.sample(absent, k)
        asked = sorted([(name, "yes") for name in positives] + [(name, "no") for name in negatives])
        for slot, (name, answer) in enumerate(asked):
            questions.append(_question(image, slot, MCI_TEMPLATE.format(object=name), answer, name))
    return questions


DERIVE = {"oc": derive_oc, "mci": derive_mci}
ANSWER_TYPE = {"oc": "number", "mci": "yes/no"}
QUESTION_TYPE = {"oc": "how many", "mci": "does"}


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def annotation_names(task: str) -> List[str]:
    """The derived files COCOVQAEvalDataset takes, in its order: questions, answer list, official Q and A files."""
    return [f"{task}_{SPLIT}", f"{task}_answer_list", f"{task}_{SPLIT}_questions", f"{task}_{SPLIT}_annotations"]


def answer_list(task: str, rule: DerivationRule) -> List[str]:
    return [str(n) for n in range(1, rule.max_count + 1)] if task == "oc" else ["no", "yes"]


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def generate(task: str, questions: List[dict], rule: DerivationRule, folder, source: Optional[dict] = None) -> Path:
    """Write ``questions`` in LAVIS's coco_vqa format and as official VQA files into ``folder``; returns it.

    ``manifest.json`` (written last, so its presence marks a complete folder) records the rule, the source and
    the counts.
    """
    folder = Path(folder)
    annotations_dir = folder / "annotations"
    annotations_dir.mkdir(parents=True, exist_ok=True)
    info = {"description": f"lavis_xformer fine-grained {task.upper()} ({SPLIT})", "version": FORMAT_VERSION}
    lavis_records, official_questions, official_annotations = [], [], []
    for q in questions:
        lavis_records.append(
            {
                "question_id": q["question_id"],
                "question": q["question"],
                "answer": [q["answer"]] * ANSWERS_PER_QUESTION,
                "image": q["image"],
                "image_id": q["image_id"],
                "object": q["object"],
                "dataset": f"xformer_{task}",
            }
        )
        official_questions.append(
            {"image_id": q["image_id"], "question": q["question"], "question_id": q["question_id"]}
        )
        official_annotations.append(
            {
                "question_id": q["question_id"],
                "image_id": q["image_id"],
                "question_type": QUESTION_TYPE[task],
                "answer_type": ANSWER_TYPE[task],
                "multiple_choice_answer": q["answer"],
                "answers": [
                    {"answer": q["answer"], "answer_confidence": "yes", "answer_id": i}
                    for i in range(1, ANSWERS_PER_QUESTION + 1)
                ],
            }
        )
    names = annotation_names(task)
    contents = [
        lavis_records,
        answer_list(task, rule),
        {
            "info": info,
            "license": {},
            "task_type": "Open-Ended",
            "data_type": f"xformer_{task}",
            "data_subtype": SPLIT,
            "questions": official_questions,
        },
        {
            "info": info,
            "license": {},
            "data_type": f"xformer_{task}",
            "data_subtype": SPLIT,
            "annotations": official_annotations,
        },
    ]
    for name, data in zip(names, contents):
        _write_json(annotations_dir / f"{name}.json", data)
    answers = Counter(q["answer"] for q in questions)
    manifest = {
        "format_version": FORMAT_VERSION,
        "task": task,
        "rule": asdict(rule),
        "source": source or {},
        "num_questions": len(questions),
        "num_images": len({q["image_id"] for q in questions}),
        "answers": dict(sorted(answers.items())),
        "files": {name: f"annotations/{name}.json" for name in names},
    }
    _write_json(folder / "manifest.json", manifest)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# What a builder is configured with
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinegrainedSpec:
    """A dataset yaml's ``finegrained:`` node."""

    task: str
    source_format: str
    annotations: str  #: the COCO instances / VCR annotation file
    images: str  #: the folder the image paths are relative to
    root: str = "xformer_finegrained"  #: where the derived files go
    rule: DerivationRule = DerivationRule()

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"finegrained.task must be one of {TASKS}, got {self.task!r}")
        if self.source_format not in SOURCE_FORMATS:
            raise ValueError(f"finegrained.source_format must be one of {SOURCE_FORMATS}, got {self.source_format!r}")

    @classmethod
    def from_config(cls, cfg) -> "FinegrainedSpec":
        cfg = dict(cfg or {})
        rule_fields = {f.name for f in fields(DerivationRule)}
        known = {"task", "source_format", "annotations", "images", "root"} | rule_fields
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown finegrained setting(s) {unknown}; valid: {sorted(known)}")
        missing = sorted({"task", "source_format", "annotations", "images"} - set(cfg))
        if missing:
            raise ValueError(f"finegrained settings {missing} are required")
        rule = DerivationRule(**{k: (None if cfg[k] is None else int(cfg[k])) for k in rule_fields if k in cfg})
        return cls(
            task=str(cfg["task"]),
            source_format=str(cfg["source_format"]),
            annotations=str(cfg["annotations"]),
            images=str(cfg["images"]),
            root=str(cfg.get("root", "xformer_finegrained")),
            rule=rule,
        )

    def folder_name(self, annotations_path: Path) -> str:
        identity = json.dumps({"source": str(annotations_path), "rule": asdict(self.rule)}, sort_keys=True)
        digest = hashlib.sha1(identity.encode()).hexdigest()[:12]
        return f"{self.task}_{self.source_format}-v{FORMAT_VERSION}-{digest}"


def resolve_path(path: str) -> Path:
    """LAVIS's rule for dataset paths: absolute and ``~`` paths as given, relative ones under ``env.cache_root``."""
    expanded = Path(os.path.expanduser(path))
    if expanded.is_absolute():
        return expanded
    return Path(registry.get_path("cache_root")) / expanded


def source_signature(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_current(folder: Path, signature: dict) -> bool:
    manifest = folder / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("source") == signature


def ensure_derived(spec: FinegrainedSpec, annotations_path: Path, folder: Path) -> Path:
    """The derived files for ``spec`` in ``folder``, derived first when missing or older than the source.

    Derivation goes to a temporary folder renamed into place when complete, so an interrupted run never leaves
    half-written files behind.
    """
    if not annotations_path.is_file():
        expected = "a COCO instances_*.json" if spec.source_format == "coco" else "VCR's val.jsonl"
        raise FileNotFoundError(
            f"{spec.source_format} annotations for the {spec.task.upper()} benchmark not found at {annotations_path}; "
            f"set finegrained.annotations to {expected} (relative paths are under LAVIS's cache_root)"
        )
    signature = source_signature(annotations_path)
    if is_current(folder, signature):
        return folder
    annotations = READERS[spec.source_format](annotations_path)
    questions = DERIVE[spec.task](annotations, spec.rule)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        generate(spec.task, questions, spec.rule, staging, source=signature)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if folder.exists():
            shutil.rmtree(folder)  # derived from an older source
        os.rename(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logging.info(
        "%s: %d questions derived from %s into %s", spec.task.upper(), len(questions), annotations_path, folder
    )
    return folder


# ---------------------------------------------------------------------------------------------------------------
# LAVIS builders (the task that scores them is ``tasks.FinegrainedVQATask``, ``xformer_finegrained``)
# ---------------------------------------------------------------------------------------------------------------
class FinegrainedBuilder(BaseDatasetBuilder):
    """Derives the questions (``_download_data``, run by rank 0 while the others wait, as LAVIS downloads) and
    points LAVIS's ``build()`` at the derived files; ``build_info`` comes from the ``finegrained:`` node."""

    train_dataset_cls = COCOVQADataset  # unused: the benchmark has only a test split
    eval_dataset_cls = COCOVQAEvalDataset

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.spec = FinegrainedSpec.from_config(self.config.get("finegrained", None))
        self.annotations_path = resolve_path(self.spec.annotations)
        self.data_dir = resolve_path(self.spec.root) / self.spec.folder_name(self.annotations_path)
        build_info = OmegaConf.create(
            {
                "annotations": {
                    SPLIT: {
                        "storage": [
                            str(self.data_dir / "annotations" / f"{n}.json") for n in annotation_names(self.spec.task)
                        ]
                    }
                },
                "images": {"storage": str(resolve_path(self.spec.images))},
            }
        )
        configured = self.config.get("build_info", None)
        if configured is not None and configured != build_info:
            logging.warning(
                "%s: build_info is derived from `finegrained:`; the configured one is ignored", type(self).__name__
            )
        self.config.build_info = build_info

    def _download_data(self):
        ensure_derived(self.spec, self.annotations_path, self.data_dir)
        images = resolve_path(self.spec.images)
        if not images.is_dir():
            logging.warning("%s: images folder %s does not exist; set finegrained.images", type(self).__name__, images)


@registry.register_builder("xformer_oc_coco")
class OCCOCOBuilder(FinegrainedBuilder):
    """Object Counting on COCO instances (GVT's OC@COCO)."""

    DATASET_CONFIG_DICT = {"default": dataset_config_path("xformer_finegrained/oc_coco.yaml")}


@registry.register_builder("xformer_mci_coco")
class MCICOCOBuilder(FinegrainedBuilder):
    """Multi-Class Identification on COCO instances (GVT's MCI@COCO)."""

    DATASET_CONFIG_DICT = {"default": dataset_config_path("xformer_finegrained/mci_coco.yaml")}


@registry.register_builder("xformer_oc_vcr")
class OCVCRBuilder(FinegrainedBuilder):
    """Object Counting on VCR's objects (GVT's OC@VCR)."""

    DATASET_CONFIG_DICT = {"default": dataset_config_path("xformer_finegrained/oc_vcr.yaml")}


@registry.register_builder("xformer_mci_vcr")
class MCIVCRBuilder(FinegrainedBuilder):
    """Multi-Class Identification on VCR's objects (GVT's MCI@VCR)."""

    DATASET_CONFIG_DICT = {"default": dataset_config_path("xformer_finegrained/mci_vcr.yaml")}


def derive_from_files(
    task: str, source_format: str, annotations_path, rule: DerivationRule = DerivationRule()
) -> List[dict]:
    """Questions for ``task`` from an annotation file, without writing anything (for inspection and tests)."""
    return DERIVE[task](READERS[source_format](annotations_path), rule)
