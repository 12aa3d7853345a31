"""Activation checkpointing of the trainable layers: memory for time (``checkpoint_trainable_layers``).

Every Q-Former layer (LAVIS's ``BertLayer``, the early-CA variant's too) and every dual cross-attention layer keeps
only its inputs in training; its activations are recomputed in the backward (``torch.utils.checkpoint``, the
non-reentrant kind, which restores the RNG state so that dropout draws the same masks). LAVIS's own switch
(``gradient_checkpointing`` in the Q-Former's config) turns the query cache off, which ITG reads, so the layers are
wrapped here instead; as in ``sdpa.use_sdpa_attention`` the class of each layer is swapped in place and no parameter
is touched. The cross-attention keys/values shared within a step (``sdpa.SharedContextProjections``) are re-entered
for the recomputation, so it repeats the forward op for op. tests/test_checkpointing.py: losses and gradients equal
without it. The frozen CLIP-ViT has LAVIS's switch, ``use_grad_checkpoint``.
"""

from typing import Dict

import torch
from lavis.models.blip2_models.Qformer import BertLayer
from torch.utils.checkpoint import checkpoint

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


_CHECKPOINTED: Dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED:
        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (CheckpointedLayer, cls), {"__module__": cls.__module__})
    return _CHECKPOINTED[cls]


def checkpoint_trainable_layers(model: torch.nn.Module) -> int:
    """Checkpoint every Q-Former and dual-block layer inside ``model``; returns how many were switched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, (BertLayer, DualCrossAttentionLayer)) and not isinstance(module, CheckpointedLayer):
            module.__class__ = _checkpointed_class(type(module))
            switched += 1
    return switched
