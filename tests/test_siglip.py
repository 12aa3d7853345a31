"""SigLIP's sigmoid loss as stage 1's contrastive term (``itc_loss: sigmoid``, models/contrastive.py).

Reference: open_clip's ``SigLipLoss`` (src/open_clip/loss.py), written out: ``logits = logit_scale * img @ txt.T +
logit_bias`` (open_clip passes ``logit_scale.exp()``), labels ``2 * eye - 1``, ``-logsigmoid(labels * logits).sum() /
batch``; across ranks each rank adds its images against the other ranks' texts with negative labels only.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lavis_xformer.models.contrastive import SigmoidITC

pytestmark = pytest.mark.usefixtures("process_group")


def open_clip_siglip(image_features, text_features, logit_scale, logit_bias):
    """open_clip ``SigLipLoss._loss`` in one process (``logit_scale`` already exponentiated, as open_clip passes it)."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    labels = 2 * torch.eye(len(image_features)) - torch.ones(len(image_features), len(text_features))
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


def features(batch=6, queries=1, width=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, queries, width, generator=generator), dim=-1)
    text = F.normalize(torch.randn(batch, width, generator=generator), dim=-1)
    return image, text


def test_initial_scalars_are_siglips():
    itc = SigmoidITC()
    assert itc.logit_scale.item() == pytest.approx(math.log(10)) and itc.logit_bias.item() == -10.0


def test_equals_open_clips_siglip_loss():
    image, text = features()
    itc = SigmoidITC(init_logit_scale=1.3, init_logit_bias=-2.5)  # away from the initialisation
    loss, logits_i2t, logits_t2i = itc(image, text, rank=0)
    expected = open_clip_siglip(image[:, 0], text, itc.logit_scale.exp(), itc.logit_bias)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits_t2i, logits_i2t.T.detach())
    # several queries: the similarity is BLIP-2's, the best query's
    image, text = features(queries=4)
    loss, _, _ = itc(image, text, rank=0)
    best = torch.einsum("iqd,td->itq", image, text).max(-1).values
    logits = itc.logit_scale.exp() * best + itc.logit_bias
    labels = 2 * torch.eye(6) - 1
    torch.testing.assert_close(loss, -F.logsigmoid(labels * logits).sum() / 6)


def _rank_worker(rank, world, init_file, out_file, image, text):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = image.shape[0] // world
        local_image = image[rank * rows : (rank + 1) * rows].clone().requires_grad_(True)
        local_text = text[rank * rows : (rank + 1) * rows].clone().requires_grad_(True)
        itc = SigmoidITC(init_logit_scale=1.3, init_logit_bias=-2.5)
        loss, _, _ = itc(local_image, local_text, rank=rank)
        loss.backward()
        # what DDP would do: average the gradients (and the logged loss) over the ranks
        grads = [local_image.grad, local_text.grad, itc.logit_scale.grad.view(1), itc.logit_bias.grad.view(1)]
        for grad in grads[2:]:
            dist.all_reduce(grad)
            grad /= world
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        torch.save({"loss": mean_loss, "image_grad": grads[0] / world, "text_grad": grads[1] / world,
                    "scale_grad": grads[2], "bias_grad": grads[3]}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path):
    """Each rank's images against every rank's texts: the ranks' mean loss and their DDP-averaged gradients equal the
    one-process loss and gradients over the whole batch."""
    import torch.multiprocessing as mp

    image, text = features(batch=8, queries=3)
    world = 2
    mp.spawn(_rank_worker, args=(world, tmp_path / "init", tmp_path / "out", image, text), nprocs=world, join=True)
    results = [torch.load(f"{tmp_path / 'out'}.{rank}") for rank in range(world)]

    whole_image, whole_text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    itc = SigmoidITC(init_logit_scale=1.3, init_logit_bias=-2.5)
    loss, _, _ = itc(whole_image, whole_text, rank=0)
    loss.backward()  # sum over 8 rows / 8 = the mean of the ranks' (sum over their 4 rows / 4)

    for result in results:
        torch.testing.assert_close(result["loss"], loss.detach())
        torch.testing.assert_close(result["scale_grad"], itc.logit_scale.grad.view(1))
        torch.testing.assert_close(result["bias_grad"], itc.logit_bias.grad.view(1))
    torch.testing.assert_close(torch.cat([r["image_grad"] for r in results]), whole_image.grad)
    torch.testing.assert_close(torch.cat([r["text_grad"] for r in results]), whole_text.grad)


def test_xformer_stage1_with_the_sigmoid_loss(monkeypatch):
    """``itc_loss: sigmoid`` in X-Former stage 1 (and, with ``use_mae: False``, BLIP-2's stage 1): loss_itc is the
    reference on the model's own features, ITM still draws its hard negatives from the ITC logits (softmax + 1e-4,
    the pair itself excluded), and t', b train while the softmax temperature does not."""
    from lavis.models import load_model

    from lavis_xformer.models.config import XFormerConfig
    from lavis_xformer.models.xformer import XFormer

    for use_mae in (True, False):
        base = load_model("xformer", "tiny").config.to_dict()
        overrides = {"itc_loss": "sigmoid"} if use_mae else {"itc_loss": "sigmoid", "use_mae": False,
                                                             "reconstruction_loss": False}
        torch.manual_seed(0)
        model = XFormer(XFormerConfig(**{**base, **overrides}))
        captured, draws = {}, []
        original_forward = model.sigmoid_itc.forward

        def capture(image_feats, text_feat, rank):
            captured.update(image=image_feats.detach(), text=text_feat.detach())
            result = original_forward(image_feats, text_feat, rank)
            captured.update(i2t=result[1].detach(), t2i=result[2].detach())
            return result

        original_multinomial = torch.multinomial

        def multinomial(weights, n, *args, **kwargs):
            draws.append(weights.detach().clone())
            return original_multinomial(weights, n, *args, **kwargs)

        monkeypatch.setattr(model.sigmoid_itc, "forward", capture)
        monkeypatch.setattr(torch, "multinomial", multinomial)
        samples = {"image": torch.randn(4, 3, 32, 32), "text_input": ["a red circle", "two squares", "a star", "x"]}
        output = model(samples)
        monkeypatch.undo()

        itc = model.sigmoid_itc
        best = torch.einsum("iqd,td->itq", captured["image"], captured["text"]).max(-1).values
        expected = open_clip_siglip(torch.eye(4), best.T.contiguous(), itc.logit_scale.exp(), itc.logit_bias)
        torch.testing.assert_close(output.loss_itc, expected)
        assert len(draws) == 8  # one negative image per text, one negative text per image
        for row, weights in enumerate(draws[:4]):  # negative images for text `row`: from logits text -> image
            expected_weights = F.softmax(captured["t2i"][row], dim=0) + 1e-4
            expected_weights[row] = 0
            torch.testing.assert_close(weights, expected_weights)
        for row, weights in enumerate(draws[4:]):
            expected_weights = F.softmax(captured["i2t"][row], dim=0) + 1e-4
            expected_weights[row] = 0
            torch.testing.assert_close(weights, expected_weights)
        assert torch.isfinite(output.loss_itm) and torch.isfinite(output.loss)

        model.zero_grad(set_to_none=True)
        output.loss.backward()
        assert itc.logit_scale.grad is not None and itc.logit_bias.grad is not None
        assert not model.temp.requires_grad and model.temp.grad is None
