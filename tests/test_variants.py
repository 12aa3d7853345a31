"""The paper's baselines and ablations (lavis_xformer/models/variants.py): each is a model type of the same classes;
each trains offline with exactly its losses; concat, early CA and clip_layerN read what the paper says they read."""

import importlib.util
from pathlib import Path

import pytest
import torch
from lavis.common.registry import registry
from lavis.models import load_model
from omegaconf import OmegaConf
from transformers.models.vit_mae import modeling_vit_mae

from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.variants import VARIANTS, variant_type_name
from lavis_xformer.models.xformer import XFormer

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]
STAGE1 = [name for name, v in VARIANTS.items() if 1 in v.stages]
STAGE2 = [name for name, v in VARIANTS.items() if 2 in v.stages]


def batch(size=4, image_size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(size, 3, image_size, image_size, generator=generator), "text_input": CAPTIONS[:size]}


def train_one_step(model, samples):
    """One AdamW step; returns the output and the trainable parameters that got no gradient."""
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    output = model(samples)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    optimizer.step()
    return output, [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]


def loss_keys(output):
    return {key for key, value in output.items() if value is not None}


# ------------------------------------------------------------------------------------------------------------------
# Every variant: a registered model type that trains offline with exactly its losses
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STAGE1)
def test_stage1_variant_trains_one_tiny_step_with_exactly_its_losses(process_group, name):
    torch.manual_seed(0)
    model = load_model("xformer", variant_type_name(name, "tiny"))
    assert type(model) is XFormer  # a config of the same class, not a copy of it
    output, no_grad = train_one_step(model, batch())
    assert loss_keys(output) == VARIANTS[name].losses(stage=1)
    assert no_grad == [], f"trainable parameters without gradient: {no_grad}"
    # Z' for features and stage 2 goes through the same variant pathway.
    model.eval()
    expected = (4, model.config.num_query_token, model.config.qformer_hidden_size)
    assert model.image_queries(batch()["image"]).shape == expected


@pytest.mark.parametrize("name", STAGE2)
def test_stage2_variant_trains_one_tiny_step_with_exactly_its_losses(name):
    if registry.get_model_class("xformer_opt") is None:
        pytest.skip("the stage-2 architecture xformer_opt is not registered")
    torch.manual_seed(0)
    model = load_model("xformer_opt", variant_type_name(name, "tiny"))
    assert type(model) is registry.get_model_class("xformer_opt")
    output, no_grad = train_one_step(model, batch())
    assert loss_keys(output) == VARIANTS[name].losses(stage=2)
    # Stage 2 has no text in the Q-Former: only the early-CA blocks' text feed-forward (kept, as Blip2OPT keeps
    # everything but each layer's own text FFN; see fusion.py) gets no gradient.
    assert all(".mae_block.intermediate." in n or ".mae_block.output." in n for n in no_grad), no_grad
    assert bool(no_grad) == (name == "early_ca")


def _yaml_generator():
    """tools/generate_variant_yamls.py, the script that writes the variant yamls (it lives outside the package)."""
    path = Path(__file__).resolve().parent.parent / "tools" / "generate_variant_yamls.py"
    spec = importlib.util.spec_from_file_location("generate_variant_yamls", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_yaml_is_its_base_yaml_plus_the_variant_fields():
    """The yamls are what VARIANTS says (regenerate with `python tools/generate_variant_yamls.py`)."""
    generator = _yaml_generator()
    written = generator.variant_yamls()
    for path, text in written.items():
        assert path.read_text() == text, f"{path.name} is not what the script writes; run it to regenerate"
    checked = 0
    for arch, (stage, bases) in generator.VARIANT_ARCHS.items():
        cls = registry.get_model_class(arch)
        if cls is None:
            continue
        for base in bases:
            base_yaml = OmegaConf.load(cls.default_config_path(base))
            for variant in VARIANTS.values():
                if stage not in variant.stages:
                    continue
                model_type = variant_type_name(variant.name, base)
                assert model_type in cls.PRETRAINED_MODEL_CONFIG_DICT, f"{arch} type {model_type} not registered"
                yaml = OmegaConf.load(cls.default_config_path(model_type))
                expected = variant.model_section(OmegaConf.to_container(base_yaml.model), tiny="tiny" in base)
                assert OmegaConf.to_container(yaml.model) == expected, (
                    f"{arch} {model_type}: yaml differs from {base} + VARIANTS[{variant.name!r}]; regenerate with "
                    "`python tools/generate_variant_yamls.py`"
                )
                assert yaml.preprocess == base_yaml.preprocess
                assert cls.default_config_path(model_type) == str(generator.variant_yaml_path(arch, variant.name, base))
                assert generator.variant_yaml_path(arch, variant.name, base) in written
                checked += 1
    assert checked >= 2 * len(STAGE1)


def test_variant_configs_are_validated():
    with pytest.raises(ValueError, match="mae_fusion='sum' is not valid; choose one of"):
        XFormerConfig(mae_fusion="sum")
    with pytest.raises(ValueError, match="mae_source='dino' is not valid"):
        XFormerConfig(mae_source="dino")
    with pytest.raises(ValueError, match="reconstruction_loss=True needs mae_fusion='dual' and mae_source='mae'"):
        XFormerConfig(mae_fusion="concat")
    with pytest.raises(ValueError, match="reconstruction_loss=True needs mae_fusion='dual' and mae_source='mae'"):
        XFormerConfig(mae_source="clip_layer")
    with pytest.raises(ValueError, match="clip_feature_layer=40 must be a CLIP-ViT block: 1 to 39"):
        XFormerConfig(mae_source="clip_layer", clip_feature_layer=40, reconstruction_loss=False)
    with pytest.raises(ValueError, match="'clip_feature_layer' .* expected <class 'int'>"):
        XFormerConfig.from_lavis_cfg({"clip_feature_layer": "28"})


# ------------------------------------------------------------------------------------------------------------------
# no_recon and no_self_attn
# ------------------------------------------------------------------------------------------------------------------
def test_no_recon_never_builds_the_mae_decoder_and_sees_the_unmasked_image(monkeypatch):
    built = []
    original = modeling_vit_mae.ViTMAEDecoder.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_vit_mae.ViTMAEDecoder, "__init__", counting_init)
    model = load_model("xformer", "no_recon_tiny").train()
    assert built == [], "the MAE decoder was constructed"
    assert model.mae_decoder is None and model.mae_out_proj is None
    assert not any(isinstance(m, modeling_vit_mae.ViTMAEDecoder) for m in model.modules())
    _, mae = model.forward_encoders(batch()["image"], model.config.mask_ratio)  # as forward() calls it, in training
    assert mae.mask.sum() == 0 and mae.features.shape[1] == 1 + 16  # [CLS] + every patch
    load_model("xformer", "tiny")  # the X-Former proper does build it
    assert len(built) == 1


def test_no_self_attn_drops_only_the_self_attention_before_the_second_cross_attention():
    layer = load_model("xformer", "no_self_attn_tiny").dual_block.layers[0]
    assert layer.query_self_attention is None  # Z_q straight into its cross-attention to M'
    assert layer.mae_self_attention is not None and layer.query_cross_attention is not None


# ------------------------------------------------------------------------------------------------------------------
# clip_layerN: CLIP's block-N output in place of M
# ------------------------------------------------------------------------------------------------------------------
def test_clip_layer28_takes_the_output_of_clip_block_28(process_group):
    model = load_model("xformer", "clip_layer28_tiny").eval()
    assert model.mae_encoder is None and model.mae_decoder is None  # no MAE at all
    assert model.dual_block.mae_proj.in_features == model.config.vit_embed_dim
    blocks = {}
    handles = [
        model.visual_encoder.blocks[i - 1].register_forward_hook(lambda m, inp, out, i=i: blocks.setdefault(i, out))
        for i in (27, 28, 29)
    ]
    fed, streams = [], []
    handles.append(model.dual_block.mae_proj.register_forward_pre_hook(lambda m, inp: fed.append(inp[0])))
    handles.append(model.dual_block.register_forward_pre_hook(lambda m, inp: streams.append(inp[2])))
    try:
        torch.manual_seed(0)
        model(batch())
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(fed[0], blocks[28], rtol=0, atol=0)  # the query pass reads block 28 ...
    assert not torch.allclose(fed[0], blocks[27]) and not torch.allclose(fed[0], blocks[29])  # ... not a neighbour
    # ITM: positives, hard negatives, positives, each with its own image's block 28 (projected once, in the query
    # pass: ITM composes those rows, fusion.MaeStream)
    assert len(fed) == 1 and len(streams) == 2
    per_image = model.dual_block.mae_norm(model.dual_block.mae_proj(blocks[28]))
    itm_states = streams[1].states
    assert itm_states.shape[0] == 3 * 4
    torch.testing.assert_close(itm_states[:4], per_image, rtol=0, atol=0)
    torch.testing.assert_close(itm_states[8:], per_image, rtol=0, atol=0)
    assert all(any(torch.equal(row, image) for image in per_image) for row in itm_states[4:8])


# ------------------------------------------------------------------------------------------------------------------
# concat and early CA: M inside the Q-Former, in every pass that reads the image
# ------------------------------------------------------------------------------------------------------------------
def _record_inputs(module, store):
    return module.register_forward_pre_hook(lambda m, inp: store.append(inp[0].detach()))


def test_concat_feeds_c_and_aligned_m_to_every_clip_cross_attention(process_group):
    model = load_model("xformer", "concat_tiny").eval()
    assert model.dual_block is None and model.mae_align.out_features == model.config.vit_embed_dim
    clip_keys = []
    handle = _record_inputs(model.Qformer.bert.encoder.layer[0].crossattention.self.key, clip_keys)
    samples = batch()
    try:
        torch.manual_seed(0)
        model(samples)
    finally:
        handle.remove()
    clip_features, mae = model.forward_encoders(samples["image"], model.config.mask_ratio)
    num_clip = clip_features.shape[1]
    # the query pass: (C, M*) with M* = Linear(M)
    query_pass = clip_keys[0]
    assert query_pass.shape[1] == num_clip + mae.features.shape[1]
    torch.testing.assert_close(query_pass[:, :num_clip], clip_features)
    torch.testing.assert_close(query_pass[:, num_clip:], model.mae_align(mae.features))
    # the ITM pass: every row's M* belongs to the same image as its C, hard negatives included
    itm_pass = clip_keys[1]
    assert itm_pass.shape[0] == 3 * 4
    for row in itm_pass:
        image = [j for j in range(4) if torch.allclose(row[:num_clip], clip_features[j])]
        assert len(image) == 1
        torch.testing.assert_close(row[num_clip:], model.mae_align(mae.features[image[0]]))


def test_early_ca_cross_attends_to_m_in_the_layers_without_clip_cross_attention(process_group):
    model = load_model("xformer", "early_ca_tiny").eval()
    layers = model.Qformer.bert.encoder.layer
    assert [layer.has_cross_attention for layer in layers] == [True, False]
    assert layers[0].mae_block is None and layers[1].mae_block is not None
    assert layers[1].mae_block.crossattention.self.key.in_features == model.config.mae_hidden_size
    mae_keys = []
    handle = _record_inputs(layers[1].mae_block.crossattention.self.key, mae_keys)
    samples = batch()
    try:
        torch.manual_seed(0)
        model(samples)
    finally:
        handle.remove()
    _, mae = model.forward_encoders(samples["image"], model.config.mask_ratio)
    assert len(mae_keys) == 2  # the query pass and ITM (ITC's and ITG's text-only passes have no queries)
    torch.testing.assert_close(mae_keys[0], mae.features)
    assert mae_keys[1].shape[0] == 3 * 4
    for row in mae_keys[1]:
        assert any(torch.equal(row, mae.features[j]) for j in range(4))


def test_early_ca_without_m_says_what_to_pass():
    model = load_model("xformer", "early_ca_tiny").eval()
    clip_features = model.forward_clip(batch()["image"])
    with pytest.raises(ValueError, match="pass mae_features"):
        model.forward_queries(clip_features)
    with pytest.raises(ValueError, match=r"encoder_hidden_states=\[C, M\]"):
        model.Qformer.bert(query_embeds=model.query_tokens.expand(4, -1, -1), encoder_hidden_states=clip_features)


def test_early_ca_full_size_block_is_a_bert_layer_without_self_attention():
    """The structure chosen for the paper's 183M (fusion.EarlyCrossAttention): cross-attention to M (1280 wide) + query FFN + text
    FFN, in the 6 layers without CLIP cross-attention; ``early_ca_feed_forward: False`` keeps the bare one."""
    from lavis_xformer.models.builders import no_hub

    with torch.device("meta"), no_hub():
        model = XFormer(XFormerConfig(mae_fusion="early_ca", reconstruction_loss=False))
        bare = XFormer(XFormerConfig(mae_fusion="early_ca", reconstruction_loss=False, early_ca_feed_forward=False))
    given = [i for i, layer in enumerate(model.Qformer.bert.encoder.layer) if layer.mae_block is not None]
    assert given == [1, 3, 5, 7, 9, 11]
    width, ffn, mae = 768, 3072, 1280
    cross_attention = 2 * (width * width + width) + 2 * (mae * width + width) + 2 * width
    feed_forward = width * ffn + ffn + ffn * width + width + 2 * width
    block = model.Qformer.bert.encoder.layer[1].mae_block
    assert sum(p.numel() for p in block.parameters()) == cross_attention + 2 * feed_forward
    bare_block = bare.Qformer.bert.encoder.layer[1].mae_block
    assert sum(p.numel() for p in bare_block.parameters()) == cross_attention


# ------------------------------------------------------------------------------------------------------------------
# Fusion strategies (models/fusion.py): one interface, selected by `mae_fusion`
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type, fusion_name", [("tiny", "dual"), ("concat_tiny", "concat"),
                                                     ("early_ca_tiny", "early_ca"), ("blip2", "none")])
def test_every_fusion_satisfies_the_interface(model_type, fusion_name):
    from lavis_xformer.models.fusion import FUSIONS, NO_FUSION, Fusion

    if model_type == "blip2":
        cfg = load_model("xformer", "tiny").config
        model = XFormer(XFormerConfig(**{**cfg.to_dict(), "use_mae": False, "reconstruction_loss": False})).eval()
    else:
        model = load_model("xformer", model_type).eval()
    fusion = model.fusion
    assert isinstance(fusion, Fusion) and fusion.name == fusion_name
    assert set(FUSIONS) == {"dual", "concat", "early_ca"} and all(XFormerConfig(mae_fusion=n, reconstruction_loss=False)
                                                                  for n in FUSIONS)
    # held under its own attribute (its checkpoint prefix); the other fusions' attributes are None
    for name, fusion_class in FUSIONS.items():
        held = getattr(model, fusion_class.attribute)
        assert held is (fusion if name == fusion_name else None), (name, held)
    if fusion_name == "none":
        assert fusion is NO_FUSION and not list(fusion.parameters())
    own = {n for n, _ in fusion.named_parameters()}
    assert {f"{fusion.attribute}.{n}" for n in own} <= set(model.state_dict())

    clip_features, mae = model.forward_encoders(batch()["image"], 0.0)
    mae_features = mae.features if mae is not None else None
    context, mask = fusion.qformer_context(clip_features, mae_features)
    reads_mae = fusion_name in ("concat", "early_ca")
    if reads_mae:
        with pytest.raises(ValueError, match="pass mae_features"):
            fusion.qformer_context(clip_features)
    else:
        assert context is clip_features and torch.equal(mask, torch.ones(4, clip_features.shape[1], dtype=torch.long))
    query_states = model.forward_queries(clip_features, mae_features=mae_features).last_hidden_state
    enriched, mae_enriched = fusion.enrich(query_states, mae_features)
    assert enriched.shape == query_states.shape
    assert fusion.enriches_queries == (fusion_name == "dual") == (not torch.equal(enriched, query_states))
    assert (mae_enriched is None) == (fusion_name != "dual")
    if mae_enriched is not None:
        assert mae_enriched.shape == (*mae_features.shape[:2], model.config.qformer_hidden_size)
    # and the model's pathway is exactly these two steps
    path = model.encode(batch()["image"], 0.0)
    torch.testing.assert_close(path.enriched_queries, enriched, rtol=0, atol=0)
