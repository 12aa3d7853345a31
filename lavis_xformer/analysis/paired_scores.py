"""Per-item scores of captioning and retrieval, the units the paired bootstrap of a comparison resamples: what
``compare`` needs to put captioning (per-image CIDEr) and retrieval (per-query hits at 1/5/10, both ways) rows beside
its VQA rows. Each is the very quantity LAVIS's task averages, so the means equal its reported metrics (tested).

    retrieval_ranks(scores_i2t, scores_t2i, txt2img, img2txt) -> ([n_images], [n_texts]) 0-based rank of the best match
    hits_at(text_ranks, image_ranks)                          -> {"txt_r1": [n_images] 0/1, ..., "img_r10": [n_texts]}
    retrieval_hits(scores_i2t, scores_t2i, txt2img, img2txt)  -> the two above in one
    cider_per_image(references, captions)                      -> (CIDEr, {image_id: CIDEr of that image})
    paired_interval(reference_scores, other_scores)            -> (delta, low, high), x100 (points; CIDEr x100)
"""

from typing import Dict, Sequence, Tuple

import numpy as np

from lavis_xformer.analysis import stats

RECALL_AT = (1, 5, 10)


def retrieval_ranks(scores_i2t, scores_t2i, txt2img, img2txt) -> Tuple[np.ndarray, np.ndarray]:
    """Per query, the 0-based rank of its best ground-truth match, as LAVIS's ``RetrievalTask._report_metrics``
    ranks: image->text ([n_images], the best-ranked of the image's captions) and text->image ([n_texts]). What a
    comparison caches: every R@k follows from them (``hits_at``)."""
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    # LAVIS's order, ties included (its ``np.argsort(score)[::-1]``): the ``-100`` of every candidate ITM did not
    # re-score ties, and a tie broken otherwise would move a rank
    order_i2t = np.argsort(scores_i2t, axis=1)[:, ::-1]
    text_ranks = np.array([min(int(np.where(order_i2t[i] == t)[0][0]) for t in img2txt[i]) for i in range(len(order_i2t))])
    order_t2i = np.argsort(scores_t2i, axis=1)[:, ::-1]
    image_ranks = np.array([int(np.where(order_t2i[t] == txt2img[t])[0][0]) for t in range(len(order_t2i))])
    return text_ranks, image_ranks


def hits_at(text_ranks, image_ranks, ks: Sequence[int] = RECALL_AT) -> Dict[str, np.ndarray]:
    """0/1 per query: ``txt_r{k}`` (image->text, per image) and ``img_r{k}`` (text->image, per text)."""
    text_ranks, image_ranks = np.asarray(text_ranks), np.asarray(image_ranks)
    hits = {}
    for k in ks:
        hits[f"txt_r{k}"] = (text_ranks < k).astype(float)
    for k in ks:
        hits[f"img_r{k}"] = (image_ranks < k).astype(float)
    return hits


def retrieval_hits(scores_i2t, scores_t2i, txt2img, img2txt, ks: Sequence[int] = RECALL_AT) -> Dict[str, np.ndarray]:
    """Per query, whether a ground-truth match ranks in the top k (``retrieval_ranks``, then ``hits_at``)."""
    return hits_at(*retrieval_ranks(scores_i2t, scores_t2i, txt2img, img2txt), ks)


def cider_per_image(references: Dict[int, Sequence[str]], captions: Dict[int, str]) -> Tuple[float, Dict[int, float]]:
    """pycocoevalcap's CIDEr-D on its PTB tokenisation (``tasks.caption_metrics``, the one scorer loop): the corpus
    score, which is the mean of the per-image scores, and each image's."""
    from lavis_xformer.tasks import caption_metrics

    scores, per_image, _ = caption_metrics(references, captions, per_image=("CIDEr",))
    return scores["CIDEr"], per_image["CIDEr"]


def paired_interval(reference_scores, other_scores, num_resamples: int = stats.DEFAULT_RESAMPLES,
                    confidence: float = stats.DEFAULT_CONFIDENCE, seed: int = stats.DEFAULT_SEED):
    """(mean difference, interval low, high) of other - reference, x100, by the paired percentile bootstrap over
    the items (``analysis.stats``)."""
    a, b = np.asarray(reference_scores, dtype=float), np.asarray(other_scores, dtype=float)
    low, high = stats.paired_bootstrap_ci(a, b, num_resamples, confidence, seed)
    return float(100.0 * (b.mean() - a.mean())), low, high
