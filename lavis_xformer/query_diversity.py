"""Query diversity (supplement, section 6): how different a model's output queries are from each other.

For every image, the model's output queries (X-Former: Z', the dual block's enriched queries, with the MAE branch
seeing the whole image; BLIP-2: the Q-Former's query outputs) give a Q x Q matrix of pairwise cosine
similarities (32 x 32 at paper scale). The matrices are averaged over images; a model's single diversity figure is

    diversity = 1 - mean off-diagonal cosine similarity of the averaged matrix

(equal to the per-image figure averaged over images, as the mean is linear). Higher means more diverse queries;
the paper reports X-Former's queries as 7% more diverse than BLIP-2's. Both kinds of model are read where their
queries leave the query transformer, before any projection into an LLM, so stage-1 and stage-2 models compare alike.

``heatmap_png`` draws the averaged matrices side by side (PIL only: no plotting library is needed).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lavis_xformer.models.blip2_baseline_llm import blip2_query_outputs


@torch.no_grad()
def blip2_output_queries(model, image: torch.Tensor) -> torch.Tensor:
    """BLIP-2's query outputs for a batch of images without text: LAVIS's ``Blip2Qformer.extract_features``
    (mode "image") up to ``image_embeds``, which every BLIP-2 class (Q-Former, OPT, T5) can compute."""
    return blip2_query_outputs(model, image)


@torch.no_grad()
def output_queries(model, image: torch.Tensor) -> torch.Tensor:
    """[batch, num_queries, width]: X-Former's Z' (``image_queries``) or BLIP-2's Q-Former query outputs."""
    if hasattr(model, "image_queries"):
        return model.image_queries(image).float()
    if all(hasattr(model, name) for name in ("visual_encoder", "ln_vision", "Qformer", "query_tokens")):
        return blip2_output_queries(model, image).float()
    raise TypeError(
        f"{type(model).__name__} has neither X-Former's image_queries nor BLIP-2's visual_encoder/Qformer/query_tokens"
    )


def cosine_similarity_matrices(queries: torch.Tensor) -> torch.Tensor:
    """[batch, Q, Q] pairwise cosine similarities of each image's queries."""
    normalized = F.normalize(queries.float(), dim=-1)
    return normalized @ normalized.transpose(1, 2)


def diversity(mean_similarity: np.ndarray) -> float:
    """1 - mean off-diagonal entry of a (mean) Q x Q cosine-similarity matrix."""
    matrix = np.asarray(mean_similarity, dtype=np.float64)
    q = matrix.shape[0]
    if matrix.shape != (q, q) or q < 2:
        raise ValueError(f"need a square similarity matrix with at least 2 queries, got shape {matrix.shape}")
    off_diagonal = matrix[~np.eye(q, dtype=bool)]
    return float(1.0 - off_diagonal.mean())


@dataclass
class QueryDiversity:
    """The averaged similarity matrix of one model and its diversity figure."""

    label: str
    mean_similarity: np.ndarray  #: [Q, Q]
    num_images: int

    @property
    def diversity(self) -> float:
        return diversity(self.mean_similarity)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "num_images": self.num_images,
            "num_queries": int(self.mean_similarity.shape[0]),
            "diversity": self.diversity,
            "mean_off_diagonal_similarity": 1.0 - self.diversity,
            "mean_similarity": self.mean_similarity.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "QueryDiversity":
        return cls(data["label"], np.asarray(data["mean_similarity"], dtype=np.float64), int(data["num_images"]))


class SimilarityAccumulator:
    """Sums per-image similarity matrices; ``all_reduce`` adds every rank's sums (the identity in one process)."""

    def __init__(self):
        self.total: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, similarities: torch.Tensor) -> None:
        batch_total = similarities.double().sum(dim=0).cpu()
        self.total = batch_total if self.total is None else self.total + batch_total
        self.count += similarities.shape[0]

    def all_reduce(self, num_queries: int) -> None:
        from lavis_xformer.common import distributed

        if distributed.get_world_size() == 1:
            return
        total = self.total if self.total is not None else torch.zeros(num_queries, num_queries, dtype=torch.float64)
        packed = torch.cat([total.flatten(), torch.tensor([float(self.count)], dtype=torch.float64)])
        packed = distributed.sum_over_ranks(packed.to(distributed.collective_device())).cpu()
        self.total = packed[:-1].view(num_queries, num_queries)
        self.count = int(packed[-1].item())

    def result(self, label: str) -> QueryDiversity:
        if not self.count:
            raise ValueError("no image was seen: cannot average similarity matrices")
        return QueryDiversity(label, (self.total / self.count).numpy(), self.count)


def measure(model, images: Iterable[torch.Tensor], label: str, device="cpu") -> QueryDiversity:
    """Average the similarity matrices of ``model``'s output queries over batches of processed images."""
    accumulator = SimilarityAccumulator()
    num_queries = None
    for batch in images:
        queries = output_queries(model, batch.to(device))
        num_queries = queries.shape[1]
        accumulator.add(cosine_similarity_matrices(queries))
    if num_queries is None:
        num_queries = int(model.query_tokens.shape[1])
    accumulator.all_reduce(num_queries)
    return accumulator.result(label)


# ---------------------------------------------------------------------------------------------------------------
# Heatmap (PIL)
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


def pil_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def heatmap_png(results: Sequence[QueryDiversity], path, cell: Optional[int] = None) -> Path:
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


def relative_difference(results: Sequence[QueryDiversity]) -> List[dict]:
    """Each model's diversity against the first's: the paper's "x% more diverse"."""
    reference = results[0]
    return [
        {
            "label": r.label,
            "reference": reference.label,
            "diversity": r.diversity,
            "relative_to_reference_percent": (
                100.0 * (r.diversity - reference.diversity) / reference.diversity
                if reference.diversity
                else float("nan")
            ),
        }
        for r in results
    ]
