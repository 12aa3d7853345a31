"""BLIP-2 stage 2 as the paper's baseline: LAVIS's own ``Blip2OPT`` and ``Blip2T5``, built by the plugin's builders.

LAVIS's constructors load the LLM and its tokenizer from the hub inside ``__init__``, which cannot be overridden
piece by piece. So these classes replace ``__init__`` only: ``Blip2LLMPartsMixin`` builds the very parts
``Blip2OPT.__init__`` / ``Blip2T5.__init__`` build, under the attribute names their methods read (``opt_tokenizer``,
``opt_model``, ``opt_proj``, ``eos_token_id``, ``prompt``, ``prompt_length``, ``max_txt_len``; ``t5_*``; the Q-Former
without its text parts), with the plugin's builders: hub weights for the paper types, random weights offline for
``tiny`` and inside ``no_hub()``. ``forward`` is LAVIS's for both; ``generate`` / ``predict_answers`` are LAVIS's for
``Blip2T5``. What LAVIS 1.0.2 gets wrong, and is fixed here (each fix shared with the X-Former stage-2 classes):

1. ``Blip2OPT.generate`` builds ``[prompt] * batch`` whatever ``samples["prompt"]`` is, so per-image prompts become
   a list of lists, and tokenises without padding, so prompts of different lengths cannot share a batch.
   ``OPTGenerationMixin`` left-pads them (OPT computes its positions from the attention mask, so the padding between
   the image queries and a prompt changes nothing) and passes ``min_length`` as ``min_new_tokens``: transformers'
   ``min_length`` counts the padded prompt, which would make one image's answer depend on its batch neighbours.
   For the same reason, beam search with a length penalty (which divides by the padded length) runs prompts of
   different token lengths in separate calls.
2. ``Blip2OPT`` has no ``predict_answers`` (LAVIS added one after 1.0.2); zero-shot VQA needs it.
3. ``Blip2T5.forward`` needs ``samples["text_output"]``, but caption data has one text per image: BLIP-2's
   prefix-LM split (``split_captions``) is applied when it is absent.
4. ``Blip2T5.__init__`` casts T5 to bf16 unconditionally and relies on CUDA autocast to mix it with fp32 inputs;
   on CPU that fails. The builders keep the LLM in fp32 where CUDA is absent (``llm_precision``).
Inputs are checked up front (``ValueError`` naming the problem) instead of failing deep inside transformers.
``freeze_vit_layernorms: False`` (the supplement's fine-tuning recipe, which LAVIS's constructors have no switch for)
trains the frozen CLIP-ViT's layer norms, for these baselines and the X-Former stage-2 classes alike.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_t5 import Blip2T5

from lavis_xformer.models.builders import ConfigBuildersMixin, freeze, unfreeze_layernorms
from lavis_xformer.models.config_llm import Blip2OPTConfig, Blip2T5Config
from lavis_xformer.models.llm_builders import build_opt, build_t5, drop_qformer_text_parts
from lavis_xformer.models.sdpa import use_sdpa_attention
from lavis_xformer.paths import model_config_path

OPT_MODEL_TYPES = ("pretrain_opt2.7b", "pretrain_opt6.7b", "caption_coco_opt2.7b", "caption_coco_opt6.7b", "tiny")
T5_MODEL_TYPES = ("pretrain_flant5xl", "caption_coco_flant5xl", "tiny")


def model_type_configs(arch: str, model_types: Sequence[str]) -> dict:
    """``PRETRAINED_MODEL_CONFIG_DICT``: type -> configs/models/<arch>/<arch>_<type>.yaml."""
    return {model_type: model_config_path(f"{arch}/{arch}_{model_type}.yaml") for model_type in model_types}


# ================================================================================================================
# Input checks shared by every stage-2 model
# ================================================================================================================
def check_image_batch(samples) -> torch.Tensor:
    image = samples.get("image") if isinstance(samples, dict) else None
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"samples['image'] must be a [batch, 3, height, width] tensor, got {got}")
    return image


def check_generation_args(num_beams, max_length, min_length, num_captions, use_nucleus_sampling):
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1 (1 = greedy search), got {num_beams!r}")
    if isinstance(num_captions, bool) or not isinstance(num_captions, int) or num_captions < 1:
        raise ValueError(f"num_captions must be an integer >= 1, got {num_captions!r}")
    if not use_nucleus_sampling and num_captions > num_beams:
        raise ValueError(
            f"num_captions={num_captions} > num_beams={num_beams}: beam search returns at most num_beams sequences "
            "per image (raise num_beams, or use_nucleus_sampling=True)"
        )
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length (new tokens to generate) must be an integer >= 1, got {max_length!r}")
    if not isinstance(min_length, int) or not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be an integer in [0, max_length={max_length}], got {min_length!r}")


def prompts_for_batch(prompt, batch_size: int) -> List[str]:
    """One prompt per image: a string is shared by the batch, a list gives each image its own."""
    if isinstance(prompt, str):
        return [prompt] * batch_size
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise ValueError(f"samples['prompt'] must be a string or a list of strings, got {type(prompt).__name__}")
    if len(prompt) != batch_size:
        raise ValueError(f"batch size mismatch: {batch_size} images but {len(prompt)} prompts in samples['prompt']")
    return list(prompt)


def vqa_prompts(samples, prompt: str, batch_size: int, inference_method: str) -> List[str]:
    """The LLM input of ``predict_answers``: each question in ``samples["text_input"]`` formatted into ``prompt``."""
    if inference_method != "generate":
        raise ValueError(
            f"inference_method={inference_method!r} is not supported: the stage-2 models answer by generation "
            "(inference_method='generate'); answer_list and num_ans_candidates are not used"
        )
    questions = samples.get("text_input")
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(questions, (list, tuple)) or not all(isinstance(q, str) for q in questions):
        raise ValueError(f"samples['text_input'] must hold the questions as a list of strings, got {questions!r}")
    if len(questions) == 0:
        raise ValueError("samples['text_input'] is an empty list of questions; give one question per image")
    if len(questions) != batch_size:
        raise ValueError(f"batch size mismatch: {batch_size} images but {len(questions)} questions")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string such as 'Question: {{}} Short answer:', got {prompt!r}")
    if not prompt:
        return list(questions)  # LAVIS's convention: an empty prompt feeds the questions as they are
    if prompt.count("{}") != 1:
        raise ValueError(
            f"prompt {prompt!r} must contain exactly one '{{}}' placeholder where the question goes, "
            "e.g. 'Question: {} Short answer:'"
        )
    return [prompt.format(question) for question in questions]


def split_captions(captions: Sequence[str], generator: Optional[torch.Generator] = None) -> Tuple[List[str], List[str]]:
    """BLIP-2's prefix-LM split for FlanT5 (supplement section 3): each caption is cut at a random word between its
    start and its middle; the prefix goes to the encoder with the image, the rest is the decoder's target."""
    prefixes, suffixes = [], []
    for caption in captions:
        words = caption.split()
        cut = int(torch.randint(0, len(words) // 2 + 1, (1,), generator=generator))
        prefixes.append(" ".join(words[:cut]))
        suffixes.append(" ".join(words[cut:]))
    return prefixes, suffixes


def with_prefix_split(samples: dict) -> dict:
    """``samples`` with ``text_input`` / ``text_output`` as the prefix-LM split of ``text_input`` (caption data),
    unchanged when it already has ``text_output`` (LAVIS's convention for instruction data)."""
    if "text_output" in samples:
        return samples
    prefixes, suffixes = split_captions(samples["text_input"])
    return {**samples, "text_input": prefixes, "text_output": suffixes}


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

    def build_opt_parts(self, config: Blip2OPTConfig):
        self.opt_tokenizer, self.opt_model = build_opt(config)
        # LAVIS ends answers at the first newline; its id is the generation's eos.
        self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]
        self.opt_proj = nn.Linear(self.Qformer.config.hidden_size, self.opt_model.config.hidden_size)
        self.max_txt_len = config.max_txt_len
        self.prompt = config.prompt
        # LAVIS keeps a tensor; an int slices the same and does not live on a device (meta builds included).
        self.prompt_length = len(self.opt_tokenizer(self.prompt).input_ids)

    def build_t5_parts(self, config: Blip2T5Config):
        self.t5_tokenizer, self.t5_model = build_t5(config)
        self.t5_proj = nn.Linear(self.Qformer.config.hidden_size, self.t5_model.config.hidden_size)
        self.max_txt_len = config.max_txt_len
        self.prompt = config.prompt
        self._apply_lemmatizer = config.apply_lemmatizer
        self._lemmatizer = None


# ================================================================================================================
# OPT inference, fixed for batched prompts (module docstring, 1 and 2)
# ================================================================================================================
class OPTGenerationMixin:
    """``generate`` and ``predict_answers`` on a frozen OPT whose input starts with projected image queries.

    The image side is ``llm_image_inputs(image) -> (embeddings [B, Q, D_llm], attention mask [B, Q])``: BLIP-2's
    Q-Former output for the baseline, X-Former's Z' for ``xformer_opt``.
    """

    def llm_image_inputs(self, image) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

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
        """LAVIS's ``Blip2OPT.generate``; ``samples["prompt"]`` may be one string or one per image."""
        image = check_image_batch(samples)
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
        length_penalty=0,
        **kwargs,
    ):
        """Zero-shot VQA as the paper evaluates it: the question in ``prompt``, beam search, length penalty 0."""
        image = check_image_batch(samples)
        prompts = vqa_prompts(samples, prompt, image.shape[0], inference_method)
        return self.generate_from_prompts(
            image, prompts, num_beams=num_beams, max_length=max_len, min_length=min_len, length_penalty=length_penalty
        )

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
        check_generation_args(num_beams, max_length, min_length, num_captions, use_nucleus_sampling)
        settings = dict(
            use_nucleus_sampling=use_nucleus_sampling, num_beams=num_beams, max_length=max_length,
            min_length=min_length, top_p=top_p, repetition_penalty=repetition_penalty, length_penalty=length_penalty,
            num_captions=num_captions, temperature=temperature,
        )
        # transformers' beam search divides a hypothesis' score by its length ** length_penalty, counting the
        # prompt with its left padding: prompts padded to a batch's longest would rank their hypotheses unlike
        # the same prompts alone. With a length penalty, prompts of different token lengths go in separate calls.
        lengths = [len(ids) for ids in self.opt_tokenizer(prompts).input_ids]
        if use_nucleus_sampling or num_beams == 1 or length_penalty == 0 or len(set(lengths)) == 1:
            return self._generate_padded(image, prompts, **settings)
        texts = [None] * len(prompts)
        for length in sorted(set(lengths)):
            group = [i for i, n in enumerate(lengths) if n == length]
            answers = self._generate_padded(image[group], [prompts[i] for i in group], **settings)
            for position, i in enumerate(group):
                texts[i] = answers[position * num_captions : (position + 1) * num_captions]
        return [text for per_image in texts for text in per_image]

    def _generate_padded(
        self, image, prompts, use_nucleus_sampling, num_beams, max_length, min_length, top_p, repetition_penalty,
        length_penalty, num_captions, temperature,
    ) -> List[str]:
        image_embeds, image_atts = self.llm_image_inputs(image)

        self.opt_tokenizer.padding_side = "left"  # [image queries | padding | prompt]: every answer starts flush
        prompt_tokens = self.opt_tokenizer(prompts, padding="longest", return_tensors="pt").to(image.device)
        attention_mask = torch.cat([image_atts, prompt_tokens.attention_mask], dim=1)

        if use_nucleus_sampling:
            num_beams, copies = 1, num_captions
        else:
            copies = num_beams
        with self.maybe_autocast():
            outputs = self.opt_model.generate(
                input_ids=prompt_tokens.input_ids,
                # transformers expands input_ids and attention_mask per beam / sample, not this extra input.
                query_embeds=image_embeds.repeat_interleave(copies, dim=0),
                attention_mask=attention_mask,
                do_sample=use_nucleus_sampling,
                top_p=top_p,
                temperature=temperature,
                num_beams=num_beams,
                max_new_tokens=max_length,
                min_new_tokens=min_length,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.opt_tokenizer.pad_token_id,
                repetition_penalty=repetition_penalty,
                length_penalty=length_penalty,
                num_return_sequences=num_captions,
            )
        new_tokens = outputs[:, prompt_tokens.input_ids.shape[1] :]
        return [text.strip() for text in self.opt_tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# ================================================================================================================
# The baselines
# ================================================================================================================
@registry.register_model("blip2_baseline_opt")
class Blip2BaselineOPT(OPTGenerationMixin, Blip2LLMPartsMixin, Blip2OPT):
    """LAVIS's ``Blip2OPT`` (its ``forward``), built by the plugin's builders; generation fixed as documented above.

    >>> model = load_model("blip2_baseline_opt", "tiny")              # offline, random weights
    >>> model = load_model("blip2_baseline_opt", "pretrain_opt2.7b")  # LAVIS's released BLIP-2 OPT-2.7B
    """

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("blip2_baseline_opt", OPT_MODEL_TYPES)
    config_class = Blip2OPTConfig

    def __init__(self, config: Optional[Blip2OPTConfig] = None):
        config = config or Blip2OPTConfig()
        self.init_blip2_module(config)
        self.build_blip2_parts(config)
        self.build_opt_parts(config)
        if config.sdpa_attention:  # off by default: the baseline is LAVIS's code as shipped
            use_sdpa_attention(self)

    def llm_image_inputs(self, image):
        """BLIP-2's visual prefix: the Q-Former's query outputs, projected (LAVIS's ``Blip2OPT.generate`` inline)."""
        inputs_opt = self.opt_proj(blip2_query_outputs(self, image))
        return inputs_opt, torch.ones(inputs_opt.shape[:-1], dtype=torch.long, device=image.device)


@registry.register_model("blip2_baseline_t5")
class Blip2BaselineT5(Blip2LLMPartsMixin, Blip2T5):
    """LAVIS's ``Blip2T5`` (``forward``, ``generate``, ``predict_answers``), built by the plugin's builders.

    Additions: the prefix-LM split of caption-only batches and up-front input checks (module docstring, 3).
    """

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("blip2_baseline_t5", T5_MODEL_TYPES)
    config_class = Blip2T5Config

    def __init__(self, config: Optional[Blip2T5Config] = None):
        config = config or Blip2T5Config()
        self.init_blip2_module(config)
        self.build_blip2_parts(config)
        self.build_t5_parts(config)
        if config.sdpa_attention:
            use_sdpa_attention(self)

    def forward(self, samples):
        return super().forward(with_prefix_split(samples))

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
        image = check_image_batch(samples)
        check_generation_args(num_beams, max_length, min_length, num_captions, use_nucleus_sampling)
        prompts_for_batch(samples.get("prompt", self.prompt), image.shape[0])
        return super().generate(
            samples,
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
        prompt="",
        length_penalty=-1,
        **kwargs,
    ):
        image = check_image_batch(samples)
        check_generation_args(num_beams, max_len, min_len, 1, False)
        vqa_prompts(samples, prompt, image.shape[0], inference_method)
        return super().predict_answers(
            samples,
            num_beams=num_beams,
            inference_method=inference_method,
            max_len=max_len,
            min_len=min_len,
            num_ans_candidates=num_ans_candidates,
            answer_list=answer_list,
            prompt=prompt,
            length_penalty=length_penalty,
            **kwargs,
        )
