"""How the second feature stream M meets the Q-Former's queries: one interface, three strategies (``mae_fusion``).

M is the frozen MAE-ViT's features of the (masked) image, or for ``mae_source: clip_layer`` an intermediate CLIP-ViT
block's output. A fusion answers two questions of the image pathway (``XFormerImageMixin.encode``):

    qformer_context(C, M) -> (context, mask)    what the Q-Former's cross-attentions read
    enrich(Z_q, M)        -> (Z', M' or None)   what becomes of the Q-Former's query output

    fusion                       model attribute   context     enrich
    ``Fusion`` (no MAE branch)   (none)            C           Z' = Z_q            BLIP-2
    ``DualCrossAttention``       ``dual_block``    C           the dual block      X-Former (section 2.3, Fig. 3)
    ``ConcatFusion``             ``mae_align``     (C, M*)     Z' = Z_q            Fig. 1b; supplement Table 3
    ``EarlyCrossAttention``      ``early_ca``      [C, M]      Z' = Z_q            Fig. 1c; supplement Table 3

Each module lives on the model under its ``attribute``, the prefix of its parameters in checkpoints. Only the dual
block produces M', so only it can feed the frozen MAE decoder (``reconstruction_loss`` needs ``mae_fusion: dual``).
"""

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from lavis.models.blip2_models.Qformer import BertAttention, BertIntermediate, BertLayer, BertOutput

from lavis_xformer.models.class_swaps import swap_class


class Fusion(nn.Module):
    """The interface, with BLIP-2's behaviour (no second stream): the Q-Former reads C and its output is Z'."""

    name = "none"  # the ``mae_fusion`` value that selects it
    attribute: Optional[str] = None  # the model attribute holding the module (its parameters' checkpoint prefix)
    enriches_queries: bool = False  # whether Z' differs from Z_q (ITG then reads the enriched cache)

    def qformer_context(self, clip_features, mae_features=None) -> Tuple[object, object]:
        """The Q-Former's ``encoder_hidden_states`` and ``encoder_attention_mask``."""
        return clip_features, _all_tokens(clip_features)

    def mae_stream(self, mae_features) -> Optional["MaeStream"]:
        """The part of ``enrich`` that reads M alone, for passes over the same images to share (ITM's positives re-use
        the query pass's); None where there is none."""
        return None

    def enrich(self, query_states, mae_features, mae_stream=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(Z', M') from (Z_q, M); M' is None where nothing produces it. ``mae_stream``: ``mae_stream(M)``, already
        computed."""
        return query_states, None

    def _require_mae(self, mae_features):
        if mae_features is None:
            raise ValueError(
                f"mae_fusion={self.name!r}: the Q-Former reads the MAE features too; pass mae_features "
                "(model.forward_encoders(image) returns them)"
            )


def _all_tokens(features):
    return torch.ones(features.shape[:-1], dtype=torch.long, device=features.device)


# ================================================================================================================
# X-Former: the dual cross-attention block
# ================================================================================================================
class Attention(nn.Module):
    """Multi-head attention on ``torch.nn.functional.scaled_dot_product_attention`` (self- or cross-)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def _heads(self, x):
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, hidden_states, context):
        q, k, v = self._heads(self.query(hidden_states)), self._heads(self.key(context)), self._heads(self.value(context))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.output(attended.transpose(1, 2).flatten(2))


class Residual(nn.Module):
    """Post-norm residual sub-layer, as in the BERT layers of the Q-Former: ``LN(x + dropout(f(x, ...)))``; a given
    ``output`` is f(x, ...) already computed."""

    def __init__(self, sublayer: nn.Module, hidden_size: int, dropout: float):
        super().__init__()
        self.sublayer = sublayer
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, x, *context, output=None):
        if output is None:
            output = self.sublayer(x, *context)
        return self.norm(x + self.dropout(output))


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class DualCrossAttentionLayer(nn.Module):
    """One layer of the dual block.

    (1) MAE branch: the MAE tokens are the queries, Z_q the keys/values -> M' (MAE features enriched with the
        Q-Former's global semantics).
    (2) Query branch: Z_q, after self-attention (the paper's ablation keeps it), attends to M' -> Z' (queries
        enriched with local detail).
    """

    def __init__(self, cfg):
        super().__init__()
        width, heads, drop = cfg.qformer_hidden_size, cfg.dual_num_heads, cfg.dual_dropout

        def attention():
            return Residual(Attention(width, heads, cfg.dual_attention_dropout), width, drop)

        def ffn():
            return Residual(FeedForward(width, cfg.dual_intermediate_size), width, drop)

        self.mae_self_attention = attention() if cfg.dual_mae_self_attention else None
        self.mae_cross_attention = attention()
        self.mae_ffn = ffn()
        self.query_self_attention = attention() if cfg.dual_query_self_attention else None
        self.query_cross_attention = attention()
        self.query_ffn = ffn()

    def forward(self, query_states, mae_states, mae_self_attended=None):
        """``mae_self_attended``: the MAE self-attention's product (before its dropout), already computed."""
        if self.mae_self_attention is not None:
            mae_states = self.mae_self_attention(mae_states, mae_states, output=mae_self_attended)
        enriched_mae = self.mae_ffn(self.mae_cross_attention(mae_states, query_states))

        if self.query_self_attention is not None:
            query_states = self.query_self_attention(query_states, query_states)
        enriched_queries = self.query_ffn(self.query_cross_attention(query_states, enriched_mae))
        return enriched_queries, enriched_mae


@dataclass
class MaeStream:
    """The dual block's work on M alone, before the queries take part: M projected and normalised, and the first
    layer's MAE self-attention product (before its dropout; None where that layer has none, or where attention
    dropout makes the product random). A stage-1 step reads each image's M in the query pass and twice more in ITM
    (the positive pairs), so ITM composes these rows (``select``, ``cat``) instead of computing them again; dropout
    still draws fresh masks in every pass. tests/test_xformer_stage1.py: losses and gradients equal computing them
    anew."""

    states: torch.Tensor  # [B, tokens, qformer_hidden_size]
    self_attended: Optional[torch.Tensor] = None  # [B, tokens, qformer_hidden_size]

    def select(self, rows: Sequence[int]) -> "MaeStream":
        index = torch.as_tensor(rows, device=self.states.device)
        return MaeStream(*(None if t is None else t.index_select(0, index) for t in (self.states, self.self_attended)))

    @staticmethod
    def cat(streams: Sequence["MaeStream"]) -> "MaeStream":
        attended = [s.self_attended for s in streams]
        return MaeStream(
            torch.cat([s.states for s in streams]), None if any(a is None for a in attended) else torch.cat(attended)
        )


def mae_stream_of_pairs(fusion: "Fusion", stream: "MaeStream", mae_world, negative_images, rank: int) -> "MaeStream":
    """The MAE stream of ITM's [positives; hard negatives; positives] image rows, composed from ``stream`` (the query
    pass's, for this rank's B images). A negative drawn from this rank re-uses its row; if any comes from another
    rank, the negatives are computed from ``mae_world`` (M gathered over ranks, [B * world, tokens, width])."""
    batch = stream.states.shape[0]
    local = [index - rank * batch for index in negative_images]
    if all(0 <= row < batch for row in local):
        negatives = stream.select(local)
    else:
        negatives = fusion.mae_stream(mae_world[negative_images])
    return MaeStream.cat([stream, negatives, stream])


class DualCrossAttention(Fusion):
    """Projects M to the Q-Former width, then runs the dual layers: (Z_q, M) -> (Z', M'). The Q-Former reads C."""

    name, attribute, enriches_queries = "dual", "dual_block", True

    def __init__(self, cfg):
        super().__init__()
        self.mae_proj = nn.Linear(cfg.mae_feature_width, cfg.qformer_hidden_size)  # MAE's width; CLIP's for clip_layer
        self.mae_norm = nn.LayerNorm(cfg.qformer_hidden_size, eps=1e-12)
        self.layers = nn.ModuleList(DualCrossAttentionLayer(cfg) for _ in range(cfg.dual_num_layers))

    def mae_stream(self, mae_features) -> MaeStream:
        states = self.mae_norm(self.mae_proj(mae_features))
        first = self.layers[0].mae_self_attention
        if first is None or (self.training and first.sublayer.dropout > 0):
            return MaeStream(states)
        return MaeStream(states, first.sublayer(states, states))

    def forward(self, query_states, mae_features=None, mae_stream: Optional[MaeStream] = None):
        """(Z', M') from Z_q and M, or from Z_q and ``mae_stream`` (M's part computed already)."""
        if mae_stream is None:
            mae_stream = self.mae_stream(mae_features)
        mae_states, self_attended = mae_stream.states, mae_stream.self_attended
        for layer in self.layers:
            query_states, mae_states = layer(query_states, mae_states, self_attended)
            self_attended = None
        return query_states, mae_states

    def enrich(self, query_states, mae_features, mae_stream=None):
        return self(query_states, mae_features, mae_stream)


# ================================================================================================================
# Concat (Fig. 1b)
# ================================================================================================================
class ConcatFusion(Fusion, nn.Linear):
    """M* = Linear(M) at the CLIP width (1280 -> 1408), concatenated with C along the tokens: every Q-Former
    cross-attention (queries alone, ITM's positives and hard negatives) reads (C, M*). The module is that linear
    layer (``model.mae_align(M)`` is M*); no dual block, so Z' = Z_q and there is no M'."""

    name, attribute = "concat", "mae_align"

    def __init__(self, cfg, clip_width: int):
        nn.Linear.__init__(self, cfg.mae_feature_width, clip_width)

    def qformer_context(self, clip_features, mae_features=None):
        self._require_mae(mae_features)
        aligned = self(mae_features.to(self.weight.dtype))
        context = torch.cat([clip_features, aligned], dim=1)
        return context, torch.cat([_all_tokens(clip_features), _all_tokens(mae_features)], dim=1)


# ================================================================================================================
# Early cross-attention inside the Q-Former (Fig. 1c)
# ================================================================================================================
class MaeCrossAttentionBlock(nn.Module):
    """LAVIS's ``BertLayer`` without its self-attention, cross-attending to M (see ``EarlyCrossAttention``).

    Queries: cross-attention to M, then the query feed-forward; text tokens: the text feed-forward, as in every
    LAVIS Q-Former layer. Built from LAVIS's own ``BertAttention`` / ``BertIntermediate`` / ``BertOutput``.
    """

    def __init__(self, config, feed_forward: bool = True):
        super().__init__()
        self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate_query = BertIntermediate(config) if feed_forward else None
        self.output_query = BertOutput(config) if feed_forward else None
        self.intermediate = BertIntermediate(config) if feed_forward else None
        self.output = BertOutput(config) if feed_forward else None

    def forward(self, hidden_states, mae_states, mae_attention_mask, query_length: int):
        queries, text = hidden_states[:, :query_length], hidden_states[:, query_length:]
        if query_length > 0:
            if mae_states is None:
                raise ValueError(
                    "early_ca Q-Former: the queries cross-attend to the MAE features too; pass "
                    "encoder_hidden_states=[C, M] and encoder_attention_mask=[C mask, M mask] "
                    "(EarlyCrossAttention.qformer_context builds them)"
                )
            queries = self.crossattention(queries, None, None, mae_states, mae_attention_mask)[0]
            if self.output_query is not None:
                queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1] and self.output is not None:
            text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class EarlyCrossAttentionLayer(BertLayer):
    """A LAVIS Q-Former layer reading ``encoder_hidden_states=[C, M]``: its own CLIP cross-attention (if any) reads C;
    an ``mae_block`` (layers without CLIP cross-attention) runs after the layer and reads M.

    Converted in place from LAVIS's ``BertLayer`` (parameter names, pretrained weights, the layers Blip2OPT removes
    and the ITG cache format stay LAVIS's): LAVIS's ``BertEncoder`` builds plain ``BertLayer``s and has no hook for
    another class, and re-building the layers would re-load the weights. A plain tensor ``encoder_hidden_states`` is
    C alone.
    """

    mae_block: Optional[MaeCrossAttentionBlock]

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_value=None,
        output_attentions=False,
        query_length=0,
    ):
        clip_states, mae_states = _split(encoder_hidden_states)
        clip_mask, mae_mask = _split(encoder_attention_mask)
        outputs = super().forward(
            hidden_states, attention_mask, head_mask, clip_states, clip_mask, past_key_value, output_attentions,
            query_length,
        )
        if self.mae_block is None:
            return outputs
        return (self.mae_block(outputs[0], mae_states, mae_mask, query_length),) + tuple(outputs[1:])


def _split(value):
    if isinstance(value, (list, tuple)):
        return value[0], value[1]
    return value, None


class EarlyCrossAttention(Fusion):
    """The Q-Former's layers without a CLIP cross-attention (LAVIS: layers 1, 3, ..., 11) get an MAE interaction block
    after them: LAVIS's ``BertLayer`` with its self-attention left out (the layer before it just ran one), i.e. a
    cross-attention from the queries to M (keys/values from M's 1280 width) followed by the query feed-forward, and
    the text feed-forward that text tokens take through every LAVIS Q-Former layer. The Q-Former reads [C, M]; Z' = Z_q.

    How big the added layers are the paper does not say; its 183M (75M over BLIP-2's 108M, with OPT-6.7B) decides.
    Stage-2 counts of the candidates (BLIP-2's Q-Former reduced as LAVIS ``Blip2OPT`` reduces it, + the OPT-6.7B
    projection):

        bare cross-attention to M in the 6 layers                        +18.9M  -> 127.2M
        + a query feed-forward after each                                +47.3M  -> 155.6M
        + the text feed-forward as well (a BertLayer minus self-attn)    +75.6M  -> 183.9M   <- chosen, paper 183M
        full BertLayers (self-attention too) inserted after the 6        +89.8M  -> 198.1M

    Only the chosen structure is within 3% of the paper. Its text feed-forward is the one part stage 2 never runs
    (no text enters the Q-Former there); ``Blip2OPT``'s rule removes each Q-Former layer's own ``intermediate`` /
    ``output`` only, so it stays and counts, which is what makes 183M. (The same 183.9M also results from the bare
    cross-attention with the Q-Former's own 12 text feed-forwards left in stage 2.) ``early_ca_feed_forward: False``
    builds the bare cross-attention (127.2M).

    The blocks live inside the Q-Former (``Qformer.bert.encoder.layer.<i>.mae_block``); this module holds no
    parameters of its own.
    """

    name, attribute = "early_ca", "early_ca"

    def __init__(self, cfg, qformer):
        super().__init__()
        self.layers_given_mae = add_early_cross_attention(qformer, cfg.mae_feature_width, cfg.early_ca_feed_forward)

    def qformer_context(self, clip_features, mae_features=None):
        self._require_mae(mae_features)
        return [clip_features, mae_features], [_all_tokens(clip_features), _all_tokens(mae_features)]


def add_early_cross_attention(qformer, mae_width: int, feed_forward: bool = True) -> List[int]:
    """Turn a built LAVIS Q-Former into the early-CA one in place; returns the indices of the layers given M.

    New modules are initialised as LAVIS initialises the Q-Former (``BertPreTrainedModel._init_weights``).
    """
    config = copy.deepcopy(qformer.config)
    config.encoder_width = mae_width
    given = []
    for index, layer in enumerate(qformer.bert.encoder.layer):
        swap_class(layer, EarlyCrossAttentionLayer, "early_cross_attention")
        layer.mae_block = None
        if not layer.has_cross_attention:
            block = MaeCrossAttentionBlock(config, feed_forward)
            block.apply(qformer._init_weights)
            layer.mae_block = block
            given.append(index)
    return given


# ================================================================================================================
# Selection by config
# ================================================================================================================
FUSIONS = {fusion.name: fusion for fusion in (DualCrossAttention, ConcatFusion, EarlyCrossAttention)}
NO_FUSION = Fusion()  # BLIP-2's pathway (use_mae: False); it holds no state, so one instance serves every model


def build_fusion(cfg, qformer, clip_width: int) -> Optional[Fusion]:
    """The fusion module of ``cfg.mae_fusion`` (None without the MAE branch); early CA converts ``qformer``."""
    if not cfg.use_mae:
        return None
    if cfg.mae_fusion == "concat":
        return ConcatFusion(cfg, clip_width)
    if cfg.mae_fusion == "early_ca":
        return EarlyCrossAttention(cfg, qformer)
    return DualCrossAttention(cfg)
