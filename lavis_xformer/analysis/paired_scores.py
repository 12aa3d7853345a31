"""Per-item scores of captioning and retrieval, the units the paired bootstrap of a comparison resamples: what
``compare`` needs to put captioning (per-image CIDEr) and retrieval (per-query hits at 1/5/10, both ways) rows beside
its VQA rows. Each is the very quantity LAVIS's task averages, so the means equal its reported metrics (tested).

    retrieval_hits(scores_i2t, scores_t2i, txt2img, img2txt)  -> {"txt_r1": [n_images] 0/1, ..., "img_r10": [n_texts]}
    cider_per_image(references, captions)                      -> (CIDEr, {image_id: CIDEr of that image})
    paired_interval(reference_scores, other_scores)            -> (delta, low, high), x100 (points; CIDEr x100)
"""

from typing import Dict, Sequence, Tuple

import numpy as np

from lavis_xformer.analysis import stats

RECALL_AT = (1, 5, 10)


def retrieval_hits(scores_i2t, scores_t2i, txt2img, img2txt, ks: Sequence[int] = RECALL_AT) -> Dict[str, np.ndarray]:
    """Per query, whether a ground-truth match ranks in the top k: image->text (``txt_r{k}``, the best-ranked of the
    image's captions, as LAVIS's ``RetrievalTask._report_metrics``) and text->image (``img_r{k}``)."""
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    order_i2t = np.argsort(-scores_i2t, axis=1, kind="stable")
    text_ranks = np.array([min(int(np.where(order_i2t[i] == t)[0][0]) for t in img2txt[i]) for i in range(len(order_i2t))])
    order_t2i = np.argsort(-scores_t2i, axis=1, kind="stable")
    image_ranks = np.array([int(np.where(order_t2i[t] == txt2img[t])[0][0]) for t in range(len(order_t2i))])
    hits = {}
    for k in ks:
        hits[f"txt_r{k}"] = (text_ranks < k).astype(float)
        hits[f"img_r{k}"] = (image_ranks < k).astype(float)
    return hits


def cider_per_image(references: Dict[int, Sequence[str]], captions: Dict[int, str]) -> Tuple[float, Dict[int, float]]:
    """pycocoevalcap's CIDEr-D on its PTB tokenisation (as ``COCOEvalCap``): the corpus score, which is the mean of
    the per-image scores, and each image's."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": captions[i]}] for i in references})
    corpus, per_image = Cider().compute_score(gts, res)
    return float(corpus), {i: float(s) for i, s in zip(gts.keys(), per_image)}


def paired_interval(reference_scores, other_scores, num_resamples: int = stats.DEFAULT_RESAMPLES,
                    confidence: float = stats.DEFAULT_CONFIDENCE, seed: int = stats.DEFAULT_SEED):
    """(mean difference, interval low, high) of other - reference, x100, by the paired percentile bootstrap over
    the items (``analysis.stats``)."""
    a, b = np.asarray(reference_scores, dtype=float), np.asarray(other_scores, dtype=float)
    low, high = stats.paired_bootstrap_ci(a, b, num_resamples, confidence, seed)
    return float(100.0 * (b.mean() - a.mean())), low, high
