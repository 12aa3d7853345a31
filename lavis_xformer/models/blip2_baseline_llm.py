"""BLIP-2 stage 2 as the paper's baseline: LAVIS's ``Blip2OPT`` and ``Blip2T5``, built by the plugin's builders.

LAVIS's constructors load the LLM and its tokenizer from the hub inside ``__init__``, which cannot be overridden
piece by piece. So these classes replace ``__init__``: ``Blip2LLMPartsMixin`` builds the BLIP-2 parts
``Blip2OPT.__init__`` / ``Blip2T5.__init__`` build (tokenizer, frozen CLIP-ViT + ``ln_vision``, the Q-Former without
its text parts) and the LLM head (``llm_head.OPTHead`` / ``T5Head``) builds the LLM parts, under the attribute names
LAVIS's methods and checkpoints use (``opt_model``, ``opt_proj``, ``t5_model``, ``t5_proj``, ...): hub weights for
the paper types, random weights offline for ``tiny`` and inside ``no_hub()``.

The loss, generation and VQA are the shared LLM head's, the very code X-Former's stage-2 classes run, so a comparison
differs only in the visual prefix: here BLIP-2's, the Q-Former's query outputs projected
(``llm_image_inputs``). The head's losses equal LAVIS's own ``Blip2OPT.forward`` / ``Blip2T5.forward``, its
generation LAVIS's where LAVIS is right (tests/test_stage2.py); ``llm_head`` lists the LAVIS 1.0.2 bugs it fixes.
``freeze_vit_layernorms: False`` (the supplement's fine-tuning recipe, which LAVIS's constructors have no switch for)
trains the frozen CLIP-ViT's layer norms, for these baselines and the X-Former stage-2 classes alike.
"""

from typing import Sequence

import torch
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_t5 import Blip2T5

from lavis_xformer.models.builders import ConfigBuildersMixin, freeze, unfreeze_layernorms
from lavis_xformer.models.config_llm import Blip2OPTConfig, Blip2T5Config
from lavis_xformer.models.llm_builders import drop_qformer_text_parts
from lavis_xformer.models.llm_head import OPTHead, T5Head
from lavis_xformer.models.sdpa import use_sdpa_attention
from lavis_xformer.paths import model_config_path

OPT_MODEL_TYPES = ("pretrain_opt2.7b", "pretrain_opt6.7b", "caption_coco_opt2.7b", "caption_coco_opt6.7b", "tiny")
T5_MODEL_TYPES = ("pretrain_flant5xl", "caption_coco_flant5xl", "tiny")


def model_type_configs(arch: str, model_types: Sequence[str]) -> dict:
    """``PRETRAINED_MODEL_CONFIG_DICT``: type -> configs/models/<arch>/<arch>_<type>.yaml."""
    return {model_type: model_config_path(f"{arch}/{arch}_{model_type}.yaml") for model_type in model_types}


# ================================================================================================================
# Construction: what Blip2OPT.__init__ / Blip2T5.__init__ build, by the plugin's builders
# ================================================================================================================
def blip2_query_outputs(model, image: torch.Tensor) -> torch.Tensor:
    """BLIP-2's query outputs for a batch of images without text (CLIP-ViT, ``ln_vision``, Q-Former), as every
    LAVIS BLIP-2 class (Q-Former, OPT, T5) computes them before its own head or projection."""
    with model.maybe_autocast():
        image_embeds = model.ln_vision(model.visual_encoder(image))
    image_embeds = image_embeds.float()
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
    query_output = model.Qformer.bert(
        query_embeds=model.query_tokens.expand(image_embeds.shape[0], -1, -1),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        return_dict=True,
    )
    return query_output.last_hidden_state


class Blip2LLMPartsMixin(ConfigBuildersMixin):
    """Builds the parts of LAVIS's BLIP-2 LLM classes under LAVIS's attribute names (see the module docstring)."""

    def init_blip2_module(self, config):
        """``nn.Module`` set-up without LAVIS's downloading constructor (Blip2OPT/Blip2T5.__init__ are skipped)."""
        self.attach_build_config(config)
        Blip2Base.__init__(self)
        self.config = config

    def build_blip2_parts(self, config):
        """Tokenizer, frozen CLIP-ViT + ``ln_vision``, and the Q-Former without its text parts, as LAVIS does."""
        self.tokenizer = self.init_tokenizer()
        self.visual_encoder, self.ln_vision = self.init_vision_encoder(
            "eva_clip_g", config.image_size, config.drop_path_rate, config.use_grad_checkpoint, config.vit_precision
        )
        if config.freeze_vit:
            freeze(self.visual_encoder)
            if not config.freeze_vit_layernorms:  # fine-tuning: the CLIP-ViT's layer norms train (supplement 2)
                unfreeze_layernorms(self.visual_encoder)
        self.Qformer, self.query_tokens = self.init_Qformer(
            config.num_query_token, self.visual_encoder.num_features, config.cross_attention_freq
        )
        drop_qformer_text_parts(self.Qformer)  # stage 2 feeds no text to the Q-Former

    def build_blip2_llm(self, config):
        """Everything ``Blip2OPT.__init__`` / ``Blip2T5.__init__`` build: the BLIP-2 parts, then the LLM head's."""
        self.init_blip2_module(config)
        self.build_blip2_parts(config)
        self.build_llm(config, input_width=self.Qformer.config.hidden_size)


# ================================================================================================================
# The baselines
# ================================================================================================================
class Blip2BaselineLLM(Blip2LLMPartsMixin):
    """What both baselines add to the LLM head: LAVIS's construction and BLIP-2's visual prefix."""

    def __init__(self, config=None):
        config = config or self.config_class()
        self.build_blip2_llm(config)
        if config.sdpa_attention:  # off by default: the baseline is LAVIS's code as shipped
            use_sdpa_attention(self)

    def llm_image_inputs(self, image):
        """BLIP-2's visual prefix: the Q-Former's query outputs, projected (LAVIS's ``generate`` inline); also the
        training prefix, as in LAVIS's ``forward``."""
        prefix = self.project_to_llm(blip2_query_outputs(self, image))
        return prefix, torch.ones(prefix.shape[:-1], dtype=torch.long, device=image.device)


@registry.register_model("blip2_baseline_opt")
class Blip2BaselineOPT(Blip2BaselineLLM, OPTHead, Blip2OPT):
    """LAVIS's ``Blip2OPT``, built by the plugin's builders, with the shared OPT head (its loss is LAVIS's).

    >>> model = load_model("blip2_baseline_opt", "tiny")              # offline, random weights
    >>> model = load_model("blip2_baseline_opt", "pretrain_opt2.7b")  # LAVIS's released BLIP-2 OPT-2.7B
    """

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("blip2_baseline_opt", OPT_MODEL_TYPES)
    config_class = Blip2OPTConfig


@registry.register_model("blip2_baseline_t5")
class Blip2BaselineT5(Blip2BaselineLLM, T5Head, Blip2T5):
    """LAVIS's ``Blip2T5``, built by the plugin's builders, with the shared FlanT5 head (its loss is LAVIS's)."""

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("blip2_baseline_t5", T5_MODEL_TYPES)
    config_class = Blip2T5Config
