"""OC / MCI (GVT's fine-grained benchmark, X-Former Table 3): derivation from COCO and VCR annotations, the LAVIS
builders and task, and scoring with number words normalised the same way for every model."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import load_dataset_config
from omegaconf import OmegaConf
from PIL import Image

from lavis_xformer.analysis import compare, vqa_scoring
from lavis_xformer.datasets import finegrained
from lavis_xformer.datasets.finegrained import DerivationRule

CATEGORIES = ["person", "wine glass", "bus", "knife", "dog", "sheep"]

# image id -> {category: instances}; "crowd" lists categories with an iscrowd region.
SCENES = {
    3: {"person": 3, "wine glass": 1},
    5: {"bus": 1, "crowd": ["person"]},
    9: {"knife": 1, "person": 12},  # 12 people: over max_count, never counted
    12: {},  # no objects: gives no question
    20: {"dog": 2, "sheep": 4, "bus": 1},
    21: {"person": 1, "dog": 1, "knife": 2, "wine glass": 5},
}


def write_coco_instances(folder, scenes=SCENES) -> str:
    """A small COCO-format instances file (and 8x8 images named as its file_name entries)."""
    categories = [{"id": i + 1, "name": name, "supercategory": "thing"} for i, name in enumerate(CATEGORIES)]
    ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for image_id, scene in sorted(scenes.items(), reverse=True):  # unsorted on purpose: the reader sorts by id
        file_name = f"COCO_val2014_{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": file_name, "width": 8, "height": 8})
        Image.new("RGB", (8, 8), (image_id * 10 % 255, 80, 120)).save(folder / file_name)
        for name, count in scene.items():
            if name == "crowd":
                continue
            for _ in range(count):
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[name], "iscrowd": 0}
                )
        for name in scene.get("crowd", []):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[name], "iscrowd": 1}
            )
    path = folder / "instances_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path)


@pytest.fixture()
def coco_file(tmp_path):
    return write_coco_instances(tmp_path)


def test_plural_forms_of_coco_names():
    assert [
        finegrained.plural(n) for n in ("person", "wine glass", "bus", "knife", "sheep", "skis", "bench", "dog")
    ] == ["people", "wine glasses", "buses", "knives", "sheep", "skis", "benches", "dogs"]


def test_oc_questions_answers_and_counts(coco_file):
    questions = finegrained.derive_from_files("oc", "coco", coco_file)
    # One question per image with a countable category: 3, 5, 9 (knife only: 12 people > max_count), 20, 21.
    assert [q["image_id"] for q in questions] == [3, 5, 9, 20, 21]
    for q in questions:
        scene = SCENES[q["image_id"]]
        assert q["answer"] == str(scene[q["object"]])
        assert q["question"] == f"How many {finegrained.plural(q['object'])} are there in the image?"
        assert q["question_id"] == q["image_id"] * 100
        assert 1 <= int(q["answer"]) <= 10
    by_image = {q["image_id"]: q for q in questions}
    assert by_image[5]["object"] == "bus"  # the crowd of people is not countable
    assert by_image[9]["object"] == "knife"

    every = finegrained.derive_from_files("oc", "coco", coco_file, DerivationRule(questions_per_image=10))
    asked = Counter(q["image_id"] for q in every)
    assert asked == {3: 2, 5: 1, 9: 1, 20: 3, 21: 4}
    assert {(q["image_id"], q["object"], q["answer"]) for q in every} >= {(21, "wine glass", "5"), (20, "sheep", "4")}
    assert len({q["question_id"] for q in every}) == len(every)

    capped = finegrained.derive_from_files("oc", "coco", coco_file, DerivationRule(questions_per_image=10, max_count=2))
    assert (
        all(int(q["answer"]) <= 2 for q in capped) and len(capped) == len(every) - 3
    )  # people (3), sheep (4), wine glasses (5)


def test_mci_questions_are_balanced_and_correct(coco_file):
    for k in (1, 2, 3):
        questions = finegrained.derive_from_files("mci", "coco", coco_file, DerivationRule(questions_per_image=k))
        answers = Counter(q["answer"] for q in questions)
        assert answers["yes"] == answers["no"] > 0 and set(answers) == {"yes", "no"}
        for q in questions:
            scene = SCENES[q["image_id"]]
            present = set(scene) - {"crowd"} | set(scene.get("crowd", []))
            assert q["answer"] == ("yes" if q["object"] in present else "no")
            assert q["question"] == f"Does {q['object']} exist in the image?"
            assert q["object"] in CATEGORIES
        assert 12 not in {q["image_id"] for q in questions}  # an empty image has no positive
        per_image = Counter((q["image_id"], q["answer"]) for q in questions)
        for image_id in {q["image_id"] for q in questions}:
            present = len(set(SCENES[image_id]) - {"crowd"} | set(SCENES[image_id].get("crowd", [])))
            absent = len(CATEGORIES) - present
            assert per_image[(image_id, "yes")] == per_image[(image_id, "no")] == min(k, present, absent)
    # The crowd region still says "a person is there".
    pairs = finegrained.derive_from_files("mci", "coco", coco_file, DerivationRule(questions_per_image=5))
    assert (5, "person", "yes") in {(q["image_id"], q["object"], q["answer"]) for q in pairs}


def test_derivation_is_seeded_and_per_image(tmp_path, coco_file):
    rule = DerivationRule(seed=0, questions_per_image=2)
    first = finegrained.derive_from_files("mci", "coco", coco_file, rule)
    assert first == finegrained.derive_from_files("mci", "coco", coco_file, rule)
    assert any(
        finegrained.derive_from_files("mci", "coco", coco_file, DerivationRule(seed=s, questions_per_image=2)) != first
        for s in (1, 2, 3)
    )
    # An image's questions do not depend on the other images in the file.
    smaller = {k: v for k, v in SCENES.items() if k != 20}
    (tmp_path / "smaller").mkdir()
    reduced = finegrained.derive_from_files("mci", "coco", write_coco_instances(tmp_path / "smaller", smaller), rule)
    assert reduced == [q for q in first if q["image_id"] != 20]
    # max_images keeps whole images, so yes/no stay balanced.
    sampled = finegrained.derive_from_files(
        "mci", "coco", coco_file, DerivationRule(questions_per_image=1, max_images=2)
    )
    assert len({q["image_id"] for q in sampled}) == 2 and Counter(q["answer"] for q in sampled) == {"yes": 2, "no": 2}


def test_vcr_annotations(tmp_path):
    records = [
        {"img_fn": "movie_b/shot2.jpg", "objects": ["person", "person", "chair"], "question": ["what"]},
        {"img_fn": "movie_a/shot1.jpg", "objects": ["person", "dog", "dog", "dog"]},
        {"img_fn": "movie_b/shot2.jpg", "objects": ["person", "person", "chair"]},  # same image, another question
        {"img_fn": "movie_c/shot3.jpg", "objects": ["car"]},
    ]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    annotations = finegrained.read_vcr_annotations(path)
    assert [image.image for image in annotations.images] == [
        "movie_a/shot1.jpg",
        "movie_b/shot2.jpg",
        "movie_c/shot3.jpg",
    ]
    assert [image.image_id for image in annotations.images] == [0, 1, 2]
    assert annotations.images[1].counts == {"person": 2, "chair": 1}
    assert annotations.vocabulary == ["car", "chair", "dog", "person"]
    oc = finegrained.derive_oc(annotations, DerivationRule(questions_per_image=5))
    assert {(q["image"], q["object"], q["answer"]) for q in oc} == {
        ("movie_a/shot1.jpg", "person", "1"),
        ("movie_a/shot1.jpg", "dog", "3"),
        ("movie_b/shot2.jpg", "person", "2"),
        ("movie_b/shot2.jpg", "chair", "1"),
        ("movie_c/shot3.jpg", "car", "1"),
    }
    mci = finegrained.derive_mci(annotations, DerivationRule(questions_per_image=5))
    assert Counter(q["answer"] for q in mci) == {"yes": 5, "no": 5}
    # A JSON list of the same records reads the same.
    listed = tmp_path / "val.json"
    listed.write_text(json.dumps(records))
    assert finegrained.read_vcr_annotations(listed) == annotations


def test_bad_sources_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="instances"):
        finegrained.read_coco_instances(bad)
    with pytest.raises(ValueError, match="img_fn"):
        bad.write_text(json.dumps([{"objects": []}]))
        finegrained.read_vcr_annotations(bad)
    with pytest.raises(ValueError, match="unknown finegrained setting"):
        finegrained.FinegrainedSpec.from_config(
            {"task": "oc", "source_format": "coco", "annotations": "a", "images": "b", "sed": 1}
        )


def builder_config(name, annotations, images, root, **rule):
    cfg = load_dataset_config(registry.get_builder_class(name).default_config_path())
    cfg.finegrained.update({"annotations": annotations, "images": images, "root": root, **rule})
    return cfg


def test_builders_write_lavis_and_official_files(tmp_path, coco_file):
    assert {"xformer_oc_coco", "xformer_mci_coco", "xformer_oc_vcr", "xformer_mci_vcr"} <= set(registry.list_datasets())
    cfg = builder_config("xformer_mci_coco", coco_file, str(tmp_path), str(tmp_path / "derived"), questions_per_image=2)
    task = registry.get_task_class("xformer_finegrained").setup_task(SimpleNamespace(run_cfg=OmegaConf.create({})))
    datasets = task.build_datasets(SimpleNamespace(datasets_cfg={"xformer_mci_coco": cfg}))
    dataset = datasets["xformer_mci_coco"]["test"]
    expected = finegrained.derive_from_files("mci", "coco", coco_file, DerivationRule(questions_per_image=2))
    assert [a["question_id"] for a in dataset.annotation] == [q["question_id"] for q in expected]
    assert all(a["answer"] == [q["answer"]] * 10 for a, q in zip(dataset.annotation, expected))
    assert dataset.answer_list == ["no", "yes"]
    # LAVIS's VQA task picked up the official files, as for VQAv2.
    official_q = json.loads(open(task.ques_files["test"]).read())["questions"]
    official_a = json.loads(open(task.anno_files["test"]).read())["annotations"]
    assert (
        [q["question_id"] for q in official_q]
        == [a["question_id"] for a in official_a]
        == [q["question_id"] for q in expected]
    )
    assert {a["answer_type"] for a in official_a} == {"yes/no"}
    sample = dataset[0]
    assert sample["question_id"] == expected[0]["question_id"] and sample["text_input"] == expected[0]["question"]

    # The derived files follow the source: a changed annotation file is derived again.
    manifest = tmp_path / "derived"
    (folder,) = manifest.iterdir()
    before = json.loads((folder / "manifest.json").read_text())
    changed = {**SCENES, 30: {"dog": 1}}
    write_coco_instances(tmp_path, changed)
    registry.get_builder_class("xformer_mci_coco")(cfg).build_datasets()
    after = json.loads((folder / "manifest.json").read_text())
    assert after["num_images"] == before["num_images"] + 1


def test_finegrained_task_defaults_to_the_paper_protocol():
    task_cls = registry.get_task_class("xformer_finegrained")
    task = task_cls.setup_task(SimpleNamespace(run_cfg=OmegaConf.create({})))
    assert (task.prompt, task.num_beams, task.length_penalty, task.inference_method, task.max_len, task.min_len) == (
        "Question: {} Short Answer:",
        5,
        0.0,
        "generate",
        10,
        1,
    )
    task = task_cls.setup_task(SimpleNamespace(run_cfg=OmegaConf.create({"num_beams": 3, "prompt": "Q: {} A:"})))
    assert (task.num_beams, task.prompt, task.length_penalty) == (3, "Q: {} A:", 0.0)


def test_scoring_normalises_number_words_for_every_model(tmp_path, coco_file):
    """OC through the comparison's scorer (LAVIS's VQAEval): "two", "2", "Two." and "2 " are the same answer."""
    prepared = compare.prepare_benchmark(
        compare.BENCHMARKS["oc_coco"],
        compare.Protocol(),
        overrides=[
            f"finegrained.annotations={coco_file}",
            f"finegrained.images={tmp_path}",
            f"finegrained.root={tmp_path / 'derived'}",
            "finegrained.questions_per_image=10",
        ],
    )
    truth = {a["question_id"]: a["answer"][0] for a in prepared.dataset.annotation}
    words = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}
    as_digits = [{"question_id": q, "prediction": a} for q, a in truth.items()]
    as_words = [{"question_id": q, "prediction": words[a].capitalize() + "."} for q, a in truth.items()]
    with_article = [{"question_id": q, "prediction": f"the {a} "} for q, a in truth.items()]
    wrong = [{"question_id": q, "prediction": str(int(a) + 1)} for q, a in truth.items()]
    scores = {
        name: vqa_scoring.score_vqa(prepared, preds, tmp_path / "scoring", name)
        for name, preds in [("digits", as_digits), ("words", as_words), ("article", with_article), ("wrong", wrong)]
    }
    assert scores["digits"].accuracy == scores["words"].accuracy == scores["article"].accuracy == 100.0
    assert scores["wrong"].accuracy == 0.0
    assert scores["digits"].per_answer_type == {"number": 100.0}
