"""X-Former stage 1 (arXiv 2407.13851, section 2.3 and Fig. 3), read top to bottom as the method.

    image --(frozen CLIP-ViT)--> C --(Q-Former, learnable queries, text)--> Z_q
    image --(random masking, frozen MAE-ViT)--> M
    dual cross-attention:  M attends to Z_q -> M'  ;  Z_q attends to M' -> Z'
    Z'  -> ITC, ITM, ITG          M' -> frozen MAE decoder -> reconstruction loss on the masked patches

``encode`` is that image pathway, once, for the stage-1 losses, retrieval, features and stage 2 alike. How M meets the
queries is a module of ``models/fusion.py``: the dual block (X-Former), or the paper's concat / early
cross-attention baselines. The BLIP-2 parts are LAVIS's own classes (``Blip2Qformer`` is the parent: its Q-Former,
EVA ViT, tokenizer, heads and retrieval code); this file adds the MAE branch. With ``use_mae=False`` every loss is
LAVIS's BLIP-2 loss on the same weights (tests/test_xformer_stage1.py proves it).
"""

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
from lavis.models.blip_models.blip_outputs import BlipOutputFeatures
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions, ModelOutput

from lavis_xformer.common import distributed as dist
from lavis_xformer.models import clip_recon, variants
from lavis_xformer.models.builders import (
    ConfigBuildersMixin,
    blip2_init_kwargs,
    build_clip_vit,
    build_mae,
    build_mae_encoder,
    build_qformer,
    freeze,
    unfreeze_layernorms,
)
from lavis_xformer.models.activation_checkpointing import checkpoint_trainable_layers
from lavis_xformer.models.config import XFormerConfig
from lavis_xformer.models.contrastive import SigmoidITC
from lavis_xformer.models.fusion import FUSIONS, NO_FUSION, Fusion, MaeStream, build_fusion, mae_stream_of_pairs
from lavis_xformer.models.inputs import check_image, check_image_batch, check_texts
from lavis_xformer.models.mae_decoder import predict_some_patches
from lavis_xformer.models.masking import gather_tokens, mask_ratio_of, masked_patches, ordered_noise, random_masking
from lavis_xformer.models.precision import frozen_half_dtype, run_in_half_precision
from lavis_xformer.models.query_cache_lm_head import QueryCacheLMHead
from lavis_xformer.models.sdpa import (
    SharedContextProjections,
    reusing_projections,
    shared_context_projections,
    use_sdpa_attention,
)
from lavis_xformer.paths import model_config_path

# The processors normalise with CLIP's statistics (what the CLIP-ViT was trained on); MAE was trained on
# ImageNet statistics. Each encoder must see its own normalisation, so the MAE input is re-normalised here.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
class ImagePath(ModelOutput):
    """One pass of the image pathway (``encode``): everything the losses, retrieval and stage 2 read."""

    clip_features: torch.Tensor = None  # C: [B, clip tokens, clip width], after ln_vision
    mae: Optional[MaeEncoding] = None  # M and its masking; None without the MAE branch
    queries: torch.Tensor = None  # Z_q: [B, num_query_token, qformer_hidden_size]
    enriched_queries: torch.Tensor = None  # Z': Z_q after the fusion (Z_q itself where the fusion leaves it)
    mae_enriched: Optional[torch.Tensor] = None  # M': the dual block's MAE branch; None for the other fusions
    mae_stream: Optional[MaeStream] = None  # the fusion's work on M alone (the dual block's), for ITM to re-use
    qformer_output: Optional[BaseModelOutputWithPoolingAndCrossAttentions] = None  # Z_q's pass: cache, hidden states
    clip_projections: Optional[SharedContextProjections] = None  # the query pass's keys/values of C, for ITM

    @property
    def mae_features(self) -> Optional[torch.Tensor]:
        return self.mae.features if self.mae is not None else None


@dataclass
class XFormerOutput(ModelOutput):
    """Stage-1 losses, each separately, and their weighted total (``loss``). ``loss_lm`` is ITG (LAVIS's name)."""

    loss: torch.Tensor = None
    loss_itc: torch.Tensor = None
    loss_itm: torch.Tensor = None
    loss_lm: torch.Tensor = None
    loss_rec: Optional[torch.Tensor] = None


# ================================================================================================================
# The image side shared by stage 1 and stage 2: C, M, Z_q -> (Z', M')
# ================================================================================================================
class XFormerImageMixin:
    """The X-Former image pathway on top of a LAVIS BLIP-2 class (which provides the CLIP-ViT and Q-Former).

    ``build_mae_branch(config)`` adds the frozen MAE encoder (and decoder when the reconstruction loss is on) and
    the trainable fusion (the dual block by default); with ``use_mae=False`` nothing is added and the pathway is
    BLIP-2's.
    """

    def build_mae_branch(self, config: XFormerConfig):
        self.mae_encoder = self.masked_clip = self.mae_decoder = self.mae_out_proj = None
        for fusion_class in FUSIONS.values():
            setattr(self, fusion_class.attribute, None)
        if not config.use_mae:
            return
        # Variants (models/variants.py): no MAE for clip_layer, no decoder without reconstruction, concat / early CA,
        # a trainable CLIP-ViT in the MAE encoder's place for clip_vit.
        mae = build_mae(config) if config.reconstruction_loss else None
        if config.mae_source == "mae":
            mae_encoder = freeze(mae.vit if mae is not None else build_mae_encoder(config))
            self.mae_encoder = run_in_half_precision(mae_encoder, frozen_half_dtype(config))
        elif config.mae_source == "clip_vit":
            # Supplement Table 6 "CLIP w Recon.": "we replace MAE encoder with CLIP-ViT and pass masked image to
            # CLIP-ViT which is then optimized for image reconstruction with MAE decoder". A second CLIP-ViT, with
            # the frozen one's initial weights (C still comes from that one), trainable and in fp32; only the MAE
            # decoder of ``mae`` is kept.
            self.masked_clip = build_clip_vit(dataclasses.replace(config, freeze_vit=False))
        fusion = build_fusion(config, self.Qformer, self.visual_encoder.num_features)
        setattr(self, fusion.attribute, fusion)
        if config.reconstruction_loss:
            # Frozen, but the reconstruction loss's gradient flows back through it to M': it stays in the training
            # precision (fp32, or the runner's autocast). In bf16 it was also 2.7x slower at bench size.
            decoder = mae.decoder if config.mae_decoder_trainable else freeze(mae.decoder)  # trainable: clip_recon
            self.mae_decoder = predict_some_patches(decoder)  # the loss reads the masked patches alone
            # M' lives at the Q-Former width; the frozen decoder reads the MAE encoder's width.
            self.mae_out_proj = nn.Linear(config.qformer_hidden_size, config.mae_hidden_size)
        self.register_buffer("_clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_mae_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_mae_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def fusion(self) -> Fusion:
        """How M meets the queries (models/fusion.py), held under its own name (``dual_block``, ``mae_align``, ...)."""
        if not self.config.use_mae:
            return NO_FUSION
        return getattr(self, FUSIONS[self.config.mae_fusion].attribute)

    def unfreeze_vit_layernorms(self):
        """VQA fine-tuning (supplement section 2) trains the CLIP-ViT's layer norms only."""
        unfreeze_layernorms(self.visual_encoder)

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
            noise = ordered_noise(image.shape[0], self.mae_encoder.embeddings.num_patches, image.device)
        with mask_ratio_of(self.mae_encoder.config, mask_ratio), torch.no_grad(), self.maybe_autocast():
            encoded = self.mae_encoder(pixel_values=pixels, noise=noise, return_dict=True)
        return MaeEncoding(
            features=encoded.last_hidden_state.float(),
            mask=encoded.mask,
            ids_restore=encoded.ids_restore,
            pixels=pixels,
        )

    def forward_clip_with_block(self, image, block: int):
        """(C, output of CLIP-ViT block ``block``, 1-based) from one CLIP forward pass, by a forward hook on that block:
        M for ``mae_source: clip_layer``. The block output is detached and float32, as the frozen MAE's features are."""
        captured = []

        def hook(module, inputs, output):
            if not captured:  # the first call only: activation checkpointing may run the block again
                captured.append(output)

        handle = self.visual_encoder.blocks[block - 1].register_forward_hook(hook)
        try:
            clip_features = self.forward_clip(image)
        finally:
            handle.remove()
        return clip_features, captured[0].detach().float()

    def forward_masked_clip(self, image, mask_ratio: Optional[float] = None, noise=None) -> MaeEncoding:
        """M for "CLIP w Recon." (``models/clip_recon.py``): a CLIP-ViT encodes only the visible patches of the masked
        image, as MAE's encoder does; the trainable copy (``mae_source: clip_vit``) with gradient, the frozen CLIP-ViT
        itself (``frozen_clip_vit``) without, as the frozen MAE. The reconstruction target is MAE's (``mae_pixels``)."""
        if mask_ratio is None:
            mask_ratio = self.config.mask_ratio if self.training else self.config.eval_mask_ratio
        frozen = self.config.mae_source == "frozen_clip_vit"
        vit = self.visual_encoder if frozen else self.masked_clip
        with torch.no_grad() if frozen else contextlib.nullcontext():
            features, mask, ids_restore = clip_recon.encode_visible_patches(vit, image, mask_ratio, noise)
        return MaeEncoding(features=features, mask=mask, ids_restore=ids_restore, pixels=self.mae_pixels(image))

    def forward_encoders(self, image, mask_ratio: Optional[float] = None, noise=None):
        """(C, MaeEncoding of M or None) from the frozen encoders; for clip_layer, M is a CLIP-ViT block's output, for
        clip_vit the trainable CLIP-ViT copy's encoding of the masked image."""
        if not self.config.use_mae:
            return self.forward_clip(image), None
        if self.config.mae_source == "clip_layer":
            clip_features, block_features = self.forward_clip_with_block(image, self.config.clip_feature_layer)
            return clip_features, MaeEncoding(features=block_features)
        if self.config.mae_source in clip_recon.CLIP_RECON_SOURCES:
            return self.forward_clip(image), self.forward_masked_clip(image, mask_ratio, noise)
        return self.forward_clip(image), self.forward_mae(image, mask_ratio, noise)

    # ------------------------------------------------------------------------------------------------------------
    # Q-Former and the image pathway
    # ------------------------------------------------------------------------------------------------------------
    def forward_queries(
        self, clip_features, output_hidden_states: bool = False, mae_features=None, text_ids=None, text_atts=None
    ):
        """The learnable queries through the Q-Former, cross-attending to C. Without text the pass is unimodal (Z_q);
        with text (``text_ids`` / ``text_atts``: ITM's captions, a VQA question) queries and text attend to each other
        (bi-directional mask) and the first ``num_query_token`` positions of the output are the queries'.

        ``mae_features``: M, which the concat and early-CA fusions read inside the Q-Former (unused otherwise).
        """
        query_tokens = self.query_tokens.expand(clip_features.shape[0], -1, -1)
        context, context_atts = self.fusion.qformer_context(clip_features, mae_features)
        attention_mask = None
        if text_ids is not None:
            query_atts = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=clip_features.device)
            attention_mask = torch.cat([query_atts, text_atts], dim=1)
        return self.Qformer.bert(
            text_ids,
            query_embeds=query_tokens,
            attention_mask=attention_mask,
            encoder_hidden_states=context,
            encoder_attention_mask=context_atts,
            use_cache=True,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )

    def encode(self, image, mask_ratio: Optional[float] = None, noise=None, text_ids=None, text_atts=None) -> ImagePath:
        """The image pathway: C and M from the frozen encoders, Z_q from the Q-Former, (Z', M') from the fusion.

        ``mask_ratio``: the fraction of MAE patches hidden (None: ``mask_ratio`` in training, ``eval_mask_ratio``
        otherwise); ``noise`` ([B, num_patches], as transformers takes it) fixes the masking. ``text_ids`` /
        ``text_atts``: a question entering the Q-Former with the queries (VQA fine-tuning, ``qformer_text_input``);
        Z_q is then the query positions of that pass, and goes through the fusion with M as always.
        """
        clip_features, mae = self.forward_encoders(check_image(image, self.config.image_size), mask_ratio, noise)
        mae_features = mae.features if mae is not None else None
        # ITM (stage 1) reads C again. Inside this block every SDPA cross-attention of the Q-Former finds
        # ``clip_projections`` through a context variable (sdpa.current_shared_context) and, when its context is
        # ``clip_features`` itself (the same tensor object), stores its keys/values of C there; ``itm_loss`` hands
        # them back with ``reusing_projections``. Outside such a block, or with another tensor, nothing changes.
        with shared_context_projections(clip_features) as clip_projections:
            # hidden states: ITG's enriched cache re-projects every layer's query states
            qformer_output = self.forward_queries(
                clip_features, True, mae_features=mae_features, text_ids=text_ids, text_atts=text_atts
            )
        queries = qformer_output.last_hidden_state[:, : self.query_tokens.shape[1], :]
        mae_stream = self.fusion.mae_stream(mae_features) if mae_features is not None else None
        enriched_queries, mae_enriched = self.fusion.enrich(queries, mae_features, mae_stream)
        return ImagePath(
            clip_features=clip_features,
            mae=mae,
            queries=queries,
            enriched_queries=enriched_queries,
            mae_enriched=mae_enriched,
            mae_stream=mae_stream,
            qformer_output=qformer_output,
            clip_projections=clip_projections,
        )

    def enriched_query_cache(self, query_output, enrichment):
        """Keys/values the ITG text tokens attend to, carrying the dual block's enrichment Z' - Z_q.

        In BLIP-2 the text decoder sees, at every Q-Former layer, the keys/values of that layer's query states
        (``past_key_values``). Here every layer's query states get Z' - Z_q added before its key/value
        projections, so ITG is conditioned on Z'; with a zero enrichment this is exactly BLIP-2's cache. This route
        is the project's choice (``itg_conditioning``): the paper says only that Z' is "optimized for ITC, ITM, and ITG".
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

    def forward_decoder(self, mae_enriched, ids_restore, patches=None):
        """Predicted pixels of every patch from M' (visible tokens; the decoder adds its mask tokens), or of the
        patches ``patches`` ([B, n] indices) only (``mae_decoder.MaePatchDecoder``)."""
        tokens = self.mae_out_proj(mae_enriched)
        with self.maybe_autocast():
            return self.mae_decoder(tokens, ids_restore, patches=patches).logits.float()

    def reconstruction_target(self, pixels):
        """What the decoder predicts, per patch: the pixels (``norm_pix_loss``: normalised per patch)."""
        target = self.patchify(pixels)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def reconstruction_loss(self, pixels, predicted_patches, mask):
        """Mean squared error over the masked patches only (MAE's loss; ``norm_pix_loss`` as a switch)."""
        per_patch = ((predicted_patches - self.reconstruction_target(pixels)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def reconstruction_loss_of(self, path: ImagePath) -> Optional[torch.Tensor]:
        """The reconstruction loss of one pass of the pathway; None where no MAE decoder is built. The decoder
        predicts the masked patches only, the ones the loss reads (``mae_decoder.MaePatchDecoder``; tests/test_xformer_stage1.py:
        the loss and its gradients equal ``reconstruction_loss`` of every patch's prediction)."""
        if self.mae_decoder is None:
            return None
        mae = path.mae
        patches = masked_patches(mae.ids_restore, path.mae_enriched.shape[1] - 1)  # M': [CLS] + the visible patches
        if patches is None:
            predicted = self.forward_decoder(path.mae_enriched, mae.ids_restore)
            return self.reconstruction_loss(mae.pixels, predicted, mae.mask)
        predicted = self.forward_decoder(path.mae_enriched, mae.ids_restore, patches)
        target = self.reconstruction_target(mae.pixels)
        target = gather_tokens(target, patches)
        return ((predicted - target) ** 2).mean()

    # ------------------------------------------------------------------------------------------------------------
    # Features for analysis
    # ------------------------------------------------------------------------------------------------------------
    def image_queries(self, image, mask_ratio: Optional[float] = None, noise=None):
        """Z' for a batch of images without text: what ITC compares and what stage 2 feeds to the LLM."""
        return self.encode(image, mask_ratio, noise).enriched_queries

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
        self.sigmoid_itc = SigmoidITC() if config.itc_loss == "sigmoid" else None  # SigLIP's t' and b
        if self.sigmoid_itc is not None:
            self.temp.requires_grad_(False)  # the softmax's temperature: unused
        if config.sdpa_attention:
            use_sdpa_attention(self)
        if config.checkpoint_trainable_layers:
            checkpoint_trainable_layers(self)

    def init_Qformer(self, num_query_token, vision_width, cross_attention_freq=2):
        return build_qformer(self._build_cfg, vision_width, lm_head_class=QueryCacheLMHead)

    # ------------------------------------------------------------------------------------------------------------
    # The stage-1 objective
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, samples):
        image = check_image_batch(samples, self.config.image_size)
        texts = check_texts(samples.get("text_input"), image.shape[0])
        text_tokens = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(image.device)
        rank = dist.get_rank()

        # The objective is defined on the masked image, in training and in validation alike; eval_mask_ratio is
        # for features (image_queries), where there is nothing to reconstruct.
        path = self.encode(image, self.config.mask_ratio, samples.get("mae_noise"))
        loss_itc, sim_i2t, sim_t2i = self.itc_loss(path.enriched_queries, text_tokens, rank)
        loss_itm = self.itm_loss(path, text_tokens, sim_i2t, sim_t2i, rank)
        loss_lm = self.itg_loss(self.itg_cache(path), text_tokens)
        loss_rec = self.reconstruction_loss_of(path)

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
        if self.sigmoid_itc is not None:  # itc_loss: sigmoid (SigLIP; models/contrastive.py)
            return self.sigmoid_itc(image_feats, text_feat, rank)

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

    def itm_loss(self, path: ImagePath, text_tokens, sim_i2t, sim_t2i, rank):
        """Image-text matching on Z' of the bi-directional pass; hard negatives drawn from ITC similarities."""
        clip_features, mae_features = path.clip_features, path.mae_features
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
        mae_all = mae_stream_all = None
        if mae_features is not None:
            mae_all = torch.cat([mae_features, mae_world[neg_images], mae_features])
        if path.mae_stream is not None:  # the fusion's work on M alone, re-used from the query pass
            mae_stream_all = mae_stream_of_pairs(self.fusion, path.mae_stream, mae_world, neg_images, rank)

        clip_parts = [clip_features, clip_world[neg_images], clip_features]  # pos, neg, pos
        # The rows of ``compose``'s context that are ``encode``'s C (the same tensor object) take the keys/values the
        # query pass stored; only the hard negatives' rows are projected (sdpa.SharedContextProjections).
        with reusing_projections(path.clip_projections) as shared:
            clip_all = shared.compose(clip_parts) if shared is not None else torch.cat(clip_parts)
            queries = self.multimodal_queries(clip_all, mae_all, text_ids_all, text_atts_all, mae_stream_all)
        logits = self.itm_head(queries).mean(dim=1)
        labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(logits.device)
        return F.cross_entropy(logits, labels)

    def multimodal_queries(self, clip_features, mae_features, text_ids, text_atts, mae_stream=None):
        """The ITM representation of (image, text) pairs: ``encode``'s Q-Former pass and fusion, with the text in.
        The bi-directional pass over [queries; text] cross-attends to C (and M for concat / early CA), then the
        fusion (the dual block) enriches the queries with the image's own M (``mae_stream``: its part on M, given
        where an earlier pass over the same images computed it)."""
        output = self.forward_queries(clip_features, mae_features=mae_features, text_ids=text_ids, text_atts=text_atts)
        query_states = output.last_hidden_state[:, : self.query_tokens.shape[1], :]
        queries, _ = self.fusion.enrich(query_states, mae_features, mae_stream)
        return queries

    def itg_cache(self, path: ImagePath):
        """What ITG's text attends to: Z' through the enriched cache where the fusion changes the queries, else the
        Q-Former's own cache (BLIP-2's)."""
        if self.fusion.enriches_queries and self.config.itg_conditioning == "enriched_cache":
            return self.enriched_query_cache(path.qformer_output, path.enriched_queries - path.queries)
        return path.qformer_output.past_key_values

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

    @torch.no_grad()
    def generate(
        self,
        samples,
        use_nucleus_sampling=False,
        num_beams=3,
        max_length=30,
        min_length=10,
        top_p=0.9,
        repetition_penalty=1.0,
    ):
        """Captions from the ITG decoder, conditioned exactly as ITG is trained: the [DEC] text attends to
        ``itg_cache`` of one ``encode`` pass (Z' through the enriched cache), at ``eval_mask_ratio``.

        LAVIS's ``Blip2Qformer.generate``: the same arguments (LAVIS's caption task calls it), the Q-Former's BERT
        LM head under transformers' beam search (``num_beams``) or nucleus sampling (``top_p``, one sample per
        image), [SEP] ends a caption. ``samples["mae_noise"]`` fixes the MAE masking as in ``forward``. With the
        MAE branch off the tokens are ``Blip2Qformer.generate``'s (tests/test_captioning.py).
        """
        image = check_image_batch(samples, self.config.image_size)
        path = self.encode(image, self.config.eval_mask_ratio, samples.get("mae_noise"))
        query_cache = self.itg_cache(path)
        if use_nucleus_sampling:
            num_beams = 1
        else:  # transformers expands the [DEC] tokens per beam, not the cache
            query_cache = tuple(tuple(state.repeat_interleave(num_beams, dim=0) for state in layer) for layer in query_cache)
        bos = torch.full((image.shape[0], 1), self.tokenizer.bos_token_id, dtype=torch.long, device=image.device)
        outputs = self.Qformer.generate(
            input_ids=bos,
            query_cache=query_cache,
            max_length=max_length,
            min_length=min_length,
            num_beams=num_beams,
            do_sample=use_nucleus_sampling,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.batch_decode(outputs, skip_special_tokens=True)

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
        path = self.encode(image, self.config.eval_mask_ratio)
        return path.enriched_queries, self.pack_image_inputs(path.clip_features, path.mae_features)

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
        image = check_image_batch(samples, self.config.image_size)
        path = self.encode(image, self.config.eval_mask_ratio)
        multimodal_embeds = None
        if mode == "multimodal":
            texts = check_texts(samples.get("text_input"), image.shape[0])
            text = self.tokenizer(texts, return_tensors="pt", padding=True).to(image.device)
            multimodal_embeds = self.multimodal_queries(
                path.clip_features, path.mae_features, text.input_ids, text.attention_mask
            )
        return BlipOutputFeatures(
            image_embeds=path.enriched_queries,
            image_embeds_proj=F.normalize(self.vision_proj(path.enriched_queries), dim=-1),
            multimodal_embeds=multimodal_embeds,
        )
