"""Embedded default data: a small, deterministic dataset of coloured shapes, written in LAVIS's own formats.

Each image shows 1-4 non-overlapping circles, squares and triangles in red, green, blue or yellow on a plain
background, rasterised exactly and saved as PNG. From the same scene description come

* captions -- "two red circles and a blue square", plus two phrasings of it ("a picture of ...",
  "an image showing ...");
* VQA questions, three per image: counting ("How many circles are there in the image?" -> "2", "0" when absent)
  and identification ("Is there a red square in the image?"), one "yes" and one "no" per image, so yes/no is
  exactly balanced;
* retrieval pairs.

``generate(spec, folder)`` writes::

    images/{split}/shapes_{split}_{index:06d}.png
    annotations/scenes_{split}.json                 the ground truth: every object's shape, colour, centre, radius
    annotations/caption_{split}.json                LAVIS COCO-caption format (train: one caption per entry;
                                                    val/test: all captions per image, integer image ids)
    annotations/caption_{split}_gt.json             val/test: COCO ground truth for pycocoevalcap
    annotations/vqa_{split}.json                    LAVIS coco_vqa format (10 answers per question, as VQAv2)
    annotations/vqa_answer_list.json                every possible answer (for rank-based inference)
    annotations/vqa_{split}_questions.json          val/test: official VQA question file  } read by LAVIS's
    annotations/vqa_{split}_annotations.json        val/test: official VQA annotation file} VQA / VQAEval
    annotations/retrieval_{split}.json              LAVIS retrieval format (train: pairs; val/test: caption lists)
    manifest.json                                   the spec and file list; written last, marks completion

Everything is a function of ``ShapesSpec`` alone: each split has its own ``random.Random`` seeded from
``(seed, split)`` (so resizing one split leaves the others unchanged) and no global random state is touched.
The same spec gives the same bytes (PNG and JSON) on every run.
"""

import json
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

# Bump when the generator's output changes: the folder name carries it, so older data is never reused silently.
FORMAT_VERSION = 1

SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUND = (245, 245, 245)
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
CAPTION_TEMPLATES = ("{}", "a picture of {}", "an image showing {}")
ANSWER_LIST = ["0", "1", "2", "3", "4", "5", "6", "no", "yes"]

# Image ids are unique over all splits and do not depend on the other splits' sizes.
IMAGE_ID_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}
QUESTIONS_PER_IMAGE = 3  # question_id = image_id * 10 + k


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate. Every field is part of the data's identity (and of its folder name)."""

    seed: int = 0  #: base seed; each split draws from its own generator seeded with (seed, split)
    image_size: int = 64  #: width = height of the PNGs, in pixels (>= 32)
    num_train: int = 512  #: images in the train split
    num_val: int = 64  #: images in the val split
    num_test: int = 64  #: images in the test split
    min_objects: int = 1  #: fewest shapes in an image
    max_objects: int = 4  #: most shapes in an image (<= 6)

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size} is too small to draw 4 separate shapes; use >= 32")
        if not 1 <= self.min_objects <= self.max_objects <= max(NUMBER_WORDS):
            raise ValueError(
                f"need 1 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects}) <= {max(NUMBER_WORDS)}"
            )
        for split in SPLITS:
            if not 0 <= self.split_size(split) < 1_000_000:
                raise ValueError(f"num_{split}={self.split_size(split)} must lie in [0, 1000000)")

    @classmethod
    def from_config(cls, cfg) -> "ShapesSpec":
        """From a mapping (a dataset yaml's ``shapes:`` node); keys other than the fields and ``root`` are refused."""
        cfg = dict(cfg or {})
        cfg.pop("root", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown shapes setting(s) {unknown}; valid: {sorted(known)} and 'root'")
        return cls(**{key: int(value) for key, value in cfg.items()})

    def split_size(self, split: str) -> int:
        return getattr(self, f"num_{split}")

    def folder_name(self) -> str:
        return (
            f"shapes-v{FORMAT_VERSION}-seed{self.seed}-{self.image_size}px-{self.num_train}-{self.num_val}-"
            f"{self.num_test}-obj{self.min_objects}to{self.max_objects}"
        )


@dataclass(frozen=True)
class Shape:
    """One object: a shape of a colour inside the circle (center, radius), which never overlaps another's."""

    shape: str
    color: str
    center: Tuple[int, int]
    radius: int


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------
def sample_scene(rng: random.Random, spec: ShapesSpec) -> List[Shape]:
    """1-4 shapes at random places; bounding circles are kept apart by a margin, so shapes never touch."""
    size = spec.image_size
    min_radius, max_radius = max(3, round(size * 0.08)), max(4, round(size * 0.14))
    margin = 2
    count = rng.randint(spec.min_objects, spec.max_objects)
    for _ in range(1000):  # a full redraw when the shapes do not fit; in practice the first draw almost always does
        objects: List[Shape] = []
        for _ in range(count):
            for _ in range(100):
                radius = rng.randint(min_radius, max_radius)
                center = (rng.randint(radius + 1, size - radius - 2), rng.randint(radius + 1, size - radius - 2))
                if all(math.dist(center, o.center) > radius + o.radius + margin for o in objects):
                    objects.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), center, radius))
                    break
            else:
                break
        if len(objects) == count:
            return objects
    raise RuntimeError(f"could not place {count} separate shapes in a {size}px image; increase image_size")


def shape_mask(obj: Shape, image_size: int) -> np.ndarray:
    """Pixels whose centre lies inside the shape: exact geometry (no rasteriser artefacts), so every shape is one
    solid blob. Circle of the bounding radius; square and equilateral triangle (apex up) inscribed in it."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5
    cx, cy, r = obj.center[0] + 0.5, obj.center[1] + 0.5, float(obj.radius)
    if obj.shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2
    if obj.shape == "square":
        half = r / math.sqrt(2)
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    corners = [(cx, cy - r), (cx - r * math.sqrt(3) / 2, cy + r / 2), (cx + r * math.sqrt(3) / 2, cy + r / 2)]
    sides = [
        (bx - ax) * (ys - ay) - (by - ay) * (xs - ax)
        for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1])
    ]
    return (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0)


def render(objects: List[Shape], image_size: int) -> Image.Image:
    pixels = np.empty((image_size, image_size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    for obj in objects:
        pixels[shape_mask(obj, image_size)] = COLORS[obj.color]
    return Image.fromarray(pixels, mode="RGB")


# ---------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------
def describe(objects: List[Shape]) -> str:
    """"two red circles and a blue square": groups by (colour, shape), most frequent first, then by name order."""
    counts = Counter((o.color, o.shape) for o in objects)
    color_order, shape_order = list(COLORS), list(SHAPES)
    groups = sorted(counts.items(), key=lambda kv: (-kv[1], color_order.index(kv[0][0]), shape_order.index(kv[0][1])))
    phrases = [f"{NUMBER_WORDS[n]} {color} {shape}{'s' if n > 1 else ''}" for (color, shape), n in groups]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions(objects: List[Shape]) -> List[str]:
    description = describe(objects)
    return [template.format(description) for template in CAPTION_TEMPLATES]


def questions(rng: random.Random, objects: List[Shape]) -> List[dict]:
    """One counting question and two identification questions (one "yes", one "no", in random order)."""
    shape = rng.choice(SHAPES)
    counting = {
        "question": f"How many {shape}s are there in the image?",
        "answer": str(sum(o.shape == shape for o in objects)),
        "question_type": "how many",
        "answer_type": "number",
    }
    present = sorted({(o.color, o.shape) for o in objects})
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    identification = []
    for (color, shape_name), answer in ((rng.choice(present), "yes"), (rng.choice(absent), "no")):
        identification.append(
            {
                "question": f"Is there a {color} {shape_name} in the image?",
                "answer": answer,
                "question_type": "is there a",
                "answer_type": "yes/no",
            }
        )
    rng.shuffle(identification)
    return [counting] + identification


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _split_records(spec: ShapesSpec, split: str):
    """(image_id, image path, objects, captions, questions, train caption index) per image of a split, in order."""
    rng = random.Random(f"lavis_xformer.shapes:{spec.seed}:{split}")
    for index in range(spec.split_size(split)):
        objects = sample_scene(rng, spec)
        yield (
            IMAGE_ID_OFFSET[split] + index,
            f"{split}/shapes_{split}_{index:06d}.png",
            objects,
            captions(objects),
            questions(rng, objects),
            rng.randrange(len(CAPTION_TEMPLATES)),  # which caption a train entry uses
        )


def generate(spec: ShapesSpec, folder) -> Path:
    """Write the dataset described by ``spec`` into ``folder`` (created; must not hold a dataset already)."""
    folder = Path(folder)
    images, annotations = folder / "images", folder / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    _write_json(annotations / "vqa_answer_list.json", ANSWER_LIST)

    files = {"vqa_answer_list": "annotations/vqa_answer_list.json"}
    for split in SPLITS:
        (images / split).mkdir(parents=True, exist_ok=True)
        scenes, caption_anns, retrieval_anns, vqa_anns = [], [], [], []
        official_questions, official_annotations, gt_images, gt_captions = [], [], [], []
        for image_id, image_path, objects, texts, qas, train_choice in _split_records(spec, split):
            render(objects, spec.image_size).save(images / image_path, format="PNG")
            scenes.append({"image_id": image_id, "image": image_path, "objects": [asdict(o) for o in objects]})
            if split == "train":
                pair = {"image": image_path, "caption": texts[train_choice], "image_id": f"shapes_{image_id}"}
                caption_anns.append(pair)
                retrieval_anns.append(dict(pair))
            else:
                caption_anns.append({"image": image_path, "caption": texts, "image_id": image_id})
                retrieval_anns.append({"image": image_path, "caption": texts})
                gt_images.append({"id": image_id, "file_name": image_path})
                for k, text in enumerate(texts):
                    gt_captions.append({"image_id": image_id, "id": image_id * 10 + k, "caption": text})
            for k, qa in enumerate(qas):
                question_id = image_id * 10 + k
                vqa_anns.append(
                    {
                        "question_id": question_id,
                        "question": qa["question"],
                        "answer": [qa["answer"]] * 10,  # VQAv2 has 10 human answers; the official metric needs them
                        "image": image_path,
                        "image_id": image_id,
                        "dataset": "vqa",
                    }
                )
                official_questions.append({"image_id": image_id, "question": qa["question"], "question_id": question_id})
                official_annotations.append(
                    {
                        "question_id": question_id,
                        "image_id": image_id,
                        "question_type": qa["question_type"],
                        "answer_type": qa["answer_type"],
                        "multiple_choice_answer": qa["answer"],
                        "answers": [
                            {"answer": qa["answer"], "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)
                        ],
                    }
                )

        written = {
            f"scenes_{split}": scenes,
            f"caption_{split}": caption_anns,
            f"retrieval_{split}": retrieval_anns,
            f"vqa_{split}": vqa_anns,
        }
        if split != "train":
            info = {"description": f"lavis_xformer shapes ({split})", "version": FORMAT_VERSION}
            written[f"caption_{split}_gt"] = {
                "info": info,
                "licenses": [],
                "type": "captions",
                "images": gt_images,
                "annotations": gt_captions,
            }
            written[f"vqa_{split}_questions"] = {
                "info": info,
                "license": {},
                "task_type": "Open-Ended",
                "data_type": "shapes",
                "data_subtype": split,
                "questions": official_questions,
            }
            written[f"vqa_{split}_annotations"] = {
                "info": info,
                "license": {},
                "data_type": "shapes",
                "data_subtype": split,
                "annotations": official_annotations,
            }
        for name, data in written.items():
            _write_json(annotations / f"{name}.json", data)
            files[name] = f"annotations/{name}.json"

    manifest = {
        "format_version": FORMAT_VERSION,
        "spec": asdict(spec),
        "splits": {split: spec.split_size(split) for split in SPLITS},
        "files": files,
    }
    _write_json(folder / "manifest.json", manifest)
    return folder


def is_complete(folder) -> bool:
    return (Path(folder) / "manifest.json").is_file()


def ensure_generated(spec: ShapesSpec, root) -> Path:
    """The dataset folder for ``spec`` under ``root``, generated first if missing.

    Generation goes to a temporary folder that is renamed into place when complete, so an interrupted run never
    leaves a half-written dataset behind, and a concurrent generator's result is kept if it finished first.
    """
    root = Path(root)
    target = root / spec.folder_name()
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.folder_name()}.tmp-", dir=root))
    try:
        generate(spec, staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if target.exists() and not is_complete(target):
            shutil.rmtree(target)  # the leftover of an older, interrupted layout
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target):  # someone else's complete copy is fine; anything else is an error
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def read_annotation(folder, name: str):
    """One of a generated dataset's annotation files, parsed (e.g. ``"scenes_train"``)."""
    return json.loads(annotation_path(folder, name).read_text())


def default_root(cache_root: Optional[str] = None) -> Path:
    """``<LAVIS cache_root>/xformer_shapes``, where LAVIS keeps every dataset."""
    if cache_root is None:
        from lavis.common.registry import registry

        cache_root = registry.get_path("cache_root")
    return Path(cache_root) / "xformer_shapes"


def resolve_root(root: Optional[str]) -> Path:
    """A configured ``shapes.root``: absolute and ``~`` paths as given, relative ones under LAVIS's cache_root
    (LAVIS's rule for every dataset path), ``None`` for the default."""
    if root is None or str(root) == "":
        return default_root()
    path = Path(os.path.expanduser(str(root)))
    if path.is_absolute():
        return path
    from lavis.common.registry import registry

    return Path(registry.get_path("cache_root")) / path


def annotation_path(folder, name: str) -> Path:
    """Absolute path of an annotation file of a generated dataset (e.g. ``"vqa_val_questions"``)."""
    return Path(folder) / "annotations" / f"{name}.json"


# ---------------------------------------------------------------------------------------------------------------
# Planted facts (the experiment, lavis_xformer/experiment): what each image shows, as questions with known answers
# ---------------------------------------------------------------------------------------------------------------
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
MAX_COUNT = 3  #: counting questions are asked only where the answer is 0..MAX_COUNT (the balanced answer set)
#: question type -> its answers; each type's questions are balanced over these (``balanced_questions``)
QUESTION_TYPES = {
    "count_shape": tuple(str(n) for n in range(MAX_COUNT + 1)),  # how many circles?
    "count_colour": tuple(str(n) for n in range(MAX_COUNT + 1)),  # how many red things?
    "quadrant": QUADRANTS,  # where is the red circle? (asked when exactly one red circle is present)
    "exists": ("no", "yes"),  # is there a red circle?
}
KINDS = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)  # "red circle", ...: 12 named objects


def quadrant(obj: Shape, image_size: int) -> str:
    """The quadrant that holds the object's centre (pixel centres: ``x + 0.5`` against ``image_size / 2``)."""
    half = image_size / 2
    return QUADRANTS[2 * (obj.center[1] + 0.5 >= half) + (obj.center[0] + 0.5 >= half)]


def set_caption(objects: List[Shape]) -> str:
    """What occurs, and nothing more: "blue square and red circle" -- each (colour, shape) once, in name order,
    singular, no number, no plural, no position (the experiment's CLIP stand-in learns from these)."""
    kinds = sorted({(o.color, o.shape) for o in objects}, key=lambda k: (list(COLORS).index(k[0]), SHAPES.index(k[1])))
    phrases = [f"{color} {shape}" for color, shape in kinds]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def detail_caption(objects: List[Shape], image_size: int) -> str:
    """Counts and positions: "two red circles top left and bottom right and a blue square top right" (``describe``'s
    groups, each followed by its objects' quadrants in ``QUADRANTS`` order): both Q-Formers' stage-1 captions."""
    counts = Counter((o.color, o.shape) for o in objects)
    color_order, shape_order = list(COLORS), list(SHAPES)
    groups = sorted(counts.items(), key=lambda kv: (-kv[1], color_order.index(kv[0][0]), shape_order.index(kv[0][1])))
    phrases = []
    for (color, shape), n in groups:
        places = sorted((quadrant(o, image_size) for o in objects if (o.color, o.shape) == (color, shape)),
                        key=QUADRANTS.index)
        phrases.append(f"{NUMBER_WORDS[n]} {color} {shape}{'s' if n > 1 else ''} {' and '.join(places)}")
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def facts(objects: List[Shape], image_size: int) -> dict:
    """Every planted fact of an image: ``{question type: {target: answer}}`` (targets: a shape, a colour, a named
    object); counting answers above ``MAX_COUNT`` and quadrants of repeated objects are left out (not asked)."""
    kinds = Counter(f"{o.color} {o.shape}" for o in objects)
    found = {
        "count_shape": {s: str(sum(o.shape == s for o in objects)) for s in SHAPES},
        "count_colour": {c: str(sum(o.color == c for o in objects)) for c in COLORS},
        "quadrant": {f"{o.color} {o.shape}": quadrant(o, image_size) for o in objects
                     if kinds[f"{o.color} {o.shape}"] == 1},
        "exists": {k: "yes" if kinds[k] else "no" for k in KINDS},
    }
    for qtype in ("count_shape", "count_colour"):
        found[qtype] = {t: a for t, a in found[qtype].items() if int(a) <= MAX_COUNT}
    return found


def balanced_questions(image_facts: List[dict], rng: random.Random) -> List[Tuple[int, str, str, str]]:
    """(image index, question type, target, answer) tuples, every answer of a type equally often: of each type's
    candidate questions (every fact of every image), each answer keeps as many as the rarest answer has, drawn
    with ``rng``; sorted by image, type and target. An image-blind guess then scores 1 / (number of answers)."""
    chosen = []
    for qtype, answers in QUESTION_TYPES.items():
        by_answer = {a: [] for a in answers}
        for index, found in enumerate(image_facts):
            for target, answer in sorted(found[qtype].items()):
                by_answer[answer].append((index, qtype, target, answer))
        keep = min(len(v) for v in by_answer.values())
        for answer in answers:
            chosen += rng.sample(by_answer[answer], keep)
    type_order = list(QUESTION_TYPES)
    return sorted(chosen, key=lambda q: (q[0], type_order.index(q[1]), q[2]))
