"""Query diversity (supplement, section 6), two measures.

``measure_image_text`` is the supplement's: image queries against text queries, 32 x 32 per image-text pair,
marginalised over the text, the spread over image queries averaged over pairs (the formula is above the function;
the paper reports X-Former's queries as 7% more diverse than BLIP-2's by it). Stage-1 models only.

``measure`` is image-query self-similarity, the figure ``compare`` reports: for every image, the model's output
queries (X-Former: Z', the dual block's enriched queries, with the MAE branch seeing the whole image; BLIP-2: the
Q-Former's query outputs) give a Q x Q matrix of pairwise cosine similarities, averaged over images, and

    diversity = 1 - mean off-diagonal cosine similarity of the averaged matrix

(equal to the per-image figure averaged over images, as the mean is linear). Higher means more diverse queries.
Both kinds of model are read where their
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


# ---------------------------------------------------------------------------------------------------------------
# Image queries against text queries: supplement section 6, as the paper measures it
# ---------------------------------------------------------------------------------------------------------------
# "We first compute similarity between output queries for images and text ... to get 32x32 matrix for each
# image-text pair. We then aggregate the similarities by marginalizing them over the text to get scores for each
# image query ... average it across samples and image queries."
#
# Image queries z_1..z_Q: the model's output queries for the image alone (``output_queries``: X-Former's Z', BLIP-2's
# Q-Former query outputs). Text queries t_1..t_Q: the output queries for the image *with the text*, i.e. the query
# half of the Q-Former's bi-directional image-text (ITM) pass, LAVIS's ``extract_features(mode="multimodal")``
# ``multimodal_embeds`` (X-Former: after the dual block). The supplement's 32 x 32 says the text side has 32 vectors,
# which only these have (the text transformer's token states vary in number with the caption); they are the
# "image-text queries" whose "fine-grained interaction" with the image queries the section studies. For a pair n:
#
#     S_n[i, j] = cos(z_{n,i}, t_{n,j})                                  the 32 x 32 matrix of Fig. 7
#     s_{n,i}   = (1/Q) sum_j S_n[i, j]                                  marginalised over the text: one score per image query
#     diversity = (1/N) sum_n sqrt((1/Q) sum_i (s_{n,i} - mean_i s_{n,i})^2)
#
# the spread of the image queries' scores (population standard deviation across the Q image queries), averaged
# over the N image-text pairs: queries that relate to the text in the same way score alike (0); diverse queries
# spread. ``mean_score`` = (1/NQ) sum_{n,i} s_{n,i} is reported beside it. Only stage-1 models have the image-text
# pass (stage 2 feeds no text to the Q-Former).
@torch.no_grad()
def text_conditioned_queries(model, image: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """[batch, Q, width]: the query outputs of the image-text (ITM) pass, ``extract_features(mode="multimodal")``."""
    if not (hasattr(model, "extract_features") and hasattr(model, "itm_head")):
        raise TypeError(
            f"{type(model).__name__} has no image-text pass (extract_features with mode 'multimodal'): the image-text "
            "query diversity needs a stage-1 model (xformer or blip2_baseline); stage 2 feeds no text to the Q-Former"
        )
    features = model.extract_features({"image": image, "text_input": list(texts)}, mode="multimodal")
    return features.multimodal_embeds.float()


def image_text_scores(image_queries: torch.Tensor, text_queries: torch.Tensor) -> torch.Tensor:
    """(S [batch, Q, Q] with S[n, i, j] = cos(z_{n,i}, t_{n,j}), s [batch, Q] = S marginalised over the text)."""
    similarity = F.normalize(image_queries.float(), dim=-1) @ F.normalize(text_queries.float(), dim=-1).transpose(1, 2)
    return similarity, similarity.mean(dim=-1)


def score_spread(scores: torch.Tensor) -> torch.Tensor:
    """[batch]: the population standard deviation of each pair's per-image-query scores s_{n,:}."""
    return scores.double().std(dim=-1, unbiased=False)


@dataclass
class ImageTextDiversity:
    """One model's image-query vs text-query similarity (section 6): the averaged 32 x 32 matrix and the diversity
    (mean over pairs of the spread of the text-marginalised per-image-query scores)."""

    label: str
    mean_similarity: np.ndarray  #: [Q, Q], S averaged over the pairs (rows: image queries, columns: text queries)
    diversity: float
    num_images: int  #: image-text pairs (the name ``heatmap_png`` reads)

    @property
    def mean_score(self) -> float:
        """(1/NQ) sum_{n,i} s_{n,i}: the mean of S's entries (marginalising and averaging are both means)."""
        return float(self.mean_similarity.mean())

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "num_pairs": self.num_images,
            "num_queries": int(self.mean_similarity.shape[0]),
            "diversity": self.diversity,
            "mean_score": self.mean_score,
            "mean_similarity": self.mean_similarity.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ImageTextDiversity":
        matrix = np.asarray(data["mean_similarity"], dtype=np.float64)
        return cls(data["label"], matrix, float(data["diversity"]), int(data["num_pairs"]))


def measure_image_text(model, pairs: Iterable[tuple], label: str, device="cpu") -> ImageTextDiversity:
    """The section-6 measure over batches of (processed images, their paired texts), one text per image (COCO: each
    of an image's captions makes a pair). Sums are added over ranks, as ``measure``'s are."""
    matrices, spreads = SimilarityAccumulator(), SimilarityAccumulator()  # spreads: each pair's as a 1 x 1 "matrix"
    num_queries = None
    for images, texts in pairs:
        images = images.to(device)
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} texts: give one text per image")
        similarity, scores = image_text_scores(output_queries(model, images), text_conditioned_queries(model, images, texts))
        num_queries = similarity.shape[1]
        matrices.add(similarity)
        spreads.add(score_spread(scores)[:, None, None])
    if num_queries is None:
        num_queries = int(model.query_tokens.shape[1])
    matrices.all_reduce(num_queries)
    spreads.all_reduce(1)
    mean = matrices.result(label)
    return ImageTextDiversity(label, mean.mean_similarity, float(spreads.result(label).mean_similarity[0, 0]), mean.num_images)


# ---------------------------------------------------------------------------------------------------------------
# Image-query self-similarity (what compare reports)
# ---------------------------------------------------------------------------------------------------------------
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
