"""Typed configs of the stage-2 models: the backbone configs plus a frozen LLM (OPT or FlanT5).

    BackboneConfig -> FrozenLLMConfig -> Blip2OPTConfig, Blip2T5Config      (blip2_baseline_opt, blip2_baseline_t5)
    XFormerConfig -> XFormerStage2Config
    XFormerStage2Config + Blip2OPTConfig -> XFormerOPTConfig                  (xformer_opt)
    XFormerStage2Config + Blip2T5Config -> XFormerT5Config                    (xformer_t5)

The LLM keys keep LAVIS's names (``opt_model``, ``t5_model``, ``prompt``, ``max_txt_len``, ``apply_lemmatizer``), so a
LAVIS BLIP-2 yaml's model section reads unchanged. As everywhere in the plugin, unknown fields are refused.
"""

from dataclasses import dataclass
from typing import Optional

from lavis_xformer.models.config import BackboneConfig, XFormerConfig, _check_choice
from lavis_xformer.models.precision import PRECISIONS

LLM_PRECISIONS = PRECISIONS  # auto | fp32 | bf16 | fp16 (models/precision.py)
# The paper's prompt, as section 3.1 writes it for OC/MCI: 'We use the prompt "Question: {} Short Answer:"'
# (zero-shot VQAv2 and supplement section 2 print it without the braces: "Question: Short Answer:").
PAPER_VQA_PROMPT = "Question: {} Short Answer:"
VQA_PROMPT = PAPER_VQA_PROMPT  # the default of ``vqa_prompt``


@dataclass
class FrozenLLMConfig(BackboneConfig):
    """What BLIP-2 stage 2 adds to the backbone: a frozen LLM fed with the projected image queries.

    The ``llm_*`` sizes build a random LLM when no hub checkpoint is named (the ``tiny`` types); a named checkpoint
    brings its own architecture (from the hub, or from ``published_llm.py`` inside ``no_hub()``).

    VQA fine-tuning (``qformer_text_input: True``): as BLIP-2 does for VQA (and LAVIS's InstructBLIP code), the
    question enters the Q-Former together with the queries (bi-directional self-attention, the query positions of
    the output are the image queries). The Q-Former keeps the text parts stage 2 otherwise removes (word and
    position embeddings, each layer's text feed-forward) and they train. A stage-2 checkpoint does not hold them:
    ``qformer_text_init`` names the stage-1 checkpoint (X-Former ``xformer`` or BLIP-2 stage 1) they are read from;
    loading a checkpoint without them and no ``qformer_text_init`` raises ``QFormerTextWeightsMissing``.
    """

    max_txt_len: int = 32  #: LLM tokens per training text; also the question's Q-Former tokens (qformer_text_input)
    prompt: str = ""  #: text after the image queries at generation, e.g. "a photo of"; OPT excludes it from the loss
    llm_tokenizer: Optional[str] = None  #: None = the checkpoint's hub tokenizer; else a file prefix in assets/
    #: frozen LLM weights' dtype: "auto" = LAVIS's half type with CUDA (OPT fp16), fp32 on a CPU (LAVIS's LLM code
    #: autocasts on CUDA only); "fp32" / "bf16" / "fp16" force it with CUDA (models/precision.py)
    llm_precision: str = "auto"
    llm_hidden_size: int = 64  #: width of a random LLM (used only without a hub checkpoint)
    llm_num_layers: int = 2  #: layers of a random LLM (T5: encoder and decoder each)
    llm_num_heads: int = 4  #: attention heads of a random LLM
    llm_ffn_dim: int = 128  #: feed-forward width of a random LLM
    llm_vocab_size: Optional[int] = None  #: vocabulary of a random LLM; None = the tokenizer's size

    # --- VQA fine-tuning (supplement section 2; BLIP-2 section 3.4): the question also enters the Q-Former ---
    qformer_text_input: bool = False  #: the question enters the Q-Former with the queries; keeps its text parts
    qformer_text_init: Optional[str] = None  #: stage-1 checkpoint supplying the Q-Former text parts `pretrained` lacks
    vqa_prompt: str = VQA_PROMPT  #: LLM prompt of VQA fine-tuning and predict_answers' default

    def _check_llm(self, checkpoint: Optional[str], checkpoint_field: str):
        BackboneConfig.__post_init__(self)
        _check_choice("llm_precision", self.llm_precision, LLM_PRECISIONS)
        if self.qformer_text_init and not self.qformer_text_input:
            raise ValueError(
                f"qformer_text_init={self.qformer_text_init!r} is set but qformer_text_input is False: the Q-Former "
                "text parts are only kept when the question enters the Q-Former (set qformer_text_input: True)"
            )
        if self.vqa_prompt and self.vqa_prompt.count("{}") != 1:
            raise ValueError(
                f"vqa_prompt={self.vqa_prompt!r} must contain exactly one '{{}}' where the question goes "
                "(or be empty: the question alone)"
            )
        if self.max_txt_len < 1:
            raise ValueError(f"max_txt_len={self.max_txt_len} must be at least 1")
        if checkpoint is None:
            if self.llm_tokenizer is None:
                raise ValueError(
                    f"{checkpoint_field} is null (a random LLM) so llm_tokenizer must name local tokenizer files "
                    "(e.g. 'tiny_opt' or 'tiny_t5' in lavis_xformer/assets)"
                )
            if min(self.llm_hidden_size, self.llm_num_layers, self.llm_num_heads, self.llm_ffn_dim) < 1:
                raise ValueError("llm_hidden_size, llm_num_layers, llm_num_heads and llm_ffn_dim must be positive")
            if self.llm_hidden_size % self.llm_num_heads:
                raise ValueError(
                    f"llm_num_heads={self.llm_num_heads} must divide llm_hidden_size={self.llm_hidden_size}"
                )


@dataclass
class Blip2OPTConfig(FrozenLLMConfig):
    """BLIP-2 with a frozen decoder-only OPT (LAVIS ``Blip2OPT``): the image queries are a prefix of the text."""

    opt_model: Optional[str] = "facebook/opt-2.7b"  #: hub OPT (weights, tokenizer, architecture); None = random
    llm_max_positions: int = 128  #: learned positions of a random OPT (image queries + prompt + answer)

    def __post_init__(self):
        self._check_llm(self.opt_model, "opt_model")


@dataclass
class Blip2T5Config(FrozenLLMConfig):
    """BLIP-2 with a frozen encoder-decoder FlanT5 (LAVIS ``Blip2T5``), trained with the prefix-LM loss."""

    t5_model: Optional[str] = "google/flan-t5-xl"  #: hub T5 (weights, tokenizer, architecture); None = random
    llm_head_dim: int = 16  #: per-head width (T5's d_kv) of a random T5
    apply_lemmatizer: bool = False  #: lemmatise predict_answers output with spaCy (LAVIS's VQA option)

    def __post_init__(self):
        self._check_llm(self.t5_model, "t5_model")


@dataclass
class XFormerStage2Config(XFormerConfig):
    """X-Former stage 2 (section 2.3 "Stage 2", Fig. 4): Z' -> one linear layer -> frozen LLM, language-modelling loss.

    CLIP-ViT, MAE-ViT and the LLM are frozen; the X-Former (Q-Former, queries, dual block, ``ln_vision``) and the
    projection train. No ITC/ITM and no text into the Q-Former.

    MAE masking in stage 2 follows the paper by default (``mask_ratio: 0.5``; inference sees the whole image,
    ``eval_mask_ratio: 0``): Fig. 3 computes M "with random masking", the supplement's implementation paragraph,
    which covers both stages, sets "The masking ratio for MAE-ViT is set to 50%", and its cost table adds the same
    0.08T FLOPs to BLIP-2 in both stages, about one MAE-ViT-H pass over half the patches (docs/fidelity.md,
    "Stage-2 masking"). ``mask_ratio: 0`` (the ``_unmasked`` project yamls) is this project's alternative. The
    Table-6 ablation switch ``reconstruction_loss: True`` needs a positive ``mask_ratio`` (``XFormerConfig`` refuses
    0). The stage-1 loss weights (``loss_weight_itc/itm/itg``) are unused here.
    """

    reconstruction_loss: bool = False  #: Table 6 ablation: build the frozen MAE decoder, add its loss to the LM loss
    mask_ratio: float = 0.5  #: MAE patches masked in stage-2 training (the paper's 50%; 0: the whole image)
    freeze_xformer: bool = False  #: train the projection only (supplement Table 6, "X-Former Frozen")


@dataclass
class XFormerOPTConfig(XFormerStage2Config, Blip2OPTConfig):
    """``xformer_opt``: X-Former stage 2 with a frozen OPT."""

    def __post_init__(self):
        XFormerStage2Config.__post_init__(self)
        Blip2OPTConfig.__post_init__(self)


@dataclass
class XFormerT5Config(XFormerStage2Config, Blip2T5Config):
    """``xformer_t5``: X-Former stage 2 with a frozen FlanT5."""

    def __post_init__(self):
        XFormerStage2Config.__post_init__(self)
        Blip2T5Config.__post_init__(self)
