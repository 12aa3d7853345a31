"""One arm, one seed: stage 1 (the model's own losses: ITC, ITM, ITG, and X-Former's reconstruction), its health
line, the frozen visual output, and the probe's accuracies. In-process and deterministic: one thread, seeded
initialisation, batch order, masks and dropout, deterministic kernels."""

import math
import time
from typing import Dict, List

import numpy as np
import torch

from lavis_xformer.experiment.data import Split
from lavis_xformer.experiment.design import HEALTH, Arm, ExperimentSize, Recipe
from lavis_xformer.experiment.models import PretokenizedTokenizer, arm_image_size, build_arm
from lavis_xformer.experiment.probe import blind_baseline, probe_accuracies


def optimizer_and_schedule(model, recipe: Recipe):
    """AdamW on the trainable parameters (no weight decay on biases and norms, LAVIS's runner's rule), linear
    warm-up then cosine decay to ``min_lr``."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "bias" in name or "norm" in name else decay).append(parameter)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=recipe.betas)

    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        low = recipe.min_lr / recipe.lr
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_stage1(model, images: torch.Tensor, captions: List[str], recipe: Recipe, seed: int) -> Dict[str, List[float]]:
    """``recipe.steps`` steps of the model's stage-1 loss on (image, count-and-position caption) pairs, no
    augmentation (a crop or flip would change a count or a position the caption states); per-step losses."""
    model.tokenizer = PretokenizedTokenizer(model.tokenizer, captions, model.max_txt_len)
    optimizer, schedule = optimizer_and_schedule(model, recipe)
    order_rng = torch.Generator().manual_seed(seed)  # the same batches for every arm of a seed
    mask_rng = torch.Generator().manual_seed(seed + 1)
    history: Dict[str, List[float]] = {}
    order, position = torch.randperm(len(images), generator=order_rng), 0
    model.train()
    for _ in range(recipe.steps):
        if position + recipe.batch_size > len(order):
            order, position = torch.randperm(len(images), generator=order_rng), 0
        rows = order[position : position + recipe.batch_size]
        position += recipe.batch_size
        samples = {"image": images[rows], "text_input": [captions[i] for i in rows.tolist()]}
        if model.mae_encoder is not None:
            samples["mae_noise"] = torch.rand(len(rows), model.mae_encoder.embeddings.num_patches, generator=mask_rng)
        output = model(samples)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        schedule.step()
        for key in ("loss", "loss_itc", "loss_itm", "loss_lm", "loss_rec"):
            value = getattr(output, key)
            if value is not None:
                history.setdefault(key, []).append(value.item())
    return history


def health(history: Dict[str, List[float]], batch_size: int) -> dict:
    """The arm's training-health line: ITC over its last tenth of steps against chance (ln batch), and X-Former's
    reconstruction loss, last tenth over first tenth; ``healthy`` when both are within ``HEALTH``'s thresholds."""
    tenth = max(1, len(history["loss_itc"]) // 10)
    itc = float(np.mean(history["loss_itc"][-tenth:])) / math.log(batch_size)
    line = {"itc_over_chance": round(itc, 4), "healthy": itc <= HEALTH["itc_over_chance_max"]}
    text = f"ITC {itc:.2f} x chance (max {HEALTH['itc_over_chance_max']})"
    if "loss_rec" in history:
        rec = history["loss_rec"]
        ratio = float(np.mean(rec[-tenth:]) / np.mean(rec[:tenth]))
        line["rec_last_over_first"] = round(ratio, 4)
        line["healthy"] = line["healthy"] and ratio <= HEALTH["rec_drop_ratio_max"]
        text += f"; reconstruction last/first {ratio:.2f} (max {HEALTH['rec_drop_ratio_max']})"
    line["text"] = text
    return line


@torch.no_grad()
def visual_output(model, images: torch.Tensor, batch_size: int = 250) -> np.ndarray:
    """What the arm hands on, per image, flattened: the stage-1 query outputs after the fusion (Z'; Z_q for BLIP-2),
    in eval mode with the MAE seeing the whole image. [N, num_query_token * qformer_hidden_size]."""
    model.eval()
    parts = [model.encode(images[i : i + batch_size], mask_ratio=0.0).enriched_queries.flatten(1)
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts).numpy().astype(np.float64)


def probe(model, train: Split, train_images, test: Split, test_images, alpha: float) -> Dict[str, float]:
    """The probe's accuracies per question type on the model's frozen output as it is now."""
    return probe_accuracies(visual_output(model, train_images), train.questions,
                            visual_output(model, test_images), test.questions, alpha)


def query_diversity(model, test: Split, test_images, pairs: int) -> Dict[str, float]:
    """The supplement's four query-diversity readings (``analysis.query_diversity``) on the first ``pairs`` test
    images with their count-and-position captions."""
    from lavis_xformer.analysis.query_diversity import measure_readings

    model.eval()
    images, captions = test_images[:pairs], test.detail_captions[:pairs]
    batches = [(images[i : i + 64], captions[i : i + 64]) for i in range(0, len(captions), 64)]
    return measure_readings(model, batches, "").readings


def run_arm(arm: Arm, seed: int, size: ExperimentSize, standins: Dict[str, str], train: Split, test: Split) -> dict:
    """Probe the arm's frozen output at initialisation, train it on ``train``, probe it again (fit on ``train``'s
    questions, scored on ``test``'s), and take its query-diversity readings."""
    start = time.time()
    torch.use_deterministic_algorithms(True)
    model = build_arm(arm, size, standins, seed)
    image_size = arm_image_size(arm, size)
    train_images, test_images = train.images(image_size), test.images(image_size)
    # what the architecture passes on before any training: the share of the final accuracy stage 1 is owed
    accuracy_at_init = probe(model, train, train_images, test, test_images, size.probe_alpha)
    history = train_stage1(model, train_images, train.detail_captions, size.stage1, seed)
    trained = time.time() - start
    accuracies = probe(model, train, train_images, test, test_images, size.probe_alpha)
    return {"arm": arm.name, "seed": seed, "health": health(history, size.stage1.batch_size),
            "accuracy": accuracies, "accuracy_at_init": accuracy_at_init,
            "query_diversity": query_diversity(model, test, test_images, size.diversity_pairs),
            "baseline": blind_baseline(train.questions, test.questions),
            "final_losses": {k: round(float(np.mean(v[-max(1, len(v) // 10):])), 4) for k, v in history.items()},
            "seconds_train": round(trained, 1), "seconds": round(time.time() - start, 1)}
