"""The Perceiver Resampler of Flamingo and xGen-MM (BLIP-3): learned latents that read the image features.

    latents L [B, num_latents, D] (learned), image features X [B, N, D]
    repeat depth times:  L = L + attention(q = LN(L), k = v = [LN(X) ; LN(L)])
                         L = L + FF(L)                       FF = LN -> Linear(D, 4D) -> GELU -> Linear(4D, D)
    output = LN(L)       [B, num_latents, D]   (the LLM head's linear layer then projects it to the LLM width)

Flamingo (seed 003/004): "This transformer has a set of learned latent vectors as queries, and the keys and values
are a concatenation of the spatio-temporal visual features with the learned latent vectors." The module and
parameter names are those of the public references (mlfoundations/open_flamingo and the ``xgen-mm`` branch of
salesforce/LAVIS, ``open_flamingo/src/helpers.py``: ``to_q``, ``to_kv``, ``to_out``, ``norm_media``,
``norm_latents``, ``layers.<i>.0`` / ``.1``, ``norm``), so their state dicts map one to one; the single-image case
only (no frame or media-time embeddings: one image per sample, as in BLIP-2's stage 2). The attention is torch's
SDPA kernel, equal to the references' explicit softmax (tests/test_connectors.py). xgen-mm's ``projection`` after
the final norm is here the LLM head's ``opt_proj`` / ``t5_proj``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class PerceiverAttention(nn.Module):
    """Latents attend to [image features ; latents]: [B, N, D], [B, L, D] -> [B, L, D]."""

    def __init__(self, width: int, num_heads: int, head_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, features, latents):
        features, latents = self.norm_media(features), self.norm_latents(latents)
        q = self.to_q(latents)  # [B, L, H * d]
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)  # [B, N + L, H * d] each
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))  # [B, H, *, d]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v: [B, H, L, d]
        return self.to_out(out.transpose(1, 2).flatten(2))


def feed_forward(width: int, mult: int) -> nn.Sequential:
    """Pre-norm feed-forward without biases (the references' ``FeedForward``): [B, L, D] -> [B, L, D]."""
    return nn.Sequential(
        nn.LayerNorm(width),
        nn.Linear(width, width * mult, bias=False),
        nn.GELU(),
        nn.Linear(width * mult, width, bias=False),
    )


class PerceiverResampler(nn.Module):
    """``num_latents`` learned latents, ``depth`` x (attention to [features ; latents], feed-forward), final norm.

    [B, N, width] image features -> [B, num_latents, width].
    """

    def __init__(self, width: int, depth: int, num_heads: int, head_dim: int, num_latents: int, ff_mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, width))  # the references' N(0, 1) initialisation
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, num_heads, head_dim), feed_forward(width, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, features):
        latents = self.latents.expand(features.shape[0], -1, -1)  # [B, L, D]
        for attention, ff in self.layers:
            latents = attention(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
