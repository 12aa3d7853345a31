"""Activation checkpointing of the trainable layers: memory for time (``checkpoint_trainable_layers``).

    layer(inputs) in training -> torch.utils.checkpoint(layer.forward, inputs): only the inputs are kept

Every Q-Former layer (LAVIS's ``BertLayer``, the early-CA variant's too) and every dual cross-attention layer is
recomputed in the backward (the non-reentrant kind, which restores the RNG state, so dropout draws the same masks).
LAVIS's own switch (``gradient_checkpointing`` in the Q-Former's config) turns off the query cache that ITG reads,
so the layers' classes are swapped instead (``class_swaps``); no parameter is touched. The cross-attention
keys/values shared within a step (``sdpa.SharedContextProjections``) are re-entered for the recomputation, so it
repeats the forward op for op. The frozen CLIP-ViT has LAVIS's switch, ``use_grad_checkpoint``.
"""

import torch
from lavis.models.blip2_models.Qformer import BertLayer
from torch.utils.checkpoint import checkpoint

from lavis_xformer.models.class_swaps import mixed_class, swap_class
from lavis_xformer.models.fusion import DualCrossAttentionLayer
from lavis_xformer.models.sdpa import current_shared_context, reusing_projections


class CheckpointedLayer:
    """Mixin placed before a layer's class: in training with gradients its forward is checkpointed."""

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(*args, **kwargs)
        shared = current_shared_context()
        parent_forward = super().forward

        def run(*inputs):
            with reusing_projections(shared):
                return parent_forward(*inputs, **kwargs)

        return checkpoint(run, *args, use_reentrant=False)


def checkpoint_trainable_layers(model: torch.nn.Module) -> int:
    """Checkpoint every Q-Former and dual-block layer inside ``model``; returns how many were switched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, (BertLayer, DualCrossAttentionLayer)) and not isinstance(module, CheckpointedLayer):
            swap_class(module, mixed_class(CheckpointedLayer, type(module), "Checkpointed"), "activation_checkpointing")
            switched += 1
    return switched
