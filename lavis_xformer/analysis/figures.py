"""The figures of the analysis tools and the demo, drawn with matplotlib; each is written as PNG and as SVG.

* ``accuracy_bars_png`` -- ``analysis.compare``'s accuracy per benchmark and answer type, one bar per model;
* ``heatmap_png`` -- ``analysis.query_diversity``'s averaged query-similarity matrices side by side;
* ``loss_curves_png`` -- the demo's training losses of both models (per-iteration lines, or per-epoch averages);
* ``reconstruction_grid_png`` -- the demo's test images, MAE masks and X-Former's reconstructions.

Each takes numbers already computed (the modules above compute them), writes ``path`` (PNG) and the same figure
beside it as ``.svg``, and returns ``path``. matplotlib is used without pyplot (``Figure`` objects), so nothing
depends on a display or on a global backend.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from lavis_xformer.analysis.query_diversity import QueryDiversity

# Distinguishable colours for up to eight models (Okabe-Ito).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
DPI = 100


def save_png_and_svg(figure: Figure, path) -> Path:
    """``path`` as PNG and ``path`` with the suffix ``.svg``; returns the PNG's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    figure.savefig(path.with_suffix(".svg"), format="svg", bbox_inches="tight")
    return path


def accuracy_bars_png(labels: Sequence[str], groups: Sequence[Tuple[str, str, Sequence[float]]], path) -> Path:
    """Accuracy in % as grouped bars: one group per ``(first label line, second label line, one value per model)``,
    one bar per model of ``labels``."""
    figure = Figure(figsize=(max(4.0, 0.35 * len(labels) * len(groups) + 1.5), 4.2))
    axes = figure.subplots()
    width = 0.8 / max(len(labels), 1)
    positions = np.arange(len(groups))
    for m, label in enumerate(labels):
        values = [group[2][m] for group in groups]
        bars = axes.bar(positions - 0.4 + width * (m + 0.5), values, width, label=label,
                        color=PALETTE[m % len(PALETTE)])
        axes.bar_label(bars, fmt="%.0f", fontsize=7)
    axes.set_xticks(positions, [f"{first}\n{second}" for first, second, _ in groups], fontsize=8)
    axes.set_ylim(0, 105)
    axes.set_ylabel("Accuracy (%)")
    axes.grid(axis="y", color="#e1e1e1")
    axes.set_axisbelow(True)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(labels), 3), frameon=False, fontsize=8)
    return save_png_and_svg(figure, path)


def heatmap_png(results: Sequence["QueryDiversity"], path) -> Path:
    """The models' averaged similarity matrices side by side on one colour scale (viridis), with a colour bar."""
    if not results:
        raise ValueError("no query-diversity result to draw")
    low = min(float(r.mean_similarity.min()) for r in results)
    high = max(float(r.mean_similarity.max()) for r in results)
    figure = Figure(figsize=(3.6 * len(results) + 1.2, 3.9), layout="constrained")
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for ax, result in zip(axes, results):
        image = ax.imshow(result.mean_similarity, cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(f"{result.label}\ndiversity {result.diversity:.4f} ({result.num_images} images)", fontsize=9)
        ax.set_xlabel("query")
        ax.set_ylabel("query")
    figure.colorbar(image, ax=list(axes), label="cosine similarity of output queries (mean over images)")
    return save_png_and_svg(figure, path)


# ---------------------------------------------------------------------------------------------------------------
# The demo's loss curves and reconstructions
# ---------------------------------------------------------------------------------------------------------------
LOSS_PANELS = [  # (title, stage, loss term)
    ("Stage 1: total loss", "stage1", "loss"),
    ("Stage 1: ITC", "stage1", "loss_itc"),
    ("Stage 1: ITM", "stage1", "loss_itm"),
    ("Stage 1: ITG", "stage1", "loss_lm"),
    ("Stage 1: reconstruction (X-Former)", "stage1", "loss_rec"),
    ("Stage 2: LM loss", "stage2", "loss_lm"),
    ("VQA fine-tuning: answer loss", "vqa_ft", "loss"),
]


def loss_series(records: Sequence[dict], term: str, or_total: bool = False) -> Tuple[List[float], List[float]]:
    """(x, values) of one loss term. ``records`` are per-iteration lines (``runners.logs.read_iteration_log``: x is
    the iteration, keys ``loss``, ``loss_itc``, ...) or LAVIS's per-epoch lines (x is the 1-based epoch, keys
    ``train_loss``, ...). ``or_total``: without the term, the total (stage 2's LM loss is its only loss)."""
    keys = (term, f"train_{term}") + (("loss", "train_loss") if or_total else ())
    for key in keys:
        points = [(float(r.get("iteration", i + 1)), float(r[key])) for i, r in enumerate(records)
                  if r.get(key) is not None]
        if points:
            return [x for x, _ in points], [v for _, v in points]
    return [], []


def loss_curves_png(stats: Dict[str, Dict[str, List[dict]]], labels: Dict[str, str], path: Path) -> Path:
    """Losses of every model: stage 1 total and each term, stage 2 LM loss, VQA fine-tuning's answer loss
    (``stats[model][stage]``: per-iteration lines or per-epoch averages, see ``loss_series``); ``labels[model]``
    names a model in the legend."""
    figure = Figure(figsize=(14, 6.4), layout="constrained")
    axes = figure.subplots(2, 4).ravel()
    for ax in axes[len(LOSS_PANELS):]:
        ax.set_axis_off()
    per_iteration = any("iteration" in r for per_stage in stats.values() for rs in per_stage.values() for r in rs)
    for ax, (title, stage, term) in zip(axes, LOSS_PANELS):
        ax.set_title(title, fontsize=10)
        ax.grid(color="#e8e8e8")
        drawn = False
        for index, (model_key, per_stage) in enumerate(stats.items()):
            x, values = loss_series(per_stage.get(stage, []), term, or_total=stage == "stage2")
            if values:
                ax.plot(x, values, marker="o" if len(values) < 30 else None, markersize=3,
                        color=PALETTE[index % len(PALETTE)], label=labels[model_key])
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="#787878")
        ax.set_xlabel("iteration" if per_iteration else "epoch", fontsize=8)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, names, loc="outside upper center", ncol=len(names), frameon=False)
    return save_png_and_svg(figure, path)


def reconstruction_grid_png(views: Dict[str, torch.Tensor], path: Path, title: str) -> Path:
    """Rows: images; columns: image | MAE mask | reconstruction from M' | reconstruction with the visible patches."""
    columns = [("original", "image"), ("masked", "MAE mask (grey: masked)"),
               ("reconstruction", "reconstruction from M'"), ("reconstruction_visible", "+ visible patches")]
    count = views["original"].shape[0]
    figure = Figure(figsize=(2.0 * len(columns), 1.8 * count + 0.9), layout="constrained")
    axes = figure.subplots(count, len(columns), squeeze=False)
    for c, (key, label) in enumerate(columns):
        axes[0, c].set_title(label, fontsize=8)
        for r in range(count):
            pixels = views[key][r].permute(1, 2, 0).float().clamp(0, 1).cpu().numpy()
            axes[r, c].imshow(pixels, interpolation="nearest")
            axes[r, c].set_axis_off()
    figure.suptitle(title, fontsize=9, wrap=True)
    return save_png_and_svg(figure, path)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark charts (analysis.bench)
# ----------------------------------------------------------------------------------------------------------------
def component_breakdown_chart(bars: Dict[str, Dict[str, float]], components: Sequence[str], stem, title: str) -> List[Path]:
    """Stacked horizontal bars, one per (model, operation): seconds per component (``analysis.breakdown``)."""
    from matplotlib import colormaps

    names = list(bars)
    figure = Figure(figsize=(9, 0.6 * len(names) + 1.8))
    axes = figure.subplots()
    left = np.zeros(len(names))
    colours = colormaps["tab10"]
    for index, component in enumerate(components):
        widths = np.array([bars[name].get(component, 0.0) for name in names])
        if not widths.any():
            continue
        axes.barh(names, widths, left=left, color=colours(index % 10), label=component)
        left += widths
    axes.invert_yaxis()
    axes.set_xlabel("seconds per call (profiled self time: CPU, or the kernels on CUDA)")
    axes.set_title(title)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(names) < 4 else -0.12), ncol=4, frameon=False)
    png = save_png_and_svg(figure, Path(stem).with_suffix(".png"))
    return [png, png.with_suffix(".svg")]


def cost_vs_batch_chart(points: Sequence[dict], stem, title: str) -> List[Path]:
    """Seconds per call (top) and the call's peak memory (bottom) against the batch size, one column per operation
    and one line per (model, image size); ``points`` are the bench's scaling rows (``operation``, ``row``,
    ``batch_size``, ``image_size``, ``median_s``, ``peak_mb``)."""
    operations = sorted({p["operation"] for p in points}, reverse=True)  # train_step, then feature_extraction
    figure = Figure(figsize=(5.5 * len(operations), 7), layout="constrained")
    axes = figure.subplots(2, len(operations), squeeze=False)
    batch_sizes = sorted({p["batch_size"] for p in points})
    for column, operation in enumerate(operations):
        lines: Dict[Tuple[str, int], List[dict]] = {}
        for point in points:
            if point["operation"] == operation:
                lines.setdefault((point["row"], point["image_size"]), []).append(point)
        for (row, image_size), series in sorted(lines.items()):
            series = sorted(series, key=lambda p: p["batch_size"])
            batches = [p["batch_size"] for p in series]
            style = "-" if row.startswith("xformer") else "--"
            for line, key in ((0, "median_s"), (1, "peak_mb")):
                axes[line][column].plot(batches, [p[key] for p in series], style, marker="o", label=f"{row}, {image_size} px")
        for line, ylabel in ((0, "seconds per call"), (1, "peak memory of the call (MB)")):
            panel = axes[line][column]
            panel.set_xscale("log", base=2)
            panel.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
            panel.set_yscale("log")
            panel.set_xlabel("batch size")
            panel.set_ylabel(ylabel)
            panel.grid(True, which="both", alpha=0.3)
        axes[0][column].set_title(operation)
        axes[0][column].legend(fontsize=8)
    figure.suptitle(title)
    png = save_png_and_svg(figure, Path(stem).with_suffix(".png"))
    return [png, png.with_suffix(".svg")]
