"""Attention on ``torch.nn.functional.scaled_dot_product_attention`` for the three attention classes the models
borrow: LAVIS's Q-Former ``BertSelfAttention``, LAVIS's EVA ViT ``Attention`` and transformers'
``ViTMAESelfAttention``.

Each subclass keeps its parent's parameters, inputs and outputs; only the attention product is computed by SDPA
(fused kernels on CPU and GPU; no materialised probability matrix in the backward). Cases SDPA cannot express
(attention maps requested or saved for Grad-CAM, head masks, relative position embeddings) fall back to the
parent's code. ``use_sdpa_attention(module)`` switches a built model in place (the class of each attention module
is swapped; no parameter is touched), ``use_reference_attention`` switches back.
tests/test_sdpa.py proves outputs, losses and gradients equal to the originals to 1e-5.
"""

import torch
import torch.nn.functional as F
from lavis.models.blip2_models.Qformer import BertSelfAttention
from lavis.models.eva_vit import Attention as EvaAttention
from transformers.models.vit_mae.modeling_vit_mae import ViTMAESelfAttention


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
            key_layer = self.transpose_for_scores(self.key(encoder_hidden_states))
            value_layer = self.transpose_for_scores(self.value(encoder_hidden_states))
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


class SdpaEvaAttention(EvaAttention):
    def forward(self, x, rel_pos_bias=None):
        if self.relative_position_bias_table is not None:
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
    def forward(self, hidden_states, head_mask=None, output_attentions: bool = False):
        if output_attentions or head_mask is not None:
            return super().forward(hidden_states, head_mask, output_attentions)
        query = self.transpose_for_scores(self.query(hidden_states))
        key = self.transpose_for_scores(self.key(hidden_states))
        value = self.transpose_for_scores(self.value(hidden_states))
        context = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout.p if self.training else 0.0
        )
        return (context.transpose(1, 2).flatten(2),)


_SDPA_OF = {BertSelfAttention: SdpaBertSelfAttention, EvaAttention: SdpaEvaAttention, ViTMAESelfAttention: SdpaViTMAESelfAttention}
_REFERENCE_OF = {sdpa: reference for reference, sdpa in _SDPA_OF.items()}


def _swap(module: torch.nn.Module, mapping) -> int:
    switched = 0
    for child in module.modules():
        target = mapping.get(type(child))
        if target is not None:
            child.__class__ = target
            switched += 1
    return switched


def use_sdpa_attention(module: torch.nn.Module) -> int:
    """Switch every Q-Former, EVA ViT and ViT-MAE attention inside ``module`` to SDPA; returns how many."""
    return _swap(module, _SDPA_OF)


def use_reference_attention(module: torch.nn.Module) -> int:
    """Switch back to LAVIS's / transformers' own attention code; returns how many."""
    return _swap(module, _REFERENCE_OF)
