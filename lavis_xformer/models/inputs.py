"""Checks of a batch's inputs, one set for every model (stage 1, stage 2, X-Former and the BLIP-2 baselines).

    samples["image"]        [B, 3, image_size, image_size] float, finite (the xformer_image_* processors' output)
    samples["text_input"]   B strings (captions, prompts or questions)

Each check returns its input (as a list for texts) or raises a ``ValueError`` naming the field and how to fix it.
"""

from typing import List, Optional

import torch


def check_image(image, image_size: Optional[int] = None) -> torch.Tensor:
    """A [B, 3, H, W] float image batch, of ``image_size`` pixels a side where given, with finite values."""
    size = f"{image_size}, {image_size}" if image_size is not None else "height, width"
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"samples['image'] must be a [batch, 3, {size}] tensor, got {got}")
    if image_size is not None:
        if image.shape[1] != 3:
            raise ValueError(
                f"samples['image'] has {image.shape[1]} channels; the encoders take 3 (RGB). "
                "Convert images with the xformer_image_* processors."
            )
        if tuple(image.shape[-2:]) != (image_size, image_size):
            raise ValueError(
                f"samples['image'] is {tuple(image.shape[-2:])} pixels but the model's image_size is {image_size}; "
                f"resize with the xformer_image_* processors (image_size: {image_size})"
            )
    return check_image_values(image)


def check_image_batch(samples, image_size: Optional[int] = None) -> torch.Tensor:
    """``check_image`` of ``samples["image"]``."""
    return check_image(samples.get("image") if isinstance(samples, dict) else None, image_size)


def check_image_values(image: torch.Tensor) -> torch.Tensor:
    """A floating-point tensor (raw uint8 or integer pixels are refused, not converted: the normalisation they need
    is the processor's), all finite (a NaN / inf image would give empty answers or a NaN loss with no error)."""
    if not torch.is_floating_point(image):
        raise ValueError(
            f"samples['image'] has dtype {image.dtype}; the models take float images normalised by the "
            "xformer_image_* processors (raw pixels are not converted: apply the processor to the PIL image)"
        )
    # (meta tensors hold no values: the meta-device builds that count parameters and FLOPs skip this). A NaN or inf
    # anywhere makes the sum non-finite, so one pass (the sum) clears a finite image; only a non-finite sum (or
    # finite values overflowing it) needs the element-wise check, 25x slower.
    if image.device.type != "meta" and not torch.isfinite(image.sum()) and not torch.isfinite(image).all():
        bad = sorted({int(i) for i in (~torch.isfinite(image)).flatten(1).any(1).nonzero().flatten()})
        raise ValueError(f"samples['image'] holds NaN or inf values (batch items {bad[:10]}); check the data")
    return image


def check_texts(texts, batch_size: int, key: str = "text_input") -> List[str]:
    """``texts`` as one string per image, or a ``ValueError`` naming ``samples[key]``."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"samples[{key!r}] must be a list of strings, got {texts!r:.80}")
    if len(texts) == 0:
        raise ValueError(f"samples[{key!r}] is an empty list; give one text per image")
    if len(texts) != batch_size:
        raise ValueError(f"batch size mismatch: {batch_size} images but {len(texts)} texts in samples[{key!r}]")
    return list(texts)


def prompts_for_batch(prompt, batch_size: int) -> List[str]:
    """One prompt per image: a string is shared by the batch, a list gives each image its own."""
    if isinstance(prompt, str):
        return [prompt] * batch_size
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise ValueError(f"samples['prompt'] must be a string or a list of strings, got {type(prompt).__name__}")
    if len(prompt) != batch_size:
        raise ValueError(f"batch size mismatch: {batch_size} images but {len(prompt)} prompts in samples['prompt']")
    return list(prompt)


def vqa_questions(samples, batch_size: int) -> List[str]:
    """The questions of a VQA batch, ``samples["text_input"]`` (one string is one question), checked: one per image,
    none empty or whitespace only."""
    questions = samples.get("text_input")
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(questions, (list, tuple)) or not all(isinstance(q, str) for q in questions):
        raise ValueError(f"samples['text_input'] must hold the questions as a list of strings, got {questions!r}")
    if len(questions) == 0:
        raise ValueError("samples['text_input'] is an empty list of questions; give one question per image")
    if len(questions) != batch_size:
        raise ValueError(f"batch size mismatch: {batch_size} images but {len(questions)} questions")
    empty = [index for index, question in enumerate(questions) if not question.strip()]
    if empty:  # (it was answered: the LLM continued the prompt alone)
        raise ValueError(f"samples['text_input'] holds empty questions (batch items {empty[:10]}); every image "
                         "needs a question (an annotation entry with an empty 'question' is a bad sample)")
    return list(questions)
