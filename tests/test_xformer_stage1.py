"""Stage-1 X-Former: BLIP-2 equivalence, reconstruction against transformers' MAE, gradients, sizes, bad input."""

import copy

import pytest
import torch
from lavis.models import load_model
from transformers import ViTMAEForPreTraining

from lavis_xformer.checkpoints import CheckpointError
from lavis_xformer.models.blip2_baseline import Blip2Baseline
from lavis_xformer.models.builders import mae_config, no_hub
from lavis_xformer.models.config import BackboneConfig, XFormerConfig
from lavis_xformer.models.xformer import XFormer

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]


def tiny(**overrides) -> XFormer:
    """The `tiny` model type with config overrides (random weights, offline)."""
    cfg = load_model("xformer", "tiny").config  # the yaml's values
    return XFormer(XFormerConfig(**{**cfg.to_dict(), **overrides}))


def batch(size=4, image_size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(size, 3, image_size, image_size, generator=generator), "text_input": CAPTIONS[:size]}


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count(params):
    return sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------------------------------------
# The BLIP-2 part is BLIP-2
# ------------------------------------------------------------------------------------------------------------------
# Dropout draws differ between SDPA's fused kernel and LAVIS's nn.Dropout, so the train-mode comparison (same
# dropout masks) uses the reference attention; eval mode compares the default SDPA path.
@pytest.mark.parametrize("train_mode, sdpa", [(False, True), (True, False)])
def test_mae_off_losses_equal_lavis_blip2(process_group, train_mode, sdpa):
    torch.manual_seed(0)
    blip2 = load_model("blip2_baseline", "tiny")
    xformer = tiny(use_mae=False, reconstruction_loss=False, sdpa_attention=sdpa)
    result = xformer.load_state_dict(blip2.state_dict(), strict=True)  # identical parameter sets
    assert not result.missing_keys and not result.unexpected_keys
    blip2.train(train_mode)
    xformer.train(train_mode)

    samples = batch()
    torch.manual_seed(123)  # same dropout masks and the same sampled ITM negatives
    reference = blip2(samples)
    torch.manual_seed(123)
    ours = xformer(samples)

    for key in ("loss_itc", "loss_itm", "loss_lm", "loss"):
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-5, msg=key)
    assert ours.loss_rec is None and "loss_rec" not in ours


def test_blip2_checkpoint_loads_with_only_xformer_modules_missing(tmp_path, checkpoint_log):
    blip2 = load_model("blip2_baseline", "tiny")
    path = tmp_path / "blip2_stage1.pth"
    torch.save({"model": blip2.state_dict()}, path)
    xformer = load_model("xformer", "tiny")
    with pytest.raises(CheckpointError, match=r"lacks \d+ trainable tensors of XFormer in dual_block .*mae_out_proj"):
        xformer.load_from_pretrained(str(path))  # strict by default: the dual block would stay random
    result = xformer.load_from_pretrained(str(path), allow_partial_load=True)
    assert result.unexpected_keys == []
    assert {key.split(".")[0] for key in result.missing_keys} == {"mae_encoder", "mae_decoder", "dual_block", "mae_out_proj"}
    for name, value in blip2.state_dict().items():
        assert torch.equal(xformer.state_dict()[name], value), name
    summary = [r.getMessage() for r in checkpoint_log if "loaded" in r.getMessage()]
    assert len(summary) == 1 and "missing: dual_block" in summary[0] and "unexpected: none" in summary[0]


def test_enriched_cache_with_zero_enrichment_is_blip2_cache():
    model = tiny().eval()
    clip_features = model.forward_clip(batch()["image"])
    output = model.forward_queries(clip_features, output_hidden_states=True)
    cache = model.enriched_query_cache(output, torch.zeros_like(output.last_hidden_state))
    assert len(cache) == len(output.past_key_values) == model.config.qformer_num_layers
    for (key, value), (ref_key, ref_value) in zip(cache, output.past_key_values):
        torch.testing.assert_close(key, ref_key, rtol=0, atol=1e-6)
        torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-6)


def test_itg_depends_on_the_enriched_queries():
    """With the enriched cache the text decoder sees Z': changing the MAE input changes the ITG loss."""
    model = tiny().eval()
    samples = batch()
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    first = model({**samples, "mae_noise": noise})["loss_lm"]
    torch.manual_seed(0)
    second = model({**samples, "mae_noise": noise.flip(-1)})["loss_lm"]
    assert (first - second).abs() > 1e-6  # random tiny weights: a small but real difference
    qformer_cache = tiny(itg_conditioning="qformer_cache").eval()
    qformer_cache.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    a = qformer_cache({**samples, "mae_noise": noise})["loss_lm"]
    torch.manual_seed(0)
    b = qformer_cache({**samples, "mae_noise": noise.flip(-1)})["loss_lm"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# Reconstruction
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruction_loss_equals_transformers_mae_loss(norm_pix_loss):
    model = tiny(norm_pix_loss=norm_pix_loss).eval()
    reference = ViTMAEForPreTraining(mae_config(model.config)).eval()
    reference.vit.load_state_dict(model.mae_encoder.state_dict())
    reference.decoder.load_state_dict(model.mae_decoder.state_dict())

    image = batch()["image"]
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(1))
    mae = model.forward_mae(image, mask_ratio=model.config.mask_ratio, noise=noise)
    # M' replaced by M: the MAE encoder's own features go straight into the frozen decoder.
    predicted = model.mae_decoder(mae.features, mae.ids_restore).logits
    ours = model.reconstruction_loss(mae.pixels, predicted, mae.mask)
    expected = reference(pixel_values=mae.pixels, noise=noise).loss
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_decoder_predicting_only_the_masked_patches_gives_the_same_loss_and_gradients(norm_pix_loss):
    """The loss reads the masked patches only, so the decoder's last layer computes only their rows
    (``MaePatchDecoder``): the same predictions there as transformers' decoder, the same loss and gradients as
    ``reconstruction_loss`` over every patch's prediction."""
    from lavis_xformer.models.sdpa import use_reference_attention, use_sdpa_attention
    from lavis_xformer.models.masking import masked_patches

    model = tiny(norm_pix_loss=norm_pix_loss, mae_decoder_num_layers=2).train()
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(1))
    mae = model.forward_mae(batch()["image"], mask_ratio=0.5, noise=noise)
    patches = masked_patches(mae.ids_restore, mae.features.shape[1] - 1)
    assert patches.shape == (4, 8) and bool((mae.mask.gather(1, patches) == 1).all())
    assert masked_patches(mae.ids_restore, 16) is None  # nothing masked: the full decoder runs (and the loss is 0/0)
    tokens = torch.randn(4, 1 + 8, model.config.mae_hidden_size, generator=torch.Generator().manual_seed(2))
    every = model.mae_decoder(tokens, mae.ids_restore).logits
    picked = model.mae_decoder(tokens, mae.ids_restore, patches=patches).logits
    expected = every.gather(1, patches.unsqueeze(-1).expand(-1, -1, every.shape[-1]))
    torch.testing.assert_close(picked, expected, rtol=1e-6, atol=1e-6)
    assert use_reference_attention(model.mae_decoder) > 0  # transformers' attention: every row, then the patches'
    torch.testing.assert_close(model.mae_decoder(tokens, mae.ids_restore, patches=patches).logits, expected,
                               rtol=1e-5, atol=1e-5)
    use_sdpa_attention(model.mae_decoder)

    path = model.encode(batch()["image"], 0.5, noise)
    losses, grads = [], []
    for masked_only in (True, False):
        model.zero_grad(set_to_none=True)
        if masked_only:
            loss = model.reconstruction_loss_of(path)
        else:
            every_patch = model.forward_decoder(path.mae_enriched, mae.ids_restore)
            loss = model.reconstruction_loss(mae.pixels, every_patch, mae.mask)
        loss.backward(retain_graph=True)
        losses.append(loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("dual_block.") for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_mae_sees_its_own_normalisation():
    model = tiny()
    raw = torch.rand(2, 3, 32, 32)
    clip_normalised = (raw - model._clip_mean) / model._clip_std
    imagenet_normalised = (raw - model._mae_mean) / model._mae_std
    torch.testing.assert_close(model.mae_pixels(clip_normalised), imagenet_normalised, rtol=1e-5, atol=1e-5)


def test_masked_patch_count_and_loss_covers_only_masked_patches():
    model = tiny(mask_ratio=0.5).train()
    mae = model.forward_mae(batch()["image"])
    num_patches = (32 // 8) ** 2
    assert mae.mask.shape == (4, num_patches)
    assert (mae.mask.sum(dim=1) == int(0.5 * num_patches)).all()
    assert mae.features.shape[1] == 1 + num_patches - int(0.5 * num_patches)  # [CLS] + visible

    target = model.patchify(mae.pixels)
    perfect = model.reconstruction_loss(mae.pixels, target, mae.mask)
    assert perfect.item() == 0.0
    visible_wrong = target + 5.0 * (1 - mae.mask).unsqueeze(-1)  # error on visible patches only
    assert model.reconstruction_loss(mae.pixels, visible_wrong, mae.mask).item() == 0.0
    masked_wrong = target + 1.0 * mae.mask.unsqueeze(-1)
    torch.testing.assert_close(model.reconstruction_loss(mae.pixels, masked_wrong, mae.mask), torch.tensor(1.0))


def test_eval_mae_sees_the_whole_image_in_order():
    model = tiny().eval()
    mae = model.forward_mae(batch()["image"])
    assert mae.mask.sum() == 0 and mae.features.shape[1] == 1 + 16
    assert torch.equal(mae.ids_restore, torch.arange(16).expand(4, -1))


# ------------------------------------------------------------------------------------------------------------------
# Training step: what is frozen stays frozen, everything trainable learns
# ------------------------------------------------------------------------------------------------------------------
def test_optimizer_step_updates_exactly_the_trainable_parameters():
    torch.manual_seed(0)
    model = tiny().train()
    frozen_modules = {"visual_encoder": model.visual_encoder, "mae_encoder": model.mae_encoder, "mae_decoder": model.mae_decoder}
    frozen_before = {name: copy.deepcopy(m.state_dict()) for name, m in frozen_modules.items()}
    params = trainable(model)
    assert params, "no trainable parameters"
    assert not any(n.startswith(("visual_encoder.", "mae_encoder.", "mae_decoder.")) for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}

    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    output = model(batch())
    output.loss.backward()
    no_grad = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], f"trainable parameters without gradient: {no_grad}"
    optimizer.step()

    for name, module in frozen_modules.items():
        for p in module.parameters():
            assert p.grad is None
        for key, value in module.state_dict().items():
            assert torch.equal(value, frozen_before[name][key]), f"{name}.{key} changed"
    assert all(not torch.equal(before[n], p) for n, p in params.items() if n != "temp")


def test_reconstruction_loss_sends_gradient_into_the_dual_block():
    model = tiny().train()
    model(batch())["loss_rec"].backward()
    for name, p in model.dual_block.named_parameters():
        if name.startswith("layers.0.query_"):
            continue  # the query branch (Z') does not feed M'
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0  # through Z_q -> M'


def test_loss_weights_and_output_fields():
    model = tiny(loss_weight_itc=2.0, loss_weight_itm=0.5, loss_weight_itg=0.0, loss_weight_rec=3.0).eval()
    torch.manual_seed(0)
    out = model(batch())
    expected = 2.0 * out.loss_itc + 0.5 * out.loss_itm + 3.0 * out.loss_rec
    torch.testing.assert_close(out.loss, expected)
    assert set(k for k, v in out.items() if v is not None) == {"loss", "loss_itc", "loss_itm", "loss_lm", "loss_rec"}


# ------------------------------------------------------------------------------------------------------------------
# Full size, on the meta device: no weights, no downloads
# ------------------------------------------------------------------------------------------------------------------
def test_full_size_trainable_parameters_exceed_lavis_blip2_by_22m():
    with torch.device("meta"), no_hub():
        xformer = XFormer(XFormerConfig())
        blip2 = Blip2Baseline(BackboneConfig())
    extra = count(trainable(xformer).values()) - count(trainable(blip2).values())
    assert abs(extra - 22e6) <= 2e6, f"X-Former adds {extra / 1e6:.2f}M trainable parameters"
    # The published frozen encoders: EVA ViT-g (39 blocks) ~ 985M, MAE ViT-H encoder ~ 630M.
    assert abs(count(xformer.visual_encoder.parameters()) - 985.0e6) < 5e6
    assert abs(count(xformer.mae_encoder.parameters()) - 630.8e6) < 5e6
    assert xformer.mae_encoder.config.hidden_size == 1280 and xformer.config.num_query_token == 32


# ------------------------------------------------------------------------------------------------------------------
# Bad input and bad config
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "samples, message",
    [
        ({"image": torch.randn(2, 3, 48, 48), "text_input": CAPTIONS[:2]}, "image_size is 32"),
        ({"image": torch.randn(2, 1, 32, 32), "text_input": CAPTIONS[:2]}, "has 1 channels"),
        ({"image": torch.randn(3, 32, 32), "text_input": CAPTIONS[:1]}, "must be a \\[batch, 3, 32, 32\\] tensor"),
        ({"image": torch.randn(2, 3, 32, 32), "text_input": []}, "empty list"),
        ({"image": torch.randn(2, 3, 32, 32), "text_input": CAPTIONS[:3]}, "2 images but 3 texts"),
        ({"image": torch.randn(2, 3, 32, 32), "text_input": "a red circle"}, "list of strings"),
    ],
)
def test_bad_input_raises_clear_value_error(samples, message):
    with pytest.raises(ValueError, match=message):
        tiny()(samples)


def test_unknown_or_mistyped_config_fields_are_refused_before_building():
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['mask_ration'\].*valid fields: .*mask_ratio"):
        XFormerConfig.from_lavis_cfg({"arch": "xformer", "mask_ration": 0.5})
    with pytest.raises(ValueError, match="'num_query_token' .* expected <class 'int'>"):
        XFormerConfig.from_lavis_cfg({"num_query_token": "32"})
    with pytest.raises(ValueError, match="itg_conditioning='x' is not valid; choose one of"):
        XFormerConfig(itg_conditioning="x")
    with pytest.raises(ValueError, match="at least one MAE patch"):
        XFormerConfig(mask_ratio=1.0)


# ------------------------------------------------------------------------------------------------------------------
# Retrieval through LAVIS's compute_sim_matrix: ITC on Z', ITM re-scoring through the dual block
# ------------------------------------------------------------------------------------------------------------------
import torch.nn.functional as F  # noqa: E402
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer  # noqa: E402


class _RetrievalImages(torch.utils.data.Dataset):
    """What LAVIS's ``compute_sim_matrix`` reads from a retrieval eval dataset: ``text``, ``image`` and the images."""

    def __init__(self, images, texts):
        self.images, self.text, self.image = images, texts, [f"img{i}" for i in range(len(images))]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index]}


RETRIEVAL_TEXTS = [f"{n} {c} {s}" for n, c, s in zip(
    ["a", "two", "three", "a", "four", "two", "a", "three"],
    ["red", "blue", "green", "yellow", "red", "green", "blue", "yellow"],
    ["circle", "squares", "triangles", "square", "circles", "triangles", "triangle", "circles"],
)]


def lavis_sim_matrix(model, images, k_test):
    from lavis.models.blip2_models.blip2 import compute_sim_matrix

    loader = torch.utils.data.DataLoader(_RetrievalImages(images, RETRIEVAL_TEXTS), batch_size=3)
    with torch.no_grad():
        return compute_sim_matrix(model, loader, k_test=k_test)


class _LavisBlip2Path:
    """The model seen through LAVIS's own ``Blip2Qformer.forward_image`` / ``compute_itm`` (no MAE branch)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward_image(self, image):
        return Blip2Qformer.forward_image(self._model, image)

    def compute_itm(self, **kwargs):
        return Blip2Qformer.compute_itm(self._model, **kwargs)


@torch.no_grad()
def direct_retrieval_scores(model, images, texts):
    """ITC + ITM for every (image, text), computed from the model's parts: ITC between vision_proj(Z') and the
    text's [CLS]; ITM from the bi-directional pass over [queries; text] on C, then the dual block with M."""
    tokens = model.tokenizer(texts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    text_cls = model.Qformer.bert(tokens.input_ids, attention_mask=tokens.attention_mask, return_dict=True)
    text_feat = F.normalize(model.text_proj(text_cls.last_hidden_state[:, 0]), dim=-1)
    image_feats = F.normalize(model.vision_proj(model.image_queries(images)), dim=-1)
    itc = torch.einsum("iqd,td->itq", image_feats, text_feat).max(-1).values

    itm = torch.empty_like(itc)
    clip_features, mae = model.forward_encoders(images)
    num_queries = model.query_tokens.shape[1]
    for i in range(len(images)):
        for t in range(len(texts)):
            output = model.Qformer.bert(
                tokens.input_ids[t : t + 1],
                query_embeds=model.query_tokens,
                attention_mask=torch.cat([torch.ones(1, num_queries, dtype=torch.long), tokens.attention_mask[t : t + 1]], 1),
                encoder_hidden_states=clip_features[i : i + 1],
                encoder_attention_mask=torch.ones(clip_features[i : i + 1].shape[:-1], dtype=torch.long),
                return_dict=True,
            )
            queries = output.last_hidden_state[:, :num_queries]
            if mae is not None:
                queries, _ = model.dual_block(queries, mae.features[i : i + 1])
            itm[i, t] = model.itm_head(queries)[0, :, 1].mean()
    return itc, itm


def expected_lavis_scores(itc, itm, k_test):
    """LAVIS's score matrices from ITC and ITM: the top-k texts (images) by ITC get ITC + ITM, the rest -100."""
    i2t = torch.full_like(itc, -100.0)
    for i in range(itc.shape[0]):
        top = itc[i].topk(k_test).indices
        i2t[i, top] = itc[i, top] + itm[i, top]
    t2i = torch.full_like(itc.t(), -100.0)
    for t in range(itc.shape[1]):
        top = itc[:, t].topk(k_test).indices
        t2i[t, top] = itc[top, t] + itm[top, t]
    return i2t, t2i


def test_retrieval_scores_use_the_mae_branch():
    torch.manual_seed(0)
    model = tiny().eval()
    images = batch(size=4, seed=5)["image"]
    i2t, t2i = lavis_sim_matrix(model, images, k_test=3)
    expected_i2t, expected_t2i = expected_lavis_scores(*direct_retrieval_scores(model, images, RETRIEVAL_TEXTS), 3)
    torch.testing.assert_close(torch.from_numpy(i2t), expected_i2t, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(t2i), expected_t2i, rtol=0, atol=1e-5)
    # ... and not what LAVIS's BLIP-2 code computes on the same model (Q-Former output, no dual block)
    blip2_i2t, _ = lavis_sim_matrix(_LavisBlip2Path(model), images, k_test=3)
    assert (torch.from_numpy(blip2_i2t) - expected_i2t).abs().max() > 1e-3


def test_retrieval_packing_round_trips_c_and_m():
    model = tiny().eval()
    clip_features, mae = model.forward_encoders(batch()["image"])
    packed = model.pack_image_inputs(clip_features, mae.features)
    assert packed.shape == (4, clip_features.shape[1] + mae.features.shape[1], max(32, 48))
    clip_back, mae_back = model.unpack_image_inputs(packed)
    assert torch.equal(clip_back, clip_features) and torch.equal(mae_back, mae.features)
    with pytest.raises(ValueError, match="followed by the MAE features"):
        model.unpack_image_inputs(clip_features)


def test_retrieval_with_mae_off_equals_lavis_blip2(process_group):
    torch.manual_seed(0)
    blip2 = load_model("blip2_baseline", "tiny").eval()
    xformer = tiny(use_mae=False, reconstruction_loss=False).eval()
    xformer.load_state_dict(blip2.state_dict(), strict=True)
    images = batch(size=4, seed=6)["image"]
    for ours, reference in zip(lavis_sim_matrix(xformer, images, 3), lavis_sim_matrix(blip2, images, 3)):
        torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(reference), rtol=0, atol=1e-5)


def test_extract_features_are_z_prime():
    model = tiny().eval()
    samples = batch()
    image = model.extract_features(samples, mode="image")
    torch.testing.assert_close(image.image_embeds, model.image_queries(samples["image"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(image.image_embeds_proj, F.normalize(model.vision_proj(image.image_embeds), dim=-1))
    assert image.text_embeds is None and image.multimodal_embeds is None

    multimodal = model.extract_features(samples, mode="multimodal")
    torch.testing.assert_close(multimodal.image_embeds, image.image_embeds, rtol=0, atol=0)
    tokens = model.tokenizer(samples["text_input"], return_tensors="pt", padding=True)
    clip_features, mae = model.forward_encoders(samples["image"])
    expected = model.multimodal_queries(clip_features, mae.features, tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(multimodal.multimodal_embeds, expected, rtol=0, atol=1e-6)

    text = model.extract_features(samples, mode="text")
    reference = Blip2Qformer.extract_features(model, samples, mode="text")
    torch.testing.assert_close(text.text_embeds_proj, reference.text_embeds_proj, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.extract_features(samples, mode="images")


# ------------------------------------------------------------------------------------------------------------------
# freeze_vit_layernorms: honoured by every architecture, the BLIP-2 baselines included
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("archs", [("xformer", "blip2_baseline"), ("xformer_opt", "blip2_baseline_opt"),
                                   ("xformer_t5", "blip2_baseline_t5")])
def test_freeze_vit_layernorms_false_trains_the_same_vit_layer_norms(archs):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    trainable_vit = []
    for arch in archs:
        model_cls = registry.get_model_class(arch)
        cfg = OmegaConf.load(model_cls.default_config_path("tiny")).model
        frozen = model_cls.from_config(OmegaConf.merge(cfg, {"load_pretrained": False}))
        assert not any(p.requires_grad for p in frozen.visual_encoder.parameters())  # the default: all frozen
        model = model_cls.from_config(OmegaConf.merge(cfg, {"load_pretrained": False, "freeze_vit_layernorms": False}))
        trainable_vit.append(sorted(n for n, p in model.visual_encoder.named_parameters() if p.requires_grad))
        assert not model.visual_encoder.training  # still pinned in eval mode
    assert trainable_vit[0] and all("norm" in name for name in trainable_vit[0])
    assert trainable_vit[0] == trainable_vit[1]


def test_dual_block_attention_dropout_is_its_own_switch():
    """``dual_attention_dropout`` (default 0: SDPA's fused kernel) drops attention probabilities; ``dual_dropout``
    the residual branches. Each acts alone, in training only."""
    from lavis_xformer.models.fusion import DualCrossAttention

    def block(**dropouts):
        torch.manual_seed(0)
        config = XFormerConfig(qformer_hidden_size=16, dual_num_heads=2, dual_intermediate_size=32, mae_hidden_size=24, **dropouts)
        return DualCrossAttention(config)

    queries, mae_features = torch.randn(2, 4, 16), torch.randn(2, 9, 24)

    def two_calls(module):
        torch.manual_seed(1)
        first = module(queries, mae_features)[0]
        torch.manual_seed(2)
        return first, module(queries, mae_features)[0]

    assert XFormerConfig().dual_attention_dropout == 0.0
    no_dropout = block(dual_dropout=0.0, dual_attention_dropout=0.0).train()
    assert torch.equal(*two_calls(no_dropout))
    attention_only = block(dual_dropout=0.0, dual_attention_dropout=0.5).train()
    assert not torch.equal(*two_calls(attention_only))
    assert torch.equal(*two_calls(attention_only.eval()))
    assert all(layer.sublayer.dropout == 0.5 and layer.dropout.p == 0.0
               for layer in attention_only.modules() if type(layer).__name__ == "Residual" and hasattr(layer.sublayer, "num_heads"))
    with pytest.raises(ValueError, match="dual_attention_dropout"):
        XFormerConfig(dual_attention_dropout=1.0)


def test_itm_reuses_the_dual_blocks_work_on_m_with_the_same_losses_and_gradients(process_group, monkeypatch):
    """ITM's dual-block pass reads each image's M again (positives twice, the local negatives once): it re-uses the
    query pass's projection of M and first MAE self-attention product (``fusion.MaeStream``) with the losses and
    gradients of computing them anew; only the query pass projects M."""
    from lavis_xformer.models import xformer as xformer_module

    model = tiny(mask_ratio=0.5).train()
    samples = {**batch(), "mae_noise": torch.rand(4, 16, generator=torch.Generator().manual_seed(3))}
    projected_rows = []
    model.dual_block.mae_proj.register_forward_hook(lambda module, args, out: projected_rows.append(args[0].shape[0]))
    results = []
    for share in (True, False):
        if not share:  # ITM computes its MAE stream from mae_all, as before the re-use
            monkeypatch.setattr(xformer_module.MaeStream, "cat", staticmethod(lambda streams: None))
        projected_rows.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # same negatives, same dropout masks
        out = model(samples)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, sum(projected_rows)))
    (shared_out, shared_grads, shared_rows), (plain_out, plain_grads, plain_rows) = results
    assert (shared_rows, plain_rows) == (4, 4 + 3 * 4)
    for key in ("loss", "loss_itc", "loss_itm", "loss_lm", "loss_rec"):
        torch.testing.assert_close(shared_out[key], plain_out[key], rtol=1e-6, atol=1e-6, msg=key)
    assert shared_grads.keys() == plain_grads.keys()
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mae_stream_is_not_shared_when_attention_dropout_draws():
    """With attention dropout in training the self-attention product is random per pass: only the deterministic
    projection of M is shared."""
    model = tiny(dual_attention_dropout=0.1).train()
    mae_features = torch.randn(2, 5, model.config.mae_feature_width)
    assert model.dual_block.mae_stream(mae_features).self_attended is None
    assert model.eval().dual_block.mae_stream(mae_features).self_attended is not None


# ------------------------------------------------------------------------------------------------------------------
# One image pathway: the stage-1 losses, retrieval, features and stage 2 all read `encode`
# ------------------------------------------------------------------------------------------------------------------
def spy_on_encode(model, shift=0.0):
    """Record every ``encode`` call (mask ratio, returned path); ``shift`` is added to the Z' it returns."""
    calls = []
    original = model.encode

    def encode(image, mask_ratio=None, noise=None, **text):  # text: VQA fine-tuning's question (text_ids, text_atts)
        path = original(image, mask_ratio, noise, **text)
        if shift:
            path.enriched_queries = path.enriched_queries + shift
        calls.append((mask_ratio, noise, path))
        return path

    model.encode = encode
    return calls


def test_stage1_losses_read_one_encode_pass(process_group):
    model = tiny(mask_ratio=0.25).train()
    samples = {**batch(), "mae_noise": torch.rand(4, 16, generator=torch.Generator().manual_seed(3))}
    torch.manual_seed(0)
    reference = model(samples)
    calls = spy_on_encode(model)
    torch.manual_seed(0)
    same = model(samples)
    assert len(calls) == 1 and calls[0][0] == 0.25 and calls[0][1] is samples["mae_noise"]
    for key in ("loss", "loss_itc", "loss_itm", "loss_lm", "loss_rec"):
        torch.testing.assert_close(same[key], reference[key], rtol=0, atol=0, msg=key)
    path = calls[0][2]
    assert path.clip_features.shape[:2] == (4, 17) and path.mae.mask.sum() == 4 * 4  # a quarter of 16 patches
    assert path.queries.shape == path.enriched_queries.shape == (4, 8, 32)
    assert path.mae_enriched.shape == (4, 1 + 12, 32)  # M': [CLS] + the visible patches, at the Q-Former width
    # what encode returns is what ITC and ITG read: shifting its Z' moves them (ITM and reconstruction do not read Z')
    spy_on_encode(model, shift=0.5)
    torch.manual_seed(0)
    shifted = model(samples)
    assert (shifted.loss_itc - reference.loss_itc).abs() > 1e-4 and (shifted.loss_lm - reference.loss_lm).abs() > 1e-4
    torch.testing.assert_close(shifted.loss_rec, reference.loss_rec, rtol=0, atol=0)


def test_retrieval_and_features_read_encode_at_the_eval_mask_ratio(process_group):
    model = tiny().eval()
    calls = spy_on_encode(model)
    images = batch(size=4, seed=5)["image"]
    enriched, packed = model.forward_image(images)
    assert len(calls) == 1 and calls[0][0] == model.config.eval_mask_ratio
    assert enriched is calls[0][2].enriched_queries
    assert torch.equal(packed, model.pack_image_inputs(calls[0][2].clip_features, calls[0][2].mae.features))
    features = model.extract_features(batch(), mode="multimodal")
    assert len(calls) == 2 and features.image_embeds is calls[1][2].enriched_queries
    lavis_sim_matrix(model, images, k_test=3)  # LAVIS's compute_sim_matrix: one encode per batch of 3 images
    assert len(calls) == 2 + 2
    assert torch.equal(model.image_queries(images), calls[-1][2].enriched_queries) and len(calls) == 5


@pytest.mark.parametrize("arch", ["xformer_opt", "xformer_t5"])
def test_stage2_reads_the_same_encode(arch):
    from omegaconf import OmegaConf

    from lavis.common.registry import registry

    model_cls = registry.get_model_class(arch)
    cfg = OmegaConf.load(model_cls.default_config_path("tiny")).model
    model = model_cls.from_config(OmegaConf.merge(cfg, {"load_pretrained": False, "reconstruction_loss": True,
                                                         "mask_ratio": 0.5})).train()
    calls = spy_on_encode(model)
    image, noise = batch()["image"], torch.rand(4, 16, generator=torch.Generator().manual_seed(2))
    enriched, loss_rec = model.xformer_queries(image, noise)
    assert len(calls) == 1 and calls[0][0] == 0.5 and calls[0][1] is noise and enriched is calls[0][2].enriched_queries
    torch.testing.assert_close(loss_rec, model.reconstruction_loss_of(calls[0][2]), rtol=0, atol=0)
    model.eval()
    prefix, atts = model.llm_image_inputs(image)
    assert len(calls) == 2 and calls[1][0] is None  # the mode's default: eval_mask_ratio
    torch.testing.assert_close(prefix, model.project_to_llm(calls[1][2].enriched_queries), rtol=0, atol=0)
    assert atts.shape == prefix.shape[:-1] and bool(atts.all())
    # and stage 2's Z' is stage 1's: the same pathway on the same weights
    stage1 = tiny().eval()
    stage1.load_state_dict({k: v for k, v in model.state_dict().items() if k in stage1.state_dict()}, strict=False)
    shared = [k for k in stage1.state_dict() if k in model.state_dict() and not k.startswith(("mae_decoder", "mae_out_proj"))]
    assert any(k.startswith("dual_block.") for k in shared) and any(k.startswith("Qformer.") for k in shared)
    torch.testing.assert_close(stage1.encode(image).enriched_queries, model.encode(image).enriched_queries,
                               rtol=0, atol=1e-6)
