"""The LLM side of stage 2, one for both models: a frozen OPT or FlanT5 fed with a visual prefix.

    visual prefix [B, Q, D_llm]   BLIP-2: the Q-Former's query outputs, projected; X-Former: Z', projected
    OPT (decoder only):  [prefix | text]                 -> causal LM, loss on the text's target tokens
    T5 (encoder-decoder): [prefix | encoder text] -> encoder, the target text -> decoder labels

The BLIP-2 baselines and X-Former both inherit ``forward``, ``generate`` and ``predict_answers`` from here, so the two
sides of a comparison differ only in the prefix a model supplies (``llm_image_inputs`` at inference,
``llm_training_inputs`` in training). The heads are mixins, not modules, so the state-dict keys stay LAVIS's
(``opt_model``, ``opt_proj``, ``t5_model``, ``t5_proj``). The losses equal LAVIS's ``Blip2OPT.forward`` /
``Blip2T5.forward`` on the same prefix; what LAVIS 1.0.2's generation gets wrong and is fixed here for both models is
listed in docs/stage2.md.
"""

import itertools
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from transformers.modeling_outputs import ModelOutput

from lavis_xformer.models.config_llm import VQA_PROMPT, Blip2OPTConfig, Blip2T5Config
from lavis_xformer.models.inputs import check_image_batch, check_texts, prompts_for_batch, vqa_questions
from lavis_xformer.models.llm_builders import build_opt, build_t5


# ================================================================================================================
# Settings and outputs
# ================================================================================================================
@dataclass(frozen=True)
class GenerationSettings:
    """How to decode, checked once. Field names and defaults are LAVIS's ``generate`` keyword arguments."""

    use_nucleus_sampling: bool = False  #: sample from the top-p nucleus instead of beam search
    num_beams: int = 5  #: beam width (1 = greedy search); unused when sampling
    max_length: int = 30  #: new tokens at most
    min_length: int = 1  #: new tokens at least before the end token (T5: LAVIS's count, with the start token)
    top_p: float = 0.9  #: nucleus size when sampling
    repetition_penalty: float = 1.0  #: 1.0 = none
    length_penalty: float = 1.0  #: beam scores are divided by length ** length_penalty (0: none, < 0: short)
    num_captions: int = 1  #: sequences returned per image
    temperature: float = 1.0  #: softmax temperature when sampling

    def __post_init__(self):
        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.num_beams) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1 (1 = greedy search), got {self.num_beams!r}")
        if not is_int(self.num_captions) or self.num_captions < 1:
            raise ValueError(f"num_captions must be an integer >= 1, got {self.num_captions!r}")
        if not self.use_nucleus_sampling and self.num_captions > self.num_beams:
            raise ValueError(
                f"num_captions={self.num_captions} > num_beams={self.num_beams}: beam search returns at most "
                "num_beams sequences per image (raise num_beams, or use_nucleus_sampling=True)"
            )
        if not is_int(self.max_length) or self.max_length < 1:
            raise ValueError(f"max_length (new tokens to generate) must be an integer >= 1, got {self.max_length!r}")
        if not is_int(self.min_length) or not 0 <= self.min_length <= self.max_length:
            raise ValueError(
                f"min_length must be an integer in [0, max_length={self.max_length}], got {self.min_length!r}"
            )

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "GenerationSettings":
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown generation argument(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**kwargs)

    @property
    def sequences_per_image(self) -> int:
        """Sequences transformers decodes per image: the beams, or one per sampled caption."""
        return self.num_captions if self.use_nucleus_sampling else self.num_beams

    @property
    def length_penalty_sees_padding(self) -> bool:
        """Whether beam scores depend on the padded prompt length (decoder-only LLMs, see the module docstring)."""
        return not self.use_nucleus_sampling and self.num_beams > 1 and self.length_penalty != 0

    def transformers_kwargs(self) -> dict:
        """The shared arguments of ``generate`` in transformers; each head adds its minimum length and end token."""
        return dict(
            do_sample=self.use_nucleus_sampling,
            top_p=self.top_p,
            temperature=self.temperature,
            num_beams=1 if self.use_nucleus_sampling else self.num_beams,
            max_new_tokens=self.max_length,
            repetition_penalty=self.repetition_penalty,
            length_penalty=self.length_penalty,
            num_return_sequences=self.num_captions,
        )


@dataclass
class LLMOutput(ModelOutput):
    """Stage-2 losses: the LLM's loss, the image side's reconstruction loss (X-Former ablation), their total."""

    loss: torch.Tensor = None
    loss_lm: torch.Tensor = None
    loss_rec: Optional[torch.Tensor] = None


# ================================================================================================================
# Text preparation (the input checks are models/inputs.py)
# ================================================================================================================
def vqa_prompts(questions: List[str], prompt: str, inference_method: str = "generate") -> List[str]:
    """Each question formatted into ``prompt``: the LLM input of ``predict_answers``, and of VQA fine-tuning, which
    must see the same prompt."""
    if inference_method != "generate":
        raise ValueError(
            f"inference_method={inference_method!r} is not supported: the stage-2 models answer by generation "
            "(inference_method='generate'); answer_list and num_ans_candidates are not used"
        )
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string such as {VQA_PROMPT!r}, got {prompt!r}")
    if not prompt:
        return list(questions)  # LAVIS's convention: an empty prompt feeds the questions as they are
    if prompt.count("{}") != 1:
        raise ValueError(
            f"prompt {prompt!r} must contain exactly one '{{}}' placeholder where the question goes, "
            f"e.g. {VQA_PROMPT!r}"
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


def draw_answers(answers, weights, n_answers, generator: Optional[torch.Generator] = None) -> List[str]:
    """One answer per question, drawn by its weight (supplement section 2: "we randomly select one of the answers").

    The inputs are LAVIS's VQA collater's: ``answers`` is the flat list of every question's distinct answers,
    ``weights`` their weights (VQAv2: the share of the 10 annotators who gave it, so the draw is uniform over the
    annotations; Visual Genome: one answer), ``n_answers`` how many belong to each question. The draw uses torch's
    generator (the global one by default, whose state exact resume restores), on the CPU whatever the batch's device.
    """
    n_answers = [int(n) for n in torch.as_tensor(n_answers).reshape(-1).tolist()]
    weights = torch.as_tensor(weights, dtype=torch.float).reshape(-1).cpu()
    if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"samples['answer'] must be the flat list of answer strings, got {answers!r:.80}")
    if min(n_answers, default=0) < 1 or sum(n_answers) != len(answers) or len(answers) != len(weights):
        raise ValueError(
            f"samples['answer'] ({len(answers)}), samples['weight'] ({len(weights)}) and samples['n_answers'] "
            f"{n_answers} disagree: each question needs >= 1 answer and the counts must sum to the answers given"
        )
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"samples['weight'] must be finite and >= 0, got {weights.tolist()}")
    per_question = torch.zeros(len(n_answers), max(n_answers))
    starts = [0] + list(itertools.accumulate(n_answers))[:-1]
    for row, (start, n) in enumerate(zip(starts, n_answers)):
        per_question[row, :n] = weights[start : start + n]
    if not (per_question.sum(1) > 0).all():
        raise ValueError("every question needs an answer of positive weight in samples['weight']")
    drawn = torch.multinomial(per_question, 1, generator=generator).squeeze(1).tolist()
    return [answers[start + i] for start, i in zip(starts, drawn)]


def weighted_token_mean(token_loss_sums, token_counts, weights=None) -> torch.Tensor:
    """sum_i w_i * (summed loss of sample i's target tokens) / sum_i w_i * (its number of target tokens): every
    target token of sample i weighs ``w_i``; with no weights, transformers' mean over the batch's target tokens."""
    if weights is None:
        return token_loss_sums.sum() / token_counts.sum()
    weights = torch.as_tensor(weights, dtype=token_loss_sums.dtype, device=token_loss_sums.device)
    if weights.shape != token_loss_sums.shape:
        raise ValueError(
            f"weights must hold one number per sample ({token_loss_sums.numel()}), got {tuple(weights.shape)}"
        )
    if not torch.isfinite(weights).all() or (weights < 0).any() or not weights.sum() > 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights.tolist()}")
    return (weights * token_loss_sums).sum() / (weights * token_counts).sum()


# ================================================================================================================
# What both heads share: the training step and LAVIS's inference entry points
# ================================================================================================================
class LLMHead:
    """``forward``, ``generate`` and ``predict_answers`` on a visual prefix; ``OPTHead`` / ``T5Head`` supply the
    LLM-specific ``caption_loss``, ``prefix_lm_loss`` and ``generate_from_prefix``."""

    llm_projection: str = None  # the trainable linear layer from the image queries to the LLM width
    vqa_length_penalty: float = 0.0  # predict_answers' default (module docstring)

    # ---- the visual prefix, supplied by the model ------------------------------------------------------------
    def llm_image_inputs(self, image, questions: Optional[List[str]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prefix [B, Q, D_llm], attention mask [B, Q]) at inference; ``questions`` enter the Q-Former when the model
        was built with ``qformer_text_input`` (VQA fine-tuning) and are ignored otherwise."""
        raise NotImplementedError

    def llm_training_inputs(
        self, image, samples, questions: Optional[List[str]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(prefix, attention mask, reconstruction loss or None) for the training objective."""
        prefix, prefix_atts = self.llm_image_inputs(image, questions)
        return prefix, prefix_atts, None

    def project_to_llm(self, queries) -> torch.Tensor:
        return getattr(self, self.llm_projection)(queries)

    # ---- training ----------------------------------------------------------------------------------------------
    def forward(self, samples) -> LLMOutput:
        """Three kinds of batch, told apart by their keys (LAVIS's conventions):

        * VQA (``answer``, ``weight``, ``n_answers``: LAVIS's VQA collater): VQA fine-tuning. One answer per
          question is drawn by its weight (``draw_answers``), and ``prefix_lm_loss`` trains the LLM on
          ``vqa_prompt`` with the question -> that answer, the prompt ``predict_answers`` uses at test time;
        * instruction data (``text_output``): ``prefix_lm_loss`` with ``text_input`` as prompts, ``text_output``
          as targets;
        * captions (``text_input`` only): ``caption_loss``.

        With ``qformer_text_input`` the question (``text_input`` of a VQA or instruction batch) also enters the
        Q-Former; a caption batch is refused, since the Q-Former would see the caption it is trained to produce.
        """
        image = check_image_batch(samples)
        texts = check_texts(samples.get("text_input"), image.shape[0], "text_input")
        if samples.get("answer") is not None:
            prompts = vqa_prompts(texts, self.config.vqa_prompt)
            targets = draw_answers(samples["answer"], samples.get("weight"), samples.get("n_answers"))
        elif samples.get("text_output") is not None:
            prompts, targets = texts, check_texts(samples.get("text_output"), image.shape[0], "text_output")
        else:
            if self.config.qformer_text_input:
                raise ValueError(
                    "qformer_text_input feeds the question to the Q-Former, but this batch has captions only (no "
                    "'answer' or 'text_output'): the Q-Former would see the text it is trained to produce. Train "
                    "VQA batches (LAVIS's VQA datasets) with this model, or set qformer_text_input: False"
                )
            prompts = targets = None
        prefix, prefix_atts, loss_rec = self.llm_training_inputs(image, samples, texts if prompts else None)
        if targets is None:
            loss_lm = self.caption_loss(prefix, prefix_atts, texts)
        else:
            loss_lm = self.prefix_lm_loss(prefix, prefix_atts, prompts, targets)
        loss = loss_lm if loss_rec is None else loss_lm + self.config.loss_weight_rec * loss_rec
        return LLMOutput(loss=loss, loss_lm=loss_lm, loss_rec=loss_rec)

    # ---- inference ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, samples, **kwargs) -> List[str]:
        """LAVIS's ``generate`` (keyword arguments: ``GenerationSettings``' fields); ``samples["prompt"]`` may be one
        string or one per image. Returns ``num_captions`` texts per image, image by image. With
        ``qformer_text_input`` the Q-Former reads ``samples["text_input"]``, or the prompts (LAVIS's InstructBLIP)."""
        settings = GenerationSettings.from_kwargs(kwargs)
        image = check_image_batch(samples)
        prompts = prompts_for_batch(samples.get("prompt", self.prompt), image.shape[0])
        questions = samples.get("text_input", prompts)
        return self.generate_from_prefix(*self.llm_image_inputs(image, questions), prompts, settings)

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
        prompt=None,
        length_penalty=None,
        **kwargs,
    ) -> List[str]:
        """LAVIS's ``predict_answers`` signature: each question in ``prompt`` (None: the config's ``vqa_prompt``, the
        VQA fine-tuning prompt), answered by beam search (VQA as the paper evaluates it); with
        ``qformer_text_input`` the question also enters the Q-Former, as in fine-tuning. ``answer_list``,
        ``num_ans_candidates`` and other keywords are ignored, as by LAVIS's generative VQA;
        ``length_penalty=None`` is the LLM's default (module docstring)."""
        length_penalty = self.vqa_length_penalty if length_penalty is None else length_penalty
        prompt = self.config.vqa_prompt if prompt is None else prompt
        settings = GenerationSettings(
            num_beams=num_beams, max_length=max_len, min_length=min_len, length_penalty=length_penalty
        )
        image = check_image_batch(samples)
        questions = vqa_questions(samples, image.shape[0])
        prompts = vqa_prompts(questions, prompt, inference_method)
        prefix, prefix_atts = self.llm_image_inputs(image, questions)
        return self.postprocess_answers(self.generate_from_prefix(prefix, prefix_atts, prompts, settings))

    def postprocess_answers(self, answers: List[str]) -> List[str]:
        return answers

    # ---- per LLM -------------------------------------------------------------------------------------------------
    def caption_loss(self, prefix, prefix_atts, captions: List[str]) -> torch.Tensor:
        raise NotImplementedError

    def prefix_lm_loss(self, prefix, prefix_atts, prompts, targets, weights=None) -> torch.Tensor:
        """The LLM reads prompt + target after the prefix; the loss is on the target tokens only (prompt, prefix and
        padding are -100). Prompt and target are each truncated to ``max_txt_len`` tokens, as LAVIS truncates its
        texts. Reduction: the mean over target tokens, each token of sample i weighted by ``weights[i]`` (default 1:
        LAVIS's token mean)."""
        raise NotImplementedError

    def generate_from_prefix(self, prefix, prefix_atts, prompts, settings: GenerationSettings) -> List[str]:
        raise NotImplementedError


# ================================================================================================================
# OPT: decoder-only
# ================================================================================================================
class OPTHead(LLMHead):
    """The frozen OPT of LAVIS's ``Blip2OPT``, fed with a visual prefix."""

    llm_projection = "opt_proj"
    vqa_length_penalty = 0.0

    def build_llm(self, config: Blip2OPTConfig, input_width: int):
        """What ``Blip2OPT.__init__`` builds after the Q-Former, under its names, by the plugin's builders."""
        self.opt_tokenizer, self.opt_model = build_opt(config)
        # LAVIS ends answers at the first newline; its id is the generation's eos.
        self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]
        self.opt_proj = nn.Linear(input_width, self.opt_model.config.hidden_size)
        self.max_txt_len = config.max_txt_len
        self.prompt = config.prompt
        # LAVIS keeps a tensor; an int slices the same and does not live on a device (meta builds included).
        self.prompt_length = len(self.opt_tokenizer(self.prompt).input_ids)

    def caption_loss(self, prefix, prefix_atts, captions):
        """``Blip2OPT.forward``'s text side: LM loss on ``caption + "\\n"``, none on the first ``prompt_length``
        tokens (the prompt, which the caption text processor prepends)."""
        self.opt_tokenizer.padding_side = "right"
        tokens = self.opt_tokenizer(
            [caption + "\n" for caption in captions],
            return_tensors="pt",
            padding="longest",
            truncation=True,
            max_length=self.max_txt_len,
        ).to(prefix.device)
        labels = tokens.input_ids.masked_fill(tokens.input_ids == self.opt_tokenizer.pad_token_id, -100)
        if self.prompt:
            labels[:, : self.prompt_length] = -100
        return self.lm_loss(prefix, prefix_atts, tokens.input_ids, tokens.attention_mask, labels)

    def prefix_lm_loss(self, prefix, prefix_atts, prompts, targets, weights=None):
        """[prefix | prompt | target + "\\n" | padding], the loss on the target tokens only; the target follows one
        space when the prompt does not end in one (the token generation emits after "Short answer:")."""
        prompt_ids, target_ids = self.prompt_target_ids(prompts, targets)
        width = max(len(p) + len(t) for p, t in zip(prompt_ids, target_ids))
        shape, device = (len(prompts), width), prefix.device
        input_ids = torch.full(shape, self.opt_tokenizer.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros(shape, dtype=torch.long, device=device)
        labels = torch.full(shape, -100, dtype=torch.long, device=device)
        for row, (prompt, target) in enumerate(zip(prompt_ids, target_ids)):
            end = len(prompt) + len(target)
            input_ids[row, :end] = torch.tensor(prompt + target)
            attention_mask[row, :end] = 1
            labels[row, len(prompt) : end] = torch.tensor(target)
        return self.lm_loss(prefix, prefix_atts, input_ids, attention_mask, labels, weights)

    def prompt_target_ids(self, prompts, targets) -> Tuple[List[List[int]], List[List[int]]]:
        """The token ids of [prompt | target + "\\n"] as ``prefix_lm_loss`` lays them out (also the layout of a
        few-shot demonstration, ``lavis_xformer.fewshot``): the prompt with BOS, the target after one space when the
        prompt does not end in one; each truncated to ``max_txt_len``."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets; give one target per prompt")
        prompt_ids = self.opt_tokenizer(list(prompts), truncation=True, max_length=self.max_txt_len).input_ids
        target_texts = [
            (" " if prompt and not prompt[-1].isspace() else "") + target + "\n"
            for prompt, target in zip(prompts, targets)
        ]
        target_ids = self.opt_tokenizer(
            target_texts, add_special_tokens=False, truncation=True, max_length=self.max_txt_len
        ).input_ids
        return prompt_ids, target_ids

    def lm_loss(self, prefix, prefix_atts, input_ids, attention_mask, labels, weights=None):
        """OPT on [prefix | input_ids]: the (weighted) mean cross-entropy of the tokens whose label is not -100."""
        labels = torch.cat([torch.full_like(prefix_atts, -100), labels], dim=1)
        text_embeds = self.opt_model.model.decoder.embed_tokens(input_ids)
        with self.maybe_autocast():
            outputs = self.opt_model(
                inputs_embeds=torch.cat([prefix, text_embeds], dim=1),
                attention_mask=torch.cat([prefix_atts, attention_mask], dim=1),
                return_dict=True,
                labels=labels,
                reduction="none",  # per-sample sums: the weights apply per sample
            )
        return weighted_token_mean(outputs.loss, (labels[:, 1:] != -100).sum(1), weights)

    def generate_from_prefix(self, prefix, prefix_atts, prompts, settings):
        lengths = [len(ids) for ids in self.opt_tokenizer(prompts, truncation=True, max_length=self.max_txt_len).input_ids]
        if not settings.length_penalty_sees_padding or len(set(lengths)) == 1:
            return self._generate_padded(prefix, prefix_atts, prompts, settings)
        per_image = [None] * len(prompts)
        for length in sorted(set(lengths)):
            group = [i for i, n in enumerate(lengths) if n == length]
            texts = self._generate_padded(prefix[group], prefix_atts[group], [prompts[i] for i in group], settings)
            for position, i in enumerate(group):
                per_image[i] = texts[position * settings.num_captions : (position + 1) * settings.num_captions]
        return [text for texts in per_image for text in texts]

    def _generate_padded(self, prefix, prefix_atts, prompts, settings) -> List[str]:
        self.opt_tokenizer.padding_side = "left"  # [prefix | padding | prompt]: every answer starts flush
        prompt_tokens = self.opt_tokenizer(  # truncated as in training: an over-long question would pass the positions
            prompts, padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(prefix.device)
        with self.maybe_autocast():
            outputs = self.opt_model.generate(
                input_ids=prompt_tokens.input_ids,
                # transformers expands input_ids and attention_mask per beam / sample, not this extra input.
                query_embeds=prefix.repeat_interleave(settings.sequences_per_image, dim=0),
                attention_mask=torch.cat([prefix_atts, prompt_tokens.attention_mask], dim=1),
                min_new_tokens=settings.min_length,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.opt_tokenizer.pad_token_id,
                **settings.transformers_kwargs(),
            )
        new_tokens = outputs[:, prompt_tokens.input_ids.shape[1] :]
        return [text.strip() for text in self.opt_tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# ================================================================================================================
# FlanT5: encoder-decoder
# ================================================================================================================
class T5Head(LLMHead):
    """The frozen FlanT5 of LAVIS's ``Blip2T5``, fed with a visual prefix. Prompts are right-padded in the encoder
    input, where T5's relative positions and the attention mask make the padding invisible."""

    llm_projection = "t5_proj"
    vqa_length_penalty = -1.0

    def build_llm(self, config: Blip2T5Config, input_width: int):
        """What ``Blip2T5.__init__`` builds after the Q-Former, under its names, by the plugin's builders."""
        self.t5_tokenizer, self.t5_model = build_t5(config)
        self.t5_proj = nn.Linear(input_width, self.t5_model.config.hidden_size)
        self.max_txt_len = config.max_txt_len
        self.prompt = config.prompt
        self._apply_lemmatizer = config.apply_lemmatizer
        self._lemmatizer = None

    def caption_loss(self, prefix, prefix_atts, captions):
        """BLIP-2's prefix-LM objective on caption data: a random split (``split_captions``), then
        ``prefix_lm_loss``."""
        return self.prefix_lm_loss(prefix, prefix_atts, *split_captions(captions))

    def prefix_lm_loss(self, prefix, prefix_atts, prompts, targets, weights=None):
        """``Blip2T5.forward``'s text side: [prefix | prompt] into the encoder, the target decoded."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets; give one target per prompt")
        device = prefix.device
        with self.maybe_autocast(dtype=torch.bfloat16):
            input_tokens, output_tokens = (
                self.t5_tokenizer(
                    list(texts), padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
                ).to(device)
                for texts in (prompts, targets)
            )
            target_ids = output_tokens.input_ids
            labels = target_ids.masked_fill(target_ids == self.t5_tokenizer.pad_token_id, -100)
            outputs = self.t5_model(
                inputs_embeds=torch.cat([prefix, self.t5_model.encoder.embed_tokens(input_tokens.input_ids)], dim=1),
                attention_mask=torch.cat([prefix_atts, input_tokens.attention_mask], dim=1),
                decoder_attention_mask=output_tokens.attention_mask,
                return_dict=True,
                labels=labels,
                reduction="none",  # per-sample sums: the weights apply per sample
            )
        return weighted_token_mean(outputs.loss, (labels != -100).sum(1), weights)

    def generate_from_prefix(self, prefix, prefix_atts, prompts, settings):
        input_tokens = self.t5_tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(prefix.device)
        with self.maybe_autocast(dtype=torch.bfloat16):
            inputs_embeds = torch.cat([prefix, self.t5_model.encoder.embed_tokens(input_tokens.input_ids)], dim=1)
            outputs = self.t5_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=torch.cat([prefix_atts, input_tokens.attention_mask], dim=1),
                min_length=settings.min_length,  # the decoder's length: no prompt in it, as in LAVIS
                **settings.transformers_kwargs(),
            )
        return self.t5_tokenizer.batch_decode(outputs, skip_special_tokens=True)

    def postprocess_answers(self, answers):
        return self._lemmatize(answers) if self._apply_lemmatizer else answers
