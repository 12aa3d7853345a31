"""The figures of the analysis tools and the demo, drawn with PIL (no plotting library needed).

* ``accuracy_bars_png`` -- ``analysis.compare``'s accuracy per benchmark and answer type, one bar per model;
* ``heatmap_png`` -- ``analysis.query_diversity``'s averaged query-similarity matrices side by side;
* ``loss_curves_png`` -- the demo's per-epoch training losses of both models;
* ``reconstruction_grid_png`` -- the demo's test images, MAE masks and X-Former's reconstructions.

Each takes numbers already computed (the modules above compute them) and writes one PNG.
"""

import math
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

if TYPE_CHECKING:
    from lavis_xformer.analysis.query_diversity import QueryDiversity

# Distinguishable colours for up to eight models (Okabe-Ito).
PALETTE = [
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (213, 94, 0),
    (240, 228, 66),
    (0, 0, 0),
]


def pil_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def accuracy_bars_png(labels: Sequence[str], groups: Sequence[Tuple[str, str, Sequence[float]]], path) -> Path:
    """Accuracy in % as grouped bars: one group per ``(first label line, second label line, one value per model)``,
    one bar per model of ``labels``."""
    from PIL import Image, ImageDraw

    font, small = pil_font(13), pil_font(11)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    bar = 20
    group_widths = [
        max(bar * len(labels), measure.textlength(first, font=small), measure.textlength(second, font=small)) + 18
        for first, second, _ in groups
    ]
    legend_height = 18 * len(labels)
    left, top, plot_height, bottom = 44, 40 + legend_height, 280, 48
    width = int(max(left + sum(group_widths) + 16, left + 40 + max(measure.textlength(l, font=small) for l in labels)))
    height = top + plot_height + bottom
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), "Accuracy (%)", fill=(0, 0, 0), font=font)
    for m, label in enumerate(labels):  # legend, one model per line
        y = 30 + 18 * m
        draw.rectangle([left, y + 2, left + 11, y + 13], fill=PALETTE[m % len(PALETTE)])
        draw.text((left + 17, y), label, fill=(0, 0, 0), font=small)
    for tick in range(0, 101, 20):  # horizontal grid and y labels
        y = top + plot_height - tick * plot_height / 100
        draw.line([(left, y), (width - 8, y)], fill=(225, 225, 225))
        draw.text((left - 30, y - 7), f"{tick:>3}", fill=(80, 80, 80), font=small)
    x0 = left + 8
    for (first, second, values), group_width in zip(groups, group_widths):
        bars_left = x0 + (group_width - 18 - bar * len(values)) / 2
        for m, value in enumerate(values):
            x = bars_left + m * bar
            y = top + plot_height - max(0.0, min(100.0, value)) * plot_height / 100
            draw.rectangle([x, y, x + bar - 3, top + plot_height], fill=PALETTE[m % len(PALETTE)])
            draw.text((x, y - 13), f"{value:.0f}", fill=(40, 40, 40), font=small)
        draw.text((x0, top + plot_height + 6), first, fill=(0, 0, 0), font=small)
        draw.text((x0, top + plot_height + 21), second, fill=(90, 90, 90), font=small)
        x0 += group_width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Query-diversity heatmap
# ---------------------------------------------------------------------------------------------------------------
# Viridis at five stops; values between stops are interpolated linearly.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 RGB for ``values`` scaled from [low, high] onto viridis."""
    t = np.clip((np.asarray(values, dtype=np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    position = t * (len(_VIRIDIS) - 1)
    lower = np.minimum(position.astype(int), len(_VIRIDIS) - 2)
    fraction = (position - lower)[..., None]
    return (_VIRIDIS[lower] * (1 - fraction) + _VIRIDIS[lower + 1] * fraction).round().astype(np.uint8)


def heatmap_png(results: Sequence["QueryDiversity"], path, cell: Optional[int] = None) -> Path:
    """The models' averaged similarity matrices side by side on one colour scale, with a colour bar."""
    from PIL import Image, ImageDraw

    if not results:
        raise ValueError("no query-diversity result to draw")
    num_queries = max(r.mean_similarity.shape[0] for r in results)
    cell = cell or max(4, 320 // num_queries)
    side = cell * num_queries
    low = min(float(r.mean_similarity.min()) for r in results)
    high = max(float(r.mean_similarity.max()) for r in results)
    margin, title_height, bar_width = 24, 44, 16
    width = margin + len(results) * (side + margin) + bar_width + 60
    height = title_height + side + 2 * margin
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title_font, label_font = pil_font(14), pil_font(11)
    for index, result in enumerate(results):
        left = margin + index * (side + margin)
        pixels = colormap(result.mean_similarity, low, high)
        tile = Image.fromarray(pixels, "RGB").resize((cell * pixels.shape[1], cell * pixels.shape[0]), Image.NEAREST)
        canvas.paste(tile, (left, title_height))
        draw.text((left, 6), result.label, fill=(0, 0, 0), font=title_font)
        draw.text(
            (left, 24),
            f"diversity {result.diversity:.4f} ({result.num_images} images)",
            fill=(60, 60, 60),
            font=label_font,
        )
    bar_left = margin + len(results) * (side + margin)
    gradient = colormap(np.linspace(high, low, side)[:, None].repeat(bar_width, axis=1), low, high)
    canvas.paste(Image.fromarray(gradient, "RGB"), (bar_left, title_height))
    draw.text((bar_left + bar_width + 4, title_height - 6), f"{high:.2f}", fill=(0, 0, 0), font=label_font)
    draw.text((bar_left + bar_width + 4, title_height + side - 8), f"{low:.2f}", fill=(0, 0, 0), font=label_font)
    draw.text(
        (margin, title_height + side + 6),
        "cosine similarity between output queries, averaged over images",
        fill=(60, 60, 60),
        font=label_font,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The demo's loss curves and reconstructions
# ---------------------------------------------------------------------------------------------------------------
def _nice_range(values: Sequence[float]):
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    pad = 0.06 * (high - low)
    return low - pad, high + pad


def draw_panel(draw, box, title: str, series: Dict[str, List[float]], colors: Dict[str, tuple]) -> None:
    """One line chart: ``series`` maps a label to its per-epoch values (epoch 1 first)."""
    left, top, right, bottom = box
    font, small = pil_font(13), pil_font(10)
    draw.text((left, top), title, fill=(0, 0, 0), font=font)
    plot = (left + 50, top + 22, right - 8, bottom - 22)
    draw.rectangle(plot, outline=(170, 170, 170))
    values = [v for vs in series.values() for v in vs]
    if not values:
        draw.text((plot[0] + 8, plot[1] + 8), "n/a", fill=(120, 120, 120), font=small)
        return
    low, high = _nice_range(values)
    epochs = max(len(vs) for vs in series.values())

    def xy(i, v):
        x = plot[0] + 10 + (plot[2] - plot[0] - 20) * (i / max(1, epochs - 1))
        y = plot[3] - (plot[3] - plot[1]) * (v - low) / (high - low)
        return x, y

    decimals = min(5, max(1, 1 - math.floor(math.log10((high - low) / 4))))  # enough to tell the ticks apart
    for tick in range(5):  # y grid and labels
        v = low + (high - low) * tick / 4
        _, y = xy(0, v)
        draw.line([(plot[0], y), (plot[2], y)], fill=(232, 232, 232))
        draw.text((left, y - 6), f"{v:.{decimals}f}", fill=(90, 90, 90), font=small)
    step = max(1, math.ceil(epochs / 8))
    for i in range(0, epochs, step):  # x labels: epochs, 1-based
        x, _ = xy(i, low)
        draw.text((x - 3, plot[3] + 4), str(i + 1), fill=(90, 90, 90), font=small)
    for label, vs in series.items():
        points = [xy(i, v) for i, v in enumerate(vs)]
        if len(points) > 1:
            draw.line(points, fill=colors[label], width=2)
        for x, y in points:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colors[label])


def loss_curves_png(stats: Dict[str, Dict[str, List[dict]]], labels: Dict[str, str], path: Path) -> Path:
    """Per-epoch losses of every model: stage 1 total and each term, stage 2 LM loss (``stats[model][stage]``, the
    epoch averages of LAVIS's log.txt); ``labels[model]`` names a model in the legend."""
    from PIL import Image, ImageDraw

    panels = [
        ("Stage 1: total loss", "stage1", "train_loss"),
        ("Stage 1: ITC", "stage1", "train_loss_itc"),
        ("Stage 1: ITM", "stage1", "train_loss_itm"),
        ("Stage 1: ITG", "stage1", "train_loss_lm"),
        ("Stage 1: reconstruction (X-Former)", "stage1", "train_loss_rec"),
        ("Stage 2: LM loss", "stage2", "train_loss_lm"),
    ]
    colors = {labels[key]: PALETTE[i % len(PALETTE)] for i, key in enumerate(stats)}
    cols, panel_w, panel_h, legend_h = 3, 330, 230, 36
    rows = math.ceil(len(panels) / cols)
    image = Image.new("RGB", (cols * panel_w + 16, legend_h + rows * panel_h + 24), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x = 16
    for label, color in colors.items():  # legend
        draw.rectangle([x, 12, x + 22, 16], fill=color)
        draw.text((x + 28, 6), label, fill=(0, 0, 0), font=pil_font(13))
        x += 40 + int(draw.textlength(label, font=pil_font(13)))
    draw.text((x + 10, 6), "per-epoch averages (x: epoch)", fill=(110, 110, 110), font=pil_font(11))
    for index, (title, stage, key) in enumerate(panels):
        r, c = divmod(index, cols)
        box = (8 + c * panel_w, legend_h + r * panel_h, 8 + (c + 1) * panel_w - 8, legend_h + (r + 1) * panel_h - 8)
        series = {}
        for model_key, per_stage in stats.items():
            values = [e[key] for e in per_stage.get(stage, []) if key in e]
            if key == "train_loss_lm" and stage == "stage2" and not values:
                values = [e["train_loss"] for e in per_stage.get(stage, [])]
            if values:
                series[labels[model_key]] = values
        draw_panel(draw, box, title, series, colors)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def reconstruction_grid_png(views: Dict[str, torch.Tensor], path: Path, title: str) -> Path:
    """Rows: images; columns: image | MAE mask | reconstruction from M' | reconstruction with the visible patches."""
    from PIL import Image, ImageDraw

    columns = [("original", "image"), ("masked", "MAE mask (grey: masked)"),
               ("reconstruction", "reconstruction from M'"), ("reconstruction_visible", "+ visible patches")]
    count, _, height, width = views["original"].shape
    scale = max(1, 112 // max(height, width))
    tile_w, tile_h, gap = width * scale, height * scale, 8
    col_w = max(tile_w, 150)
    canvas_w = len(columns) * (col_w + gap) + gap
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, words = [""], title.split()
    for word in words:  # wrap the title to the canvas
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and measure.textlength(candidate, font=pil_font(13)) > canvas_w - 2 * gap:
            lines.append(word)
        else:
            lines[-1] = candidate
    top = 30 + 17 * len(lines)
    canvas = Image.new("RGB", (canvas_w, top + count * (tile_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((gap, 6 + 17 * i), line, fill=(0, 0, 0), font=pil_font(13))
    for c, (key, label) in enumerate(columns):
        draw.text((gap + c * (col_w + gap), top - 20), label, fill=(60, 60, 60), font=pil_font(11))
        for r in range(count):
            pixels = (views[key][r].permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(pixels, "RGB").resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (gap + c * (col_w + gap), top + r * (tile_h + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Benchmark charts (analysis.bench), matplotlib: PNG and SVG side by side
# ----------------------------------------------------------------------------------------------------------------
def _save_png_and_svg(figure, stem: Path) -> List[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    return paths


def component_breakdown_chart(bars: Dict[str, Dict[str, float]], components: Sequence[str], stem, title: str) -> List[Path]:
    """Stacked horizontal bars, one per (model, operation): seconds per component (``analysis.breakdown``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(bars)
    figure, axes = plt.subplots(figsize=(9, 0.6 * len(names) + 1.8))
    left = np.zeros(len(names))
    colours = plt.get_cmap("tab10")
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
    paths = _save_png_and_svg(figure, stem)
    plt.close(figure)
    return paths


def cost_vs_batch_chart(points: Sequence[dict], stem, title: str) -> List[Path]:
    """Seconds per call (top) and the call's peak memory (bottom) against the batch size, one column per operation
    and one line per (model, image size); ``points`` are the bench's scaling rows (``operation``, ``row``,
    ``batch_size``, ``image_size``, ``median_s``, ``peak_mb``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    operations = sorted({p["operation"] for p in points}, reverse=True)  # train_step, then feature_extraction
    figure, axes = plt.subplots(2, len(operations), figsize=(5.5 * len(operations), 7), squeeze=False, constrained_layout=True)
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
    paths = _save_png_and_svg(figure, stem)
    plt.close(figure)
    return paths
