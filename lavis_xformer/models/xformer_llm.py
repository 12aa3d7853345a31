"""X-Former stage 2 (arXiv 2407.13851, section 2.3 "Stage 2", Fig. 4): aligning Z' with a frozen LLM.

    image --(frozen CLIP-ViT, frozen MAE-ViT, X-Former)--> Z' --(one linear layer)--> soft prompt of the frozen LLM
    xformer_opt: [Z' | caption]          -> OPT,  language-modelling loss on the caption          (LAVIS Blip2OPT)
    xformer_t5:  [Z' | caption prefix]   -> T5 encoder, the caption's suffix is the decoder target (LAVIS Blip2T5)

Only the X-Former (Q-Former, queries, dual block, ``ln_vision``) and the projection train. No ITC/ITM, no text into
the Q-Former; the reconstruction loss is an off-by-default switch (Table 6 ablation). MAE masking follows
``mask_ratio`` (0 by default in stage 2: see ``XFormerStage2Config``); at inference the MAE sees the whole image
(``eval_mask_ratio``).

The classes are LAVIS's ``Blip2OPT`` / ``Blip2T5`` built like the baselines (``blip2_baseline_llm``), with the image
side replaced: ``llm_image_inputs`` returns the projected Z' instead of the Q-Former output, and generation and
VQA run on it. With ``use_mae=False`` and the same weights the losses are LAVIS's (tests/test_stage2.py).
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_t5 import Blip2T5
from transformers.modeling_outputs import ModelOutput

from lavis_xformer.models import variants
from lavis_xformer.models.blip2_baseline_llm import (
    OPT_MODEL_TYPES,
    T5_MODEL_TYPES,
    Blip2LLMPartsMixin,
    OPTGenerationMixin,
    check_generation_args,
    model_type_configs,
    prompts_for_batch,
    split_captions,
    vqa_prompts,
)
from lavis_xformer.models.config_llm import XFormerOPTConfig, XFormerT5Config
from lavis_xformer.models.sdpa import use_sdpa_attention
from lavis_xformer.models.xformer import XFormerImageMixin


@dataclass
class XFormerLLMOutput(ModelOutput):
    """Stage-2 losses: the LLM's language-modelling loss, the optional reconstruction loss, and their total."""

    loss: torch.Tensor = None
    loss_lm: torch.Tensor = None
    loss_rec: Optional[torch.Tensor] = None


class XFormerStage2Mixin(XFormerImageMixin):
    """The X-Former image side of stage 2, on top of a class built by ``Blip2LLMPartsMixin``.

    ``llm_projection`` names the trainable linear layer from Z' to the LLM width (``opt_proj`` / ``t5_proj``).
    """

    llm_projection: str = None

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

    def project_to_llm(self, queries):
        return getattr(self, self.llm_projection)(queries)

    def xformer_queries(self, image, noise=None):
        """(Z', reconstruction loss or None) for the training objective: ``encode``, the image pathway of stage 1.

        Like stage 1, the objective is defined on the image masked by ``mask_ratio`` in training and validation
        alike; ``noise`` ([B, num_patches]) fixes that masking.
        """
        path = self.encode(image, self.config.mask_ratio, noise)
        return path.enriched_queries, self.reconstruction_loss_of(path)

    def llm_image_inputs(self, image):
        """The LLM's visual prefix at inference: projected Z' (the MAE sees ``eval_mask_ratio`` of masking in eval
        mode, i.e. the whole image by default) and its attention mask."""
        prefix = self.project_to_llm(self.encode(image).enriched_queries)
        return prefix, torch.ones(prefix.shape[:-1], dtype=torch.long, device=prefix.device)

    def stage2_output(self, loss_lm, loss_rec) -> XFormerLLMOutput:
        loss = loss_lm if loss_rec is None else loss_lm + self.config.loss_weight_rec * loss_rec
        return XFormerLLMOutput(loss=loss, loss_lm=loss_lm, loss_rec=loss_rec)


# ================================================================================================================
# OPT: decoder-only, language-modelling loss on the caption after the image prefix
# ================================================================================================================
@registry.register_model("xformer_opt")
class XFormerOPT(XFormerStage2Mixin, OPTGenerationMixin, Blip2LLMPartsMixin, Blip2OPT):
    """X-Former stage 2 with a frozen OPT.

    >>> model, vis_processors, _ = load_model_and_preprocess("xformer_opt", "tiny", is_eval=True)  # offline
    >>> model.predict_answers({"image": vis_processors["eval"](image)[None], "text_input": ["how many stars?"]})
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        **model_type_configs("xformer_opt", OPT_MODEL_TYPES),
        **variants.variant_model_types("xformer_opt", OPT_MODEL_TYPES, stage=2),
    }
    config_class = XFormerOPTConfig
    llm_projection = "opt_proj"

    def __init__(self, config: Optional[XFormerOPTConfig] = None):
        config = config or XFormerOPTConfig()
        self.init_blip2_module(config)
        self.build_blip2_parts(config)
        self.build_opt_parts(config)
        self.build_xformer_stage2(config)

    def forward(self, samples):
        image = self.check_image(samples.get("image") if isinstance(samples, dict) else None)
        captions = self.check_texts(samples.get("text_input"), image.shape[0])
        enriched_queries, loss_rec = self.xformer_queries(image, noise=samples.get("mae_noise"))
        loss_lm = self.caption_loss(self.opt_proj(enriched_queries), captions)
        return self.stage2_output(loss_lm, loss_rec)

    def caption_loss(self, image_embeds, captions: List[str]):
        """OPT's language-modelling loss on ``caption + "\\n"`` after the image prefix (``Blip2OPT.forward``'s text
        side): no loss on the prefix, the padding or the first ``prompt_length`` tokens (the prompt, which the
        caption text processor prepends)."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        self.opt_tokenizer.padding_side = "right"
        text_tokens = self.opt_tokenizer(
            [caption + "\n" for caption in captions],
            return_tensors="pt",
            padding="longest",
            truncation=True,
            max_length=self.max_txt_len,
        ).to(image_embeds.device)

        targets = text_tokens.input_ids.masked_fill(text_tokens.input_ids == self.opt_tokenizer.pad_token_id, -100)
        if self.prompt:
            targets[:, : self.prompt_length] = -100
        targets = torch.cat([torch.full_like(image_atts, -100), targets], dim=1)

        text_embeds = self.opt_model.model.decoder.embed_tokens(text_tokens.input_ids)
        with self.maybe_autocast():
            outputs = self.opt_model(
                inputs_embeds=torch.cat([image_embeds, text_embeds], dim=1),
                attention_mask=torch.cat([image_atts, text_tokens.attention_mask], dim=1),
                return_dict=True,
                labels=targets,
            )
        return outputs.loss


# ================================================================================================================
# FlanT5: encoder-decoder, prefix-LM loss (the caption's prefix with the image in, its suffix out)
# ================================================================================================================
@registry.register_model("xformer_t5")
class XFormerT5(XFormerStage2Mixin, Blip2LLMPartsMixin, Blip2T5):
    """X-Former stage 2 with a frozen FlanT5 (supplement section 3).

    ``generate`` / ``predict_answers`` are ``Blip2T5``'s with Z' as the visual prefix; their defaults are LAVIS's
    except the VQA prompt, the paper's "Question: {} Short answer:".
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        **model_type_configs("xformer_t5", T5_MODEL_TYPES),
        **variants.variant_model_types("xformer_t5", T5_MODEL_TYPES, stage=2),
    }
    config_class = XFormerT5Config
    llm_projection = "t5_proj"

    def __init__(self, config: Optional[XFormerT5Config] = None):
        config = config or XFormerT5Config()
        self.init_blip2_module(config)
        self.build_blip2_parts(config)
        self.build_t5_parts(config)
        self.build_xformer_stage2(config)

    def forward(self, samples):
        """Prefix-LM loss. Caption batches are split at random (``split_captions``); a batch that already has
        ``text_output`` uses ``text_input`` as the encoder text and ``text_output`` as the target, as LAVIS does."""
        image = self.check_image(samples.get("image") if isinstance(samples, dict) else None)
        texts = self.check_texts(samples.get("text_input"), image.shape[0])
        if "text_output" in samples:
            prefixes, targets = texts, self.check_texts(samples["text_output"], image.shape[0], key="text_output")
        else:
            prefixes, targets = split_captions(texts)
        enriched_queries, loss_rec = self.xformer_queries(image, noise=samples.get("mae_noise"))
        loss_lm = self.prefix_lm_loss(self.t5_proj(enriched_queries), prefixes, targets)
        return self.stage2_output(loss_lm, loss_rec)

    def prefix_lm_loss(self, image_embeds, prefixes: List[str], targets: List[str]):
        """``Blip2T5.forward``'s text side: [image prefix | text prefix] into the encoder, the target decoded."""
        device = image_embeds.device
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        input_tokens = self.t5_tokenizer(
            prefixes, padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(device)
        output_tokens = self.t5_tokenizer(
            targets, padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(device)
        labels = output_tokens.input_ids.masked_fill(output_tokens.input_ids == self.t5_tokenizer.pad_token_id, -100)
        with self.maybe_autocast(dtype=torch.bfloat16):
            inputs_embeds = torch.cat([image_embeds, self.t5_model.encoder.embed_tokens(input_tokens.input_ids)], dim=1)
            outputs = self.t5_model(
                inputs_embeds=inputs_embeds,
                attention_mask=torch.cat([image_atts, input_tokens.attention_mask], dim=1),
                decoder_attention_mask=output_tokens.attention_mask,
                return_dict=True,
                labels=labels,
            )
        return outputs.loss

    # ------------------------------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        samples,
        use_nucleus_sampling=False,
        num_beams=5,
        max_length=30,
        min_length=1,
        top_p=0.9,
        repetition_penalty=1.0,
        length_penalty=1.0,
        num_captions=1,
        temperature=1,
    ):
        image = self.check_image(samples.get("image") if isinstance(samples, dict) else None)
        prompts = prompts_for_batch(samples.get("prompt", self.prompt), image.shape[0])
        return self.generate_from_prompts(
            image,
            prompts,
            use_nucleus_sampling=use_nucleus_sampling,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            num_captions=num_captions,
            temperature=temperature,
        )

    @torch.no_grad()
    def predict_answers(
        self,
        samples,
        num_beams=5,
        inference_method="generate",
        max_len=10,
        min_len=1,
        num_ans_candidates=128,
        answer_list=None,
        prompt="Question: {} Short answer:",
        length_penalty=-1,
        **kwargs,
    ):
        image = self.check_image(samples.get("image") if isinstance(samples, dict) else None)
        prompts = vqa_prompts(samples, prompt, image.shape[0], inference_method)
        answers = self.generate_from_prompts(
            image, prompts, num_beams=num_beams, max_length=max_len, min_length=min_len, length_penalty=length_penalty
        )
        return self._lemmatize(answers) if self._apply_lemmatizer else answers

    def generate_from_prompts(
        self,
        image,
        prompts: List[str],
        use_nucleus_sampling=False,
        num_beams=5,
        max_length=30,
        min_length=1,
        top_p=0.9,
        repetition_penalty=1.0,
        length_penalty=1.0,
        num_captions=1,
        temperature=1.0,
    ) -> List[str]:
        """``Blip2T5.generate`` from the projected Z'. The prompts are right-padded in the encoder input, where T5's
        relative positions and the attention mask make the padding invisible."""
        check_generation_args(num_beams, max_length, min_length, num_captions, use_nucleus_sampling)
        image_embeds, image_atts = self.llm_image_inputs(image)
        input_tokens = self.t5_tokenizer(prompts, padding="longest", return_tensors="pt").to(image.device)
        with self.maybe_autocast(dtype=torch.bfloat16):
            inputs_embeds = torch.cat([image_embeds, self.t5_model.encoder.embed_tokens(input_tokens.input_ids)], dim=1)
            outputs = self.t5_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=torch.cat([image_atts, input_tokens.attention_mask], dim=1),
                do_sample=use_nucleus_sampling,
                top_p=top_p,
                temperature=temperature,
                num_beams=num_beams,
                max_new_tokens=max_length,
                min_length=min_length,
                repetition_penalty=repetition_penalty,
                length_penalty=length_penalty,
                num_return_sequences=num_captions,
            )
        return self.t5_tokenizer.batch_decode(outputs, skip_special_tokens=True)
