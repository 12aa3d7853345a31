"""The frozen encoders' stand-ins of the experiment, pretrained once on a fixed split (``PRETRAIN_SEED``) and frozen in
every arm and seed, as hub weights would be, through the demo's one stand-in loop (``demo.standins.train_standin``):

* CLIP-ViT, one per image size (32 px for most arms, 64 px for BLIP-2 at 2x resolution), 4-px patches: CLIP's
  contrastive loss on SET-ONLY captions ("blue square and red circle": no number, plural or position), the image
  embedding pooled over every token (``design.CLIP_POOL``) -- the stand-in leaves the gap the paper describes;
* MAE (X-Former's), 4-px patches at 32 px: MAE's own reconstruction loss.
"""

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lavis_xformer.demo.standins import ClipStandIn, StandInRecipe, random_hflip, train_standin
from lavis_xformer.experiment.data import make_split
from lavis_xformer.experiment.design import ARMS, CLIP_POOL, HEALTH, PRETRAIN_SEED, ExperimentSize
from lavis_xformer.experiment.models import model_config
from lavis_xformer.models.xformer import IMAGENET_MEAN, IMAGENET_STD


def clip_recipe(size: ExperimentSize) -> StandInRecipe:
    return StandInRecipe(epochs=size.clip_epochs, lr=3e-3, betas=(0.9, 0.98), warmup_epochs=1.0, batch_size=64,
                         weight_decay=0.1, seed=PRETRAIN_SEED)


def mae_recipe(size: ExperimentSize) -> StandInRecipe:
    return StandInRecipe(epochs=size.mae_epochs, lr=4e-3, betas=(0.9, 0.95), warmup_epochs=1.0, seed=PRETRAIN_SEED)


def train_clip(size: ExperimentSize, image_size: int, path: Path) -> dict:
    """Pretrain the CLIP-ViT stand-in at ``image_size`` and save its state dict to ``path``; its health line."""
    from lavis_xformer.models.builders import build_bert_tokenizer, build_clip_vit

    start = time.time()
    config = model_config(ARMS[0], size, image_size=image_size)
    split = make_split(PRETRAIN_SEED, "pretrain", size)
    images = split.images(image_size)
    tokenizer = build_bert_tokenizer(config.tokenizer)
    tokens = tokenizer(split.set_captions, padding="longest", truncation=True, max_length=config.max_txt_len,
                       return_tensors="pt")
    recipe = clip_recipe(size)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    vit = build_clip_vit(replace(config, freeze_vit=False))
    clip = ClipStandIn(vit, len(tokenizer), config.embed_dim, config.qformer_max_positions, pool=CLIP_POOL).train()

    def step_loss(rows):  # set captions name no side: a flip changes no caption
        loss, accuracy = clip(random_hflip(images[rows], generator), tokens.input_ids[rows],
                              tokens.attention_mask[rows])
        return loss, accuracy.item()

    losses, accuracies = train_standin(clip, len(images), recipe, step_loss, generator, f"CLIP {image_size}px")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(clip.vit.state_dict(), path)
    chance = math.log(min(recipe.batch_size, len(images)))
    ratio = losses[-1] / chance
    return {"name": f"clip{image_size}", "file": str(path), "epoch_losses": losses, "epoch_batch_accuracy": accuracies,
            "chance_loss": chance, "health_value": ratio, "health_max": HEALTH["clip_over_chance_max"],
            "healthy": ratio <= HEALTH["clip_over_chance_max"], "seconds": round(time.time() - start, 1),
            "health": f"last epoch's contrastive loss {losses[-1]:.3f} = {ratio:.2f} x chance (ln batch)"}


def mae_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images -> MAE's input: area-averaged to ``size``, ImageNet-normalised (what ``XFormer.mae_pixels`` gives
    the frozen MAE)."""
    x = F.adaptive_avg_pool2d(pixels.float() / 255.0, size)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def train_mae(size: ExperimentSize, path: Path) -> dict:
    """Pretrain X-Former's MAE stand-in (encoder and decoder) and ``save_pretrained`` it to ``path``; its health line."""
    from lavis_xformer.models.builders import build_mae

    start = time.time()
    config = model_config(ARMS[1], size)
    pixels = mae_pixels(make_split(PRETRAIN_SEED, "pretrain", size).pixels, config.mae_image_size)
    recipe = mae_recipe(size)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    mae = build_mae(config).train()

    def step_loss(rows):
        batch = random_hflip(pixels[rows], generator)
        noise = torch.rand(len(batch), mae.vit.embeddings.num_patches, generator=generator)
        return mae(pixel_values=batch, noise=noise).loss, None

    losses, _ = train_standin(mae, len(pixels), recipe, step_loss, generator, "MAE")
    mae.eval().save_pretrained(str(path))
    mean_colour = F.mse_loss(pixels, pixels.mean(dim=(0, 2, 3), keepdim=True).expand_as(pixels)).item()
    ratio = losses[-1] / mean_colour
    return {"name": "mae", "file": str(path), "epoch_losses": losses, "mean_colour_loss": mean_colour,
            "health_value": ratio, "health_max": HEALTH["mae_over_mean_colour_max"],
            "healthy": ratio <= HEALTH["mae_over_mean_colour_max"], "seconds": round(time.time() - start, 1),
            "health": f"last epoch's reconstruction loss {losses[-1]:.3f} = {ratio:.2f} x the mean colour's"}
