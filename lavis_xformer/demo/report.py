"""The demo's report: parameter counts, the side-by-side table (printed and Markdown) read from LAVIS's output
folders, example answers, and the figures (loss curves, MAE reconstructions; drawn by ``analysis.figures``)."""

import json
import math
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from lavis_xformer.analysis import figures
from lavis_xformer.demo.pipeline import (
    ANSWER_TYPE_OF,
    MODELS,
    STAGES,
    Console,
    DemoSettings,
    RunResult,
    data_folder,
    epoch_stats,
    eval_metrics,
    last_checkpoint,
)
from lavis_xformer.common.meta import build_on_meta, build_without_checkpoints, count_parameters

# The table: (key, label, format). Formats: "params", "loss", "recall", "acc".
METRICS = (
    ("params_stage1_trainable", "params, stage 1 trainable", "params"),
    ("params_stage1_total", "params, stage 1 total", "params"),
    ("stage1_loss", "stage 1 final loss (sum of the terms)", "loss"),
    ("stage1_loss_itc", "  ITC", "loss"),
    ("stage1_loss_itm", "  ITM", "loss"),
    ("stage1_loss_lm", "  ITG", "loss"),
    ("stage1_loss_rec", "  reconstruction", "loss"),
    ("txt_r1", "retrieval image->text R@1", "recall"),
    ("txt_r5", "retrieval image->text R@5", "recall"),
    ("txt_r10", "retrieval image->text R@10", "recall"),
    ("img_r1", "retrieval text->image R@1", "recall"),
    ("img_r5", "retrieval text->image R@5", "recall"),
    ("img_r10", "retrieval text->image R@10", "recall"),
    ("params_stage2_trainable", "params, stage 2 trainable", "params"),
    ("params_stage2_total", "params, stage 2 total", "params"),
    ("stage2_loss_lm", "stage 2 final LM loss", "loss"),
    ("vqa_overall", "VQA accuracy, overall", "acc"),
    ("vqa_counting", "VQA accuracy, counting", "acc"),
    ("vqa_identification", "VQA accuracy, identification", "acc"),
)
NOT_APPLICABLE = {("blip2", "stage1_loss_rec")}  # BLIP-2 has no reconstruction loss
NO_DELTA = {"stage1_loss"}  # X-Former's sum has one term more: compare the terms
TABLE_GROUPS = (
    ("Stage 1 (pre-training)", ("params_stage1_trainable", "params_stage1_total", "stage1_loss", "stage1_loss_itc",
                                "stage1_loss_itm", "stage1_loss_lm", "stage1_loss_rec")),
    ("Zero-shot retrieval (shapes test split)", ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")),
    ("Stage 2 and zero-shot VQA (shapes test split)", ("params_stage2_trainable", "params_stage2_total",
                                                       "stage2_loss_lm", "vqa_overall", "vqa_counting",
                                                       "vqa_identification")),
)
STANDINS_NOTE = (
    "The frozen encoders are stand-ins for the paper's hub weights: the CLIP-ViT is random, the MAE (X-Former) and "
    "the OPT (both models) are pretrained by the demo on the shapes training split (demo/standins.py). At "
    "this size the OPT answers VQA from its language prior (e.g. 'yes', '0' for every image): the VQA rows show "
    "the pipeline, not a difference between the models. The tables measure these tiny models, not the paper."
)


# ================================================================================================================
# Parameters
# ================================================================================================================
def model_section(cfg) -> dict:
    """The ``model:`` section a LAVIS ``Config`` builds its model from (yaml, model defaults and options)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.model_cfg, resolve=True)


def parameter_counts(settings: DemoSettings) -> Dict[str, Dict[str, int]]:
    counts = {}
    for model in MODELS:
        counts[model.key] = {}
        for stage in (STAGES[0], STAGES[2]):
            count = count_parameters(build_on_meta(**model_section(settings.lavis_config(stage, model, standins=False))))
            counts[model.key][f"params_{stage.key}_trainable"] = count.trainable
            counts[model.key][f"params_{stage.key}_total"] = count.total
    return counts


# ================================================================================================================
# The table
# ================================================================================================================
def collect_rows(results: Dict[str, Dict[str, RunResult]], counts) -> List[dict]:
    rows = []
    for model in MODELS:
        runs = results[model.key]
        stage1 = epoch_stats(runs["stage1"].job_dir)[-1]
        stage2 = epoch_stats(runs["stage2"].job_dir)[-1]
        retrieval = eval_metrics(runs["retrieval"].job_dir)
        vqa = eval_metrics(runs["vqa"].job_dir)
        row = {"model": model.label, "key": model.key, **counts[model.key]}
        row["stage1_loss"] = stage1["train_loss"]
        for term in ("itc", "itm", "lm", "rec"):
            row[f"stage1_loss_{term}"] = stage1.get(f"train_loss_{term}")
        row.update({k: retrieval[k] for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")})
        row["stage2_loss_lm"] = stage2.get("train_loss_lm", stage2["train_loss"])
        row["vqa_overall"] = vqa["agg_metrics"]
        for key, answer_type in ANSWER_TYPE_OF.items():
            row[key] = vqa.get(answer_type)
        rows.append(row)
    return rows


def format_value(value, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "params":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}K"
    if kind == "loss":
        return f"{value:.3f}"
    if kind == "recall":
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_delta(a, b, kind: str, key: str = "") -> str:
    if a is None or b is None or kind == "params" or key in NO_DELTA:
        return ""
    return f"{a - b:+.3f}" if kind == "loss" else f"{a - b:+.2f}"


def text_table(rows: List[dict]) -> str:
    """Metrics down, models side by side, then X-Former - BLIP-2."""
    labels = [row["model"] for row in rows]
    header = ["metric", *labels, f"Δ {labels[0]} − {labels[1]}"]
    body = []
    for key, label, kind in METRICS:
        values = [row[key] for row in rows]
        body.append([label, *(format_value(v, kind) for v in values), format_delta(values[0], values[1], kind, key)])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    rows = report["rows"]
    labels = {key: label for key, label, _ in METRICS}
    kinds = {key: kind for key, _, kind in METRICS}
    parts = [
        "# X-Former vs BLIP-2 on the shapes data",
        "",
        f"`python -m lavis_xformer.demo{' --smoke' if report['settings']['smoke'] else ''}` "
        f"({report['settings']['device']}, {report['timings']['total_seconds']:.0f}s). Both models are the `tiny` "
        "types, trained from random weights by LAVIS's runner on the same data with the same settings; stage 2 "
        "starts from each model's own stage-1 checkpoint. " + STANDINS_NOTE + " Losses are the last epoch's "
        "averages; retrieval is LAVIS's (R@K in %, ITC ranking re-scored by ITM on the top k); VQA is the official "
        "VQA accuracy with the paper's protocol (prompt \"Question: {} Short answer:\", 5 beams, length penalty 0), "
        "counting = the \"how many\" questions, identification = \"is there a ...\".",
    ]
    for title, keys in TABLE_GROUPS:
        parts += ["", f"## {title}", "", "| model | " + " | ".join(labels[k].strip() for k in keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        for row in rows:
            parts.append(f"| {row['model']} | " + " | ".join(format_value(row[k], kinds[k]) for k in keys) + " |")
    examples = report.get("examples") or []
    if examples:
        parts += ["", "## Example answers (VQA, first test images)", "",
                  "| question | answer | " + " | ".join(r["model"] for r in rows) + " |",
                  "|---|---|" + "---|" * len(rows)]
        for example in examples:
            answers = " | ".join(f"`{example['predictions'].get(r['model'], '')}`" for r in rows)
            parts.append(f"| {example['question']} | {example['answer']} | {answers} |")
    parts += ["", "Figures: `loss_curves.png`, `reconstructions.png`.", ""]
    return "\n".join(parts)


def vqa_examples(results, folder: Path, count: int = 6) -> List[dict]:
    """The first questions of the test split with each model's answer (from LAVIS's result files)."""
    from lavis_xformer.datasets import shapes

    questions = {q["question_id"]: q for q in shapes.read_annotation(folder, "vqa_test")}
    predictions = {}
    for model in MODELS:
        files = sorted((results[model.key]["vqa"].job_dir / "result").glob("*vqa_result.json"))
        if not files:
            return []
        predictions[model.label] = {int(p["question_id"]): p["answer"] for p in json.loads(files[-1].read_text())}
    shared = sorted(set.intersection(*(set(p) for p in predictions.values())))
    return [
        {
            "question_id": qid,
            "question": questions[qid]["question"],
            "answer": questions[qid]["answer"][0],
            "predictions": {label: answers[qid] for label, answers in predictions.items()},
        }
        for qid in shared[:count]
        if qid in questions
    ]

# ================================================================================================================
# Figures
# ================================================================================================================
def loss_curves(stats: Dict[str, Dict[str, List[dict]]], path: Path) -> Path:
    """``loss_curves.png``: each model's per-epoch losses of both stages."""
    return figures.loss_curves_png(stats, {model.key: model.label for model in MODELS}, path)


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


def make_reconstruction_grid(settings: DemoSettings, checkpoint: Path, path: Path) -> Optional[Path]:
    """Load the trained stage-1 X-Former (the same frozen stand-in encoders as in training, then its checkpoint)
    and draw ``reconstructions.png`` for the first test images."""
    from lavis_xformer.checkpoints import load_model_weights

    cfg = settings.lavis_config(STAGES[0], MODELS[0])
    model = build_without_checkpoints(**model_section(cfg))
    if getattr(model, "mae_decoder", None) is None:
        return None  # a variant without the reconstruction branch: nothing to draw
    load_model_weights(model, str(checkpoint), strict_unexpected=True)
    model = model.to(settings.run_device).eval()
    images = load_test_images(cfg, data_folder(cfg), settings.grid_images)
    views = reconstruct(model, images.to(settings.run_device), mask_ratio=0.5, seed=0)
    title = (f"X-Former stage 1 ({checkpoint.name}): MAE mask ratio 0.5, fixed draw; "
             f"reconstruction loss on these images {views['loss'].item():.3f}")
    return figures.reconstruction_grid_png(views, path, title)


# ================================================================================================================
# The report
# ================================================================================================================
def write_report(settings: DemoSettings, results: Dict[str, Dict[str, RunResult]], counts, standins: dict,
                 console: Console, start: float) -> dict:
    """Read the runs' outputs, write ``demo_results.{json,md}`` and the figures, print the table; ``standins``:
    what the stand-in encoders' pretraining reported (``mae_standin``, ``llm_standin``)."""
    rows = collect_rows(results, counts)
    stats = {m.key: {s: epoch_stats(results[m.key][s].job_dir) for s in ("stage1", "stage2")} for m in MODELS}
    files = {
        "json": settings.out_dir / "demo_results.json",
        "markdown": settings.out_dir / "demo_results.md",
        "loss_curves": loss_curves(stats, settings.out_dir / "loss_curves.png"),
    }
    grid = make_reconstruction_grid(
        settings, last_checkpoint(results["xformer"]["stage1"].job_dir), settings.out_dir / "reconstructions.png"
    )
    if grid is not None:
        files["reconstructions"] = grid
    timings = {f"{model}/{stage}": round(r.seconds, 1) for model, runs in results.items() for stage, r in runs.items()}
    timings["total_seconds"] = round(time.time() - start, 1)
    report = {
        "rows": rows,
        "metrics": {key: label.strip() for key, label, _ in METRICS},
        "not_applicable": sorted(f"{model}/{key}" for model, key in NOT_APPLICABLE),
        "settings": {
            "smoke": settings.smoke, "device": settings.run_device, "jobs": settings.jobs,
            "config_dir": str(settings.config_dir), "options": settings.options,
        },
        "runs": {model: {stage: str(r.job_dir) for stage, r in runs.items()} for model, runs in results.items()},
        "epochs": stats,
        **standins,
        "examples": vqa_examples(results, data_folder(settings.lavis_config(STAGES[3], MODELS[0]))),
        "timings": timings,
        "files": {k: str(v) for k, v in files.items()},
    }
    files["json"].write_text(json.dumps(report, indent=1) + "\n")
    files["markdown"].write_text(markdown_report(report))
    console.say(text_table(rows))
    console.say("")
    console.say(
        "Loss: last epoch's average; retrieval: R@K in % (LAVIS, ITC top-k re-scored by ITM); VQA: official accuracy "
        "(counting = 'how many', identification = 'is there a').\n" + textwrap.fill(STANDINS_NOTE, 118)
    )
    for key, path in files.items():
        console.say(f"{key:>15}: {path}")
    console.say(f"{'total time':>15}: {timings['total_seconds']:.0f}s")
    return report
