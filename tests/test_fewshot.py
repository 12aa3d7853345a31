"""Few-shot in-context evaluation (``lavis_xformer.fewshot``, tasks ``xformer_fewshot_vqa`` /
``xformer_fewshot_captioning``) on tiny models and a small shapes set:

* 0 shots is the zero-shot path: the same answers as ``predict_answers`` / ``generate`` and as the zero-shot tasks;
* with k shots the LLM reads exactly k demonstration images per query, all from the training split, never the
  query's image, and the same ones for X-Former and BLIP-2;
* a context longer than the LLM's positions is refused with ``ContextTooLongError``;
* the task scores every (shots, seed) and writes ``fewshot.json``.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

import lavis_xformer  # noqa: F401  (registers the plugin)
from lavis_xformer import fewshot
from lavis_xformer.tasks_fewshot import underlying
from test_stage2 import responsive, tiny

SHAPES = dict(seed=0, image_size=32, num_train=24, num_val=0, num_test=2)  # 6 test questions
PAIR = ("blip2_baseline_opt", "xformer_opt")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {arch: responsive(tiny(arch)).eval() for arch in PAIR + ("xformer_t5",)}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


def dataset_cfg(builder_name, root, text_processor):
    cfg = OmegaConf.load(registry.get_builder_class(builder_name).default_config_path()).datasets[builder_name]
    cfg.shapes.update(SHAPES, root=root)
    cfg.vis_processor = {"eval": {"name": "xformer_image_eval", "image_size": 32}}
    cfg.text_processor = {"eval": {"name": text_processor}}
    return cfg


def make_task(name, root, **run):
    kind = "vqa" if "vqa" in name else "caption"
    base = dict(num_beams=2, max_len=4, min_len=1, evaluate=True, inference_method="generate")
    if kind == "caption":
        base.update(caption_ground_truth="dataset")
    task = registry.get_task_class(name).setup_task(SimpleNamespace(run_cfg=OmegaConf.create({**base, **run})))
    builder = f"xformer_shapes_{kind}"
    cfg = dataset_cfg(builder, root, "blip_question" if kind == "vqa" else "blip_caption")
    datasets = task.build_datasets(SimpleNamespace(datasets_cfg={builder: cfg}))
    return task, datasets[builder]


def loader(dataset, batch_size=6):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collater)


def test_zero_shots_equal_predict_answers_and_generate(models, data_root):
    _, splits = make_task("xformer_fewshot_vqa", data_root, shots=[0])
    samples = next(iter(loader(splits["test"])))
    for arch, model in models.items():
        expected = model.predict_answers(samples, num_beams=2, max_len=4)
        assert fewshot.answer_in_context(model, samples, [[]] * 6, num_beams=2, max_len=4) == expected, arch
        assert len(set(expected)) > 1  # not vacuous
    for arch in ("xformer_opt", "xformer_t5"):
        image = {"image": samples["image"]}
        captions = models[arch].generate(image, num_beams=2, max_length=4)
        assert fewshot.caption_in_context(models[arch], image, [[]] * 6, num_beams=2, max_length=4) == captions


@pytest.mark.parametrize("kind", ["vqa", "captioning"])
def test_task_with_zero_shots_answers_as_the_zero_shot_task(models, data_root, kind):
    fewshot_task, splits = make_task(f"xformer_fewshot_{kind}", data_root, shots=[0])
    zero_shot_task, _ = make_task(f"xformer_{kind}", data_root)
    if kind == "vqa":  # the zero-shot task needs the prompt in run:, the few-shot one reads the model's
        zero_shot_task.prompt = models["xformer_opt"].config.vqa_prompt
    for arch in PAIR:
        few = fewshot_task.evaluation(models[arch], loader(splits["test"]), cuda_enabled=False)
        zero = zero_shot_task.evaluation(models[arch], loader(splits["test"]), cuda_enabled=False)
        assert [{k: v for k, v in r.items() if k not in ("shots", "trial_seed")} for r in few] == zero
        assert {(r["shots"], r["trial_seed"]) for r in few} == {(0, 42)}


def spy_on_inputs(model, monkeypatch):
    """Record every image batch that enters ``llm_image_inputs`` and every context that reaches generation."""
    calls = {"images": [], "contexts": []}
    image_inputs, generate = model.llm_image_inputs, model.generate_from_prefix

    def recording_image_inputs(image, questions=None):
        calls["images"].append(image.clone())
        return image_inputs(image, questions)

    def recording_generate(prefix, prefix_atts, prompts, settings):
        calls["contexts"].append(prefix_atts.clone())
        return generate(prefix, prefix_atts, prompts, settings)

    monkeypatch.setattr(model, "llm_image_inputs", recording_image_inputs)
    monkeypatch.setattr(model, "generate_from_prefix", recording_generate)
    return calls


def test_k_shots_hold_k_training_images_never_the_query_and_the_same_for_both_models(models, data_root, monkeypatch):
    shots = 2
    task, splits = make_task("xformer_fewshot_vqa", data_root, shots=[shots], trial_seeds=[7], query_set_size=16)
    test, train = underlying(splits["test"]), underlying(splits["train"])
    processor = test.vis_processor
    from PIL import Image

    def pixels(dataset, ann):
        return processor(Image.open(f"{dataset.vis_root}/{ann['image']}").convert("RGB"))

    train_images = torch.stack([pixels(train, ann) for ann in train.annotation])
    drawn = {}
    original_draw = task.pool.draw
    task._evaluated, task.setting = test, (shots, 7)
    (samples,) = loader(splits["test"])  # the 6 questions of the 2 test images, one batch
    for arch in PAIR:
        model = models[arch]
        calls = spy_on_inputs(model, monkeypatch)
        keys = drawn[arch] = []
        monkeypatch.setattr(task.pool, "draw", lambda *a: keys.append(original_draw(*a)) or keys[-1])
        task.valid_step(model, samples)
        query_images, demo_images = calls["images"]
        assert demo_images.shape[0] == shots * query_images.shape[0]  # exactly k images per query
        for i, demo in enumerate(demo_images):
            assert ((train_images - demo).abs().flatten(1).amax(1) == 0).any(), "not a training image"
            assert not torch.equal(demo, query_images[i // shots]), "the query's own image among its demonstrations"
        (context_atts,) = calls["contexts"]
        assert (context_atts.sum(1) > (shots + 1) * model.query_tokens.shape[1]).all()  # k+1 prefixes and the texts
    assert [[e.key for e in d] for d in drawn["xformer_opt"]] == [[e.key for e in d] for d in drawn[PAIR[0]]]
    assert len(drawn["xformer_opt"]) == 6 and all(len(d) == shots for d in drawn["xformer_opt"])


def test_demonstrations_are_drawn_per_query_from_the_query_set_never_with_the_query_image():
    examples = [fewshot.Example(str(i), f"/data/img{i % 10}.png", f"q{i}", "yes") for i in range(40)]
    pool = fewshot.DemoPool(examples, query_set_size=12)
    query_set = pool.query_set(3)
    assert len(query_set) == 12 and query_set == fewshot.DemoPool(examples, 12).query_set(3)
    assert pool.query_set(4) != query_set
    for key in range(20):
        image = f"/data/img{key % 10}.png"
        demos = pool.draw(key, image, 4, 3)
        assert len(demos) == 4 and len({d.key for d in demos}) == 4
        assert all(int(d.key) in query_set and d.image_path != image for d in demos)
        assert demos == pool.draw(key, image, 4, 3)  # a function of (seed, key): no batch or order dependence
    assert pool.draw(0, None, 4, 3) != pool.draw(1, None, 4, 3) or pool.draw(0, None, 4, 3) != pool.draw(2, None, 4, 3)
    with pytest.raises(ValueError, match="usable examples"):
        pool.draw(0, examples[query_set[0]].image_path, 12, 3)  # 12 in the query set, one of them the query's image
    assert fewshot.most_frequent(["2", "3", "3", "2", "3"]) == "3" and fewshot.most_frequent(["a", "b"]) == "a"


def test_a_context_longer_than_the_llm_is_refused(models, data_root):
    task, splits = make_task("xformer_fewshot_vqa", data_root, shots=[8], query_set_size=24)
    model = models["xformer_opt"]
    assert model.opt_model.config.max_position_embeddings == 128
    with pytest.raises(fewshot.ContextTooLongError, match=r"> the LLM's limit of 128 positions.*fewer shots"):
        task.evaluation(model, loader(splits["test"]), cuda_enabled=False)


def test_flant5_reads_the_demonstrations_in_its_encoder(models, data_root, monkeypatch):
    task, splits = make_task("xformer_fewshot_vqa", data_root, shots=[2], query_set_size=16)
    model = models["xformer_t5"]
    calls = spy_on_inputs(model, monkeypatch)
    results = task.evaluation(model, loader(splits["test"]), cuda_enabled=False)
    assert len(results) == 6 and all(isinstance(r["answer"], str) for r in results)
    (context_atts,) = calls["contexts"]
    assert (context_atts.sum(1) > 3 * model.query_tokens.shape[1]).all()


def test_task_scores_every_setting_and_writes_fewshot_json(models, data_root, tmp_path, monkeypatch):
    for name in ("result_dir", "output_dir"):
        monkeypatch.setitem(registry.mapping["paths"], name, str(tmp_path))
    task, splits = make_task("xformer_fewshot_vqa", data_root, shots=[0, 2], trial_seeds=[1, 2], query_set_size=16)
    results = task.evaluation(models["xformer_opt"], loader(splits["test"]), cuda_enabled=False)
    assert len(results) == 6 * 3  # 0 shots once, 2 shots per seed
    metrics = task.after_evaluation(results, "test")
    report = json.loads((tmp_path / "fewshot.json").read_text())
    assert set(report["shots"]) == {"0", "2"} and set(report["shots"]["2"]["trials"]) == {"1", "2"}
    trials = list(report["shots"]["2"]["trials"].values())
    assert report["shots"]["2"]["mean"] == pytest.approx(sum(trials) / 2)
    assert metrics["agg_metrics"] == report["shots"]["2"]["mean"]
    assert all(0 <= v <= 100 for entry in report["shots"].values() for v in entry["trials"].values())
