"""Stage-1 captioning: ``XFormer.generate`` decodes from the ITG decoder exactly as ITG is trained, equals LAVIS's
``Blip2Qformer.generate`` with the MAE branch off, and runs through the caption task on the shapes data."""

import json
import sys

import pytest
import torch
from lavis.models import load_model
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.xformer import XFormer
from helpers import PROJECTS, run_cli, shapes_options

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]


def tiny(**overrides) -> XFormer:
    cfg = load_model("xformer", "tiny").config
    torch.manual_seed(0)
    return XFormer(XFormerConfig(**{**cfg.to_dict(), **overrides}))


def responsive(model):
    """A random tiny Q-Former (std 0.02) decodes the same caption for every image; larger weights make the
    captions depend on the image, so that equalities of generated tokens below are not vacuous."""
    generator = torch.Generator().manual_seed(0)
    for name, param in model.Qformer.named_parameters():
        if param.dim() == 2 and "embeddings" not in name:
            param.data.normal_(0.0, 0.3, generator=generator)
    return model.eval()


def images(size=4, seed=0):
    return torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class LogitsSpy:
    """Records the LM head's outputs (``Qformer.cls``): every decoding step's logits, or ITG's."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.Qformer.cls.register_forward_hook(lambda module, args, output: self.calls.append(output))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def first_step_logits(model, samples, **options):
    with LogitsSpy(model) as spy:
        captions = model.generate(samples, **options)
    return spy.calls[0][:, -1], captions  # [B * beams, vocab]: the [DEC] position


# ------------------------------------------------------------------------------------------------------------------
# The same decoder as ITG, and BLIP-2's with the MAE branch off
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [dict(num_beams=3, max_length=12, min_length=3), dict(num_beams=1, max_length=12, min_length=3)],
    ids=["beam3", "greedy"],
)
@pytest.mark.parametrize(
    "overrides",
    [dict(use_mae=False, reconstruction_loss=False), dict(itg_conditioning="qformer_cache")],
    ids=["mae_off", "qformer_cache"],
)
def test_generate_without_enrichment_equals_lavis_blip2_generate(overrides, options):
    """With no enrichment of the ITG cache the tokens are LAVIS's ``Blip2Qformer.generate``'s on the same weights
    (it recomputes [queries; text] from the image at every step; X-Former decodes from the cache)."""
    model = responsive(tiny(**overrides))
    samples = {"image": images()}
    captions = model.generate(samples, **options)
    assert captions == Blip2Qformer.generate(model, samples, **options)
    assert len(set(captions)) > 1  # the captions depend on the image

    if not model.config.use_mae:  # the BLIP-2 twin (LAVIS's class, unchanged) holding the same weights
        baseline = load_model("blip2_baseline", "tiny").eval()
        baseline.load_state_dict(model.state_dict(), strict=True)
        assert baseline.generate(samples, **options) == captions


def test_first_step_logits_equal_itg_training_logits():
    """The first decoding step is ITG's position 0 for the same image and masking: the same enriched cache."""
    model = responsive(tiny(eval_mask_ratio=0.5))
    image = images()
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(1))
    logits, _ = first_step_logits(model, {"image": image, "mae_noise": noise}, num_beams=2, max_length=4, min_length=1)

    tokens = model.tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=model.max_txt_len, return_tensors="pt")
    with torch.no_grad(), LogitsSpy(model) as spy:
        model.itg_loss(model.itg_cache(model.encode(image, model.config.eval_mask_ratio, noise)), tokens)
    itg_logits = spy.calls[0][:, 0]  # the prediction after [DEC]
    torch.testing.assert_close(logits[0::2], itg_logits, rtol=0, atol=1e-5)  # beam rows start equal
    torch.testing.assert_close(logits[1::2], itg_logits, rtol=0, atol=1e-5)

    # ... and not BLIP-2's decoder: the enrichment Z' - Z_q moves those logits
    blip2_cache = model.encode(image, model.config.eval_mask_ratio, noise).qformer_output.past_key_values
    with torch.no_grad(), LogitsSpy(model) as spy:
        model.itg_loss(blip2_cache, tokens)
    assert (spy.calls[0][:, 0] - itg_logits).abs().max() > 1e-3


def test_mae_features_change_the_generated_captions():
    """The same image and CLIP-ViT, another M (the frozen MAE encoder perturbed): other logits, other captions."""
    model = responsive(tiny())
    samples = {"image": images()}
    options = dict(num_beams=3, max_length=12, min_length=3)
    logits, captions = first_step_logits(model, samples, **options)
    clip_before = model.forward_clip(samples["image"])
    with torch.no_grad():
        for param in model.mae_encoder.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    torch.testing.assert_close(model.forward_clip(samples["image"]), clip_before, rtol=0, atol=0)
    changed_logits, changed_captions = first_step_logits(model, samples, **options)
    assert (changed_logits - logits).abs().max() > 1e-3
    assert changed_captions != captions


def test_nucleus_sampling_gives_one_caption_per_image():
    model = responsive(tiny())
    torch.manual_seed(0)
    first = model.generate({"image": images()}, use_nucleus_sampling=True, max_length=8, min_length=2)
    torch.manual_seed(0)
    again = model.generate({"image": images()}, use_nucleus_sampling=True, max_length=8, min_length=2)
    assert len(first) == 4 and first == again


def test_generate_refuses_a_bad_image():
    with pytest.raises(ValueError, match=r"samples\['image'\] is \(16, 16\) pixels"):
        tiny().generate({"image": torch.zeros(1, 3, 16, 16)})


# ------------------------------------------------------------------------------------------------------------------
# LAVIS's caption task on the shapes data
# ------------------------------------------------------------------------------------------------------------------
SIZES = dict(num_train=8, num_val=4, num_test=6)


def reference_scores(ground_truth_file, results_file, monkeypatch):
    """pycocoevalcap's COCOEvalCap on the generated COCO ground truth (SPICE stubbed: it needs a download)."""
    import pycocoevalcap.eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
    coco = COCO(str(ground_truth_file))
    evaluator = pycocoevalcap.eval.COCOEvalCap(coco, coco.loadRes(str(results_file)))
    evaluator.evaluate()
    return evaluator.eval


@pytest.mark.parametrize("arch", ["xformer", "blip2_baseline"])
def test_caption_task_evaluates_a_stage1_checkpoint_on_shapes(arch, tmp_path, monkeypatch):
    """``python -m lavis_xformer.evaluate`` on the demo caption yaml (and its BLIP-2 twin): a caption for every test
    image, and the metrics pycocoevalcap gives against the split's COCO ground-truth file."""
    model = responsive(tiny() if arch == "xformer" else load_model("blip2_baseline", "tiny"))
    checkpoint = tmp_path / "stage1.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    yaml = PROJECTS / "demo" / ("caption_shapes_eval.yaml" if arch == "xformer" else "caption_shapes_eval_blip2.yaml")
    run_cli(
        [sys.executable, "-m", "lavis_xformer.evaluate", "--cfg-path", yaml, "--options",
         *shapes_options("xformer_shapes_caption", tmp_path / "data", **SIZES),
         f"model.finetuned={checkpoint}", f"run.output_dir={tmp_path / 'eval'}"],
        cwd=tmp_path,
    )
    (job,) = (tmp_path / "eval").iterdir()
    results_file = job / "result" / "test_epochbest.json"
    results = json.loads(results_file.read_text())
    (data,) = (tmp_path / "data").iterdir()
    ground_truth_file = data / "annotations" / "caption_test_gt.json"
    test_ids = {image["id"] for image in json.loads(ground_truth_file.read_text())["images"]}
    assert sorted(r["image_id"] for r in results) == sorted(test_ids) and len(test_ids) == SIZES["num_test"]
    assert all(isinstance(r["caption"], str) and r["caption"] for r in results)
    assert len({r["caption"] for r in results}) > 1

    metrics = json.loads((job / "evaluate.txt").read_text().splitlines()[-1])["test"]
    reference = reference_scores(ground_truth_file, results_file, monkeypatch)
    for name in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert metrics[name] == pytest.approx(reference[name], abs=1e-9), name
    assert metrics["Bleu_1"] > 0 and metrics["CIDEr"] >= 0


def test_caption_task_refuses_an_unknown_ground_truth():
    from types import SimpleNamespace

    from lavis.common.config import Config
    from lavis.common.registry import registry

    cfg = Config(SimpleNamespace(cfg_path=str(PROJECTS / "demo" / "caption_shapes_eval.yaml"),
                                 options=["run.caption_ground_truth=nocaps"]))
    with pytest.raises(ValueError, match="caption_ground_truth='nocaps' is not valid"):
        registry.get_task_class("xformer_captioning").setup_task(cfg=cfg)
