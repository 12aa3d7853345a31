"""Query diversity (supplement, section 6): how different a model's output queries are from each other.

For every image, the model's output queries (X-Former: Z', the dual block's enriched queries, with the MAE branch
seeing the whole image; BLIP-2: the Q-Former's query outputs) give a Q x Q matrix of pairwise cosine
similarities (32 x 32 at paper scale). The matrices are averaged over images; a model's single diversity figure is

    diversity = 1 - mean off-diagonal cosine similarity of the averaged matrix

(equal to the per-image figure averaged over images, as the mean is linear). Higher means more diverse queries;
the paper reports X-Former's queries as 7% more diverse than BLIP-2's. Both kinds of model are read where their
queries leave the query transformer, before any projection into an LLM, so stage-1 and stage-2 models compare alike.

``analysis.figures.heatmap_png`` draws the averaged matrices side by side.
"""

from dataclasses import dataclass
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
