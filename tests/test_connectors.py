"""The connector types (models/connector_llm.py): perceiver_opt/_t5, projector_opt/_t5, perceiver_dual_opt/_t5.

The perceiver equals a written-out reference of the Flamingo formula (open_flamingo's ``PerceiverResampler`` written
out with einops, on the same state dict); every type's loss reads the answer and the image; gradients reach exactly
the declared trainable parameters; perceiver_dual without its MAE branch is perceiver_opt; each type loads through
``load_model_and_preprocess``, answers through ``predict_answers`` and trains through ``lavis_xformer.train``.
"""

import sys
from pathlib import Path

import pytest
import torch
from einops import rearrange
from lavis.models import load_model, load_model_and_preprocess

from lavis_xformer.models.config_connectors import PerceiverOPTConfig, ProjectorOPTConfig
from lavis_xformer.models.perceiver import PerceiverResampler
from lavis_xformer.models.projector import PooledProjector, pooled_grid

ARCHS = ["perceiver_opt", "perceiver_t5", "projector_opt", "projector_t5", "perceiver_dual_opt", "perceiver_dual_t5"]
REPO = Path(__file__).resolve().parent.parent


# ---- the Flamingo formula, written out ---------------------------------------------------------------------------
def layer_norm(x, state, prefix):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"])


def reference_resampler(x, state, depth, heads):
    """open_flamingo's ``PerceiverResampler.forward`` (one image, no time embeddings) on ``state``'s tensors:
    q from the latents, k/v from concat(media, latents), explicit softmax with the max subtracted, residuals."""
    latents = state["latents"].expand(x.shape[0], -1, -1)
    for i in range(depth):
        p = f"layers.{i}.0."
        media, lat = layer_norm(x, state, p + "norm_media."), layer_norm(latents, state, p + "norm_latents.")
        q = lat @ state[p + "to_q.weight"].T
        k, v = (torch.cat([media, lat], dim=-2) @ state[p + "to_kv.weight"].T).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
        q = q * q.shape[-1] ** -0.5
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = rearrange(torch.einsum("b h i j, b h j d -> b h i d", attn, v), "b h n d -> b n (h d)")
        latents = out @ state[p + "to_out.weight"].T + latents
        f = f"layers.{i}.1."
        hidden = torch.nn.functional.gelu(layer_norm(latents, state, f + "0.") @ state[f + "1.weight"].T)
        latents = hidden @ state[f + "3.weight"].T + latents
    return layer_norm(latents, state, "norm.")


@pytest.mark.parametrize("heads,head_dim", [(2, 16), (3, 8)])  # inner width above and below the width
def test_perceiver_equals_the_written_out_flamingo_formula(heads, head_dim):
    torch.manual_seed(0)
    resampler = PerceiverResampler(width=20, depth=3, num_heads=heads, head_dim=head_dim, num_latents=5, ff_mult=4)
    for param in resampler.parameters():  # LayerNorm affine off its (1, 0) initialisation too
        param.data.normal_(0, 0.3)
    x = torch.randn(2, 17, 20)
    got = resampler(x)
    assert got.shape == (2, 5, 20)
    expected = reference_resampler(x, resampler.state_dict(), depth=3, heads=heads)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # latents attend to the image: another image, other latents
    assert not torch.allclose(resampler(torch.randn(2, 17, 20)), got)


def test_projector_pools_the_patch_grid():
    projector = PooledProjector(width=3, grid=4, num_tokens=4, layers=1, hidden_size=8)
    features = torch.randn(1, 17, 3)  # [CLS] + 4 x 4 patches
    grid = features[0, 1:].reshape(4, 4, 3)
    expected = grid.reshape(2, 2, 2, 2, 3).mean(dim=(1, 3)).reshape(4, 3)  # 2 x 2 blocks, row-major
    torch.testing.assert_close(projector(features)[0], expected)
    assert pooled_grid(32) == (4, 8) and pooled_grid(128) == (8, 16) and pooled_grid(64) == (8, 8)
    every_patch = PooledProjector(width=3, grid=4, num_tokens=0, layers=2, hidden_size=8)
    assert every_patch(features).shape == (1, 16, 8)


# ---- the models --------------------------------------------------------------------------------------------------
def vqa_batch(image, answers=("two", "red")):
    return {
        "image": image,
        "text_input": ["how many shapes?", "what colour is the circle?"],
        "answer": list(answers),
        "weight": torch.ones(2),
        "n_answers": torch.tensor([1, 1]),
        "mae_noise": torch.rand(2, 16, generator=torch.Generator().manual_seed(3)),
    }


@pytest.fixture(scope="module")
def models():
    built = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = load_model(arch, "tiny")
        model.eval()  # dropout off: a changed loss is the changed input's
        built[arch] = model
    return built


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_reads_the_answer_and_the_image(models, arch):
    model = models[arch]
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(vqa_batch(image)).loss
        again = model(vqa_batch(image)).loss
        other_answer = model(vqa_batch(image, answers=("three", "blue"))).loss
        other_image = model(vqa_batch(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))).loss
    assert torch.isfinite(base)
    assert base == again
    assert abs(other_answer - base) > 1e-4
    assert abs(other_image - base) > 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_exactly_the_declared_trainable_parameters(models, arch):
    model = models[arch]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    declared = {name for name, _ in model.named_parameters() if name.startswith(model.declared_trainable())}
    assert trainable == declared
    assert any(name.startswith(model.connector + ".") for name in trainable)
    model.zero_grad(set_to_none=True)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model(vqa_batch(image)).loss.backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    assert reached == trainable


def test_perceiver_dual_without_its_mae_branch_is_perceiver_opt(models):
    perceiver = models["perceiver_opt"]
    torch.manual_seed(5)
    dual = load_model("perceiver_dual_opt", "tiny")
    from lavis_xformer.models.connector_llm import PerceiverDualOPT

    config = type(dual.config)(**{**dual.config.to_dict(), "use_mae": False, "reconstruction_loss": False})
    no_mae = PerceiverDualOPT(config).eval()
    assert set(no_mae.state_dict()) == set(perceiver.state_dict())
    no_mae.load_state_dict(perceiver.state_dict())
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(no_mae(vqa_batch(image)).loss, perceiver(vqa_batch(image)).loss)
        output = dual.eval()(vqa_batch(image))
    assert output.loss_rec is not None and torch.isfinite(output.loss_rec)  # with the branch: M' is reconstructed


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_and_answers_through_lavis(arch):
    model, vis_processors, _ = load_model_and_preprocess(arch, "tiny", is_eval=True)
    from PIL import Image

    image = vis_processors["eval"](Image.new("RGB", (40, 40), (200, 30, 30))).unsqueeze(0).repeat(2, 1, 1, 1)
    answers = model.predict_answers({"image": image, "text_input": ["what colour?", "how many?"]}, max_len=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="no Q-Former"):
        PerceiverOPTConfig(opt_model=None, llm_tokenizer="tiny_opt", qformer_text_input=True)
    with pytest.raises(ValueError, match="pools the 256 patches"):
        ProjectorOPTConfig(opt_model=None, llm_tokenizer="tiny_opt", num_query_token=300)


# (projector_opt shares ConnectorLLM with perceiver_opt; its yaml is checked by test_connector_yamls)
@pytest.mark.parametrize("connector", ["perceiver", "perceiver_dual"])
def test_trains_through_lavis_xformer_train(tmp_path, connector):
    from helpers import run_cli, shapes_options

    yaml = REPO / "projects" / "xformer" / "demo" / f"pretrain_shapes_{connector}.yaml"
    out = tmp_path / "out"
    output = run_cli([
        sys.executable, "-m", "lavis_xformer.train", "--cfg-path", str(yaml), "--options",
        *shapes_options("xformer_shapes_caption", tmp_path / "data", num_train=16, num_val=4, num_test=4),
        "run.max_epoch=1", "run.batch_size_train=8", "run.log_freq=1", "run.warmup_steps=1",
        f"run.output_dir={out}",
    ], cwd=tmp_path, timeout=400)
    (checkpoint,) = out.glob("*/checkpoint_0.pth")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    assert any(key.startswith(connector.split("_")[0] + ".") for key in state), sorted(state)[:5]
    assert "loss_lm" in output or "loss" in output


def test_connector_yamls():
    """Every connector yaml is what tools/generate_connector_yamls.py writes, and its model section is a valid typed
    config of its architecture (paper scale included: no weights are built)."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import generate_connector_yamls
    finally:
        sys.path.pop(0)
    assert generate_connector_yamls.main(["--check"]) == 0
    for path in generate_connector_yamls.connector_yamls():
        model_cfg = OmegaConf.load(path).model
        config = registry.get_model_class(model_cfg.arch).config_class.from_lavis_cfg(model_cfg)
        assert config.num_query_token >= 0


def test_run_yamls_name_registered_connector_types():
    """projects/xformer/{train,eval}/*_<connector>.yaml (the BLIP-2 twins with another `model:`) name registered
    types, and run_scripts' MODEL=<connector> finds them."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import generate_connector_yamls
    finally:
        sys.path.pop(0)
    runs = generate_connector_yamls.run_yamls()
    assert len(runs) >= 30
    for path in runs:
        cfg = OmegaConf.load(path)
        cls = registry.get_model_class(cfg.model.arch)
        assert cfg.model.model_type in cls.PRETRAINED_MODEL_CONFIG_DICT, path
        assert f"output/{path.stem.split('_')[-1]}" in cfg.run.output_dir or "output/" in cfg.run.output_dir
    launcher = (REPO / "run_scripts" / "xformer" / "torchrun.sh").read_text()
    for name in generate_connector_yamls.RUN_CONNECTORS:
        assert name in launcher


def test_paper_scale_rows(monkeypatch):
    """analysis.params' connector table at paper scale (meta device): the perceiver with BLIP-3's sizes has its
    written-out parameter count, the matched one is within 2% of BLIP-2's trainable count, and with the same 32
    tokens the frozen OPT costs the same FLOPs behind either; the token / resolution rows change what they name."""
    from lavis_xformer.analysis import params
    from lavis_xformer.common.meta import build_on_meta, count_parameters

    monkeypatch.setattr(params, "CONNECTOR_ROWS", (("blip2_baseline_opt", "pretrain_opt2.7b"),
                                                   ("perceiver_opt", "pretrain_matched_opt2.7b")))
    blip2, matched = params.connector_rows()
    assert abs(matched.trainable / blip2.trainable - 1) < 0.02
    assert matched.visual_tokens == blip2.visual_tokens == 32
    assert matched.llm_flops == blip2.llm_flops and matched.forward_flops < blip2.forward_flops * 1.01
    assert matched.frozen == blip2.frozen  # the same frozen EVA ViT-g and OPT-2.7B
    assert "| perceiver_opt | pretrain_matched_opt2.7b | 32 | 224 |" in params.connectors_markdown([blip2, matched])

    width, inner, ff = 1408, 16 * 96, 4 * 1408  # BLIP-3: depth 6, 16 x 96 heads, 128 latents, ff x4
    per_layer = 4 * width * inner + 2 * width * ff + 3 * 2 * width  # q, kv (2), out; FF; three LayerNorms
    expected = 6 * per_layer + 128 * width + 2 * width + (2 * width + 2560 * width + 2560)  # + latents, final
    blip3 = count_parameters(build_on_meta("perceiver_opt", "pretrain_opt2.7b"))  # norm, ln_vision, projection
    assert blip3.trainable == expected
    assert build_on_meta("perceiver_opt", "tokens64_opt2.7b").perceiver.latents.shape == (64, 1408)
    assert build_on_meta("blip2_baseline_opt", "res490_opt2.7b").config.image_size == 490
