"""SigLIP's sigmoid loss as stage 1's image-text contrastive term (``itc_loss: sigmoid``; BLIP-2's softmax is the
default).

    logits[i, j] = exp(t') * sim(image_i, text_j) + b          t' = log 10, b = -10 at initialisation (learnable)
    labels[i, j] = +1 if (i, j) is a pair, -1 otherwise
    loss = -sum_ij log sigmoid(labels[i, j] * logits[i, j]) / (images on this rank)

SigLIP (seed 003): "Compared to Softmax, sigmoid loss simplifies the problem to *binary classification*", with
z_ij "1 if paired, otherwise 0" and the loss summed over every (image, text) pair. open_clip's ``SigLipLoss`` is the
reference: the same logits, labels and reduction (tests/test_siglip.py checks the value against it, written out).

Distributed: each rank scores its own images (rows) against every rank's texts (columns), the texts gathered
*with* their gradient (LAVIS's ``GatherLayer``: the backward sums each text's gradient over the ranks that scored
it), so every pair is counted once in the world and DDP's gradient average is the gradient of the one-process loss
over the whole batch. (open_clip passes the texts around a ring instead of gathering them: the same sum.)
``sim`` is the model's similarity: for the Q-Former / X-Former, the maximum over the queries of the cosine
similarity to the text's [CLS] (BLIP-2's ITC similarity, without its temperature).
"""

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lavis_xformer.common import distributed as dist


def sigmoid_pair_loss(logits: torch.Tensor, first_positive_column: int) -> torch.Tensor:
    """SigLIP's loss of a block of rows: ``logits`` [B, N] (row i's pair is column ``first_positive_column + i``),
    summed over the pairs and divided by the rows."""
    rows = logits.shape[0]
    labels = -torch.ones_like(logits)
    labels[torch.arange(rows), first_positive_column + torch.arange(rows)] = 1.0
    return -F.logsigmoid(labels * logits).sum() / rows


class SigmoidITC(nn.Module):
    """SigLIP's learnable temperature and bias, and the loss of [B, Q, D] image queries vs [B, D] texts."""

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))  # t'
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias))  # b

    def logits(self, similarity: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * similarity + self.logit_bias

    def forward(self, image_feats, text_feat, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits image -> every text [B, B * world], logits text -> every image [B, B * world]) of
        normalised image queries [B, Q, D] and texts [B, D]; the two logit matrices (without gradient for the
        second) are what BLIP-2's ITM draws its hard negatives from, as it does from the softmax ITC's."""
        text_feat_all = dist.all_gather_with_grad(text_feat)  # [B * world, D], gradient to every rank
        sim_i2t = torch.einsum("iqd,td->itq", image_feats, text_feat_all).max(-1).values  # [B, B * world]
        logits_i2t = self.logits(sim_i2t)
        loss = sigmoid_pair_loss(logits_i2t, rank * image_feats.shape[0])
        with torch.no_grad():
            image_feats_all = dist.concat_all_gather(image_feats)  # [B * world, Q, D]
            sim_t2i = torch.einsum("td,iqd->tiq", text_feat, image_feats_all).max(-1).values
            logits_t2i = self.logits(sim_t2i)
        return loss, logits_i2t, logits_t2i
