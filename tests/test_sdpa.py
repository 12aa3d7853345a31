"""The SDPA attention switch changes speed, not results: outputs, losses and gradients equal the reference code."""

import pytest
import torch
from lavis.models import load_model
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.sdpa import (
    SdpaBertSelfAttention,
    SdpaEvaAttention,
    SdpaViTMAESelfAttention,
    use_reference_attention,
    use_sdpa_attention,
)
from lavis_xformer.models.xformer import XFormer

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]


def pair():
    torch.manual_seed(0)
    # fp32 frozen encoders: in bf16 on the CPU the CLIP-ViT and MAE take the reference attention (faster there), and
    # this module is about the SDPA code paths.
    base = load_model("xformer", "tiny").config.to_dict()
    config = XFormerConfig(**{**base, "sdpa_attention": True, "frozen_precision": "fp32"})
    fast = XFormer(config).eval()
    reference = XFormer(XFormerConfig(**{**config.to_dict(), "sdpa_attention": False})).eval()
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def test_switch_covers_every_attention_and_is_reversible():
    fast, reference = pair()
    kinds = {type(m) for m in fast.modules()}
    assert {SdpaBertSelfAttention, SdpaEvaAttention, SdpaViTMAESelfAttention} <= kinds
    assert not {SdpaBertSelfAttention, SdpaEvaAttention, SdpaViTMAESelfAttention} & {type(m) for m in reference.modules()}
    # tiny: Q-Former 2 layers x (self + text-free query) ... count whatever was built, then switch back and forth
    switched = use_reference_attention(fast)
    assert switched > 0 and use_sdpa_attention(fast) == switched


def test_losses_and_gradients_equal_reference_attention():
    fast, reference = pair()
    generator = torch.Generator().manual_seed(0)
    samples = {"image": torch.randn(4, 3, 32, 32, generator=generator), "text_input": CAPTIONS,
               "mae_noise": torch.rand(4, 16, generator=generator)}
    outputs = []
    for model in (fast, reference):
        torch.manual_seed(7)
        out = model(samples)
        out.loss.backward()
        outputs.append(out)
    for key in ("loss", "loss_itc", "loss_itm", "loss_lm", "loss_rec"):
        torch.testing.assert_close(outputs[0][key], outputs[1][key], rtol=1e-5, atol=1e-5, msg=key)
    reference_params = dict(reference.named_parameters())
    for name, p in fast.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, reference_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_features_and_caption_generation_equal_reference_attention():
    fast, reference = pair()
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast.encode_image(image), reference.encode_image(image), rtol=1e-5, atol=1e-5)
    # LAVIS's Q-Former caption generation: cached keys/values and causal masks through the SDPA path.
    kwargs = dict(num_beams=2, max_length=6, min_length=2)
    assert Blip2Qformer.generate(fast, {"image": image}, **kwargs) == Blip2Qformer.generate(reference, {"image": image}, **kwargs)
    # X-Former's own generate: the text attends to the enriched ITG cache, then to its own cached keys/values.
    assert fast.generate({"image": image}, **kwargs) == reference.generate({"image": image}, **kwargs)


def test_attention_maps_requested_fall_back_to_reference():
    fast, reference = pair()
    tokens = fast.tokenizer(CAPTIONS[:2], return_tensors="pt", padding=True)
    a = fast.Qformer.bert(tokens.input_ids, attention_mask=tokens.attention_mask, output_attentions=True, return_dict=True)
    b = reference.Qformer.bert(tokens.input_ids, attention_mask=tokens.attention_mask, output_attentions=True, return_dict=True)
    assert len(a.attentions) == len(b.attentions)
    torch.testing.assert_close(a.attentions[0], b.attentions[0])


def test_keys_values_of_clip_features_are_projected_once_per_step(process_group, monkeypatch):
    """The unimodal pass and ITM share each cross-attention's projection of C: same losses and gradients as projecting
    every row again (LAVIS's way), and only the hard negatives' rows are projected a second time."""
    import contextlib

    from lavis_xformer.models import xformer as xformer_module

    fast, _ = pair()
    fast.train()
    generator = torch.Generator().manual_seed(0)
    samples = {"image": torch.randn(4, 3, 32, 32, generator=generator), "text_input": CAPTIONS,
               "mae_noise": torch.rand(4, 16, generator=generator)}
    projected_rows = []
    original = SdpaBertSelfAttention.context_keys_values

    def counting(self, context):
        projected_rows.append(context.shape[0])
        return original(self, context)

    monkeypatch.setattr(SdpaBertSelfAttention, "context_keys_values", counting)
    results = []
    for share in (True, False):
        if not share:
            monkeypatch.setattr(xformer_module, "shared_context_projections", lambda features: contextlib.nullcontext())
        projected_rows.clear()
        fast.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = fast(samples)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}
        results.append((out, grads, sum(projected_rows)))
    (shared_out, shared_grads, shared_rows), (plain_out, plain_grads, plain_rows) = results
    for key in ("loss", "loss_itc", "loss_itm", "loss_lm", "loss_rec"):
        torch.testing.assert_close(shared_out[key], plain_out[key], rtol=1e-6, atol=1e-6, msg=key)
    assert shared_grads.keys() == plain_grads.keys()
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    layers = sum(1 for layer in fast.Qformer.bert.encoder.layer if layer.has_cross_attention)
    batch = samples["image"].shape[0]
    assert plain_rows == layers * (batch + 3 * batch)  # unimodal B + ITM 3B rows, at every cross-attention
    assert shared_rows == layers * (batch + batch)  # unimodal B + the B hard negatives


def _bf16_mae(**overrides):
    from lavis_xformer.models.precision import run_in_half_precision

    torch.manual_seed(0)
    base = load_model("xformer", "tiny").config.to_dict()
    model = XFormer(XFormerConfig(**{**base, "sdpa_attention": True, "frozen_precision": "fp32", **overrides})).eval()
    return model, run_in_half_precision(model.mae_encoder, torch.bfloat16)


def _clip_vit_recipe(self, hidden_states):
    """The bf16 attention as LAVIS's EVA ``Attention`` computes it, written out with three projections."""
    query, key, value = (self.transpose_for_scores(layer(hidden_states)) for layer in (self.query, self.key, self.value))
    scores = torch.matmul(query * self.attention_head_size**-0.5, key.transpose(-1, -2))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=scores.dtype), value).transpose(1, 2).flatten(2)


def test_bf16_mae_encoder_attention_is_the_clip_vits_recipe_within_bf16_rounding_of_transformers(monkeypatch):
    """In bf16 on the CPU the frozen MAE encoder takes ``_half_precision_attention``: its output equals the written-out
    recipe of the CLIP-ViT's attention (queries scaled before the product, bf16 softmax) bit for bit, so the fused
    q/k/v projection changes nothing; against transformers' own bf16 attention (scores divided after the product)
    it moves by bf16 rounding only, a tenth of what bf16 moves it from fp32. Masked and unmasked."""
    from lavis_xformer.models import sdpa

    model, encoder = _bf16_mae()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for ratio in (0.0, 0.5):
        noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(6))
        model.mae_encoder.config.mask_ratio = ratio
        with torch.no_grad():
            fast = encoder(pixel_values=pixels, noise=noise).last_hidden_state
            with monkeypatch.context() as patch:
                patch.setattr(sdpa.SdpaViTMAESelfAttention, "_half_precision_attention", _clip_vit_recipe)
                recipe = encoder(pixel_values=pixels, noise=noise).last_hidden_state
            assert use_reference_attention(encoder) > 0
            transformers_bf16 = encoder(pixel_values=pixels, noise=noise).last_hidden_state
            use_sdpa_attention(encoder)
        assert torch.equal(fast, recipe), ratio
        relative = float((fast - transformers_bf16).norm() / transformers_bf16.norm())
        assert 0 < relative < 5e-3, (ratio, relative)


@pytest.mark.parametrize("heads_per_block", [1, 2])
def test_bf16_mae_encoder_attention_in_blocks_gives_the_same_bits(monkeypatch, heads_per_block):
    """Scores above ``MAE_SCORES_BLOCK_BYTES`` are computed one image (or block of heads) at a time: the same bits as
    all of them at once, masked and unmasked."""
    from lavis_xformer.models import sdpa

    model, encoder = _bf16_mae(mae_num_heads=4)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tokens = {0.0: 17, 0.5: 9}  # [CLS] + the visible patches of 16
    for ratio in (0.0, 0.5):
        noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(6))
        model.mae_encoder.config.mask_ratio = ratio
        with torch.no_grad():
            monkeypatch.setattr(sdpa, "MAE_SCORES_BLOCK_BYTES", 1 << 40)
            whole = encoder(pixel_values=pixels, noise=noise).last_hidden_state
            monkeypatch.setattr(sdpa, "MAE_SCORES_BLOCK_BYTES", heads_per_block * tokens[ratio] ** 2 * 2)
            calls = []
            monkeypatch.setattr(torch, "softmax", lambda scores, *a, **k: calls.append(scores.shape) or _softmax(scores, *a, **k))
            blocked = encoder(pixel_values=pixels, noise=noise).last_hidden_state
            monkeypatch.setattr(torch, "softmax", _softmax)
        assert torch.equal(blocked, whole), ratio
        layers = model.mae_encoder.config.num_hidden_layers
        assert len(calls) == layers * 3 * (4 // heads_per_block)  # per layer: 3 images x head blocks
        assert all(shape[0] == heads_per_block for shape in calls)


_softmax = torch.softmax
