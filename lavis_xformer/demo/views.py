"""The demo's figures and its views of a trained model: loss curves, MAE reconstructions, query diversity
(split from ``demo.report``, which re-exports these names)."""

import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

from lavis_xformer.analysis import figures
from lavis_xformer.demo.pipeline import (
    MODELS,
    STAGES,
    DemoModel,
    DemoSettings,
    data_folder,
    epoch_stats,
    last_checkpoint,
    model_section,
)
from lavis_xformer.common.meta import build_without_checkpoints
from lavis_xformer.runners.logs import read_iteration_log


# ================================================================================================================
# Figures
# ================================================================================================================
def training_curve(job_dir: Path) -> List[dict]:
    """A run's losses over training: the per-iteration lines of its log (``runners/logs.py``, every ``log_freq``
    iterations), or LAVIS's per-epoch averages for a log written without them."""
    return read_iteration_log(job_dir) or epoch_stats(job_dir)


def loss_curves(epochs: Dict[int, Dict[str, Dict[str, List[dict]]]], path: Path) -> Path:
    """``loss_curves.png``: every seed's losses (``training_curve``) of each model's trained stages."""
    series = {f"{model.key}/{seed}": per_model[model.key] for seed, per_model in epochs.items() for model in MODELS}
    labels = {f"{model.key}/{seed}": f"{model.label} s{seed}" for seed in epochs for model in MODELS}
    return figures.loss_curves_png(series, labels, path)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """[B, h*w, p*p*C] (MAE's layout: row-major patches, channels last) -> [B, C, h*p, w*p]; the inverse of
    ``XFormerImageMixin.patchify`` for square images."""
    batch, num_patches, dim = patches.shape
    side = int(round(math.sqrt(num_patches)))
    if side * side != num_patches or dim != patch_size * patch_size * channels:
        raise ValueError(f"cannot unpatchify {tuple(patches.shape)} with patch size {patch_size} and {channels} "
                         "channels (need a square number of patches of p*p*C values)")
    x = patches.reshape(batch, side, side, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, channels, side * patch_size, side * patch_size)


@torch.no_grad()
def reconstruct(model, image: torch.Tensor, mask_ratio: float = 0.5, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Original, masked input and reconstructions in [0, 1] ([B, 3, H, W] each) from a stage-1 X-Former: the MAE
    masks ``mask_ratio`` of the patches (a fixed draw, ``seed``), the dual block turns (Z_q, M) into M', and the
    frozen MAE decoder predicts every patch from M'."""
    model.eval()
    num_patches = model.mae_encoder.embeddings.num_patches
    noise = torch.rand(image.shape[0], num_patches, generator=torch.Generator().manual_seed(seed)).to(image.device)
    path = model.encode(image, mask_ratio, noise)
    mae = path.mae
    predicted = model.forward_decoder(path.mae_enriched, mae.ids_restore)  # [B, L, p*p*3], MAE-normalised pixels
    target = model.patchify(mae.pixels)
    if model.config.norm_pix_loss:  # predictions are per-patch normalised: use the target's statistics to show them
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        predicted = predicted * (var + 1.0e-6) ** 0.5 + mean
    p = model.config.mae_patch_size
    mask = mae.mask.unsqueeze(-1)  # [B, L, 1], 1 = masked
    pasted = predicted * mask + target * (1 - mask)  # the visible patches as they were

    def to_unit(pixels):  # undo MAE's normalisation
        return (pixels * model._mae_std + model._mae_mean).clamp(0, 1)

    original = to_unit(mae.pixels)
    masked_pixels = unpatchify(mask.expand_as(target), p)[:, :1].bool()  # [B, 1, H, W]
    return {
        "original": original,
        "masked": torch.where(masked_pixels, torch.full_like(original, 0.5), original),
        "reconstruction": to_unit(unpatchify(predicted, p)),
        "reconstruction_visible": to_unit(unpatchify(pasted, p)),
        "loss": model.reconstruction_loss(mae.pixels, predicted, mae.mask),
    }


def load_test_images(cfg, folder: Path, count: int) -> torch.Tensor:
    """The first ``count`` test images through the config's eval image processor."""
    from lavis.common.registry import registry
    from PIL import Image

    from lavis_xformer.datasets import shapes

    processor_cfg = next(iter(cfg.datasets_cfg.values())).vis_processor.eval
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    scenes = shapes.read_annotation(folder, "scenes_test")[:count]
    return torch.stack([processor(Image.open(folder / "images" / s["image"]).convert("RGB")) for s in scenes])


def trained_stage1_model(settings: DemoSettings, model: DemoModel, checkpoint: Path):
    """A trained stage-1 model: its config with the same frozen stand-in encoders as in training, then its
    checkpoint (every key must fit), in eval mode on the run device."""
    from lavis_xformer.checkpoints import load_model_weights

    network = build_without_checkpoints(**model_section(settings.lavis_config(STAGES[0], model)))
    load_model_weights(network, str(checkpoint), strict_unexpected=True)
    return network.to(settings.run_device).eval()


def query_diversity_by_seed(settings: DemoSettings, results) -> Dict[int, Dict[str, float]]:
    """Supplement section 6's query diversity (``analysis.query_diversity.measure_image_text``: each image's
    queries against the queries of its image-text pass, the text-marginalised scores' spread) of every seed's
    stage-1 model, over the test split's image-caption pairs (every caption of an image makes a pair):
    ``{seed: {model key: diversity}}``."""
    from lavis_xformer.analysis import query_diversity
    from lavis_xformer.datasets import shapes

    cfg = settings.lavis_config(STAGES[0], MODELS[0])
    folder = data_folder(cfg)
    annotations = shapes.read_annotation(folder, "caption_test")
    images = load_test_images(cfg, folder, len(annotations))
    text = registry_processor("blip_caption")
    pairs = [(images[i : i + 1].expand(len(a["caption"]), -1, -1, -1), [text(c) for c in a["caption"]])
             for i, a in enumerate(annotations)]
    diversity = {}
    for seed, runs in results.items():
        diversity[seed] = {}
        for model in MODELS:
            network = trained_stage1_model(settings, model, last_checkpoint(runs[model.key]["stage1"].job_dir))
            measured = query_diversity.measure_image_text(network, pairs, model.label, settings.run_device)
            diversity[seed][model.key] = measured.diversity
    return diversity


def registry_processor(name: str):
    """A LAVIS text processor with its default settings (what the runs' yamls name)."""
    from lavis.common.registry import registry

    return registry.get_processor_class(name).from_config(None)


def make_reconstruction_grid(settings: DemoSettings, checkpoint: Path, path: Path) -> Optional[Path]:
    """Load the trained stage-1 X-Former (the same frozen stand-in encoders as in training, then its checkpoint)
    and draw ``reconstructions.png`` for the first test images."""
    cfg = settings.lavis_config(STAGES[0], MODELS[0])
    model = trained_stage1_model(settings, MODELS[0], checkpoint)
    if getattr(model, "mae_decoder", None) is None:
        return None  # a variant without the reconstruction branch: nothing to draw
    images = load_test_images(cfg, data_folder(cfg), settings.grid_images)
    views = reconstruct(model, images.to(settings.run_device), mask_ratio=0.5, seed=0)
    title = (f"X-Former stage 1 ({checkpoint.name}): MAE mask ratio 0.5, fixed draw; "
             f"reconstruction loss on these images {views['loss'].item():.3f}")
    return figures.reconstruction_grid_png(views, path, title)
