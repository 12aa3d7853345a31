"""The projector connectors: MM1's average-pooling baseline and LLaVA's linear / MLP projector of patch tokens.

    CLIP-ViT features [B, 1 + G*G, W] -> drop [CLS] -> patch grid [B, W, G, G]
    num_tokens > 0: average-pool the grid to rows x cols = num_tokens (MM1 "Average Pooling")     [B, T, W]
    num_tokens = 0: every patch token (LLaVA)                                                      [B, G*G, W]
    layers - 1 x (Linear, GELU)                                                                    [B, T, hidden]
    then the LLM head's linear layer (``opt_proj`` / ``t5_proj``) to the LLM width: ``layers: 1`` is the linear
    projector (LLaVA-1), ``layers: 2`` with ``hidden = LLM width`` LLaVA-1.5's ``mlp2x_gelu``.

MM1 (seed 004): "Number of visual tokens and image resolution matters most, while the type of VL connector has
little effect". The pooled grid of a non-square token count is rows x cols with rows the largest divisor of the
count not above its square root (32 -> 4 x 8, 128 -> 8 x 16): a choice; MM1 pools n x n.
"""

import math
from typing import Tuple

import torch.nn as nn
import torch.nn.functional as F


def pooled_grid(num_tokens: int) -> Tuple[int, int]:
    """(rows, cols) with rows * cols = num_tokens and rows the largest divisor <= sqrt(num_tokens)."""
    rows = max(d for d in range(1, math.isqrt(num_tokens) + 1) if num_tokens % d == 0)
    return rows, num_tokens // rows


class PooledProjector(nn.Module):
    """[B, 1 + G*G, width] -> [B, T, out_width]: average pooling of the patch grid, then (Linear, GELU) layers."""

    def __init__(self, width: int, grid: int, num_tokens: int, layers: int, hidden_size: int):
        super().__init__()
        self.grid = grid
        self.pool_to = pooled_grid(num_tokens) if num_tokens else None
        blocks, in_width = [], width
        for _ in range(layers - 1):
            blocks += [nn.Linear(in_width, hidden_size), nn.GELU()]
            in_width = hidden_size
        self.mlp = nn.Sequential(*blocks)  # empty for the linear projector (the head's layer is the only one)
        self.out_width = in_width

    def forward(self, features):
        patches = features[:, 1:]  # [B, G*G, W] (EVA's [CLS] first)
        if self.pool_to is not None:
            grid = patches.transpose(1, 2).unflatten(-1, (self.grid, self.grid))  # [B, W, G, G]
            patches = F.adaptive_avg_pool2d(grid, self.pool_to).flatten(2).transpose(1, 2)  # [B, T, W]
        return self.mlp(patches)
