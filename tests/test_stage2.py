"""Stage 2 (xformer_opt, xformer_t5) and the BLIP-2 LLM baselines: what trains, equality with LAVIS's Blip2OPT /
Blip2T5, paper-scale sizes on the meta device, checkpoint loading, batched generation, bad input. Offline, CPU."""

import copy

import pytest
import torch
from lavis.common.registry import registry
from lavis.models import load_model, load_model_and_preprocess
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_t5 import Blip2T5
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

import lavis_xformer
from lavis_xformer.checkpoints import CheckpointError
from lavis_xformer.models.builders import no_hub
from lavis_xformer.models.config_llm import XFormerOPTConfig, XFormerT5Config
from lavis_xformer.models.llm_builders import build_opt_tokenizer, build_t5_tokenizer
from lavis_xformer.models.llm_head import VQA_PROMPT, GenerationSettings, split_captions

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]
# Eight questions of different lengths: batching them pads every prompt but the longest.
QUESTIONS = [
    "how many?",
    "what color is the big star on the left of the image?",
    "is there a red circle?",
    "which shape is it?",
    "how many blue squares are there in the picture?",
    "what?",
    "does the image show three yellow triangles next to a cup?",
    "where is the star?",
]
LLM_OF = {
    "xformer_opt": "opt_model",
    "xformer_t5": "t5_model",
    "blip2_baseline_opt": "opt_model",
    "blip2_baseline_t5": "t5_model",
}
PROJECTION_OF = {"xformer_opt": "opt_proj", "xformer_t5": "t5_proj"}


def model_config(arch: str, model_type: str = "tiny", **overrides):
    """The typed config of a registered model type (its yaml's ``model:`` section) with field overrides."""
    cls = registry.get_model_class(arch)
    section = OmegaConf.to_container(OmegaConf.load(cls.default_config_path(model_type)).model)
    return cls.config_class.from_lavis_cfg({**section, **overrides})


def tiny(arch: str, **overrides):
    return registry.get_model_class(arch)(model_config(arch, **overrides))


def responsive(model):
    """Random tiny models barely react to their input: the Q-Former's cross-attention (std 0.02) moves its outputs
    by well under 1% between images, and an OPT at OPT's init emits the same tokens whatever it is given. Larger
    cross-attention, projection and OPT weights make every answer depend on the image and the prompt, so that the
    equality checks on generated text below are not vacuous. Bytes that are not valid UTF-8 on their own are
    decoded as escapes rather than all as U+FFFD, for the same reason."""
    generator = torch.Generator().manual_seed(0)
    projection = model.opt_proj if hasattr(model, "opt_proj") else model.t5_proj
    larger = [projection.weight] + [p for n, p in model.Qformer.named_parameters() if "crossattention" in n]
    if hasattr(model, "opt_model"):
        larger += list(model.opt_model.parameters())
        model.opt_tokenizer.errors = "backslashreplace"
    for param in larger:
        if param.dim() == 2:
            param.data.normal_(0.0, 0.3, generator=generator)
    return model


def images(size=4, seed=0):
    return torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count(params):
    return sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def eval_models():
    """One tiny model per stage-2 architecture, in eval mode (generation and input checks)."""
    torch.manual_seed(0)
    return {arch: responsive(tiny(arch)).eval() for arch in LLM_OF}


# ------------------------------------------------------------------------------------------------------------------
# Training: the gradient reaches the X-Former and the projection only
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, reconstruction", [("xformer_opt", False), ("xformer_t5", False), ("xformer_opt", True)])
def test_optimizer_step_changes_only_xformer_and_projection(arch, reconstruction):
    torch.manual_seed(0)
    model = tiny(arch, reconstruction_loss=reconstruction, mask_ratio=0.5 if reconstruction else 0.0).train()
    llm = getattr(model, LLM_OF[arch])
    frozen = {"visual_encoder": model.visual_encoder, "mae_encoder": model.mae_encoder, "llm": llm}
    if reconstruction:
        frozen["mae_decoder"] = model.mae_decoder
    frozen_before = {name: copy.deepcopy(module.state_dict()) for name, module in frozen.items()}

    allowed = ("Qformer.", "query_tokens", "ln_vision.", "dual_block.", PROJECTION_OF[arch] + ".")
    allowed += ("mae_out_proj.",) if reconstruction else ()
    params = trainable(model)
    assert all(name.startswith(allowed) for name in params), [n for n in params if not n.startswith(allowed)]
    assert {prefix for prefix in allowed if any(n.startswith(prefix) for n in params)} == set(allowed)
    before = {name: p.detach().clone() for name, p in params.items()}

    # Every parameter goes to the optimiser, with weight decay: frozen ones must stay put because no gradient
    # reaches them, not because they were left out.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    output = model({"image": images(), "text_input": CAPTIONS})
    assert (output.loss_rec is not None) == reconstruction
    output.loss.backward()
    no_grad = [name for name, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], f"trainable parameters without gradient: {no_grad}"
    optimizer.step()

    for name, module in frozen.items():
        assert all(p.grad is None for p in module.parameters()), f"gradient reached {name}"
        for key, value in module.state_dict().items():
            assert torch.equal(value, frozen_before[name][key]), f"{name}.{key} changed"
    assert all(not torch.equal(before[name], p) for name, p in params.items())


def test_freeze_xformer_trains_the_projection_only():
    model = tiny("xformer_opt", freeze_xformer=True)
    assert set(trainable(model)) == {"opt_proj.weight", "opt_proj.bias"}


def test_stage2_mae_masking_follows_mask_ratio_and_inference_sees_the_whole_image():
    seen = []

    def record(model):
        original = model.forward_mae

        def forward_mae(image, mask_ratio=None, noise=None):
            seen.append(mask_ratio if mask_ratio is not None else "eval_default")
            encoding = original(image, mask_ratio, noise)
            seen.append(int(encoding.mask.sum()))
            return encoding

        model.forward_mae = forward_mae
        return model

    samples = {"image": images(2), "text_input": CAPTIONS[:2]}
    record(tiny("xformer_opt")).train()(samples)  # default stage 2: the paper's 50% masking in training
    assert seen == [0.5, 2 * 8]
    seen.clear()
    record(tiny("xformer_opt", mask_ratio=0.0)).train()(samples)  # the _unmasked yamls: whole images
    assert seen == [0.0, 0]
    seen.clear()
    model = record(tiny("xformer_opt", reconstruction_loss=True, mask_ratio=0.5)).train()
    model(samples)  # Table 6 ablation: masked like stage 1
    assert seen == [0.5, 2 * 8]  # 16 patches per 32-px image at patch 8, half masked, 2 images
    seen.clear()
    model.eval().generate({"image": images(2)}, num_beams=1, max_length=2)
    assert seen == ["eval_default", 0]  # eval_mask_ratio 0: MAE sees the whole image


def test_reconstruction_switch_builds_the_decoder_and_adds_its_loss():
    default = tiny("xformer_opt")
    assert default.mae_decoder is None and default.mae_out_proj is None
    model = tiny("xformer_opt", reconstruction_loss=True, mask_ratio=0.5, loss_weight_rec=2.0).eval()
    assert model.mae_decoder is not None and model.mae_out_proj is not None
    out = model({"image": images(2), "text_input": CAPTIONS[:2]})
    torch.testing.assert_close(out.loss, out.loss_lm + 2.0 * out.loss_rec)
    with pytest.raises(ValueError, match="reconstruction_loss=True needs mask_ratio > 0"):
        XFormerOPTConfig(reconstruction_loss=True, mask_ratio=0.0)


# ------------------------------------------------------------------------------------------------------------------
# With the MAE branch off, the stage-2 models are LAVIS's Blip2OPT / Blip2T5
# ------------------------------------------------------------------------------------------------------------------
def paired(arch, baseline_arch, **overrides):
    """(LAVIS's class built offline, X-Former with use_mae=False) holding the same weights, in eval mode."""
    torch.manual_seed(0)
    baseline = responsive(tiny(baseline_arch, **overrides)).eval()
    xformer = responsive(tiny(arch, use_mae=False, **overrides)).eval()
    result = xformer.load_state_dict(baseline.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return baseline, xformer


@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_opt_head_caption_loss_equals_lavis_blip2_opt(prompt):
    """The shared head's loss, for the baseline and for X-Former with the MAE branch off, is LAVIS's own."""
    baseline, xformer = paired("xformer_opt", "blip2_baseline_opt", prompt=prompt)
    captions = [prompt + " " + c if prompt else c for c in CAPTIONS]  # the caption processor prepends the prompt
    samples = {"image": images(), "text_input": captions}
    reference = Blip2OPT.forward(baseline, samples)["loss"]  # LAVIS's own code
    torch.testing.assert_close(baseline(samples).loss, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(xformer(samples).loss, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_text_output", [True, False])
def test_t5_head_loss_equals_lavis_blip2_t5(with_text_output):
    baseline, xformer = paired("xformer_t5", "blip2_baseline_t5")
    samples = {"image": images(), "text_input": CAPTIONS}
    if with_text_output:  # LAVIS's form: encoder text in, target out
        samples["text_input"] = ["a", "two blue", "a green", ""]
        samples["text_output"] = ["red circle", "squares", "triangle", "three"]
        split = samples
    else:  # caption batches: the random prefix-LM split, the same on every side
        torch.manual_seed(7)
        prefixes, suffixes = split_captions(CAPTIONS)
        assert prefixes != [""] * 4 and suffixes != CAPTIONS  # the seed cuts at least one caption
        split = {"image": samples["image"], "text_input": prefixes, "text_output": suffixes}
    reference = Blip2T5.forward(baseline, split)["loss"]  # LAVIS's own code
    for model in (baseline, xformer):
        torch.manual_seed(7)
        torch.testing.assert_close(model(samples).loss, reference, rtol=0, atol=1e-5)


def test_mae_off_generation_equals_lavis():
    baseline, xformer = paired("xformer_opt", "blip2_baseline_opt")
    samples = {"image": images(), "prompt": "Question: how many circles? Short answer:"}
    options = dict(num_beams=3, max_length=6, min_length=0)
    captions = xformer.generate(samples, **options)
    assert captions == Blip2OPT.generate(baseline, samples, **options)  # LAVIS's own generate
    assert baseline.generate(samples, **options) == captions
    assert len(set(captions)) > 1  # the answers depend on the image
    # LAVIS 1.0.2's Blip2OPT has no predict_answers: it equals LAVIS's generate on each formatted question alone.
    vqa = {"image": images(), "text_input": QUESTIONS[:4]}
    answers = xformer.predict_answers(vqa, max_len=5, min_len=0)
    lavis = [
        Blip2OPT.generate(
            baseline,
            {"image": vqa["image"][i : i + 1], "prompt": VQA_PROMPT.format(question)},
            num_beams=5, max_length=5, min_length=0, length_penalty=0,
        )[0]
        for i, question in enumerate(QUESTIONS[:4])
    ]
    assert answers == lavis and baseline.predict_answers(vqa, max_len=5, min_len=0) == answers
    assert len(set(answers)) > 1

    baseline, xformer = paired("xformer_t5", "blip2_baseline_t5")
    samples = {"image": images(), "prompt": QUESTIONS[:4]}  # LAVIS's Blip2T5 takes one prompt per image
    captions = xformer.generate(samples, **options)
    assert captions == Blip2T5.generate(baseline, samples, **options) and len(set(captions)) > 1
    assert baseline.generate(samples, **options) == captions
    vqa = {"image": images(), "text_input": CAPTIONS}
    answers = xformer.predict_answers(vqa, max_len=5)
    assert answers == Blip2T5.predict_answers(baseline, vqa, max_len=5, prompt=VQA_PROMPT)  # length penalty -1
    assert baseline.predict_answers(vqa, max_len=5) == answers
    assert len(set(answers)) > 1


# ------------------------------------------------------------------------------------------------------------------
# The prefix-LM loss (VQA fine-tuning): prompt + target in, loss on the target tokens only
# ------------------------------------------------------------------------------------------------------------------
PROMPTS = [VQA_PROMPT.format(q) for q in ("how many?", "what color is the big star on the left of the image?")]
ANSWERS = ["2", "blue"]


def target_token_losses(model, prefix, prompt, answer):
    """Cross-entropy of each answer token, computed by hand for one sample alone (no batch, no padding)."""
    if hasattr(model, "opt_model"):
        tokenizer, llm = model.opt_tokenizer, model.opt_model
        prompt_ids = tokenizer(prompt).input_ids
        ids = tokenizer(prompt + " " + answer + "\n").input_ids  # the answer as generation continues the prompt
        assert ids[: len(prompt_ids)] == prompt_ids
        embeds = torch.cat([prefix[None], llm.model.decoder.embed_tokens(torch.tensor([ids]))], dim=1)
        logits = llm(inputs_embeds=embeds).logits[0]
        first = prefix.shape[0] + len(prompt_ids)  # position of the first answer token
        targets = torch.tensor(ids[len(prompt_ids) :])
        return torch.nn.functional.cross_entropy(logits[first - 1 : -1], targets, reduction="none")
    tokenizer, llm = model.t5_tokenizer, model.t5_model
    prompt_ids = torch.tensor([tokenizer(prompt).input_ids])
    targets = torch.tensor([tokenizer(answer).input_ids])  # the answer and T5's "</s>"
    embeds = torch.cat([prefix[None], llm.encoder.embed_tokens(prompt_ids)], dim=1)
    logits = llm(inputs_embeds=embeds, decoder_input_ids=llm._shift_right(targets)).logits[0]
    return torch.nn.functional.cross_entropy(logits, targets[0], reduction="none")


@pytest.mark.parametrize("arch", list(LLM_OF))
def test_prefix_lm_loss_is_the_weighted_cross_entropy_of_the_answer_tokens(eval_models, arch):
    model = eval_models[arch]
    with torch.no_grad():
        prefix, prefix_atts = model.llm_image_inputs(images(2))
        per_token = [target_token_losses(model, prefix[i], PROMPTS[i], ANSWERS[i]) for i in range(2)]
        assert all(len(losses) >= 2 for losses in per_token)  # "2" + end token at least
        for weights in (None, [0.3, 1.0]):
            w = [1.0, 1.0] if weights is None else weights
            weighted_sum = sum(wi * losses.sum() for wi, losses in zip(w, per_token))
            reference = weighted_sum / sum(wi * len(losses) for wi, losses in zip(w, per_token))
            loss = model.prefix_lm_loss(prefix, prefix_atts, PROMPTS, ANSWERS, weights)
            torch.testing.assert_close(loss, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(LLM_OF))
def test_prefix_lm_loss_sees_answers_and_weights_but_not_padding(eval_models, arch):
    model = eval_models[arch]
    with torch.no_grad():
        prefix, prefix_atts = model.llm_image_inputs(images(2))

        def loss(answers, weights=None, rows=slice(None)):
            prompts = PROMPTS[rows]
            return model.prefix_lm_loss(prefix[rows], prefix_atts[rows], prompts, answers, weights)

        base = loss(ANSWERS)
        assert not torch.isclose(loss(["7", "blue"]), base)  # only an answer changed
        assert not torch.isclose(loss(ANSWERS, [1.0, 3.0]), base)  # only the weights changed
        torch.testing.assert_close(loss(ANSWERS, [2.0, 2.0]), base, rtol=0, atol=1e-6)  # only their scale
        # Sample 0 alone vs padded to sample 1's longer prompt and answer (weight 0): only its padding changed.
        alone = loss(ANSWERS[:1], rows=slice(0, 1))
        padded = loss([ANSWERS[0], "a big blue star next to two red circles"], [1.0, 0.0])
        torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="weights must hold one number per sample"):
            loss(ANSWERS, [1.0])
        with pytest.raises(ValueError, match="not all 0"):
            loss(ANSWERS, [0.0, 0.0])


@pytest.mark.parametrize("arch", ["xformer_opt", "blip2_baseline_opt"])
def test_opt_batch_with_text_output_trains_the_prefix_lm_loss(eval_models, arch):
    """A batch with ``text_output`` (LAVIS's convention) is prompt -> target for OPT too; the answers matter."""
    model = eval_models[arch]
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))  # fixes the stage-2 MAE masking
    samples = {"image": images(2), "text_input": PROMPTS, "text_output": ANSWERS, "mae_noise": noise}
    with torch.no_grad():
        expected = model.prefix_lm_loss(*model.llm_training_inputs(samples["image"], samples)[:2], PROMPTS, ANSWERS)
        torch.testing.assert_close(model(samples).loss, expected, rtol=0, atol=1e-6)
        assert not torch.isclose(model({**samples, "text_output": ["7", "red"]}).loss, expected)


def test_generation_settings_are_one_frozen_checked_object():
    settings = GenerationSettings(num_beams=3, max_length=6)
    with pytest.raises(AttributeError):
        settings.num_beams = 4  # frozen: nothing downstream can change how to decode
    with pytest.raises(ValueError, match=r"unknown generation argument\(s\) \['beams'\]"):
        GenerationSettings.from_kwargs({"beams": 3})
    with pytest.raises(ValueError, match="min_length must be an integer in \\[0, max_length=6\\]"):
        GenerationSettings(max_length=6, min_length=7)
    sampled = GenerationSettings(use_nucleus_sampling=True, num_beams=5, num_captions=3).transformers_kwargs()
    assert (sampled["do_sample"], sampled["num_beams"], sampled["num_return_sequences"]) == (True, 1, 3)


# ------------------------------------------------------------------------------------------------------------------
# Paper scale on the meta device: no weights, no downloads
# ------------------------------------------------------------------------------------------------------------------
def test_full_size_trainable_parameters_match_the_paper():
    built = {}
    with torch.device("meta"), no_hub():
        for arch in ("xformer_opt", "blip2_baseline_opt"):
            for llm in ("opt2.7b", "opt6.7b"):
                built[arch, llm] = registry.get_model_class(arch)(model_config(arch, f"pretrain_{llm}"))
    trainable_m = {key: count(trainable(model).values()) / 1e6 for key, model in built.items()}
    paper = {  # (millions, relative tolerance)
        ("xformer_opt", "opt2.7b"): (129, 0.03),
        ("xformer_opt", "opt6.7b"): (130, 0.03),
        ("blip2_baseline_opt", "opt2.7b"): (107, 0.01),
        ("blip2_baseline_opt", "opt6.7b"): (108, 0.01),
    }
    for key, (millions, tolerance) in paper.items():
        measured = trainable_m[key]
        assert abs(measured - millions) <= tolerance * millions, f"{key}: {measured:.2f}M vs the paper's {millions}M"

    for llm, llm_size in (("opt2.7b", 2.65e9), ("opt6.7b", 6.66e9)):
        xformer, blip2 = built["xformer_opt", llm], built["blip2_baseline_opt", llm]
        # X-Former adds exactly its dual block; no reconstruction in stage 2, so no decoder and no mae_out_proj.
        assert xformer.mae_decoder is None and xformer.mae_out_proj is None
        extra = count(trainable(xformer).values()) - count(trainable(blip2).values())
        assert extra == count(xformer.dual_block.parameters())
        for model in (xformer, blip2):
            assert abs(count(model.opt_model.parameters()) - llm_size) < 0.01 * llm_size
            assert not any(p.requires_grad for p in model.opt_model.parameters())
            assert model.opt_proj.out_features == model.opt_model.config.hidden_size


# ------------------------------------------------------------------------------------------------------------------
# Initialisation from stage-1 checkpoints
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage1_arch", ["xformer", "blip2_baseline"])
def test_stage1_checkpoint_initialises_xformer_opt(tmp_path, checkpoint_log, stage1_arch):
    torch.manual_seed(1)
    stage1 = load_model(stage1_arch, "tiny")
    path = tmp_path / "stage1.pth"
    torch.save({"model": stage1.state_dict()}, path)

    cls = registry.get_model_class("xformer_opt")
    cfg = OmegaConf.load(cls.default_config_path("tiny")).model
    cfg.pretrained = str(path)
    if stage1_arch == "blip2_baseline":  # no dual block in it: refused unless partial loads are asked for
        with pytest.raises(CheckpointError, match=r"lacks \d+ trainable tensors of XFormerOPT in dual_block"):
            cls.from_config(cfg)
        cfg.allow_partial_load = True
    model = cls.from_config(cfg)  # LAVIS's entry point, as load_model calls it

    stage1_weights, weights = stage1.state_dict(), model.state_dict()
    prefixes = ("Qformer.", "query_tokens", "ln_vision.", "visual_encoder.", "dual_block.", "mae_encoder.")
    shared = [k for k in weights if k.startswith(prefixes)]
    loaded = [k for k in shared if k in stage1_weights]
    assert all(torch.equal(weights[k], stage1_weights[k]) for k in loaded)
    summary = [r.getMessage() for r in checkpoint_log if r.getMessage().startswith("loaded")]
    assert len(summary) == 1 and "opt_model" in summary[0] and "opt_proj" in summary[0]
    if stage1_arch == "xformer":
        assert set(loaded) == set(shared)  # Q-Former, queries, dual block, frozen encoders: bit for bit
        assert "mae_decoder" in summary[0].split("unexpected:")[1]  # stage 2 does not build the decoder
    else:
        assert {k.split(".")[0] for k in set(shared) - set(loaded)} == {"dual_block", "mae_encoder"}
        assert "dual_block" in summary[0].split("missing:")[1].split("unexpected:")[0]


# ------------------------------------------------------------------------------------------------------------------
# Inference: batching, padding, the LAVIS entry points
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["xformer_opt", "xformer_t5", "blip2_baseline_opt"])
def test_batch_of_eight_answers_as_eight_batches_of_one(eval_models, arch):
    model = eval_models[arch]
    batch = images(8, seed=3)
    together = model.predict_answers({"image": batch, "text_input": QUESTIONS}, max_len=4)
    alone = [
        model.predict_answers({"image": batch[i : i + 1], "text_input": [question]}, max_len=4)[0]
        for i, question in enumerate(QUESTIONS)
    ]
    assert together == alone
    assert len(set(together)) > 4  # eight different inputs, (mostly) different answers

    prompts = [f"Question: {q} Answer:" for q in QUESTIONS]  # one prompt per image, all different lengths
    together = model.generate({"image": batch, "prompt": prompts}, num_beams=2, max_length=4, min_length=2)
    alone = [
        model.generate({"image": batch[i : i + 1], "prompt": prompt}, num_beams=2, max_length=4, min_length=2)[0]
        for i, prompt in enumerate(prompts)
    ]
    assert together == alone


def test_generate_returns_num_captions_per_image(eval_models):
    for arch in ("xformer_opt", "xformer_t5"):
        model = eval_models[arch]
        assert len(model.generate({"image": images(2)}, num_beams=3, num_captions=3, max_length=4)) == 6
        torch.manual_seed(0)
        sampled = model.generate({"image": images(2)}, use_nucleus_sampling=True, num_captions=2, max_length=4)
        assert len(sampled) == 4 and all(isinstance(text, str) for text in sampled)


def shapes_image():
    image = Image.new("RGB", (64, 48), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, 24, 24), fill="red")
    draw.rectangle((34, 10, 58, 34), fill="blue")
    return image


@pytest.mark.parametrize("arch", ["xformer_opt", "xformer_t5"])
def test_load_model_and_preprocess_answers_a_question_offline(arch):
    model, vis_processors, txt_processors = load_model_and_preprocess(arch, "tiny", is_eval=True)
    image = vis_processors["eval"](shapes_image()).unsqueeze(0)
    question = txt_processors["eval"]("How many circles are there?")
    answers = model.predict_answers({"image": image, "text_input": [question]}, prompt="Question: {} Short answer:")
    assert len(answers) == 1 and isinstance(answers[0], str)
    assert len(model.generate({"image": image}, max_length=5)) == 1


def test_model_zoo_lists_every_xformer_architecture_and_type():
    zoo = dict(lavis_xformer.model_zoo)
    expected = {
        "xformer_opt": ["pretrain_opt2.7b", "pretrain_opt6.7b", "caption_coco_opt2.7b", "caption_coco_opt6.7b", "tiny"],
        "xformer_t5": ["pretrain_flant5xl", "caption_coco_flant5xl", "tiny"],
    }
    expected["blip2_baseline_opt"], expected["blip2_baseline_t5"] = expected["xformer_opt"], expected["xformer_t5"]
    for arch, types in expected.items():
        assert set(types) <= set(zoo[arch]), arch
    assert {"xformer", "blip2_baseline"} <= set(zoo)
    from lavis.models import model_zoo as lavis_zoo  # LAVIS's own snapshot, refreshed on plugin import

    assert set(zoo) <= set(dict(lavis_zoo))
    for arch in expected:  # every listed type has a yaml that reads as the model's typed config
        for model_type in zoo[arch]:
            model_config(arch, model_type)


# ------------------------------------------------------------------------------------------------------------------
# Tokenizers and the prefix-LM split
# ------------------------------------------------------------------------------------------------------------------
def test_tiny_tokenizers_follow_opt_and_t5_conventions():
    opt = build_opt_tokenizer("tiny_opt")
    assert (opt.convert_ids_to_tokens(opt.pad_token_id), opt.pad_token_id, opt.eos_token_id) == ("<pad>", 1, 2)
    ids = opt("Question: how many red circles? Short answer:").input_ids
    assert ids[0] == opt.bos_token_id == 2  # OPT prepends "</s>"
    assert len(opt("\n", add_special_tokens=False).input_ids) == 1  # Blip2OPT's end-of-answer token
    assert opt.decode(ids, skip_special_tokens=True) == "Question: how many red circles? Short answer:"

    t5 = build_t5_tokenizer("tiny_t5")
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    ids = t5("Question: how many red circles? Short answer:").input_ids
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids  # T5 appends "</s>"
    assert t5.decode(ids, skip_special_tokens=True) == "Question: how many red circles? Short answer:"


def test_prefix_split_cuts_between_start_and_middle():
    generator = torch.Generator().manual_seed(0)
    cuts = set()
    for _ in range(50):
        prefixes, suffixes = split_captions(CAPTIONS, generator)
        for caption, prefix, suffix in zip(CAPTIONS, prefixes, suffixes):
            assert " ".join(w for w in (prefix, suffix) if w) == caption and suffix
            assert len(prefix.split()) <= len(caption.split()) // 2
        cuts.add(len(prefixes[1].split()))
    assert cuts == {0, 1, 2, 3}  # six words: every cut from the start to the middle occurs


# ------------------------------------------------------------------------------------------------------------------
# Bad input and bad config
# ------------------------------------------------------------------------------------------------------------------
TWO_QUESTIONS = ["how many?", "what?"]
BAD_CALLS = [
    ("predict_answers", {"text_input": TWO_QUESTIONS}, {"prompt": "Question: Answer:"}, "one '\\{\\}' placeholder"),
    ("predict_answers", {"text_input": []}, {}, "empty list of questions"),
    ("predict_answers", {"text_input": TWO_QUESTIONS}, {"num_beams": 0}, "num_beams must be an integer >= 1"),
    ("predict_answers", {"text_input": ["how many?"]}, {}, "2 images but 1 questions"),
    ("predict_answers", {"text_input": TWO_QUESTIONS}, {"inference_method": "rank"}, "inference_method='rank'"),
    ("generate", {}, {"num_beams": 0}, "num_beams must be an integer >= 1"),
    ("generate", {}, {"num_beams": 2, "num_captions": 3}, "num_captions=3 > num_beams=2"),
    ("generate", {"prompt": ["a", "b", "c"]}, {}, "2 images but 3 prompts"),
]


@pytest.mark.parametrize("arch", list(LLM_OF))
@pytest.mark.parametrize("method, extra, kwargs, message", BAD_CALLS)
def test_bad_inference_input_raises_clear_value_error(eval_models, arch, method, extra, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(eval_models[arch], method)({"image": images(2), **extra}, **kwargs)


@pytest.mark.parametrize(
    "samples, message",
    [
        ({"image": torch.randn(2, 3, 48, 48), "text_input": CAPTIONS[:2]}, "image_size is 32"),
        ({"image": torch.randn(2, 3, 32, 32), "text_input": []}, "empty list"),
        ({"image": torch.randn(2, 3, 32, 32), "text_input": CAPTIONS[:3]}, "2 images but 3 texts"),
    ],
)
def test_bad_training_input_raises_clear_value_error(eval_models, samples, message):
    for arch in ("xformer_opt", "xformer_t5"):
        with pytest.raises(ValueError, match=message):
            eval_models[arch](samples)


def test_bad_llm_config_is_refused_before_building():
    with pytest.raises(ValueError, match="llm_tokenizer must name local tokenizer files"):
        XFormerOPTConfig(opt_model=None)
    with pytest.raises(ValueError, match="llm_precision='fp8' is not valid"):
        XFormerT5Config(llm_precision="fp8")
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['opt_modle'\]"):
        XFormerOPTConfig.from_lavis_cfg({"opt_modle": "facebook/opt-2.7b"})
    with pytest.raises(ValueError, match="no published config for opt_model='facebook/opt-13b'"):
        with torch.device("meta"), no_hub():
            tiny("xformer_opt", opt_model="facebook/opt-13b", llm_tokenizer=None)
