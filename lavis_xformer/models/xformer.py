"""X-Former stage 1 (arXiv 2407.13851, section 2.3 and Fig. 3), read top to bottom as the method.

    image --(frozen CLIP-ViT)--> C --(Q-Former, learnable queries, text)--> Z_q
    image --(random masking, frozen MAE-ViT)--> M
    dual cross-attention:  M attends to Z_q -> M'  ;  Z_q attends to M' -> Z'
    Z'  -> ITC, ITM, ITG          M' -> frozen MAE decoder -> reconstruction loss on the masked patches

The BLIP-2 parts are LAVIS's own classes (``Blip2Qformer`` is the parent: its Q-Former, EVA ViT, tokenizer, heads
and retrieval code); this file adds only the MAE branch and the dual block. With ``use_mae=False`` every loss is
LAVIS's BLIP-2 loss on the same weights (tests/test_xformer_stage1.py proves it).
"""

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
from lavis.models.blip_models.blip_outputs import BlipOutputFeatures
from transformers.modeling_outputs import ModelOutput

from lavis_xformer.common import distributed as dist
from lavis_xformer.models import variants
from lavis_xformer.models.builders import (
    ConfigBuildersMixin,
    blip2_init_kwargs,
    build_mae,
    freeze,
    unfreeze_layernorms,
)
from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.precision import frozen_half_dtype, run_in_half_precision
from lavis_xformer.models.sdpa import current_shared_context, shared_context_projections, use_sdpa_attention
from lavis_xformer.paths import model_config_path

# The processors normalise with CLIP's statistics (what the CLIP-ViT was trained on); MAE was trained on
# ImageNet statistics. Each encoder must see its own normalisation, so the MAE input is re-normalised here.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ================================================================================================================
# The dual cross-attention block
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
    """Post-norm residual sub-layer, as in the BERT layers of the Q-Former: ``LN(x + dropout(f(x, ...)))``."""

    def __init__(self, sublayer: nn.Module, hidden_size: int, dropout: float):
        super().__init__()
        self.sublayer = sublayer
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, x, *context):
        return self.norm(x + self.dropout(self.sublayer(x, *context)))


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

    def __init__(self, cfg: XFormerConfig):
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

    def forward(self, query_states, mae_states):
        if self.mae_self_attention is not None:
            mae_states = self.mae_self_attention(mae_states, mae_states)
        enriched_mae = self.mae_ffn(self.mae_cross_attention(mae_states, query_states))

        if self.query_self_attention is not None:
            query_states = self.query_self_attention(query_states, query_states)
        enriched_queries = self.query_ffn(self.query_cross_attention(query_states, enriched_mae))
        return enriched_queries, enriched_mae


class DualCrossAttention(nn.Module):
    """Projects MAE features M to the Q-Former width, then runs the dual layers: (Z_q, M) -> (Z', M')."""

    def __init__(self, cfg: XFormerConfig):
        super().__init__()
        self.mae_proj = nn.Linear(cfg.mae_feature_width, cfg.qformer_hidden_size)  # MAE's width; CLIP's for clip_layer
        self.mae_norm = nn.LayerNorm(cfg.qformer_hidden_size, eps=1e-12)
        self.layers = nn.ModuleList(DualCrossAttentionLayer(cfg) for _ in range(cfg.dual_num_layers))

    def forward(self, query_states, mae_features):
        mae_states = self.mae_norm(self.mae_proj(mae_features))
        for layer in self.layers:
            query_states, mae_states = layer(query_states, mae_states)
        return query_states, mae_states


# ================================================================================================================
# Outputs
# ================================================================================================================
@dataclass
class MaeEncoding(ModelOutput):
    """The frozen MAE encoder's view of a batch: features of the visible tokens ([CLS] first) and its masking."""

    features: torch.Tensor = None  # M: [B, 1 + visible, mae_hidden_size]
    mask: torch.Tensor = None  # [B, num_patches], 1 = masked (hidden from the encoder)
    ids_restore: torch.Tensor = None  # [B, num_patches], un-shuffles visible + mask tokens for the decoder
    pixels: torch.Tensor = None  # the MAE-normalised input [B, 3, H, W], the reconstruction target


@dataclass
class XFormerOutput(ModelOutput):
    """Stage-1 losses, each separately, and their weighted total (``loss``). ``loss_lm`` is ITG (LAVIS's name)."""

    loss: torch.Tensor = None
    loss_itc: torch.Tensor = None
    loss_itm: torch.Tensor = None
    loss_lm: torch.Tensor = None
    loss_rec: Optional[torch.Tensor] = None


@contextlib.contextmanager
def _mask_ratio(mae_config, ratio: float):
    """transformers' ViTMAE reads ``config.mask_ratio`` at call time; set it for one call."""
    saved = mae_config.mask_ratio
    mae_config.mask_ratio = ratio
    try:
        yield
    finally:
        mae_config.mask_ratio = saved


# ================================================================================================================
# The image side shared by stage 1 and stage 2: C, M, Z_q -> (Z', M')
# ================================================================================================================
class XFormerImageMixin:
    """The X-Former image pathway on top of a LAVIS BLIP-2 class (which provides the CLIP-ViT and Q-Former).

    ``build_mae_branch(config)`` adds the frozen MAE encoder (and decoder when the reconstruction loss is on) and
    the trainable dual block; with ``use_mae=False`` nothing is added and the pathway is BLIP-2's.
    """

    def build_mae_branch(self, config: XFormerConfig):
        self.mae_encoder = self.mae_decoder = self.dual_block = self.mae_out_proj = self.mae_align = None
        if not config.use_mae:
            return
        # Variants (models/variants.py): no MAE for clip_layer, no decoder without reconstruction, concat / early CA.
        if config.mae_source == "mae":
            mae = build_mae(config) if config.reconstruction_loss else None
            mae_encoder = freeze(mae.vit if mae is not None else variants.build_mae_encoder(config))
            self.mae_encoder = run_in_half_precision(mae_encoder, frozen_half_dtype(config))
        if config.mae_fusion == "dual":
            self.dual_block = DualCrossAttention(config)
        else:
            variants.build_fusion(self, config)
        if config.reconstruction_loss:
            # Frozen, but the reconstruction loss's gradient flows back through it to M': it stays in the training
            # precision (fp32, or the runner's autocast). In bf16 it was also 2.7x slower at bench size.
            self.mae_decoder = freeze(mae.decoder)
            # M' lives at the Q-Former width; the frozen decoder reads the MAE encoder's width.
            self.mae_out_proj = nn.Linear(config.qformer_hidden_size, config.mae_hidden_size)
        self.register_buffer("_clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_mae_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_mae_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def unfreeze_vit_layernorms(self):
        """VQA fine-tuning (supplement section 2) trains the CLIP-ViT's layer norms only."""
        unfreeze_layernorms(self.visual_encoder)

    # ------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------
    def check_image(self, image) -> torch.Tensor:
        size = self.config.image_size
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"samples['image'] must be a [batch, 3, {size}, {size}] tensor, got {got}")
        if image.shape[1] != 3:
            raise ValueError(
                f"samples['image'] has {image.shape[1]} channels; the encoders take 3 (RGB). "
                "Convert images with the xformer_image_* processors."
            )
        if tuple(image.shape[-2:]) != (size, size):
            raise ValueError(
                f"samples['image'] is {tuple(image.shape[-2:])} pixels but the model's image_size is {size}; "
                f"resize with the xformer_image_* processors (image_size: {size})"
            )
        return image

    def check_texts(self, texts, batch_size: int, key: str = "text_input"):
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise ValueError(f"samples[{key!r}] must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError(f"samples[{key!r}] is an empty list; give one caption per image")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"samples[{key!r}] must hold only strings")
        if len(texts) != batch_size:
            raise ValueError(
                f"batch size mismatch: {batch_size} images but {len(texts)} texts in samples[{key!r}]"
            )
        return list(texts)

    # ------------------------------------------------------------------------------------------------------------
    # Frozen encoders
    # ------------------------------------------------------------------------------------------------------------
    def forward_clip(self, image):
        """C: the frozen CLIP-ViT's second-to-last layer, through the trainable ``ln_vision``."""
        vit_frozen = not any(p.requires_grad for p in self.visual_encoder.parameters())
        with self.maybe_autocast(), torch.set_grad_enabled(torch.is_grad_enabled() and not vit_frozen):
            clip_features = self.visual_encoder(image)
        return self.ln_vision(clip_features.float() if clip_features.dtype != torch.float32 else clip_features)

    def mae_pixels(self, image):
        """CLIP-normalised processor output -> MAE's own normalisation, at MAE's input size."""
        raw = image.float() * self._clip_std + self._clip_mean
        size = self.config.mae_image_size
        if tuple(raw.shape[-2:]) != (size, size):
            raw = F.interpolate(raw, size=(size, size), mode="bicubic", align_corners=False)
        return (raw - self._mae_mean) / self._mae_std

    def forward_mae(self, image, mask_ratio: Optional[float] = None, noise=None) -> MaeEncoding:
        """M: random masking (``mask_ratio`` of the patches hidden), then the frozen MAE encoder on the rest.

        ``noise`` ([B, num_patches], as transformers takes it) fixes the masking; without it a fresh random
        masking is drawn, except at ratio 0 where the patches keep their order.
        """
        if mask_ratio is None:
            mask_ratio = self.config.mask_ratio if self.training else self.config.eval_mask_ratio
        pixels = self.mae_pixels(image)
        if noise is None and mask_ratio == 0:
            num_patches = self.mae_encoder.embeddings.num_patches
            noise = torch.arange(num_patches, device=image.device, dtype=torch.float).expand(image.shape[0], -1)
        with _mask_ratio(self.mae_encoder.config, mask_ratio), torch.no_grad(), self.maybe_autocast():
            encoded = self.mae_encoder(pixel_values=pixels, noise=noise, return_dict=True)
        return MaeEncoding(
            features=encoded.last_hidden_state.float(),
            mask=encoded.mask,
            ids_restore=encoded.ids_restore,
            pixels=pixels,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Q-Former and the dual block
    # ------------------------------------------------------------------------------------------------------------
    def forward_queries(self, clip_features, output_hidden_states: bool = False, mae_features=None):
        """Z_q: the learnable queries through the Q-Former, cross-attending to C (unimodal: no text).

        ``mae_features``: M, which the concat and early-CA variants read inside the Q-Former (unused otherwise).
        """
        query_tokens = self.query_tokens.expand(clip_features.shape[0], -1, -1)
        context, context_atts = self.qformer_context(clip_features, mae_features)
        return self.Qformer.bert(
            query_embeds=query_tokens,
            encoder_hidden_states=context,
            encoder_attention_mask=context_atts,
            use_cache=True,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )

    def qformer_context(self, clip_features, mae_features=None):
        """The Q-Former's cross-attention input and its mask: C; (C, M*) for concat; [C, M] for early CA."""
        return variants.qformer_context(self, clip_features, mae_features)

    def forward_encoders(self, image, mask_ratio: Optional[float] = None, noise=None):
        """(C, MaeEncoding of M or None) from the frozen encoders; for clip_layer, M is a CLIP-ViT block's output."""
        if not self.config.use_mae:
            return self.forward_clip(image), None
        if self.config.mae_source == "clip_layer":
            clip_features, layer_features = variants.clip_with_layer(self, image, self.config.clip_feature_layer)
            return clip_features, MaeEncoding(features=layer_features)
        return self.forward_clip(image), self.forward_mae(image, mask_ratio, noise)

    def enrich(self, query_states, mae_features) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(Z', M') from (Z_q, M); the identity on Z_q when the MAE branch is off."""
        if self.dual_block is None:
            return query_states, None
        return self.dual_block(query_states, mae_features)

    def enriched_query_cache(self, query_output, enrichment):
        """Keys/values the ITG text tokens attend to, carrying the dual block's enrichment Z' - Z_q.

        In BLIP-2 the text decoder sees, at every Q-Former layer, the keys/values of that layer's query states
        (``past_key_values``). Here every layer's query states get Z' - Z_q added before its key/value
        projections, so ITG is conditioned on Z'; with a zero enrichment this is exactly BLIP-2's cache.
        """
        num_queries = self.query_tokens.shape[1]
        cache = []
        for layer, hidden in zip(self.Qformer.bert.encoder.layer, query_output.hidden_states[:-1]):
            attention = layer.attention.self
            states = hidden[:, :num_queries] + enrichment
            cache.append(
                (attention.transpose_for_scores(attention.key(states)), attention.transpose_for_scores(attention.value(states)))
            )
        return tuple(cache)

    # ------------------------------------------------------------------------------------------------------------
    # Reconstruction: M' through the frozen MAE decoder, MSE on the masked patches
    # ------------------------------------------------------------------------------------------------------------
    def patchify(self, pixels):
        """[B, 3, H, W] -> [B, num_patches, patch_size**2 * 3], MAE's layout (row-major patches, channels last)."""
        p = self.config.mae_patch_size
        batch, channels, height, width = pixels.shape
        h, w = height // p, width // p
        x = pixels.reshape(batch, channels, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(batch, h * w, p * p * channels)

    def forward_decoder(self, enriched_mae, ids_restore):
        """Predicted pixels of every patch from M' (visible tokens; the decoder adds its mask tokens)."""
        tokens = self.mae_out_proj(enriched_mae)
        with self.maybe_autocast():
            return self.mae_decoder(tokens, ids_restore).logits.float()

    def reconstruction_loss(self, pixels, predicted_patches, mask):
        """Mean squared error over the masked patches only (MAE's loss; ``norm_pix_loss`` as a switch)."""
        target = self.patchify(pixels)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((predicted_patches - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()


    # ------------------------------------------------------------------------------------------------------------
    # Features for retrieval, analysis and stage 2
    # ------------------------------------------------------------------------------------------------------------
    def image_queries(self, image, mask_ratio: Optional[float] = None, noise=None):
        """Z' for a batch of images without text: what ITC compares and what stage 2 feeds to the LLM."""
        clip_features, mae = self.forward_encoders(self.check_image(image), mask_ratio, noise)
        mae_features = mae.features if mae is not None else None
        query_states = self.forward_queries(clip_features, mae_features=mae_features).last_hidden_state
        enriched_queries, _ = self.enrich(query_states, mae_features)
        return enriched_queries

    @torch.no_grad()
    def encode_image(self, image, mask_ratio: Optional[float] = None):
        """``image_queries`` without gradient, for feature extraction and analysis."""
        return self.image_queries(image, mask_ratio)


# ================================================================================================================
# Stage 1
# ================================================================================================================
@registry.register_model("xformer")
class XFormer(XFormerImageMixin, ConfigBuildersMixin, Blip2Qformer):
    """X-Former stage 1: BLIP-2's Q-Former plus a frozen MAE-ViT and the dual cross-attention block.

    >>> import lavis_xformer
    >>> from lavis.models import load_model
    >>> model = load_model("xformer", "tiny")          # offline, random weights
    >>> model = load_model("xformer", "pretrain")      # EVA-CLIP ViT-g + MAE ViT-H + BERT-base from the hub
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain": model_config_path("xformer/xformer_pretrain.yaml"),
        "tiny": model_config_path("xformer/xformer_tiny.yaml"),
        # the paper's baselines and ablations: concat, concat_tiny, early_ca, ..., clip_layer30_tiny (variants.py)
        **variants.variant_model_types("xformer", ("pretrain", "tiny"), stage=1),
    }
    config_class = XFormerConfig

    def __init__(self, config: Optional[XFormerConfig] = None):
        config = config or XFormerConfig()
        self.attach_build_config(config)
        super().__init__(**blip2_init_kwargs(config))
        self.config = config
        if config.freeze_vit and not config.freeze_vit_layernorms:
            self.unfreeze_vit_layernorms()
        self.build_mae_branch(config)
        if config.sdpa_attention:
            use_sdpa_attention(self)

    def generate(self, *args, **kwargs):
        # Blip2Qformer.generate decodes from the Q-Former alone; here it would silently ignore the MAE branch.
        raise NotImplementedError(
            "stage-1 X-Former has no captioner of its own: caption and answer with the stage-2 models "
            "(load_model('xformer_opt', ...) or 'xformer_t5'), which decode from Z' through the LLM"
        )

    # ------------------------------------------------------------------------------------------------------------
    # The stage-1 objective
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, samples):
        image = self.check_image(samples.get("image") if isinstance(samples, dict) else None)
        texts = self.check_texts(samples.get("text_input"), image.shape[0])
        bs, rank = image.shape[0], dist.get_rank()

        # The objective is defined on the masked image, in training and in validation alike; eval_mask_ratio is
        # for features (image_queries), where there is nothing to reconstruct.
        clip_features, mae = self.forward_encoders(image, self.config.mask_ratio, samples.get("mae_noise"))
        mae_features = mae.features if mae is not None else None

        use_enriched_cache = self.dual_block is not None and self.config.itg_conditioning == "enriched_cache"
        text_tokens = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(image.device)

        # The unimodal pass and ITM read the same C: each cross-attention projects it to keys/values once.
        with shared_context_projections(clip_features):
            query_output = self.forward_queries(clip_features, use_enriched_cache, mae_features)
            query_states = query_output.last_hidden_state
            enriched_queries, enriched_mae = self.enrich(query_states, mae_features)

            loss_itc, sim_i2t, sim_t2i = self.itc_loss(enriched_queries, text_tokens, rank)
            loss_itm = self.itm_loss(clip_features, mae_features, text_tokens, sim_i2t, sim_t2i, rank)
        if use_enriched_cache:
            cache = self.enriched_query_cache(query_output, enriched_queries - query_states)
        else:
            cache = query_output.past_key_values
        loss_lm = self.itg_loss(cache, text_tokens)

        loss_rec = None
        if self.mae_decoder is not None:
            predicted = self.forward_decoder(enriched_mae, mae.ids_restore)
            loss_rec = self.reconstruction_loss(mae.pixels, predicted, mae.mask)

        cfg = self.config
        loss = cfg.loss_weight_itc * loss_itc + cfg.loss_weight_itm * loss_itm + cfg.loss_weight_itg * loss_lm
        if loss_rec is not None:
            loss = loss + cfg.loss_weight_rec * loss_rec
        return XFormerOutput(loss=loss, loss_itc=loss_itc, loss_itm=loss_itm, loss_lm=loss_lm, loss_rec=loss_rec)

    def itc_loss(self, enriched_queries, text_tokens, rank):
        """Image-text contrastive: max over query-to-[CLS] similarities, in-batch negatives from every rank."""
        image_feats = F.normalize(self.vision_proj(enriched_queries), dim=-1)  # [B, Q, D]
        text_output = self.Qformer.bert(
            text_tokens.input_ids, attention_mask=text_tokens.attention_mask, return_dict=True
        )  # text alone: the unimodal mask keeps queries and text apart
        text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)  # [B, D]

        image_feats_all = dist.concat_all_gather(image_feats)  # [B * world, Q, D]
        text_feat_all = dist.concat_all_gather(text_feat)  # [B * world, D]
        sim_i2t = torch.einsum("iqd,td->itq", image_feats, text_feat_all).max(-1).values / self.temp
        sim_t2i = torch.einsum("td,iqd->tiq", text_feat, image_feats_all).max(-1).values / self.temp

        bs = image_feats.shape[0]
        targets = torch.arange(rank * bs, rank * bs + bs, device=image_feats.device)
        loss = (
            F.cross_entropy(sim_i2t, targets, label_smoothing=0.1) + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)
        ) / 2
        return loss, sim_i2t, sim_t2i

    def itm_loss(self, clip_features, mae_features, text_tokens, sim_i2t, sim_t2i, rank):
        """Image-text matching on Z' of the bi-directional pass; hard negatives drawn from ITC similarities."""
        bs = clip_features.shape[0]
        text_ids_world = dist.concat_all_gather(text_tokens.input_ids)
        text_atts_world = dist.concat_all_gather(text_tokens.attention_mask)
        clip_world = dist.all_gather_with_grad(clip_features)
        mae_world = dist.concat_all_gather(mae_features) if mae_features is not None else None
        with torch.no_grad():
            weights_t2i = F.softmax(sim_t2i, dim=1) + 1e-4
            weights_t2i[:, rank * bs : rank * bs + bs].fill_diagonal_(0)
            weights_i2t = F.softmax(sim_i2t, dim=1) + 1e-4
            weights_i2t[:, rank * bs : rank * bs + bs].fill_diagonal_(0)

        # One draw per row, images first, as LAVIS does: the same RNG stream gives the same negatives.
        neg_images = [torch.multinomial(weights_t2i[b], 1).item() for b in range(bs)]
        neg_texts = [torch.multinomial(weights_i2t[b], 1).item() for b in range(bs)]

        text_ids_all = torch.cat([text_tokens.input_ids, text_tokens.input_ids, text_ids_world[neg_texts]])
        text_atts_all = torch.cat([text_tokens.attention_mask, text_tokens.attention_mask, text_atts_world[neg_texts]])
        clip_parts = [clip_features, clip_world[neg_images], clip_features]  # pos, neg, pos
        shared = current_shared_context()  # keys/values of C already projected by the unimodal pass
        clip_all = shared.compose(clip_parts) if shared is not None else torch.cat(clip_parts)

        mae_all = None
        if mae_features is not None:
            mae_all = torch.cat([mae_features, mae_world[neg_images], mae_features])

        logits = self.itm_head(self.multimodal_queries(clip_all, mae_all, text_ids_all, text_atts_all)).mean(dim=1)
        labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(logits.device)
        return F.cross_entropy(logits, labels)

    def multimodal_queries(self, clip_features, mae_features, text_ids, text_atts):
        """The ITM representation of (image, text) pairs: the bi-directional Q-Former pass over [queries; text]
        cross-attending to C (and M for concat / early CA), then the dual block with the image's own M."""
        query_tokens = self.query_tokens.expand(text_ids.shape[0], -1, -1)
        query_atts = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=clip_features.device)
        context, context_atts = self.qformer_context(clip_features, mae_features)
        output = self.Qformer.bert(
            text_ids,
            query_embeds=query_tokens,
            attention_mask=torch.cat([query_atts, text_atts], dim=1),
            encoder_hidden_states=context,
            encoder_attention_mask=context_atts,
            return_dict=True,
        )
        queries = output.last_hidden_state[:, : query_tokens.shape[1], :]
        if mae_features is not None:
            queries, _ = self.enrich(queries, mae_features)
        return queries

    def itg_loss(self, query_cache, text_tokens):
        """Image-grounded text generation: [DEC] replaces [CLS]; text attends causally to itself and the queries."""
        decoder_input_ids = text_tokens.input_ids.clone()
        decoder_input_ids[:, 0] = self.tokenizer.bos_token_id
        labels = decoder_input_ids.masked_fill(decoder_input_ids == self.tokenizer.pad_token_id, -100)
        query_atts = torch.ones(
            (decoder_input_ids.shape[0], self.query_tokens.shape[1]), dtype=torch.long, device=decoder_input_ids.device
        )
        output = self.Qformer(
            decoder_input_ids,
            attention_mask=torch.cat([query_atts, text_tokens.attention_mask], dim=1),
            past_key_values=query_cache,
            return_dict=True,
            labels=labels,
        )
        return output.loss

    # ------------------------------------------------------------------------------------------------------------
    # Retrieval and features: what LAVIS's compute_sim_matrix and extract_features call, on Z'
    # ------------------------------------------------------------------------------------------------------------
    # LAVIS's ``compute_sim_matrix`` (blip2.py) takes ``(image_feat, vit_feat) = forward_image(image)``, ranks texts by
    # ITC on ``vision_proj(image_feat)``, keeps ``vit_feat`` on the CPU ([N, tokens, width], concatenated and indexed
    # per image) and re-scores the top k with ``compute_itm(vit_feat, text_ids, text_atts)``. Here ``image_feat`` is
    # Z' and ``vit_feat`` packs C and M along the tokens, so that ITM re-scoring runs the dual block too.
    def pack_image_inputs(self, clip_features, mae_features=None):
        """[C; M] along the tokens, both zero-padded to the wider of the two widths (C alone without the MAE branch,
        i.e. exactly what LAVIS's BLIP-2 stores). C's token count is the CLIP-ViT's, so M is the rest."""
        if mae_features is None:
            return clip_features
        width = max(clip_features.shape[-1], mae_features.shape[-1])
        padded = [F.pad(x, (0, width - x.shape[-1])) for x in (clip_features, mae_features.to(clip_features.dtype))]
        return torch.cat(padded, dim=1)

    def unpack_image_inputs(self, image_inputs):
        """(C, M or None) from ``pack_image_inputs``' output."""
        if not self.config.use_mae:
            return image_inputs, None
        clip_tokens, clip_width = self.visual_encoder.patch_embed.num_patches + 1, self.visual_encoder.num_features
        if image_inputs.shape[1] <= clip_tokens:
            raise ValueError(
                f"image_inputs has {image_inputs.shape[1]} tokens: expected the CLIP-ViT's {clip_tokens} followed by "
                "the MAE features (model.forward_image packs them)"
            )
        clip_features = image_inputs[:, :clip_tokens, :clip_width]
        mae_features = image_inputs[:, clip_tokens:, : self.config.mae_feature_width]
        return clip_features, mae_features

    def forward_image(self, image):
        """(Z', packed [C; M]) for LAVIS's retrieval; the MAE sees ``eval_mask_ratio`` of masking (the whole image),
        as every feature does."""
        clip_features, mae = self.forward_encoders(self.check_image(image), self.config.eval_mask_ratio)
        mae_features = mae.features if mae is not None else None
        query_states = self.forward_queries(clip_features, mae_features=mae_features).last_hidden_state
        enriched_queries, _ = self.enrich(query_states, mae_features)
        return enriched_queries, self.pack_image_inputs(clip_features, mae_features)

    def compute_itm(self, image_inputs, text_ids, text_atts):
        """ITM score (the matching logit, averaged over queries, as ``itm_loss`` averages) of packed image inputs
        and texts: the bi-directional pass, then the dual block with each image's M."""
        clip_features, mae_features = self.unpack_image_inputs(image_inputs)
        return self.itm_head(self.multimodal_queries(clip_features, mae_features, text_ids, text_atts))[:, :, 1].mean(1)

    @torch.no_grad()
    def extract_features(self, samples, mode="multimodal"):
        """LAVIS's ``extract_features`` on Z': "image": ``image_embeds`` = Z', ``image_embeds_proj`` = normalised
        ``vision_proj(Z')`` (what ITC compares); "multimodal": those plus ``multimodal_embeds``, the ITM
        representation (bi-directional pass + dual block); "text": LAVIS's."""
        if mode == "text":
            return super().extract_features(samples, mode="text")
        if mode not in ("image", "multimodal"):
            raise ValueError(f"mode must be one of 'image', 'text', 'multimodal', got {mode!r}")
        image = self.check_image(samples.get("image"))
        enriched_queries, image_inputs = self.forward_image(image)
        multimodal_embeds = None
        if mode == "multimodal":
            texts = self.check_texts(samples.get("text_input"), image.shape[0])
            text = self.tokenizer(texts, return_tensors="pt", padding=True).to(image.device)
            clip_features, mae_features = self.unpack_image_inputs(image_inputs)
            multimodal_embeds = self.multimodal_queries(clip_features, mae_features, text.input_ids, text.attention_mask)
        return BlipOutputFeatures(
            image_embeds=enriched_queries,
            image_embeds_proj=F.normalize(self.vision_proj(enriched_queries), dim=-1),
            multimodal_embeds=multimodal_embeds,
        )
