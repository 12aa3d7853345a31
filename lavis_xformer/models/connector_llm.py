"""Stage-2 models whose connector is not a Q-Former: the systems that followed BLIP-2, on BLIP-2's footing.

    image --(frozen CLIP-ViT, trainable ln_vision)--> C [B, 1 + patches, 1408]
    perceiver_opt / _t5       C --(Perceiver Resampler: Flamingo, xGen-MM / BLIP-3)--> [B, latents, 1408]
    projector_opt / _t5       C --(average pooling (MM1) or all patches (LLaVA), MLP)--> [B, tokens, hidden]
    perceiver_dual_opt / _t5  the perceiver's latents enriched by X-Former's dual cross-attention over the frozen
                              MAE (M attends to the latents -> M', the latents attend to M' -> Z'), M' reconstructed
    --(the LLM head's linear layer)--> visual prefix of the frozen OPT / FlanT5

Everything but the connector is shared with ``blip2_baseline_opt`` / ``xformer_opt``: the same frozen CLIP-ViT and
its trainable ``ln_vision`` (built by the same builders), the same frozen LLM and LLM head (``llm_head``: loss,
generation, VQA fine-tuning with the question in the LLM prompt), the same processors, tasks and runner. These
types train in one stage with the LM loss only, as xGen-MM (BLIP-3) does ("the unification of the training
objectives to a single loss at every training stage", seed 004); ``perceiver_dual`` adds X-Former's reconstruction
loss. Trainable: the connector, ``ln_vision`` and the LLM projection (``declared_trainable``).
"""

import dataclasses

import torch
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_t5 import Blip2T5

from lavis_xformer.models import variants
from lavis_xformer.models.blip2_baseline_llm import Blip2LLMPartsMixin, model_type_configs
from lavis_xformer.models.config_connectors import (
    PerceiverDualOPTConfig,
    PerceiverDualT5Config,
    PerceiverOPTConfig,
    PerceiverT5Config,
    ProjectorOPTConfig,
    ProjectorT5Config,
)
from lavis_xformer.models.inputs import check_image
from lavis_xformer.models.llm_head import OPTHead, T5Head
from lavis_xformer.models.perceiver import PerceiverResampler
from lavis_xformer.models.projector import PooledProjector
from lavis_xformer.models.sdpa import use_sdpa_attention
from lavis_xformer.models.xformer import ImagePath, XFormerImageMixin
from lavis_xformer.models.xformer_llm import XFormerStage2Mixin

PERCEIVER_OPT_TYPES = ("tiny", "pretrain_opt2.7b", "pretrain_matched_opt2.7b", "vqa_ft_opt2.7b")
PERCEIVER_T5_TYPES = ("tiny", "pretrain_flant5xl", "pretrain_matched_flant5xl", "vqa_ft_flant5xl")
PROJECTOR_OPT_TYPES = ("tiny", "pretrain_opt2.7b", "pretrain_llava_opt2.7b", "vqa_ft_opt2.7b")
PROJECTOR_T5_TYPES = ("tiny", "pretrain_flant5xl", "pretrain_llava_flant5xl", "vqa_ft_flant5xl")
PERCEIVER_DUAL_OPT_TYPES = ("tiny", "pretrain_opt2.7b")
PERCEIVER_DUAL_T5_TYPES = ("tiny", "pretrain_flant5xl")


class ConnectorLLM(Blip2LLMPartsMixin):
    """LAVIS's BLIP-2 LLM class with the Q-Former replaced by ``build_connector``'s module (``connector``)."""

    connector = None  # attribute name of the connector module

    def __init__(self, config=None):
        config = config or self.config_class()
        self.init_blip2_module(config)
        self.visual_encoder, self.ln_vision = self.init_frozen_clip(config)
        self.build_llm(config, input_width=self.build_connector(config))
        if config.sdpa_attention:
            use_sdpa_attention(self)

    def build_connector(self, config) -> int:
        """Build the connector; returns the width of its tokens (the LLM projection's input)."""
        raise NotImplementedError

    def declared_trainable(self):
        """Prefixes of the parameters that train: the connector, ``ln_vision``, the LLM projection (and the
        CLIP-ViT's layer norms with ``freeze_vit_layernorms: False``)."""
        return (self.connector + ".", "ln_vision.", self.llm_projection + ".")

    clip_features = XFormerImageMixin.forward_clip  # C: the frozen CLIP-ViT, then the trainable ln_vision

    def visual_tokens(self, image) -> torch.Tensor:
        """The connector's tokens [B, num_query_token (or patches), width] of a checked image batch."""
        return getattr(self, self.connector)(self.clip_features(image))

    def llm_image_inputs(self, image, questions=None):
        """The LLM's visual prefix (training and inference alike; the questions go to the LLM prompt only)."""
        prefix = self.project_to_llm(self.visual_tokens(check_image(image, self.config.image_size)))
        return prefix, torch.ones(prefix.shape[:-1], dtype=torch.long, device=prefix.device)


class PerceiverLLM(ConnectorLLM):
    """The Perceiver Resampler at the CLIP-ViT's width (models/perceiver.py)."""

    connector = "perceiver"

    def build_connector(self, config) -> int:
        width = self.visual_encoder.num_features
        self.perceiver = PerceiverResampler(
            width, config.perceiver_depth, config.perceiver_num_heads, config.perceiver_head_dim,
            config.num_query_token, config.perceiver_ff_mult,
        )
        return width


class ProjectorLLM(ConnectorLLM):
    """Average pooling of the patch grid (or every patch) and an MLP (models/projector.py)."""

    connector = "projector"

    def build_connector(self, config) -> int:
        self.projector = PooledProjector(
            self.visual_encoder.num_features, config.image_size // config.vit_patch_size, config.num_query_token,
            config.projector_layers, config.projector_hidden_size,
        )
        return self.projector.out_width


class PerceiverDualLLM(XFormerStage2Mixin, PerceiverLLM):
    """The perceiver's latents as X-Former's Z_q: the dual block (models/fusion.py) enriches them with the frozen
    MAE's features, and M' is reconstructed by the frozen MAE decoder (``xformer.XFormerImageMixin``'s MAE branch).
    With ``use_mae: False`` nothing is added: the model, its weights and its loss are ``PerceiverLLM``'s."""

    def build_connector(self, config) -> int:
        width = super().build_connector(config)
        # The MAE branch is X-Former's, built at the perceiver's width (the dual block and M' -> MAE projection read
        # ``qformer_hidden_size``); no Q-Former exists for a fusion inside it to convert (only "dual" is allowed).
        self.Qformer = None
        self.build_mae_branch(dataclasses.replace(config, qformer_hidden_size=width))
        return width

    def declared_trainable(self):
        return super().declared_trainable() + ("dual_block.", "mae_out_proj.")

    def encode(self, image, mask_ratio=None, noise=None, text_ids=None, text_atts=None) -> ImagePath:
        """X-Former's image pathway with the perceiver in the Q-Former's place: C and M from the frozen encoders,
        Z_q = the perceiver's latents, (Z', M') from the dual block. ``mask_ratio`` / ``noise``: the MAE masking
        (``XFormerImageMixin.forward_mae``); no text enters (there is no Q-Former)."""
        clip_features, mae = self.forward_encoders(check_image(image, self.config.image_size), mask_ratio, noise)
        queries = self.perceiver(clip_features)  # Z_q: [B, latents, width]
        mae_features = mae.features if mae is not None else None
        mae_stream = self.fusion.mae_stream(mae_features) if mae_features is not None else None
        enriched_queries, mae_enriched = self.fusion.enrich(queries, mae_features, mae_stream)
        return ImagePath(clip_features=clip_features, mae=mae, queries=queries, enriched_queries=enriched_queries,
                         mae_enriched=mae_enriched, mae_stream=mae_stream)


def _types(arch, model_types, stage=2):
    return {**model_type_configs(arch, model_types), **variants.variant_model_types(arch, model_types, stage=stage)}


@registry.register_model("perceiver_opt")
class PerceiverOPT(PerceiverLLM, OPTHead, Blip2OPT):
    """Perceiver Resampler + frozen OPT, one stage, LM loss (xGen-MM / BLIP-3's connector and recipe).

    >>> model, vis_processors, _ = load_model_and_preprocess("perceiver_opt", "tiny", is_eval=True)  # offline
    """

    PRETRAINED_MODEL_CONFIG_DICT = _types("perceiver_opt", PERCEIVER_OPT_TYPES)
    config_class = PerceiverOPTConfig


@registry.register_model("perceiver_t5")
class PerceiverT5(PerceiverLLM, T5Head, Blip2T5):
    """Perceiver Resampler + frozen FlanT5, one stage, prefix-LM loss."""

    PRETRAINED_MODEL_CONFIG_DICT = _types("perceiver_t5", PERCEIVER_T5_TYPES)
    config_class = PerceiverT5Config


@registry.register_model("projector_opt")
class ProjectorOPT(ProjectorLLM, OPTHead, Blip2OPT):
    """Average-pooled (MM1) or all (LLaVA) patch tokens through an MLP + frozen OPT, one stage, LM loss."""

    PRETRAINED_MODEL_CONFIG_DICT = _types("projector_opt", PROJECTOR_OPT_TYPES)
    config_class = ProjectorOPTConfig


@registry.register_model("projector_t5")
class ProjectorT5(ProjectorLLM, T5Head, Blip2T5):
    """Average-pooled (MM1) or all (LLaVA) patch tokens through an MLP + frozen FlanT5, one stage, prefix-LM loss."""

    PRETRAINED_MODEL_CONFIG_DICT = _types("projector_t5", PROJECTOR_T5_TYPES)
    config_class = ProjectorT5Config


@registry.register_model("perceiver_dual_opt")
class PerceiverDualOPT(PerceiverDualLLM, OPTHead, Blip2OPT):
    """Perceiver + X-Former's dual block over the frozen MAE + frozen OPT, one stage, LM + reconstruction loss."""

    PRETRAINED_MODEL_CONFIG_DICT = _types("perceiver_dual_opt", PERCEIVER_DUAL_OPT_TYPES)
    config_class = PerceiverDualOPTConfig


@registry.register_model("perceiver_dual_t5")
class PerceiverDualT5(PerceiverDualLLM, T5Head, Blip2T5):
    """Perceiver + X-Former's dual block over the frozen MAE + frozen FlanT5, one stage, prefix-LM + reconstruction."""

    PRETRAINED_MODEL_CONFIG_DICT = _types("perceiver_dual_t5", PERCEIVER_DUAL_T5_TYPES)
    config_class = PerceiverDualT5Config
