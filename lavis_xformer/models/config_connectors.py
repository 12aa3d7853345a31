"""Typed configs of the connector types that replace the Q-Former (models/connector_llm.py).

    PerceiverConfig + Blip2OPTConfig / Blip2T5Config            -> PerceiverOPTConfig, PerceiverT5Config
    ProjectorConfig + Blip2OPTConfig / Blip2T5Config            -> ProjectorOPTConfig, ProjectorT5Config
    PerceiverConfig + XFormerStage2Config + Blip2OPT/T5Config   -> PerceiverDualOPTConfig, PerceiverDualT5Config

The frozen CLIP-ViT, ``ln_vision`` and LLM fields are BLIP-2's (``BackboneConfig``, ``FrozenLLMConfig``), so a
comparison differs only in the connector. ``num_query_token`` is the number of visual tokens the LLM reads, for
every connector: the Q-Former's queries, the perceiver's latents, the projector's pooled tokens (0: every patch).
The Q-Former fields (``qformer_*``, ``cross_attention_freq``) are unused by these types; ``qformer_text_input`` is
refused: there is no Q-Former for the question to enter (VQA fine-tuning puts it in the LLM prompt, as always).
"""

from dataclasses import dataclass
from typing import Optional

from lavis_xformer.models.config import BackboneConfig
from lavis_xformer.models.config_llm import Blip2OPTConfig, Blip2T5Config, XFormerStage2Config


def _check_no_qformer_text(cfg):
    if cfg.qformer_text_input:
        raise ValueError(
            f"{type(cfg).__name__}: qformer_text_input=True, but this connector has no Q-Former for the question to "
            "enter; VQA fine-tuning puts the question in the LLM prompt (vqa_prompt). Set qformer_text_input: False"
        )


@dataclass
class PerceiverConfig(BackboneConfig):
    """The Perceiver Resampler (models/perceiver.py) at the CLIP-ViT's width. Defaults: xGen-MM (BLIP-3)'s public
    ``PerceiverResampler`` (depth 6, 16 heads x 96, 128 latents, feed-forward x4)."""

    num_query_token: int = 128  #: learned latents = visual tokens the LLM reads (BLIP-3: 128; open_flamingo: 64)
    qformer_weights: Optional[str] = None  #: unused (no Q-Former)
    tokenizer: Optional[str] = None  #: unused (no Q-Former, so no BERT tokenizer is built)
    perceiver_depth: int = 6  #: (attention, feed-forward) layers
    perceiver_num_heads: int = 16  #: attention heads (open_flamingo: 8)
    perceiver_head_dim: int = 96  #: width of each head (open_flamingo: 64); heads x head_dim need not be the width
    perceiver_ff_mult: int = 4  #: feed-forward width / perceiver width

    def __post_init__(self):
        BackboneConfig.__post_init__(self)
        if min(self.num_query_token, self.perceiver_depth, self.perceiver_num_heads, self.perceiver_head_dim,
               self.perceiver_ff_mult) < 1:
            raise ValueError("num_query_token and the perceiver_* sizes must be positive")


@dataclass
class ProjectorConfig(BackboneConfig):
    """Pooled / linear / MLP projector of the patch tokens (models/projector.py): MM1's average-pooling baseline,
    LLaVA's projectors."""

    num_query_token: int = 64  #: visual tokens after average pooling of the patch grid; 0 = every patch (LLaVA)
    qformer_weights: Optional[str] = None  #: unused (no Q-Former)
    tokenizer: Optional[str] = None  #: unused (no Q-Former, so no BERT tokenizer is built)
    projector_layers: int = 2  #: linear layers in all (the LLM head's is the last): 1 = linear, 2 = LLaVA-1.5's MLP
    projector_hidden_size: int = 2560  #: width of the hidden layers (LLaVA-1.5: the LLM width); unused for 1 layer

    def __post_init__(self):
        BackboneConfig.__post_init__(self)
        grid_tokens = (self.image_size // self.vit_patch_size) ** 2
        if not 0 <= self.num_query_token <= grid_tokens:
            raise ValueError(
                f"num_query_token={self.num_query_token}: the projector pools the {grid_tokens} patches of a "
                f"{self.image_size} px image to at most that many tokens (0 = every patch)"
            )
        if self.projector_layers < 1 or self.projector_hidden_size < 1:
            raise ValueError("projector_layers and projector_hidden_size must be positive")


@dataclass
class PerceiverOPTConfig(PerceiverConfig, Blip2OPTConfig):
    """``perceiver_opt``: the Perceiver Resampler with a frozen OPT, one stage, LM loss only (BLIP-3's recipe)."""

    def __post_init__(self):
        PerceiverConfig.__post_init__(self)
        Blip2OPTConfig.__post_init__(self)
        _check_no_qformer_text(self)


@dataclass
class PerceiverT5Config(PerceiverConfig, Blip2T5Config):
    """``perceiver_t5``: the Perceiver Resampler with a frozen FlanT5, prefix-LM loss only."""

    def __post_init__(self):
        PerceiverConfig.__post_init__(self)
        Blip2T5Config.__post_init__(self)
        _check_no_qformer_text(self)


@dataclass
class ProjectorOPTConfig(ProjectorConfig, Blip2OPTConfig):
    """``projector_opt``: the pooled / MLP projector with a frozen OPT, LM loss only."""

    def __post_init__(self):
        ProjectorConfig.__post_init__(self)
        Blip2OPTConfig.__post_init__(self)
        _check_no_qformer_text(self)


@dataclass
class ProjectorT5Config(ProjectorConfig, Blip2T5Config):
    """``projector_t5``: the pooled / MLP projector with a frozen FlanT5, prefix-LM loss only."""

    def __post_init__(self):
        ProjectorConfig.__post_init__(self)
        Blip2T5Config.__post_init__(self)
        _check_no_qformer_text(self)


@dataclass
class PerceiverDualConfig(PerceiverConfig, XFormerStage2Config):
    """``perceiver_dual``: the perceiver's latents enriched by X-Former's dual cross-attention over the frozen MAE
    (the dual block at the perceiver's width, the CLIP-ViT's), trained with the LM loss plus MAE reconstruction.

    Defaults differ from ``XFormerStage2Config`` where this type is one-stage: the reconstruction loss is on and the
    MAE sees ``mask_ratio`` 0.5 of its patches hidden in training (X-Former's stage-1 recipe); ``use_mae: False``
    makes it ``perceiver_opt`` / ``perceiver_t5`` exactly. Only ``mae_fusion: dual`` exists here (concat and early
    cross-attention live inside the Q-Former).
    """

    reconstruction_loss: bool = True  #: the frozen MAE decoder and its loss on M' (added to the LM loss)
    mask_ratio: float = 0.5  #: MAE patches masked in training (the paper's 50%); eval_mask_ratio at inference
    dual_num_heads: int = 16  #: heads of the dual block's attentions (must divide the CLIP-ViT width: 1408 = 16 x 88)
    dual_intermediate_size: int = 5632  #: the dual block's FFN width (4 x the CLIP-ViT width)

    def __post_init__(self):
        PerceiverConfig.__post_init__(self)
        XFormerStage2Config.__post_init__(self)
        if self.mae_fusion != "dual":
            raise ValueError(f"mae_fusion={self.mae_fusion!r}: perceiver_dual has the dual block only ('dual')")
        if self.vit_embed_dim % self.dual_num_heads:
            raise ValueError(
                f"dual_num_heads={self.dual_num_heads} must divide the perceiver width vit_embed_dim={self.vit_embed_dim}"
            )


@dataclass
class PerceiverDualOPTConfig(PerceiverDualConfig, Blip2OPTConfig):
    """``perceiver_dual_opt``: ``PerceiverDualConfig`` with a frozen OPT."""

    def __post_init__(self):
        PerceiverDualConfig.__post_init__(self)
        Blip2OPTConfig.__post_init__(self)
        _check_no_qformer_text(self)


@dataclass
class PerceiverDualT5Config(PerceiverDualConfig, Blip2T5Config):
    """``perceiver_dual_t5``: ``PerceiverDualConfig`` with a frozen FlanT5."""

    def __post_init__(self):
        PerceiverDualConfig.__post_init__(self)
        Blip2T5Config.__post_init__(self)
        _check_no_qformer_text(self)
