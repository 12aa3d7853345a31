"""Few-shot in-context evaluation of the stage-2 models (OPT, and FlanT5 through its encoder input), after
OpenFlamingo's protocol (open_flamingo/eval/evaluate.py, ``evaluate_vqa`` / ``evaluate_captioning``).

    demonstrations      k examples of the training split, each an image and its text
    LLM input (OPT)     [img_1 | </s> Question: q_1 Short answer: a_1\\n | ... | img_k | ... | img | </s> Question: q Short answer:]
    LLM input (T5)      encoder: [img_1 | Question: q_1 Short answer: a_1</s> | ... | img | Question: q Short answer:</s>]
                        img_i = the model's visual prefix of image i, [Q, D_llm] (``llm_image_inputs``)

The visual prefix of each demonstration image sits where the model was trained to read an image: before the text
that belongs to it, which is laid out as in training (OPT: ``OPTHead.prompt_target_ids``, the layout of VQA
fine-tuning's ``prefix_lm_loss``, so a demonstration ends with the "\\n" that ends BLIP-2 OPT answers; T5: the
prompt and target in the encoder, one ``</s>`` at the end). The query comes last, exactly as the zero-shot path
builds it: the context is a longer prefix handed to the head's own ``generate_from_prefix``, so **0 shots is the
zero-shot path** (``predict_answers`` / ``generate``), answer for answer. Contexts of different lengths are
left-padded with masked positions (OPT's positions follow the attention mask; T5's relative positions only see
distances between the real tokens, which stay contiguous).

Demonstrations (``DemoPool``): as OpenFlamingo, a query set of ``query_set_size`` training examples is drawn with
the trial seed, and each query's k demonstrations are drawn from it without replacement. A choice beyond
OpenFlamingo: each query's draw is seeded by (trial seed, query key) rather than by one random stream over the
batches, so the demonstrations of a query do not depend on the batch size, the number of ranks or the model: both
models of a comparison see the same ones. A training example showing the query's own image is never drawn.
A VQA demonstration answers with the most frequent of its answers (the VQA files' ``multiple_choice_answer`` rule;
OpenFlamingo takes the first annotator's); a caption demonstration with its caption.

The LLM's position limit is checked before generation (``ContextTooLongError``): OPT's learned positions must hold
context + prompt + ``max_len`` new tokens; FlanT5's encoder input must fit ``n_positions`` (512, its training
length).
"""

import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from lavis_xformer.models.llm_head import (
    GenerationSettings,
    OPTHead,
    T5Head,
    check_image_batch,
    prompts_for_batch,
    vqa_prompts,
    vqa_questions,
)

DEFAULT_QUERY_SET_SIZE = 2048  # OpenFlamingo's --query_set_size


class ContextTooLongError(ValueError):
    """A few-shot input longer than the LLM can take."""


@dataclass(frozen=True)
class Example:
    """One training example a demonstration can be made of."""

    key: str  #: identity in its split (the annotation index)
    image_path: str
    text: str  #: the question (VQA) or the caption
    answer: Optional[str] = None  #: VQA: the answer the demonstration shows


@dataclass(frozen=True)
class Demonstration:
    """A drawn example, ready for the model: its processed image and its text as (prompt, target)."""

    example: Example
    image: torch.Tensor  #: [3, H, W], through the query's eval image processor
    prompt: str  #: e.g. "Question: how many circles are there? Short answer:" or the caption prompt
    target: str  #: the answer or the caption
    question: Optional[str] = None  #: what enters the Q-Former with the image (models with qformer_text_input)


# ================================================================================================================
# Demonstrations: OpenFlamingo's random sampling from a query set of the training split
# ================================================================================================================
def most_frequent(answers) -> str:
    """The most frequent answer (first seen wins a tie); a string is its own answer."""
    if isinstance(answers, str):
        return answers
    if not answers:
        raise ValueError("a VQA training example without answers cannot be a demonstration")
    counts = Counter(answers)
    return max(answers, key=lambda a: (counts[a], -answers.index(a)))


def examples_from_annotation(annotation: Sequence[dict], vis_root: str, kind: str) -> List[Example]:
    """The training split's LAVIS annotation (VQA: ``question`` + ``answer``; captions: ``caption``) as examples."""
    examples = []
    for index, ann in enumerate(annotation):
        path = os.path.join(vis_root, ann["image"])
        if kind == "vqa":
            examples.append(Example(str(index), path, ann["question"], most_frequent(ann["answer"])))
        elif kind == "caption":
            caption = ann["caption"] if isinstance(ann["caption"], str) else ann["caption"][0]
            examples.append(Example(str(index), path, caption))
        else:
            raise ValueError(f"kind must be 'vqa' or 'caption', got {kind!r}")
    return examples


class DemoPool:
    """Where demonstrations come from: the training split's examples, and per trial seed OpenFlamingo's query set
    (``query_set_size`` of them, drawn without replacement)."""

    def __init__(self, examples: Sequence[Example], query_set_size: int = DEFAULT_QUERY_SET_SIZE):
        if not examples:
            raise ValueError("the demonstration split is empty: few-shot evaluation needs training examples")
        if query_set_size < 1:
            raise ValueError(f"query_set_size must be >= 1, got {query_set_size}")
        self.examples = list(examples)
        self.query_set_size = min(query_set_size, len(self.examples))
        self._query_sets = {}

    def query_set(self, trial_seed: int) -> List[int]:
        if trial_seed not in self._query_sets:
            chosen = np.random.RandomState(trial_seed).choice(len(self.examples), self.query_set_size, replace=False)
            self._query_sets[trial_seed] = sorted(int(i) for i in chosen)
        return self._query_sets[trial_seed]

    def draw(self, query_key, query_image_path: Optional[str], shots: int, trial_seed: int) -> List[Example]:
        """``shots`` examples for one query: a function of (trial seed, query key) alone, never its image."""
        if shots == 0:
            return []
        query_image = os.path.realpath(query_image_path) if query_image_path else None
        candidates = [
            i for i in self.query_set(trial_seed) if os.path.realpath(self.examples[i].image_path) != query_image
        ]
        if shots > len(candidates):
            raise ValueError(
                f"{shots} shots, but the query set holds {len(candidates)} usable examples; lower run.shots or "
                "raise run.query_set_size"
            )
        rng = random.Random(f"lavis_xformer.fewshot:{trial_seed}:{query_key}")
        return [self.examples[i] for i in rng.sample(candidates, shots)]


# ================================================================================================================
# The in-context input
# ================================================================================================================
def llm_parts(model):
    """(tokenizer, input embedding, position limit, kind) of the model's frozen LLM."""
    if isinstance(model, OPTHead):
        opt = model.opt_model
        return model.opt_tokenizer, opt.get_input_embeddings(), opt.config.max_position_embeddings, "opt"
    if isinstance(model, T5Head):
        t5 = model.t5_model
        return model.t5_tokenizer, t5.get_input_embeddings(), getattr(t5.config, "n_positions", 512), "t5"
    raise TypeError(
        f"{type(model).__name__} has no frozen OPT / FlanT5 head: few-shot evaluation is for the stage-2 models "
        "(xformer_opt, xformer_t5, blip2_baseline_opt, blip2_baseline_t5)"
    )


def demonstration_ids(model, prompt: str, target: str) -> List[int]:
    """A demonstration's text as the LLM reads it after the image (module docstring)."""
    tokenizer, _, _, kind = llm_parts(model)
    if kind == "opt":
        (prompt_ids,), (target_ids,) = model.prompt_target_ids([prompt], [target])
        return prompt_ids + target_ids
    separator = " " if prompt and not prompt[-1].isspace() else ""
    prompt_ids = tokenizer(prompt, add_special_tokens=False, truncation=True, max_length=model.max_txt_len).input_ids
    target_ids = tokenizer(separator + target, truncation=True, max_length=model.max_txt_len).input_ids  # + </s>
    return prompt_ids + target_ids


def in_context_prefix(
    model, image: torch.Tensor, demos: Sequence[Sequence[Demonstration]], questions: Optional[List[str]] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, L, D_llm] context (each query's demonstrations, then its own visual prefix, left-padded) and its
    attention mask [B, L]; with no demonstrations, the model's ``llm_image_inputs`` unchanged."""
    if len(demos) != image.shape[0]:
        raise ValueError(f"{image.shape[0]} images but demonstrations for {len(demos)}")
    prefix, prefix_atts = model.llm_image_inputs(image, questions)  # [B, Q, D]
    flat = [demo for query in demos for demo in query]
    if not flat:
        return prefix, prefix_atts
    _, embed, _, _ = llm_parts(model)
    demo_images = torch.stack([demo.image for demo in flat]).to(image.device, image.dtype)
    demo_questions = [demo.question if demo.question is not None else demo.prompt for demo in flat]
    demo_prefix, demo_atts = model.llm_image_inputs(demo_images, demo_questions)  # [sum k, Q, D]
    rows, position = [], 0
    for b, query in enumerate(demos):
        parts, masks = [], []
        for demo in query:
            ids = torch.tensor(demonstration_ids(model, demo.prompt, demo.target), device=image.device)
            parts += [demo_prefix[position], embed(ids).to(prefix.dtype)]
            masks += [demo_atts[position], torch.ones(len(ids), dtype=prefix_atts.dtype, device=image.device)]
            position += 1
        rows.append((torch.cat(parts + [prefix[b]]), torch.cat(masks + [prefix_atts[b]])))
    width = max(len(mask) for _, mask in rows)
    context = prefix.new_zeros(len(rows), width, prefix.shape[-1])
    context_atts = prefix_atts.new_zeros(len(rows), width)
    for b, (embeds, mask) in enumerate(rows):  # left-padded: the query's own prefix ends every row
        context[b, width - len(mask) :] = embeds
        context_atts[b, width - len(mask) :] = mask
    return context, context_atts


def check_length(model, context_atts: torch.Tensor, prompts: List[str], settings: GenerationSettings, keys=None):
    """Raise ``ContextTooLongError`` for the first query whose input the LLM cannot take."""
    tokenizer, _, limit, kind = llm_parts(model)
    prompt_lengths = [len(ids) for ids in tokenizer(prompts, truncation=True, max_length=model.max_txt_len).input_ids]
    for b, (context, prompt) in enumerate(zip(context_atts.sum(1).tolist(), prompt_lengths)):
        total = int(context) + prompt + (settings.max_length if kind == "opt" else 0)
        if total > limit:
            what = "context + prompt + max_len new tokens" if kind == "opt" else "encoder input (context + prompt)"
            key = f" (query {keys[b]})" if keys is not None else ""
            raise ContextTooLongError(
                f"few-shot input too long{key}: {what} = {int(context)} + {prompt}"
                f"{f' + {settings.max_length}' if kind == 'opt' else ''} = {total} tokens > the LLM's limit of {limit} "
                f"positions ({type(model.opt_model if kind == 'opt' else model.t5_model).__name__}); use fewer "
                "shots (run.shots), a shorter max_len or a model with more positions"
            )


# ================================================================================================================
# Answering and captioning in context
# ================================================================================================================
@torch.no_grad()
def answer_in_context(
    model,
    samples: dict,
    demos: Sequence[Sequence[Demonstration]],
    num_beams: int = 5,
    max_len: int = 10,
    min_len: int = 1,
    prompt: Optional[str] = None,
    length_penalty: Optional[float] = None,
    keys=None,
) -> List[str]:
    """``predict_answers`` with demonstrations before each question (same arguments and defaults: ``prompt=None``
    is the model's ``vqa_prompt``, ``length_penalty=None`` the LLM's VQA default)."""
    image = check_image_batch(samples)
    questions = vqa_questions(samples, image.shape[0])
    prompt = model.config.vqa_prompt if prompt is None else prompt
    length_penalty = model.vqa_length_penalty if length_penalty is None else length_penalty
    settings = GenerationSettings(num_beams=num_beams, max_length=max_len, min_length=min_len, length_penalty=length_penalty)
    prompts = vqa_prompts(questions, prompt)
    context, context_atts = in_context_prefix(model, image, demos, questions)
    check_length(model, context_atts, prompts, settings, keys)
    return model.postprocess_answers(model.generate_from_prefix(context, context_atts, prompts, settings))


@torch.no_grad()
def caption_in_context(model, samples: dict, demos: Sequence[Sequence[Demonstration]], keys=None, **kwargs) -> List[str]:
    """``generate`` (LAVIS's keyword arguments) with demonstrations before each image; the prompt is
    ``samples["prompt"]`` or the model's caption prompt, as in ``generate``."""
    settings = GenerationSettings.from_kwargs(kwargs)
    image = check_image_batch(samples)
    prompts = prompts_for_batch(samples.get("prompt", model.prompt), image.shape[0])
    context, context_atts = in_context_prefix(model, image, demos, samples.get("text_input", prompts))
    check_length(model, context_atts, prompts, settings, keys)
    return model.generate_from_prefix(context, context_atts, prompts, settings)
