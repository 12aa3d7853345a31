"""The embedded shapes data: deterministic, correct annotations, read by LAVIS's own dataset classes."""

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
from lavis.common.registry import registry
from omegaconf import OmegaConf
from PIL import Image

from lavis_xformer.datasets import shapes
from lavis_xformer.datasets.robust import RobustDataset
from helpers import tree_digest


SMALL_SPEC = shapes.ShapesSpec(seed=3, image_size=48, num_train=24, num_val=6, num_test=6)


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return shapes.ensure_generated(SMALL_SPEC, root)


# =================================================================================================================
# Shapes data
# =================================================================================================================
def test_shapes_generator_is_deterministic(tmp_path, small_shapes):
    again = shapes.ensure_generated(SMALL_SPEC, tmp_path / "again")
    assert sorted(p.name for p in again.rglob("*")) == sorted(p.name for p in small_shapes.rglob("*"))
    assert tree_digest(again) == tree_digest(small_shapes)  # same spec -> same bytes, PNGs included
    other = shapes.ensure_generated(dataclasses.replace(SMALL_SPEC, seed=4), tmp_path / "other")
    assert tree_digest(other) != tree_digest(small_shapes)
    # resizing one split leaves the others' content unchanged
    bigger = shapes.ensure_generated(dataclasses.replace(SMALL_SPEC, num_train=30), tmp_path / "big")
    for name in ("caption_val", "vqa_test_annotations", "scenes_test"):
        assert shapes.read_annotation(bigger, name) == shapes.read_annotation(small_shapes, name)
    assert not list(tmp_path.glob("*/.shapes-*"))  # no staging folders left behind


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected components of a boolean image (independent of the generator's geometry)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_shapes_annotations_are_correct(small_shapes):
    words = {1: "a", 2: "two", 3: "three", 4: "four"}
    for split in shapes.SPLITS:
        scenes = {s["image_id"]: s for s in shapes.read_annotation(small_shapes, f"scenes_{split}")}
        for scene in scenes.values():
            assert 1 <= len(scene["objects"]) <= 4
            # the picture shows exactly the annotated objects: one blob each, in its colour
            pixels = np.asarray(Image.open(small_shapes / "images" / scene["image"]).convert("RGB"))
            assert _components((pixels != shapes.BACKGROUND).any(axis=-1)) == len(scene["objects"])
            for obj in scene["objects"]:
                x, y = obj["center"]
                assert tuple(pixels[y, x]) == shapes.COLORS[obj["color"]]

        # VQA answers, recomputed from the scene annotation
        vqa = shapes.read_annotation(small_shapes, f"vqa_{split}")
        kinds = Counter()
        for qa in vqa:
            objects = scenes[qa["image_id"]]["objects"]
            question = qa["question"]
            if question.startswith("How many"):
                shape = question.split()[2].rstrip("s")
                expected = str(sum(o["shape"] == shape for o in objects))
                kinds["count"] += 1
            else:
                color, shape = question.split()[3:5]  # "Is there a {color} {shape} in the image?"
                expected = "yes" if any(o["color"] == color and o["shape"] == shape for o in objects) else "no"
                kinds[expected] += 1
            assert qa["answer"] == [expected] * 10, question
        n_images = len(scenes)
        assert kinds == Counter({"count": n_images, "yes": n_images, "no": n_images})  # yes/no exactly balanced

        # captions name every (colour, shape) group with its number
        for ann in shapes.read_annotation(small_shapes, f"caption_{split}"):
            texts = ann["caption"] if isinstance(ann["caption"], list) else [ann["caption"]]
            image_id = ann["image_id"] if split != "train" else int(ann["image_id"].split("_")[1])
            groups = Counter((o["color"], o["shape"]) for o in scenes[image_id]["objects"])
            for text in texts:
                for (color, shape), n in groups.items():
                    assert f"{words[n]} {color} {shape}{'s' if n > 1 else ''}" in text, text


def _build(builder_name, root, spec=SMALL_SPEC):
    sizes = dataclasses.asdict(spec)
    cfg = OmegaConf.load(registry.get_builder_class(builder_name).default_config_path()).datasets[builder_name]
    cfg.shapes.update(sizes, root=str(root))
    cfg.vis_processor = {"train": {"name": "xformer_image_train", "image_size": 32},
                         "eval": {"name": "xformer_image_eval", "image_size": 32}}
    text = "blip_question" if builder_name.endswith("vqa") else "blip_caption"
    cfg.text_processor = {"train": {"name": text}, "eval": {"name": text}}
    return registry.get_builder_class(builder_name)(cfg).build_datasets()


def test_lavis_dataset_classes_read_shapes(small_shapes, tmp_path):
    from lavis.common.vqa_tools.vqa import VQA
    from lavis.common.vqa_tools.vqa_eval import VQAEval
    from lavis.datasets.datasets.caption_datasets import CaptionDataset, CaptionEvalDataset
    from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset, COCOVQAEvalDataset
    from lavis.datasets.datasets.retrieval_datasets import RetrievalDataset, RetrievalEvalDataset

    root = small_shapes.parent
    caption = _build("xformer_shapes_caption", root)
    # train splits come wrapped in RobustDataset (bad samples replaced and counted) around LAVIS's class
    assert isinstance(caption["train"], RobustDataset)
    assert type(caption["train"].dataset) is CaptionDataset and type(caption["val"]) is CaptionEvalDataset
    sample = caption["train"][0]
    assert sample["image"].shape == (3, 32, 32) and isinstance(sample["text_input"], str)
    assert isinstance(caption["test"][0]["image_id"], int)  # CaptionTask does int(image_id)

    vqa = _build("xformer_shapes_vqa", root)
    assert type(vqa["train"].dataset) is COCOVQADataset and type(vqa["test"]) is COCOVQAEvalDataset
    assert len(vqa["train"]) == 3 * SMALL_SPEC.num_train
    batch = vqa["train"].collater([vqa["train"][i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["weight"].tolist() == [1.0] * 4
    val = vqa["val"]
    assert val.answer_list == shapes.ANSWER_LIST and val.coco_fmt_qust_file and val.coco_fmt_anno_file
    # LAVIS's official VQA scorer reads the files: perfect answers score 100, "yes" everywhere does not
    official = VQA(val.coco_fmt_anno_file, val.coco_fmt_qust_file)
    truth = {a["question_id"]: a["multiple_choice_answer"] for a in official.dataset["annotations"]}
    for answers, expected in ((truth, 100.0), ({q: "yes" for q in truth}, 100.0 / 3)):
        results = tmp_path / "results.json"
        results.write_text(json.dumps([{"question_id": q, "answer": a} for q, a in answers.items()]))
        scorer = VQAEval(official, official.loadRes(str(results), val.coco_fmt_qust_file), n=2)
        scorer.evaluate()
        assert scorer.accuracy["overall"] == pytest.approx(expected, abs=0.01)

    retrieval = _build("xformer_shapes_retrieval", root)
    assert type(retrieval["train"].dataset) is RetrievalDataset and type(retrieval["test"]) is RetrievalEvalDataset
    test = retrieval["test"]
    assert len(test.image) == SMALL_SPEC.num_test and len(test.text) == 3 * SMALL_SPEC.num_test
    assert all(test.txt2img[t] == i for i, texts in test.img2txt.items() for t in texts)
