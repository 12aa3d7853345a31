"""The demo's stand-ins for the frozen encoders' hub weights: a tiny MAE pretrained with MAE's objective on the
training images (X-Former's frozen MAE) and a tiny OPT pretrained as a text LM on the training captions and
question-answer pairs (both models' frozen LLM). Each is saved with ``save_pretrained`` and handed to the runs."""

import contextlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from lavis_xformer.demo.pipeline import MODELS, STAGES, Console, DemoError, DemoSettings, data_folder


@dataclass(frozen=True)
class StandInRecipe:
    """How a stand-in is pretrained: AdamW, a linear warm-up, then a cosine decay to 0 over every step."""

    epochs: int  #: passes over the training split
    lr: float  #: peak learning rate
    betas: Tuple[float, float]  #: AdamW's
    warmup_epochs: float  #: length of the linear warm-up, in epochs (at least one step)
    batch_size: int = 64
    weight_decay: float = 0.05
    seed: int = 0  #: model initialisation, shuffling, flips and masks

    def optimizer_and_schedule(self, parameters, num_samples: int):
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        steps_per_epoch = math.ceil(num_samples / self.batch_size)
        total, warmup = self.epochs * steps_per_epoch, max(1, int(steps_per_epoch * self.warmup_epochs))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)),
        )
        return optimizer, schedule


@contextlib.contextmanager
def one_thread_on_cpu(device: torch.device):
    """A stand-in this small trains fastest on one CPU thread (and a busy machine ruins two)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_standin(model, settings: DemoSettings, name: str) -> Path:
    """``<out>/pretrained/<name>`` with ``save_pretrained`` (a previous demo's folder replaced): what the runs load."""
    folder = settings.out_dir / "pretrained" / name
    if folder.exists():
        shutil.rmtree(folder)
    model.eval().to("cpu").save_pretrained(str(folder))
    return folder


# ================================================================================================================
# X-Former's frozen MAE
# ================================================================================================================
MAE_STANDIN = StandInRecipe(epochs=30, lr=2e-3, betas=(0.9, 0.95), warmup_epochs=1.0)
SMOKE_MAE = replace(MAE_STANDIN, epochs=2)


def mae_training_images(cfg, folder: Path) -> torch.Tensor:
    """Every training image as the X-Former's MAE sees it: the eval processor's resize and CLIP normalisation
    (what the model is given), then ``mae_pixels``' re-normalisation to ImageNet's statistics."""
    from lavis.common.registry import registry
    from PIL import Image

    from lavis_xformer.datasets import shapes
    from lavis_xformer.models.xformer import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    processor_cfg = next(iter(cfg.datasets_cfg.values())).vis_processor.eval
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    scenes = shapes.read_annotation(folder, "scenes_train")
    images = torch.stack([processor(Image.open(folder / "images" / s["image"]).convert("RGB")) for s in scenes])

    def stats(values):
        return torch.tensor(values).view(1, 3, 1, 1)

    raw = images * stats(CLIP_STD) + stats(CLIP_MEAN)
    return (raw - stats(IMAGENET_MEAN)) / stats(IMAGENET_STD)


def pretrain_mae(settings: DemoSettings, console: Console) -> Optional[dict]:
    """Train the stand-in MAE (``MAE_STANDIN``) and point ``settings.mae_weights`` at it; None when the config
    already names MAE weights or the model has no MAE to reconstruct with.

    X-Former's frozen MAE is a pretrained one (``facebook/vit-mae-huge`` at paper scale). The ``tiny`` types build a
    random MAE instead, and a random frozen decoder reconstructs nothing, whatever M' it is given. So the demo first
    trains the tiny MAE (encoder and decoder, transformers' ``ViTMAEForPreTraining`` and its own loss) on the shapes
    training images, saves it with ``save_pretrained`` and passes that folder to every X-Former run as
    ``model.mae_weights``, where it is frozen as the hub MAE would be. BLIP-2 has no MAE. A config that names real
    MAE weights (``mae_weights``) is used as it is.
    """
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from lavis_xformer.models.builders import build_mae
    from lavis_xformer.models.config import XFormerConfig

    cfg = settings.lavis_config(STAGES[0], MODELS[0], standins=False)
    typed = XFormerConfig.from_lavis_cfg(OmegaConf.to_container(cfg.model_cfg, resolve=True))
    if typed.mae_weights or not typed.use_mae or typed.mae_source != "mae":
        return None
    recipe = SMOKE_MAE if settings.smoke else MAE_STANDIN
    if typed.mae_image_size != typed.image_size:
        raise DemoError("the MAE stand-in is trained at the model's image size; set mae_image_size = image_size")
    start = time.time()
    pixels = mae_training_images(cfg, data_folder(cfg))
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    device = torch.device(settings.run_device)
    with one_thread_on_cpu(device):
        mae = build_mae(typed).to(device).train()  # the random stand-in of this config, trained from here
        losses = _train_mae(mae, pixels, recipe, generator, device, console)
    settings.mae_weights = folder = save_standin(mae, settings, "mae")
    baseline = F.mse_loss(pixels, pixels.mean(dim=(0, 2, 3), keepdim=True).expand_as(pixels)).item()
    console.say(f"MAE stand-in saved to {folder} ({time.time() - start:.0f}s; the dataset's mean colour everywhere "
                f"would score {baseline:.4f}); X-Former runs get model.mae_weights={folder}")
    return {"recipe": asdict(recipe), "epoch_losses": losses, "mean_colour_loss": baseline,
            "folder": str(folder), "seconds": round(time.time() - start, 1)}


def _train_mae(mae, pixels, recipe: StandInRecipe, generator, device, console) -> List[float]:
    optimizer, schedule = recipe.optimizer_and_schedule(mae.parameters(), len(pixels))
    losses = []
    for epoch in range(recipe.epochs):
        order, epoch_loss = torch.randperm(len(pixels), generator=generator), 0.0
        for first in range(0, len(pixels), recipe.batch_size):
            batch = pixels[order[first : first + recipe.batch_size]].to(device)
            flip = torch.rand(len(batch), generator=generator).to(device) < 0.5  # MAE's only augmentation here
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            noise = torch.rand(len(batch), mae.vit.embeddings.num_patches, generator=generator).to(device)
            loss = mae(pixel_values=batch, noise=noise).loss  # mask_ratio of the stage-1 config
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item() * len(batch)
        losses.append(epoch_loss / len(pixels))
        if epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == recipe.epochs:
            console.say(f"MAE stand-in: epoch {epoch + 1}/{recipe.epochs}  reconstruction loss {losses[-1]:.4f}")
    return losses


# ================================================================================================================
# The frozen OPT (both models)
# ================================================================================================================
LLM_STANDIN = StandInRecipe(epochs=3, lr=3e-3, betas=(0.9, 0.98), warmup_epochs=0.5)
SMOKE_LLM = replace(LLM_STANDIN, epochs=1)


def llm_training_texts(cfg, folder: Path) -> List[str]:
    """The stand-in OPT's corpus from the training split, through the runs' own text processors."""
    from lavis.common.registry import registry

    from lavis_xformer.datasets import shapes

    caption = registry.get_processor_class("blip_caption").from_config(None)
    question = registry.get_processor_class("blip_question").from_config(None)
    captions = {int(str(a["image_id"]).split("_")[-1]): caption(a["caption"])
                for a in shapes.read_annotation(folder, "caption_train")}
    texts = [f"{text}\n" for text in captions.values()]
    for qa in shapes.read_annotation(folder, "vqa_train"):
        pair = f"Question: {question(qa['question'])} Short answer: {qa['answer'][0]}\n"
        texts += [f"{captions[qa['image_id']]}\n{pair}", pair]
    return texts


def pretrain_llm(settings: DemoSettings, console: Console) -> Optional[dict]:
    """Train the stand-in OPT (``LLM_STANDIN``) and point ``settings.opt_weights`` at it; None when the stage-2
    config already names an OPT checkpoint (``opt_model``).

    A random frozen OPT (the ``tiny`` types') gives a near-flat next-token distribution that no visual prefix can
    steer: stage 2 cannot lower its loss and zero-shot VQA answers nothing. The paper's frozen LLMs know language;
    here the tiny OPT first learns the shapes domain's language as a plain text LM (no image): the training
    split's captions, and its questions answered from the caption in the evaluation's format
    (``caption\nQuestion: q Short answer: a``, and without the caption). It is saved with ``save_pretrained``
    and handed to both models' stage-2 and VQA runs as ``model.opt_model``, where it stays frozen. What it cannot
    know is the test image: answering from the image is left to each model's visual prefix.
    """
    from omegaconf import OmegaConf

    from lavis_xformer.models.config_llm import XFormerOPTConfig
    from lavis_xformer.models.llm_builders import build_opt

    cfg = settings.lavis_config(STAGES[2], MODELS[0], standins=False)
    typed = XFormerOPTConfig.from_lavis_cfg(OmegaConf.to_container(cfg.model_cfg, resolve=True))
    if typed.opt_model is not None:
        return None
    recipe = SMOKE_LLM if settings.smoke else LLM_STANDIN
    start = time.time()
    texts = llm_training_texts(cfg, data_folder(cfg))
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    tokenizer, opt = build_opt(typed)  # the random stand-in of this config, trained from here
    device = torch.device(settings.run_device)
    opt = opt.to(device).train()
    for param in opt.parameters():
        param.requires_grad_(True)
    with one_thread_on_cpu(device):
        losses = _train_llm(opt, tokenizer, texts, recipe, generator, device, console, typed.max_txt_len * 2)
    settings.opt_weights = folder = save_standin(opt, settings, "opt")
    console.say(f"OPT stand-in saved to {folder} ({len(texts)} texts, {time.time() - start:.0f}s); stage 2 and VQA "
                f"runs get model.opt_model={folder}")
    return {"recipe": asdict(recipe), "epoch_losses": losses, "num_texts": len(texts), "folder": str(folder),
            "seconds": round(time.time() - start, 1)}


def _train_llm(opt, tokenizer, texts, recipe: StandInRecipe, generator, device, console, max_length: int) -> List[float]:
    optimizer, schedule = recipe.optimizer_and_schedule(opt.parameters(), len(texts))
    tokenizer.padding_side = "right"
    losses = []
    for epoch in range(recipe.epochs):
        order, epoch_loss, seen = torch.randperm(len(texts), generator=generator), 0.0, 0
        for first in range(0, len(texts), recipe.batch_size):
            batch = [texts[i] for i in order[first : first + recipe.batch_size].tolist()]
            tokens = tokenizer(batch, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
            tokens = tokens.to(device)
            labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
            loss = opt(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss, seen = epoch_loss + loss.item() * len(batch), seen + len(batch)
        losses.append(epoch_loss / seen)
        console.say(f"OPT stand-in: epoch {epoch + 1}/{recipe.epochs}  LM loss {losses[-1]:.4f}")
    return losses
