"""X-Former stage 2 (arXiv 2407.13851, section 2.3 "Stage 2", Fig. 4): aligning Z' with a frozen LLM.

    image --(frozen CLIP-ViT, frozen MAE-ViT, X-Former)--> Z' --(one linear layer)--> soft prompt of the frozen LLM
    xformer_opt: [Z' | caption]          -> OPT,  language-modelling loss on the caption          (LAVIS Blip2OPT)
    xformer_t5:  [Z' | caption prefix]   -> T5 encoder, the caption's suffix is the decoder target (LAVIS Blip2T5)

Only the X-Former (Q-Former, queries, dual block, ``ln_vision``) and the projection train. No ITC/ITM, no text into
the Q-Former (except the question in VQA fine-tuning, ``qformer_text_input``); the reconstruction loss is an
off-by-default switch (Table 6 ablation). MAE masking follows ``mask_ratio`` (the paper's 0.5 by default: see
``XFormerStage2Config``); at inference the MAE sees the whole image (``eval_mask_ratio``).

The classes are LAVIS's ``Blip2OPT`` / ``Blip2T5`` built like the baselines (``blip2_baseline_llm``), with the same
LLM head (``llm_head``: loss, generation, VQA) and only the visual prefix replaced: Z' projected instead of the
Q-Former output (``llm_image_inputs``; in training ``llm_training_inputs``, which adds the optional reconstruction
loss). With ``use_mae=False`` and the same weights the losses and answers are LAVIS's (tests/test_stage2.py).
"""

import torch
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_t5 import Blip2T5

from lavis_xformer.models import variants
from lavis_xformer.models.blip2_baseline_llm import (
    OPT_MODEL_TYPES,
    T5_MODEL_TYPES,
    Blip2LLMPartsMixin,
    model_type_configs,
)
from lavis_xformer.models.activation_checkpointing import checkpoint_trainable_layers
from lavis_xformer.models.config_llm import XFormerOPTConfig, XFormerT5Config
from lavis_xformer.models.inputs import check_image
from lavis_xformer.models.llm_head import OPTHead, T5Head
from lavis_xformer.models.sdpa import use_sdpa_attention
from lavis_xformer.models.xformer import XFormerImageMixin


class XFormerStage2Mixin(XFormerImageMixin):
    """The X-Former image side of stage 2, on top of a class built by ``Blip2LLMPartsMixin`` with an LLM head
    (whose ``project_to_llm`` is the trainable linear layer from Z' to the LLM width, ``opt_proj`` / ``t5_proj``)."""

    def build_xformer_stage2(self, config):
        # (freeze_vit_layernorms is applied by build_blip2_parts, for the BLIP-2 baselines alike)
        self.build_mae_branch(config)
        if config.freeze_xformer:
            # Supplement Table 6, "X-Former Frozen": the stage-1 X-Former as it is, only the projection learns.
            for name, param in self.named_parameters():
                if not name.startswith(self.llm_projection + "."):
                    param.requires_grad = False
        if config.sdpa_attention:
            use_sdpa_attention(self)
        if config.checkpoint_trainable_layers:
            checkpoint_trainable_layers(self)

    def xformer_queries(self, image, noise=None, questions=None):
        """(Z', reconstruction loss or None) for the training objective: ``encode``, the image pathway of stage 1,
        with the questions in the Q-Former when the model was built with ``qformer_text_input``.

        Like stage 1, the objective is defined on the image masked by ``mask_ratio`` in training and validation
        alike; ``noise`` ([B, num_patches]) fixes that masking.
        """
        text_ids, text_atts = self.qformer_text(questions, image.device)
        path = self.encode(image, self.config.mask_ratio, noise, text_ids=text_ids, text_atts=text_atts)
        return path.enriched_queries, self.reconstruction_loss_of(path)

    def llm_image_inputs(self, image, questions=None):
        """The LLM's visual prefix at inference: projected Z' (the MAE sees ``eval_mask_ratio`` of masking in eval
        mode, i.e. the whole image by default) and its attention mask; with ``qformer_text_input`` the questions
        enter the Q-Former."""
        text_ids, text_atts = self.qformer_text(questions, image.device)
        path = self.encode(image, text_ids=text_ids, text_atts=text_atts)
        prefix = self.project_to_llm(path.enriched_queries)
        return prefix, torch.ones(prefix.shape[:-1], dtype=torch.long, device=prefix.device)

    def llm_training_inputs(self, image, samples, questions=None):
        """The LLM head's training prefix: projected Z' of ``xformer_queries`` (``samples["mae_noise"]`` fixes the
        MAE masking), its attention mask, and the reconstruction loss (or None)."""
        image = check_image(image, self.config.image_size)
        queries, loss_rec = self.xformer_queries(image, samples.get("mae_noise"), questions)
        prefix = self.project_to_llm(queries)
        return prefix, torch.ones(prefix.shape[:-1], dtype=torch.long, device=prefix.device), loss_rec


class XFormerLLM(XFormerStage2Mixin, Blip2LLMPartsMixin):
    """LAVIS's construction of a BLIP-2 LLM class, then the MAE branch and dual block of X-Former."""

    def __init__(self, config=None):
        config = config or self.config_class()
        self.build_blip2_llm(config)
        self.build_xformer_stage2(config)


@registry.register_model("xformer_opt")
class XFormerOPT(XFormerLLM, OPTHead, Blip2OPT):
    """X-Former stage 2 with a frozen OPT: LM loss on the caption after Z' (LAVIS ``Blip2OPT``'s objective).

    >>> model, vis_processors, _ = load_model_and_preprocess("xformer_opt", "tiny", is_eval=True)  # offline
    >>> model.predict_answers({"image": vis_processors["eval"](image)[None], "text_input": ["how many stars?"]})
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        **model_type_configs("xformer_opt", OPT_MODEL_TYPES),
        **variants.variant_model_types("xformer_opt", OPT_MODEL_TYPES, stage=2),
    }
    config_class = XFormerOPTConfig


@registry.register_model("xformer_t5")
class XFormerT5(XFormerLLM, T5Head, Blip2T5):
    """X-Former stage 2 with a frozen FlanT5 (supplement section 3): prefix-LM loss, the caption's prefix with Z'
    into the encoder, its suffix as the decoder target (LAVIS ``Blip2T5``'s objective)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        **model_type_configs("xformer_t5", T5_MODEL_TYPES),
        **variants.variant_model_types("xformer_t5", T5_MODEL_TYPES, stage=2),
    }
    config_class = XFormerT5Config
