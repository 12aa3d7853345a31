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

import logging
from typing import List, Optional, Sequence, Tuple

import torch
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_t5 import Blip2T5

from lavis_xformer.models import variants
from lavis_xformer.models.builders import ConfigBuildersMixin
from lavis_xformer.models.config_llm import Blip2OPTConfig, Blip2T5Config
from lavis_xformer.models.llm_builders import drop_qformer_text_parts, is_qformer_text_part, keep_qformer_text_parts
from lavis_xformer.models.llm_head import OPTHead, T5Head
from lavis_xformer.models.sdpa import use_sdpa_attention
from lavis_xformer.paths import model_config_path

OPT_MODEL_TYPES = (
    "pretrain_opt2.7b",
    "pretrain_opt6.7b",
    "caption_coco_opt2.7b",
    "caption_coco_opt6.7b",
    "vqa_ft_opt2.7b",  # VQA fine-tuning (supplement section 2): the question into the Q-Former, 490 px
    "tiny",
)
T5_MODEL_TYPES = ("pretrain_flant5xl", "caption_coco_flant5xl", "vqa_ft_flant5xl", "tiny")


def model_type_configs(arch: str, model_types: Sequence[str]) -> dict:
    """``PRETRAINED_MODEL_CONFIG_DICT``: type -> configs/models/<arch>/<arch>_<type>.yaml."""
    return {model_type: model_config_path(f"{arch}/{arch}_{model_type}.yaml") for model_type in model_types}


# ================================================================================================================
# Construction: what Blip2OPT.__init__ / Blip2T5.__init__ build, by the plugin's builders
# ================================================================================================================
def blip2_query_outputs(model, image: torch.Tensor, text_ids=None, text_atts=None) -> torch.Tensor:
    """BLIP-2's query outputs for a batch of images (CLIP-ViT, ``ln_vision``, Q-Former), as every LAVIS BLIP-2 class
    (Q-Former, OPT, T5) computes them before its own head or projection. Without text the pass is unimodal; with
    text (``text_ids`` / ``text_atts``, a VQA question) queries and text attend to each other and the query
    positions of the output are returned, as LAVIS's InstructBLIP does."""
    with model.maybe_autocast():
        image_embeds = model.ln_vision(model.visual_encoder(image))
    image_embeds = image_embeds.float()
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    attention_mask = None
    if text_ids is not None:
        query_atts = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=image.device)
        attention_mask = torch.cat([query_atts, text_atts], dim=1)
    query_output = model.Qformer.bert(
        text_ids,
        query_embeds=query_tokens,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        return_dict=True,
    )
    return query_output.last_hidden_state[:, : query_tokens.shape[1], :]


class QFormerTextWeightsMissing(ValueError):
    """``qformer_text_input`` is on but the Q-Former's text parts were supplied by no checkpoint."""


class Blip2LLMPartsMixin(ConfigBuildersMixin):
    """Builds the parts of LAVIS's BLIP-2 LLM classes under LAVIS's attribute names (see the module docstring)."""

    def init_blip2_module(self, config):
        """``nn.Module`` set-up without LAVIS's downloading constructor (Blip2OPT/Blip2T5.__init__ are skipped)."""
        self.attach_build_config(config)
        Blip2Base.__init__(self)
        self.config = config

    def build_blip2_parts(self, config):
        """Tokenizer, frozen CLIP-ViT + ``ln_vision``, and the Q-Former without its text parts, as LAVIS does (with
        them for VQA fine-tuning, ``qformer_text_input``)."""
        self.tokenizer = self.init_tokenizer()
        self.visual_encoder, self.ln_vision = self.init_frozen_clip(config)
        self.Qformer, self.query_tokens = self.init_Qformer(
            config.num_query_token, self.visual_encoder.num_features, config.cross_attention_freq
        )
        if config.qformer_text_input:
            keep_qformer_text_parts(self.Qformer, len(self.tokenizer))
        else:
            drop_qformer_text_parts(self.Qformer)  # stage 2 feeds no text to the Q-Former

    def qformer_text(self, questions: Optional[List[str]], device) -> Tuple[Optional[torch.Tensor], ...]:
        """(token ids, attention mask) of the questions for the Q-Former with ``qformer_text_input``, else
        (None, None): the pass is then BLIP-2's stage 2, queries only. Tokenised as LAVIS's InstructBLIP does."""
        if not self.config.qformer_text_input:
            return None, None
        if questions is None:
            raise ValueError(
                "this model feeds the question to the Q-Former (qformer_text_input: True): give the questions in "
                "samples['text_input']"
            )
        tokens = self.tokenizer(
            list(questions), padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(device)
        return tokens.input_ids, tokens.attention_mask

    # ---- loading: the Q-Former's text parts of VQA fine-tuning ----------------------------------------------------
    def load_checkpoint_from_config(self, cfg, **kwargs):
        """LAVIS's entry point (``ConfigBuildersMixin``'s loader); then, with ``qformer_text_input``, the Q-Former
        text parts the loaded checkpoint lacks (a stage-2 checkpoint has none) come from ``qformer_text_init``."""
        result = super().load_checkpoint_from_config(cfg, **kwargs)
        if self.config.qformer_text_input:
            self.supply_qformer_text_parts(cfg, result)
        return result

    def _required_from_previous_stage(self, state_dict) -> set:
        """The strict ``pretrained`` load's required tensors, less the Q-Former text parts when the question enters
        the Q-Former: a stage-2 checkpoint has none of them, and ``supply_qformer_text_parts`` loads them from
        ``qformer_text_init`` (or refuses with ``QFormerTextWeightsMissing``)."""
        required = super()._required_from_previous_stage(state_dict)
        if self.config.qformer_text_input:
            required = {name for name in required if not is_qformer_text_part(name)}
        return required

    def supply_qformer_text_parts(self, cfg, result) -> None:
        """Load the text parts the checkpoint of ``result`` lacked from ``qformer_text_init``;
        ``QFormerTextWeightsMissing`` if it is not set or lacks them. With no checkpoint loaded (``result`` None:
        ``load_pretrained: False``) nothing is loaded: the whole model is its initialisation, text path included."""
        from lavis_xformer.checkpoints import extract_state_dict, load_state_dict_checked, read_checkpoint

        if result is None:
            return
        text_init = self.config.qformer_text_init
        # the trainable ones: the last layer's text feed-forward is frozen and unread (keep_qformer_text_parts)
        text_parts = [name for name, p in self.named_parameters() if is_qformer_text_part(name) and p.requires_grad]
        missing = sorted(set(result.missing_keys) & set(text_parts))
        if not missing:
            return
        source = cfg.get("finetuned") if cfg.get("load_finetuned", False) else cfg.get("pretrained")
        if not text_init:
            raise QFormerTextWeightsMissing(
                f"{type(self).__name__}: qformer_text_input is True (the question enters the Q-Former), but the "
                f"checkpoint {source!r} has no Q-Former text weights ({len(missing)} tensors, e.g. {missing[0]}): "
                "stage-2 checkpoints drop them. Set model.qformer_text_init to the stage-1 checkpoint the model was "
                "trained from (X-Former `xformer` or BLIP-2 stage 1), whose word/position embeddings and text "
                "feed-forwards are loaded."
            )
        state_dict = extract_state_dict(read_checkpoint(text_init))
        absent = [name for name in missing if name not in state_dict]
        if absent:
            raise QFormerTextWeightsMissing(
                f"{type(self).__name__}: qformer_text_init={text_init!r} lacks {len(absent)} of the Q-Former text "
                f"weights (e.g. {absent[0]}); name a stage-1 checkpoint (X-Former `xformer` or BLIP-2 stage 1)"
            )
        load_state_dict_checked(self, {name: state_dict[name] for name in missing}, text_init, strict_unexpected=True)
        logging.info("%s: %d Q-Former text tensors from %s", type(self).__name__, len(missing), text_init)

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

    def llm_image_inputs(self, image, questions=None):
        """BLIP-2's visual prefix: the Q-Former's query outputs, projected (LAVIS's ``generate`` inline); also the
        training prefix, as in LAVIS's ``forward``. With ``qformer_text_input`` the questions enter the Q-Former."""
        text_ids, text_atts = self.qformer_text(questions, image.device)
        prefix = self.project_to_llm(blip2_query_outputs(self, image, text_ids, text_atts))
        return prefix, torch.ones(prefix.shape[:-1], dtype=torch.long, device=image.device)


@registry.register_model("blip2_baseline_opt")
class Blip2BaselineOPT(Blip2BaselineLLM, OPTHead, Blip2OPT):
    """LAVIS's ``Blip2OPT``, built by the plugin's builders, with the shared OPT head (its loss is LAVIS's).

    >>> model = load_model("blip2_baseline_opt", "tiny")              # offline, random weights
    >>> model = load_model("blip2_baseline_opt", "pretrain_opt2.7b")  # LAVIS's released BLIP-2 OPT-2.7B
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        **model_type_configs("blip2_baseline_opt", OPT_MODEL_TYPES),
        **variants.variant_model_types("blip2_baseline_opt", OPT_MODEL_TYPES, stage=2),  # token count, resolution
    }
    config_class = Blip2OPTConfig


@registry.register_model("blip2_baseline_t5")
class Blip2BaselineT5(Blip2BaselineLLM, T5Head, Blip2T5):
    """LAVIS's ``Blip2T5``, built by the plugin's builders, with the shared FlanT5 head (its loss is LAVIS's)."""

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("blip2_baseline_t5", T5_MODEL_TYPES)
    config_class = Blip2T5Config
