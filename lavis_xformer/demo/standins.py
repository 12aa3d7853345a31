"""The demo's stand-ins for the frozen encoders' hub weights, each pretrained once on the shapes training split and
then frozen in every run of every seed, as hub weights would be:

* the CLIP-ViT (both models): CLIP's contrastive objective on the training images and captions, with a tiny BERT
  text tower built for the purpose and discarded afterwards;
* the MAE (X-Former): MAE's own objective on the training images;
* the OPT (both models): a text LM on the training captions and question-answer pairs.

The MAE and the OPT are saved with ``save_pretrained`` (a folder), the CLIP-ViT as a state dict (``vit_weights``)."""

import contextlib
import hashlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Tuple

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
    """What the runs load (a previous demo's replaced): ``<out>/pretrained/<name>`` with ``save_pretrained`` for a
    transformers model, ``<out>/pretrained/<name>.pth`` (the state dict) for any other module."""
    model = model.eval().to("cpu")
    if not hasattr(model, "save_pretrained"):
        path = settings.out_dir / "pretrained" / f"{name}.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        return path
    folder = settings.out_dir / "pretrained" / name
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(str(folder))
    return folder


def sha256_of(path: Path) -> str:
    """The stand-in's fingerprint (a file, or every file of a folder in name order): what the report records."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


def xformer_config(settings: DemoSettings, stage, config_class):
    """A stage's LAVIS config for X-Former (without stand-ins) and its typed model config: the sizes a stand-in
    is built with."""
    from omegaconf import OmegaConf

    cfg = settings.lavis_config(stage, MODELS[0], standins=False)
    return cfg, config_class.from_lavis_cfg(OmegaConf.to_container(cfg.model_cfg, resolve=True))


def training_images(cfg, folder: Path) -> Tuple[torch.Tensor, List[dict]]:
    """Every training image as the models are given it (the eval processor's resize and CLIP normalisation), and
    the scenes they show, in the order of ``scenes_train``."""
    from lavis.common.registry import registry
    from PIL import Image

    from lavis_xformer.datasets import shapes

    processor_cfg = next(iter(cfg.datasets_cfg.values())).vis_processor.eval
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    scenes = shapes.read_annotation(folder, "scenes_train")
    images = torch.stack([processor(Image.open(folder / "images" / s["image"]).convert("RGB")) for s in scenes])
    return images, scenes


def random_hflip(batch: torch.Tensor, generator) -> torch.Tensor:
    """Each image flipped left-right with probability 1/2 (no caption or question of the shapes data says left or
    right, so the flip changes no text)."""
    flip = torch.rand(len(batch), generator=generator).to(batch.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)


def train_standin(module, num_samples: int, recipe: StandInRecipe, step_loss: Callable, generator, name: str,
                  console: Optional[Console] = None, every: int = 10) -> Tuple[List[float], List[float]]:
    """The one pretraining loop of every stand-in: AdamW with ``recipe``'s warm-up and cosine schedule, ``epochs``
    shuffled passes (``generator``) over ``num_samples`` samples in batches of ``batch_size`` row indices.

    ``step_loss(rows)`` returns (loss, a side metric or None) for the rows of one batch. Returns the per-epoch
    sample-weighted means of the loss and of the side metric (empty when there is none)."""
    optimizer, schedule = recipe.optimizer_and_schedule([p for p in module.parameters() if p.requires_grad],
                                                        num_samples)
    losses, metrics = [], []
    for epoch in range(recipe.epochs):
        order, epoch_loss, epoch_metric = torch.randperm(num_samples, generator=generator), 0.0, 0.0
        for first in range(0, num_samples, recipe.batch_size):
            rows = order[first : first + recipe.batch_size]
            loss, metric = step_loss(rows)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item() * len(rows)
            epoch_metric += (metric if metric is not None else 0.0) * len(rows)
        losses.append(epoch_loss / num_samples)
        if metric is not None:
            metrics.append(epoch_metric / num_samples)
        if console is not None and (epoch == 0 or (epoch + 1) % every == 0 or epoch + 1 == recipe.epochs):
            extra = f"  side metric {metrics[-1]:.2f}" if metrics else ""
            console.say(f"{name}: epoch {epoch + 1}/{recipe.epochs}  loss {losses[-1]:.4f}{extra}")
    return losses, metrics


# ================================================================================================================
# The frozen CLIP-ViT (both models)
# ================================================================================================================
# Measured (2048 images): the loss leaves chance level (ln 64 = 4.16) after ~10 epochs and ends near 1.45, 40% in-batch
# image->text accuracy (many captions repeat within a batch); about 35 s of one CPU core.
CLIP_STANDIN = StandInRecipe(epochs=40, lr=3e-3, betas=(0.9, 0.98), warmup_epochs=1.0, batch_size=64, weight_decay=0.1)
SMOKE_CLIP = replace(CLIP_STANDIN, epochs=2)
CLIP_TEXT_TOWER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


class ClipStandIn(torch.nn.Module):
    """CLIP (Radford et al. 2021) at the demo's size: the config's EVA ViT as the image tower (kept), a tiny BERT
    on the project's local vocabulary as the text tower (discarded after pretraining), linear projections to a
    shared space and a learnable temperature; the loss is CLIP's symmetric cross-entropy over the batch.

    ``pool="mean"`` (the demo's): the image embedding pools every ViT output token, so that the objective shapes
    all of them (with two blocks the last block's patch outputs would otherwise get no gradient at all);
    ``pool="cls"`` (the experiment's): the class token alone, as CLIP pools.
    """

    def __init__(self, vit, vocab_size: int, embed_dim: int, max_positions: int, pool: str = "mean"):
        from transformers import BertConfig, BertModel

        if pool not in ("mean", "cls"):
            raise ValueError(f"pool={pool!r}: choose 'mean' (every token) or 'cls' (the class token, as CLIP)")
        super().__init__()
        self.vit, self.pool = vit, pool
        self.image_norm = torch.nn.LayerNorm(vit.num_features)
        self.image_proj = torch.nn.Linear(vit.num_features, embed_dim, bias=False)
        text = BertConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, **CLIP_TEXT_TOWER)
        self.text = BertModel(text, add_pooling_layer=False)
        self.text_proj = torch.nn.Linear(text.hidden_size, embed_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def forward(self, images, input_ids, attention_mask):
        import torch.nn.functional as F

        tokens = self.vit(images)  # [B, 1 + patches, width], the class token first
        pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(dim=1)
        image = F.normalize(self.image_proj(self.image_norm(pooled)), dim=-1)
        text = F.normalize(self.text_proj(self.text(input_ids, attention_mask).last_hidden_state[:, 0]), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * image @ text.t()
        labels = torch.arange(len(images), device=images.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        accuracy = (logits.argmax(dim=1) == labels).float().mean()  # image -> text, within the batch
        return loss, accuracy


def pretrain_clip(settings: DemoSettings, console: Console) -> Optional[dict]:
    """Train the stand-in CLIP-ViT (``CLIP_STANDIN``) and point ``settings.clip_weights`` at it; None when the
    config already names CLIP weights (``vit_weights``).

    Both models' frozen CLIP-ViT is EVA-CLIP at paper scale. The ``tiny`` types' is random, which would leave the
    comparison unfair (X-Former's MAE pretrained, BLIP-2's only image encoder random) and give both Q-Formers
    nothing but random features of the image. So the demo pretrains the tiny ViT as CLIP was pretrained, on the
    training images and their captions, saves its state dict and passes it to every run of both models as
    ``model.vit_weights``: one file, frozen in every stage and seed, the same for both models.
    """

    from lavis_xformer.datasets import shapes
    from lavis_xformer.models.builders import build_bert_tokenizer, build_clip_vit
    from lavis_xformer.models.config import XFormerConfig

    cfg, typed = xformer_config(settings, STAGES[0], XFormerConfig)
    if typed.vit_weights is not None:
        return None
    recipe = SMOKE_CLIP if settings.smoke else CLIP_STANDIN
    start = time.time()
    folder = data_folder(cfg)
    images, scenes = training_images(cfg, folder)
    caption_of = {entry["image"]: entry["caption"] for entry in shapes.read_annotation(folder, "caption_train")}
    texts = [caption_of[scene["image"]] for scene in scenes]
    tokenizer = build_bert_tokenizer(typed.tokenizer)
    tokens = tokenizer(texts, padding="longest", truncation=True, max_length=typed.max_txt_len, return_tensors="pt")
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    device = torch.device(settings.run_device)
    vit = build_clip_vit(replace(typed, freeze_vit=False))  # the random stand-in of this config, trained from here
    clip = ClipStandIn(vit, len(tokenizer), typed.embed_dim, typed.qformer_max_positions).to(device).train()
    with one_thread_on_cpu(device):
        losses, accuracies = _train_clip(clip, images, tokens, recipe, generator, device, console)
    settings.clip_weights = path = save_standin(clip.vit, settings, "clip_vit")
    digest = sha256_of(path)
    batch = min(recipe.batch_size, len(images))
    chance = math.log(batch)
    console.say(f"CLIP-ViT stand-in saved to {path} (sha256 {digest[:12]}, {time.time() - start:.0f}s; chance-level "
                f"loss ln {batch} = {chance:.3f}); both models' runs get model.vit_weights={path}")
    return {"recipe": asdict(recipe), "epoch_losses": losses, "epoch_batch_accuracy": accuracies,
            "chance_loss": chance, "file": str(path), "sha256": digest, "seconds": round(time.time() - start, 1)}


def _train_clip(clip, images, tokens, recipe: StandInRecipe, generator, device, console):
    def step_loss(rows):
        batch = random_hflip(images[rows], generator).to(device)
        loss, accuracy = clip(batch, tokens.input_ids[rows].to(device), tokens.attention_mask[rows].to(device))
        return loss, accuracy.item()

    return train_standin(clip, len(images), recipe, step_loss, generator, "CLIP-ViT stand-in (contrastive loss, "
                         "in-batch image->text accuracy)", console)


# ================================================================================================================
# X-Former's frozen MAE
# ================================================================================================================
# With 8-pixel patches on 32-pixel images a masked patch often holds a whole shape that no visible patch shows:
# 30 epochs then only learn the background (0.389 vs 0.399 for the mean colour). The demo yamls give X-Former's
# MAE 4-pixel patches (mae_patch_size: 4), where masked parts of a shape have visible neighbours; 80 epochs at
# 4e-3 reach 0.235 (measured), reconstructing the shapes. About 80 s of one CPU core.
MAE_STANDIN = StandInRecipe(epochs=80, lr=4e-3, betas=(0.9, 0.95), warmup_epochs=1.0)
SMOKE_MAE = replace(MAE_STANDIN, epochs=2)


def mae_training_images(cfg, folder: Path) -> torch.Tensor:
    """Every training image as the X-Former's MAE sees it: what the model is given (``training_images``), then
    ``mae_pixels``' re-normalisation to ImageNet's statistics."""
    from lavis_xformer.models.xformer import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    images, _ = training_images(cfg, folder)

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

    from lavis_xformer.models.builders import build_mae
    from lavis_xformer.models.config import XFormerConfig

    cfg, typed = xformer_config(settings, STAGES[0], XFormerConfig)
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
    def step_loss(rows):
        batch = random_hflip(pixels[rows], generator).to(device)  # MAE's only augmentation here
        noise = torch.rand(len(batch), mae.vit.embeddings.num_patches, generator=generator).to(device)
        return mae(pixel_values=batch, noise=noise).loss, None  # mask_ratio of the config

    return train_standin(mae, len(pixels), recipe, step_loss, generator, "MAE stand-in (reconstruction loss)",
                         console, every=5)[0]


# ================================================================================================================
# The frozen OPT (both models)
# ================================================================================================================
# A visual prefix sits before the OPT's BOS token ([prefix | </s> prompt ...], as in LAVIS's Blip2OPT). An LM that only
# ever saw text starting at its BOS never learns to read anything placed there: with the first recipe (3 epochs of
# plain text, the caption after the BOS) the caption's own token embeddings put in the prefix slot lowered the answer
# loss by 1% (0.317 -> 0.313), a free per-question prefix optimised for 200 steps reached only 0.186, and VQA
# fine-tuning of both models stayed at the answer prior (real and shuffled images gave the same loss). Trained on
# documents whose context (the caption) comes BEFORE the BOS, the LM learns to read that slot, late and gradually:
# its answer loss with the caption as context (``answer_losses``, 1024 questions; 0.320 without) was 0.303 after 10
# epochs, 0.294 after 25, 0.253 after 40 (seed 0; seed 1: 0.285 after 25); a free prefix optimised per question
# reached 0.023 through a trial stand-in of 0.265, where the first recipe's stalled at 0.186. 40 epochs: about
# 2.5 min of one CPU core.
LLM_STANDIN = StandInRecipe(epochs=40, lr=3e-3, betas=(0.9, 0.98), warmup_epochs=0.5)
SMOKE_LLM = replace(LLM_STANDIN, epochs=1)
CONTEXT_DROPOUT = 0.2  #: share of documents shown without their context: the LM also answers from its prior


@dataclass(frozen=True)
class ContextDocument:
    """One document of the stand-in OPT, laid out ``[context | </s> | prompt | text]``: ``context`` (a caption) sits
    before the BOS token, where the visual prefix will be; the LM loss is taken on ``text`` alone."""

    context: str
    text: str
    prompt: str = ""


def llm_training_documents(folder: Path) -> List[ContextDocument]:
    """The stand-in OPT's corpus from the training split, through the runs' own text processors: each image's
    caption as the context of (a) the caption itself (what stage 2 asks of a visual prefix) and (b) each of its
    questions answered in the evaluation's format, ``Question: q Short answer: a``."""
    from lavis.common.registry import registry

    from lavis_xformer.datasets import shapes

    caption = registry.get_processor_class("blip_caption").from_config(None)
    question = registry.get_processor_class("blip_question").from_config(None)
    captions = {int(str(a["image_id"]).split("_")[-1]): caption(a["caption"])
                for a in shapes.read_annotation(folder, "caption_train")}
    documents = [ContextDocument(text, f"{text}\n") for text in captions.values()]
    for qa in shapes.read_annotation(folder, "vqa_train"):
        answer = f"Question: {question(qa['question'])} Short answer: {qa['answer'][0]}\n"
        documents.append(ContextDocument(captions[qa["image_id"]], answer))
    return documents


def pretrain_llm(settings: DemoSettings, console: Console) -> Optional[dict]:
    """Train the stand-in OPT (``LLM_STANDIN``) and point ``settings.opt_weights`` at it; None when the stage-2
    config already names an OPT checkpoint (``opt_model``).

    A random frozen OPT (the ``tiny`` types') gives a near-flat next-token distribution that no visual prefix can
    steer. The paper's frozen LLMs know language and read whatever their context holds; here the tiny OPT learns
    the shapes domain's language from documents whose context (a caption) precedes the BOS token -- the slot the
    visual prefix takes -- followed by the caption again or a question about it answered in the evaluation's
    format (``llm_training_documents``; ``CONTEXT_DROPOUT`` of them without the context). It is saved with
    ``save_pretrained`` and handed to both models' stage-2 and VQA runs as ``model.opt_model``, where it stays
    frozen. It never sees an image: what a test image shows reaches it only through each model's visual prefix.
    """

    from lavis_xformer.models.config_llm import XFormerOPTConfig
    from lavis_xformer.models.llm_builders import build_opt

    cfg, typed = xformer_config(settings, STAGES[2], XFormerOPTConfig)
    if typed.opt_model is not None:
        return None
    recipe = SMOKE_LLM if settings.smoke else LLM_STANDIN
    start = time.time()
    documents = llm_training_documents(data_folder(cfg))
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    tokenizer, opt = build_opt(typed)  # the random stand-in of this config, trained from here
    device = torch.device(settings.run_device)
    with one_thread_on_cpu(device):
        losses = train_context_lm(opt, tokenizer, documents, recipe, generator, device, typed.max_txt_len, console)
        reads_context = answer_losses(opt, tokenizer, documents, device, typed.max_txt_len)
    settings.opt_weights = folder = save_standin(opt, settings, "opt")
    console.say(f"OPT stand-in saved to {folder} ({len(documents)} documents, {time.time() - start:.0f}s; answer loss "
                f"with the caption as context {reads_context['with_context']:.3f}, without "
                f"{reads_context['without_context']:.3f}); stage 2 and VQA runs get model.opt_model={folder}")
    return {"recipe": asdict(recipe), "context_dropout": CONTEXT_DROPOUT, "epoch_losses": losses,
            "answer_loss": reads_context, "num_documents": len(documents), "folder": str(folder),
            "seconds": round(time.time() - start, 1)}


def context_lm_batch(tokenizer, documents: List[ContextDocument], max_length: int, drop_context=None):
    """``[context | </s> | prompt | text | padding]`` per document (right-padded), the labels on ``text`` alone;
    ``drop_context[i]``: document i without its context."""

    def ids(text: str) -> List[int]:
        return tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length).input_ids if text else []

    rows = []
    for i, document in enumerate(documents):
        context = [] if drop_context is not None and drop_context[i] else ids(document.context)
        rows.append((context + [tokenizer.bos_token_id] + ids(document.prompt), ids(document.text)))
    width = max(len(head) + len(text) for head, text in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (head, text) in enumerate(rows):
        end = len(head) + len(text)
        input_ids[row, :end] = torch.tensor(head + text)
        attention_mask[row, :end] = 1
        labels[row, len(head) : end] = torch.tensor(text)
    return input_ids, attention_mask, labels


def train_context_lm(opt, tokenizer, documents: List[ContextDocument], recipe: StandInRecipe, generator, device,
                     max_length: int, console: Optional[Console] = None) -> List[float]:
    """Train ``opt`` (every weight) on ``documents`` (``context_lm_batch``, ``CONTEXT_DROPOUT`` of them without
    context), then freeze it; returns the per-epoch mean losses."""
    opt = opt.to(device).train().requires_grad_(True)

    def step_loss(rows):
        rows = rows.tolist()
        drop = (torch.rand(len(rows), generator=generator) < CONTEXT_DROPOUT).tolist()
        batch = context_lm_batch(tokenizer, [documents[i] for i in rows], max_length, drop)
        input_ids, attention_mask, labels = (tensor.to(device) for tensor in batch)
        return opt(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss, None

    losses, _ = train_standin(opt, len(documents), recipe, step_loss, generator, "OPT stand-in (LM loss)", console,
                              every=5)
    opt.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def answer_losses(opt, tokenizer, documents: List[ContextDocument], device, max_length: int,
                  num_questions: int = 256) -> dict:
    """Whether the stand-in reads its context: its mean loss on the answers (``text``) of the first
    ``num_questions`` question documents, the question being the prompt, with the caption before the BOS and
    without it."""
    answered = [d.text.rsplit(" Short answer:", 1) for d in documents if d.text.startswith("Question:")]
    contexts = [d.context for d in documents if d.text.startswith("Question:")]
    probes = [ContextDocument(context, answer, prompt=f"{question} Short answer:")
              for context, (question, answer) in list(zip(contexts, answered))[:num_questions]]

    def loss(drop: bool) -> float:
        batch = context_lm_batch(tokenizer, probes, max_length, [drop] * len(probes))
        input_ids, attention_mask, labels = (tensor.to(device) for tensor in batch)
        return opt(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.item()

    return {"with_context": round(loss(False), 4), "without_context": round(loss(True), 4)}
