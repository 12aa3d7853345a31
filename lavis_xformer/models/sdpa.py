"""Attention on ``torch.nn.functional.scaled_dot_product_attention`` for the three attention classes the models
borrow: LAVIS's Q-Former ``BertSelfAttention``, LAVIS's EVA ViT ``Attention`` and transformers'
``ViTMAESelfAttention``.

Each subclass keeps its parent's parameters, inputs and outputs; only the attention product is computed by SDPA
(fused kernels on CPU and GPU; no materialised probability matrix in the backward). Cases SDPA cannot express
(attention maps requested or saved for Grad-CAM, head masks, relative position embeddings) fall back to the
parent's code, as do bf16 inputs on a CPU (``_bf16_on_cpu``), where the fused kernel is slower: the CLIP-ViT takes
LAVIS's product there, and the MAE computes its product as that one does (``_half_precision_attention``).
``use_sdpa_attention(module)`` switches a built model in place (the class of each attention module is swapped; no
parameter is touched), ``use_reference_attention`` switches back. tests/test_sdpa.py proves outputs, losses and
gradients equal to the originals to 1e-5, and the bf16 MAE within bf16's rounding of transformers' bf16 product.

``shared_context_projections`` lets the Q-Former's cross-attentions project one batch of image features to keys and
values once per training step (see ``SharedContextProjections``). The attention modules find it through a context
variable, because LAVIS's Q-Former passes no extra argument down to them; ``XFormer.encode`` and ``XFormer.itm_loss``,
the only places that open such a block, say so where they do.
"""

import contextlib
import contextvars
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from lavis.models.blip2_models.Qformer import BertSelfAttention
from lavis.models.eva_vit import Attention as EvaAttention
from transformers.models.vit_mae.modeling_vit_mae import ViTMAESelfAttention

from lavis_xformer.models.class_swaps import swap_class


def _bf16_on_cpu(x: torch.Tensor) -> bool:
    """True where the frozen encoders run in bfloat16 on a CPU (models/precision.py: ``frozen_precision: auto`` picks
    it only on a CPU with native bf16; a forced bf16 elsewhere takes the same path). There the fused SDPA kernel is
    about 2x slower than the plain product the reference classes compute (measured on AVX-512-BF16 cores, head
    widths 8 to 88, 32 to 257 tokens), so the reference product runs instead; in fp32 and on CUDA, SDPA does."""
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class SdpaBertSelfAttention(BertSelfAttention):
    def forward(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_value=None,
        output_attentions=False,
    ):
        if output_attentions or head_mask is not None or self.save_attention or self.position_embedding_type != "absolute":
            return super().forward(
                hidden_states,
                attention_mask,
                head_mask,
                encoder_hidden_states,
                encoder_attention_mask,
                past_key_value,
                output_attentions,
            )

        # Keys/values exactly as LAVIS builds them (its cache format included).
        if encoder_hidden_states is not None:
            shared = current_shared_context()
            if shared is not None:
                key_layer, value_layer = shared.keys_values(self, encoder_hidden_states)
            else:
                key_layer, value_layer = self.context_keys_values(encoder_hidden_states)
            attention_mask = encoder_attention_mask
        else:
            key_layer = self.transpose_for_scores(self.key(hidden_states))
            value_layer = self.transpose_for_scores(self.value(hidden_states))
            if past_key_value is not None:
                key_layer = torch.cat([past_key_value[0], key_layer], dim=2)
                value_layer = torch.cat([past_key_value[1], value_layer], dim=2)
        query_layer = self.transpose_for_scores(self.query(hidden_states))

        # LAVIS's masks are additive (0 / -10000), broadcastable to [batch, heads, queries, keys].
        if attention_mask is not None:
            attention_mask = attention_mask.to(query_layer.dtype)
        context = F.scaled_dot_product_attention(
            query_layer, key_layer, value_layer, attn_mask=attention_mask, dropout_p=self.dropout.p if self.training else 0.0
        )
        return (context.transpose(1, 2).flatten(2), (key_layer, value_layer))

    def context_keys_values(self, context):
        return self.transpose_for_scores(self.key(context)), self.transpose_for_scores(self.value(context))


# ----------------------------------------------------------------------------------------------------------------
# Cross-attention keys/values of the image features, projected once per step
# ----------------------------------------------------------------------------------------------------------------
_SHARED_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("lavis_xformer_shared_context", default=None)


class SharedContextProjections:
    """Keys/values of one batch of image features C, projected once per Q-Former cross-attention and re-used.

    A stage-1 step reads C three times over: the unimodal query pass (B images) and ITM's pass over
    [C; C_neg; C] (3B rows, two thirds of them the same B images). LAVIS projects every row again at every
    cross-attention layer. Here the unimodal pass stores each layer's keys/values of C, and the ITM context, built by
    ``compose([C, C_neg, C])``, gets them back, so that only the hard negatives' rows are projected. The values are
    the same tensors (no dropout acts on a projection), so losses and gradients are LAVIS's up to summation order
    (tests/test_sdpa.py). A context that is neither C nor composed here (the concat / early-CA variants) is projected
    as usual.
    """

    def __init__(self, features: torch.Tensor):
        self.features = features
        self._kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._composed: List[Tuple[torch.Tensor, List[torch.Tensor]]] = []

    def compose(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """``torch.cat(parts)`` along the batch, remembered so that rows equal to ``features`` are not re-projected."""
        context = torch.cat(parts)
        self._composed.append((context, list(parts)))
        return context

    def _parts_of(self, context) -> Optional[List[torch.Tensor]]:
        for composed, parts in self._composed:
            if composed is context:
                return parts
        return None

    def keys_values(self, attention: SdpaBertSelfAttention, context: torch.Tensor):
        if context is self.features:
            kv = attention.context_keys_values(context)
            self._kv[id(attention)] = kv
            return kv
        parts = self._parts_of(context)
        if parts is None:
            return attention.context_keys_values(context)
        pieces = []
        for part in parts:
            stored = self._kv.get(id(attention)) if part is self.features else None
            pieces.append(stored if stored is not None else attention.context_keys_values(part))
        return torch.cat([k for k, _ in pieces]), torch.cat([v for _, v in pieces])


def current_shared_context() -> Optional[SharedContextProjections]:
    """The projections shared by the enclosing ``shared_context_projections`` block, or None outside one."""
    return _SHARED_CONTEXT.get()


@contextlib.contextmanager
def shared_context_projections(features: torch.Tensor):
    """Within the block, SDPA cross-attentions project ``features`` once per layer (see SharedContextProjections)."""
    with reusing_projections(SharedContextProjections(features)) as shared:
        yield shared


@contextlib.contextmanager
def reusing_projections(shared: Optional[SharedContextProjections]):
    """Within the block, the cross-attentions read ``shared`` (an earlier block's projections) again; with None, every
    context is projected as usual."""
    token = _SHARED_CONTEXT.set(shared)
    try:
        yield shared
    finally:
        _SHARED_CONTEXT.reset(token)


class SdpaEvaAttention(EvaAttention):
    def forward(self, x, rel_pos_bias=None):
        if self.relative_position_bias_table is not None or _bf16_on_cpu(x):
            return super().forward(x, rel_pos_bias)
        batch, tokens, _ = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=rel_pos_bias, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, -1)))


class SdpaViTMAESelfAttention(ViTMAESelfAttention):
    def forward(self, hidden_states, head_mask=None, output_attentions: bool = False, query_rows=None):
        """``query_rows`` ([B, n] token indices): the outputs of those tokens only, attending to every token (the
        MAE decoder's last layer, whose other rows the reconstruction loss does not read)."""
        if output_attentions or head_mask is not None:
            if query_rows is not None:
                raise ValueError("query_rows takes neither attention maps nor head masks")
            return super().forward(hidden_states, head_mask, output_attentions)
        if query_rows is None and _bf16_on_cpu(hidden_states) and not (self.training and self.dropout.p > 0):
            return (self._half_precision_attention(hidden_states),)
        queried = hidden_states
        if query_rows is not None:
            queried = hidden_states.gather(1, query_rows.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
        query = self.transpose_for_scores(self.query(queried))
        key = self.transpose_for_scores(self.key(hidden_states))
        value = self.transpose_for_scores(self.value(hidden_states))
        context = F.scaled_dot_product_attention(query, key, value, dropout_p=self.dropout.p if self.training else 0.0)
        return (context.transpose(1, 2).flatten(2),)

    def _half_precision_attention(self, hidden_states):
        """The frozen MAE encoder's attention in bf16 on a CPU (under the encoder's autocast), computed as the
        frozen CLIP-ViT computes its own there (LAVIS's EVA ``Attention``): one projection to queries, keys and values,
        the queries scaled before the product, a softmax in bf16. transformers' ViTMAE instead projects three times
        and divides the [tokens x tokens] scores, one more pass over the largest tensor of the layer. Scaling q before
        or the scores after the product rounds differently in bf16: the encoder's output moves by about 1e-3 of its
        norm, a tenth of what bf16 itself moves it from fp32 (tests/test_sdpa.py, tests/test_precision.py). The time
        it saves is measured in bench/README.md.

        Scores larger than ``MAE_SCORES_BLOCK_BYTES`` are computed one image (or block of heads) at a time: each
        score goes through the same kernels, so the output is the same, but a block's scores stay in cache between
        the passes over them. SDPA's fused kernel is slower here in bf16 (``_bf16_on_cpu``)."""
        batch, tokens, width = hidden_states.shape
        heads, head_width = self.num_attention_heads, self.attention_head_size
        # One [width x 3 width] product instead of three: the same dot products, so the same bits as three.
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(hidden_states, weight, bias).view(batch, tokens, 3, heads, head_width)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # each [B, heads, tokens, head width]
        query = query * head_width**-0.5
        score_bytes = tokens * tokens * query.element_size()  # one head's scores
        if batch * heads * score_bytes <= MAE_SCORES_BLOCK_BYTES:
            scores = torch.matmul(query, key.transpose(-1, -2))
            context = torch.matmul(torch.softmax(scores, dim=-1, dtype=scores.dtype), value)
            return context.transpose(1, 2).reshape(batch, tokens, width)
        per_block = min(heads, max(1, MAE_SCORES_BLOCK_BYTES // score_bytes))
        context = query.new_empty(batch, tokens, heads, head_width)
        for image in range(batch):
            for first in range(0, heads, per_block):
                rows = (image, slice(first, first + per_block))
                scores = torch.matmul(query[rows], key[rows].transpose(-1, -2))
                block = torch.matmul(torch.softmax(scores, dim=-1, dtype=scores.dtype), value[rows])
                context[image, :, first : first + per_block] = block.transpose(0, 1)
        return context.view(batch, tokens, width)


# The most attention scores the bf16 MAE product computes at once (``_half_precision_attention``). Measured on the
# development CPU at bench size: one image's 16 x 257 x 257 bf16 scores (2.1 MB) per block was the fastest of 0.5 MB,
# 1 MB, 2.1 MB and all four images (8.4 MB); the masked training pass (129 tokens, 2.1 MB for four images) gains
# nothing from blocks and stays whole.
MAE_SCORES_BLOCK_BYTES = 4 << 20


_SDPA_OF = {BertSelfAttention: SdpaBertSelfAttention, EvaAttention: SdpaEvaAttention, ViTMAESelfAttention: SdpaViTMAESelfAttention}
_REFERENCE_OF = {sdpa: reference for reference, sdpa in _SDPA_OF.items()}


def _swap(module: torch.nn.Module, mapping, swap: str) -> int:
    switched = 0
    for child in module.modules():
        target = mapping.get(type(child))
        if target is not None:
            swap_class(child, target, swap)
            switched += 1
    return switched


def use_sdpa_attention(module: torch.nn.Module) -> int:
    """Switch every Q-Former, EVA ViT and ViT-MAE attention inside ``module`` to SDPA; returns how many."""
    return _swap(module, _SDPA_OF, "sdpa_attention")


def use_reference_attention(module: torch.nn.Module) -> int:
    """Switch back to LAVIS's / transformers' own attention code; returns how many."""
    return _swap(module, _REFERENCE_OF, "reference_attention")
