"""``checkpoint_trainable_layers`` trades memory for time only: losses and gradients equal those without it."""

import torch
from lavis.models import load_model

from lavis_xformer.models.activation_checkpointing import CheckpointedLayer
from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.config_llm import XFormerOPTConfig
from lavis_xformer.models.xformer import XFormer
from lavis_xformer.models.xformer_llm import XFormerOPT

CAPTIONS = ["a red circle", "two blue squares and a star", "a green triangle", "three yellow circles"]


def pair(config_class, model_class, model_type):
    torch.manual_seed(0)
    base = load_model(model_class.__name__.lower().replace("xformeropt", "xformer_opt"), model_type).config.to_dict()
    plain = model_class(config_class(**base)).train()
    checkpointed = model_class(config_class(**{**base, "checkpoint_trainable_layers": True})).train()
    checkpointed.load_state_dict(plain.state_dict())
    return plain, checkpointed


def losses_and_grads(model, samples):
    torch.manual_seed(7)  # the same hard negatives and dropout masks in both models
    out = model(samples)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_equal_training(plain, checkpointed, samples, keys):
    (out_a, grads_a), (out_b, grads_b) = losses_and_grads(plain, samples), losses_and_grads(checkpointed, samples)
    for key in keys:
        torch.testing.assert_close(out_a[key], out_b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_stage1_losses_and_gradients_equal_without_checkpointing():
    plain, checkpointed = pair(XFormerConfig, XFormer, "tiny")
    layers = [m for m in checkpointed.modules() if isinstance(m, CheckpointedLayer)]
    # every Q-Former layer and the dual block's layer; none in the model built without the switch
    assert len(layers) == checkpointed.config.qformer_num_layers + checkpointed.config.dual_num_layers
    assert not any(isinstance(m, CheckpointedLayer) for m in plain.modules())
    generator = torch.Generator().manual_seed(0)
    samples = {"image": torch.randn(4, 3, 32, 32, generator=generator), "text_input": CAPTIONS,
               "mae_noise": torch.rand(4, 16, generator=generator)}
    assert_equal_training(plain, checkpointed, samples, ("loss", "loss_itc", "loss_itm", "loss_lm", "loss_rec"))


def test_stage2_losses_and_gradients_equal_without_checkpointing():
    plain, checkpointed = pair(XFormerOPTConfig, XFormerOPT, "tiny")
    generator = torch.Generator().manual_seed(1)
    samples = {"image": torch.randn(2, 3, 32, 32, generator=generator), "text_input": CAPTIONS[:2],
               "mae_noise": torch.rand(2, 16, generator=generator)}
    assert_equal_training(plain, checkpointed, samples, ("loss",))


def test_layers_are_recomputed_in_the_backward_only_when_training():
    plain, checkpointed = pair(XFormerConfig, XFormer, "tiny")
    generator = torch.Generator().manual_seed(2)
    samples = {"image": torch.randn(2, 3, 32, 32, generator=generator), "text_input": CAPTIONS[:2]}
    calls = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        feed_forward = model.dual_block.layers[0].query_ffn
        calls[name] = 0

        def count(*_, name=name):
            calls[name] += 1

        handle = feed_forward.register_forward_pre_hook(count)
        torch.manual_seed(7)
        model(samples).loss.backward()
        handle.remove()
    # the dual block runs twice per step (the unimodal pass and ITM); checkpointed, each run is repeated in the backward
    assert calls == {"plain": 2, "checkpointed": 4}
    with torch.no_grad():
        torch.testing.assert_close(checkpointed.eval().encode_image(samples["image"]), plain.eval().encode_image(samples["image"]))
