"""Query diversity (supplement, section 6): the four readings of the supplement's measure, and a self-similarity one.

The supplement: "we first compute similarity between output queries for images and text using both Ours and BLIP-2
model to get 32×32 matrix for each image-text pair as shown in Figure 7. We then aggregate the similarities by
marginalizing them over the text to get scores for each image query. To compute the overall diversity, we repeat
this for all the samples in COCO karpathy test split and average it across samples and image queries."

Two things in it are open, so ``measure_readings`` computes all four combinations:

* the text side ("output queries for ... text", 32 of them): ``itm_queries``, the query outputs of the Q-Former's
  image-text (ITM) pass; or ``text_tokens``, the Q-Former's text-pass states of the caption padded to
  ``max_txt_len`` (32 in LAVIS's BLIP-2, padding included: 32 x 32 for every pair);
* the statistic: ``mean``, "average it across samples and image queries" of the text-marginalised scores (what the
  sentence literally does), or ``std``, the spread of those scores over the image queries, averaged over pairs (a
  diversity in the usual sense; the figure this module reported alone before).

The headline, ``itm_queries/mean``, is the literal reading: "output queries" for the text are queries (the ITM
pass's), and the statistic is the average. Similarities are cosines in the Q-Former's output space (no ITC
projection) for both text sides. ``measure_image_text`` is the ``itm_queries/std`` reading with its averaged 32 x 32
matrix (what the demo reports). Stage-1 models only: stage 2 feeds no text to the Q-Former.

    python -m lavis_xformer.analysis.query_diversity --cfg-path projects/xformer/demo/ret_shapes_eval.yaml \
        --label X-Former --options model.finetuned=<stage-1 checkpoint>      # the four readings on a test split

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
from typing import Dict, Iterable, List, Optional, Sequence

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
# Image queries against text queries: supplement section 6, its four readings
# ---------------------------------------------------------------------------------------------------------------
# "We first compute similarity between output queries for images and text ... to get 32x32 matrix for each
# image-text pair. We then aggregate the similarities by marginalizing them over the text to get scores for each
# image query ... average it across samples and image queries."
#
# Image queries z_1..z_Q: the model's output queries for the image alone (``output_queries``: X-Former's Z', BLIP-2's
# Q-Former query outputs). Text side t_1..t_T (``itm_queries``): the output queries for the image *with the text*,
# i.e. the query half of the Q-Former's bi-directional image-text (ITM) pass, LAVIS's
# ``extract_features(mode="multimodal")`` ``multimodal_embeds`` (X-Former: after the dual block); or
# (``text_tokens``) the caption's token states padded to ``max_txt_len``. Both give the supplement's 32 x 32 (a
# choice between two readings: module docstring). For a pair n:
#
#     S_n[i, j] = cos(z_{n,i}, t_{n,j})                                  the 32 x 32 matrix of Fig. 7
#     s_{n,i}   = (1/T) sum_j S_n[i, j]                                  marginalised over the text: one score per image query
#     std       = (1/N) sum_n sqrt((1/Q) sum_i (s_{n,i} - mean_i s_{n,i})^2)
#     mean      = (1/NQ) sum_{n,i} s_{n,i}
#
# std: the spread of the image queries' scores (population standard deviation across the Q image queries), averaged
# over the N image-text pairs: queries that relate to the text in the same way score alike (0); diverse queries
# spread. mean: the supplement's literal "average it across samples and image queries".
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
    """One model's image-query vs ITM-query similarity (section 6): the averaged 32 x 32 matrix and the
    ``itm_queries/std`` reading (mean over pairs of the spread of the text-marginalised per-image-query scores)."""

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


TEXT_SIDES = ("itm_queries", "text_tokens")  #: the ITM pass's query outputs; the caption's padded token states
STATISTICS = ("mean", "std")  #: of the text-marginalised scores: their average; their spread over image queries
HEADLINE = "itm_queries/mean"  #: the reading the supplement's sentence describes literally (module docstring)


@torch.no_grad()
def text_token_states(model, texts: Sequence[str], device=None) -> torch.Tensor:
    """[batch, max_txt_len, width]: the Q-Former's text pass (ITC's, text alone) over the captions tokenised as
    stage 1 tokenises them, padded to ``max_txt_len``; every position, padding included."""
    if not (hasattr(model, "Qformer") and hasattr(model, "tokenizer") and hasattr(model, "itm_head")):
        raise TypeError(
            f"{type(model).__name__} has no stage-1 text pass: the text-token reading needs a stage-1 model"
        )
    device = device if device is not None else model.query_tokens.device
    tokens = model.tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=model.max_txt_len, return_tensors="pt"
    ).to(device)
    output = model.Qformer.bert(tokens.input_ids, attention_mask=tokens.attention_mask, return_dict=True)
    return output.last_hidden_state.float()


def marginalised_scores(image_queries: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
    """[batch, Q]: s[n, i] = mean over j of cos(z_{n,i}, t_{n,j}) (``image_queries`` [batch, Q, width],
    ``text_side`` [batch, T, width])."""
    return image_text_scores(image_queries, text_side)[1]


def four_readings(image_queries, itm_queries, text_tokens) -> Dict[str, float]:
    """The four readings of one set of pairs: ``{"<text side>/<statistic>": value}`` (formulas above)."""
    readings = {}
    for side, text in (("itm_queries", itm_queries), ("text_tokens", text_tokens)):
        scores = marginalised_scores(image_queries, text).double()
        readings[f"{side}/mean"] = float(scores.mean())
        readings[f"{side}/std"] = float(score_spread(scores).mean())
    return readings


@dataclass
class QueryDiversityReadings:
    """One model's four section-6 readings over ``num_pairs`` image-text pairs; ``headline`` is ``HEADLINE``'s."""

    label: str
    readings: Dict[str, float]  #: "<text side>/<statistic>" -> value
    num_pairs: int

    @property
    def headline(self) -> float:
        return self.readings[HEADLINE]

    def to_dict(self) -> dict:
        return {"label": self.label, "num_pairs": self.num_pairs, "headline": HEADLINE, "readings": dict(self.readings)}

    @classmethod
    def from_dict(cls, data: dict) -> "QueryDiversityReadings":
        return cls(data["label"], {k: float(v) for k, v in data["readings"].items()}, int(data["num_pairs"]))


def measure_readings(model, pairs: Iterable[tuple], label: str, device="cpu", progress=None) -> QueryDiversityReadings:
    """The four readings over batches of (processed images, their paired texts), one text per image; sums are added
    over ranks. ``progress(batches done)`` is called after each batch."""
    from lavis_xformer.common import distributed

    keys = [f"{side}/{stat}" for side in TEXT_SIDES for stat in STATISTICS]
    sums = torch.zeros(len(keys) + 2, dtype=torch.float64)  # per reading, then pairs and scores counted
    for done, (images, texts) in enumerate(pairs, 1):
        images = images.to(device)
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} texts: give one text per image")
        image_queries = output_queries(model, images)
        scores = {
            "itm_queries": marginalised_scores(image_queries, text_conditioned_queries(model, images, texts)).double(),
            "text_tokens": marginalised_scores(image_queries, text_token_states(model, texts, images.device)).double(),
        }
        for index, key in enumerate(keys):
            side, stat = key.split("/")
            sums[index] += float(scores[side].sum() if stat == "mean" else score_spread(scores[side]).sum())
        sums[-2] += images.shape[0]
        sums[-1] += scores["itm_queries"].numel()
        if progress is not None:
            progress(done)
    if distributed.get_world_size() > 1:
        sums = distributed.sum_over_ranks(sums.to(distributed.collective_device())).cpu()
    pairs_seen, scores_seen = float(sums[-2]), float(sums[-1])
    if not pairs_seen:
        raise ValueError("no image-text pair was seen: cannot average")
    readings = {
        key: float(sums[i]) / (scores_seen if key.endswith("/mean") else pairs_seen) for i, key in enumerate(keys)
    }
    return QueryDiversityReadings(label, readings, int(pairs_seen))


def readings_markdown(results: Sequence[QueryDiversityReadings]) -> str:
    """The four readings of each model, one row per model, the headline first."""
    keys = [HEADLINE] + [f"{side}/{stat}" for side in TEXT_SIDES for stat in STATISTICS if f"{side}/{stat}" != HEADLINE]
    lines = ["| model | pairs | " + " | ".join(f"{k} (headline)" if k == HEADLINE else k for k in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for r in results:
        lines.append(f"| {r.label} | {r.num_pairs} | " + " | ".join(f"{r.readings[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


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


# ---------------------------------------------------------------------------------------------------------------
# The four readings of a trained stage-1 model on a retrieval test split (the supplement: COCO Karpathy test)
# ---------------------------------------------------------------------------------------------------------------
def retrieval_pairs(dataset, batch_size: int = 32, max_images: Optional[int] = None):
    """Batches of (images, captions) from a LAVIS ``RetrievalEvalDataset`` (COCO / Flickr30k / shapes retrieval):
    every caption of an image makes a pair, as for COCO's five captions per image."""
    if not (hasattr(dataset, "img2txt") and hasattr(dataset, "text")):
        raise ValueError(f"{type(dataset).__name__} is not a retrieval evaluation dataset (img2txt, text): use a "
                         "retrieval yaml such as projects/xformer/eval/ret_coco_stage1.yaml")
    count = len(dataset.img2txt) if max_images is None else min(max_images, len(dataset.img2txt))
    images, texts = [], []
    for index in range(count):
        image = dataset[index]["image"]
        for text_index in dataset.img2txt[index]:
            images.append(image)
            texts.append(dataset.text[text_index])
            if len(texts) == batch_size:
                yield torch.stack(images), texts
                images, texts = [], []
    if texts:
        yield torch.stack(images), texts


def readings_on_checkpoint(cfg_path, options=(), label: Optional[str] = None, split: str = "test", device="cpu",
                           batch_size: int = 32, max_images: Optional[int] = None, progress=None):
    """The four readings of the stage-1 model a LAVIS evaluation yaml builds (``options``: ``key=value`` overrides,
    e.g. ``model.finetuned=<checkpoint>``) on the ``split`` of its retrieval dataset."""
    from types import SimpleNamespace

    from lavis.common.config import Config
    from lavis.tasks import setup_task

    import lavis_xformer  # noqa: F401  (registers the plugin)
    from lavis_xformer.paths import resolve_cfg_path
    from lavis_xformer.run_config import dot_list

    cfg = Config(SimpleNamespace(cfg_path=str(resolve_cfg_path(cfg_path)), options=dot_list(list(options))))
    task = setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg).to(device).eval()
    name, splits = next(iter(datasets.items()))
    if split not in splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(splits)}")
    pairs = retrieval_pairs(splits[split], batch_size, max_images)
    return measure_readings(model, pairs, label or cfg.model_cfg.arch, device, progress)


def main(argv=None) -> int:
    import argparse
    import json
    import sys
    import time

    parser = argparse.ArgumentParser(
        prog="python -m lavis_xformer.analysis.query_diversity",
        description="Supplement section 6's query diversity, its four readings, of a stage-1 model on a retrieval "
        "test split (e.g. projects/xformer/eval/ret_coco_stage1.yaml: COCO Karpathy test, as the supplement).",
    )
    parser.add_argument("--cfg-path", required=True, help="a stage-1 retrieval evaluation yaml")
    parser.add_argument("--options", nargs="+", default=[], help="overrides, e.g. model.finetuned=<checkpoint>")
    parser.add_argument("--label", default=None, help="the model's name in the table (default: its arch)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-images", type=int, default=None, help="the first N images only")
    parser.add_argument("--json", default=None, help="also write the readings to this JSON file")
    args = parser.parse_args(argv)

    start = time.monotonic()

    def progress(done):
        print(f"\r{done} batches, {time.monotonic() - start:.0f}s", end="", file=sys.stderr, flush=True)

    try:
        result = readings_on_checkpoint(args.cfg_path, args.options, args.label, args.split, args.device,
                                        args.batch_size, args.max_images, progress)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"\nquery_diversity: {error}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    print(readings_markdown([result]))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
