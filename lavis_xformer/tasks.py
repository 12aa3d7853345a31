"""The plugin's tasks: LAVIS's own, each extended by what the paper's protocol needs; registered on import.

* ``xformer_pretrain`` -- LAVIS's ``image_text_pretrain`` that also logs every stage-1 loss (``loss_itc``,
  ``loss_itm``, ``loss_lm`` = ITG, ``loss_rec``) next to the total: it names them (``logged_loss_terms``), and
  ``runner_xformer``'s loop puts their epoch averages, over all ranks, into the log and ``log.txt`` as
  ``train_loss_itc`` etc. (LAVIS itself only records the total). Steps skipped for a non-finite loss are left out
  of the averages.
* ``xformer_vqa`` / ``xformer_gqa`` -- LAVIS's ``vqa`` / ``gqa`` plus ``run.length_penalty``. LAVIS's VQA tasks
  read ``num_beams``, ``max_len``, ``min_len``, ``inference_method``, ``num_ans_candidates`` and ``prompt``
  (lavis/tasks/vqa.py:48-69) but not the length penalty, which the paper sets to 0 for short answers; without
  the key each model's own ``predict_answers`` default applies (LAVIS's Blip2T5: -1).
* ``xformer_captioning`` -- LAVIS's ``captioning`` (the model's ``generate``, the COCO caption metrics) scored
  against the evaluated dataset's own captions (``run.caption_ground_truth: dataset``: the shapes data, any LAVIS
  caption eval dataset with integer ``image_id``s and caption lists) instead of COCO Karpathy's downloaded files
  (``coco_karpathy``, LAVIS's behaviour). The metrics need Java (a clear error without it); SPICE also needs
  Stanford CoreNLP (pycocoevalcap downloads it on first use): offline it is left out with a warning
  (``unavailable_caption_metrics``).
"""

import json
import logging
import os
import shutil

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.captioning import CaptionTask
from lavis.tasks.image_text_pretrain import ImageTextPretrainTask
from lavis.tasks.vqa import GQATask, VQATask
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as corenlp
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

STAGE1_LOSSES = ("loss_itc", "loss_itm", "loss_lm", "loss_rec")


@registry.register_task("xformer_pretrain")
class XFormerPretrainTask(ImageTextPretrainTask):
    """Stage-1 pre-training (LAVIS's ``image_text_pretrain``) with every loss term logged.

    ``runner_xformer`` runs the training loop; it averages the model output's ``logged_loss_terms`` over the steps
    it keeps, next to the total."""

    logged_loss_terms = STAGE1_LOSSES


@registry.register_task("xformer_captioning")
class XFormerCaptionTask(CaptionTask):
    """LAVIS's ``captioning`` with the ground truth taken from the evaluated dataset (``run.caption_ground_truth``)."""

    GROUND_TRUTHS = ("coco_karpathy", "dataset")
    ground_truth = "coco_karpathy"

    @classmethod
    def setup_task(cls, cfg):
        task = super().setup_task(cfg)
        task.ground_truth = cfg.run_cfg.get("caption_ground_truth", cls.ground_truth)
        if task.ground_truth not in cls.GROUND_TRUTHS:
            raise ValueError(
                f"run.caption_ground_truth={task.ground_truth!r} is not valid; choose one of {list(cls.GROUND_TRUTHS)}"
            )
        task.references = {}  # split -> {image_id: [reference captions]}, for ground_truth "dataset"
        return task

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        if self.ground_truth == "dataset":
            if len(datasets) != 1:
                raise ValueError(f"caption_ground_truth: dataset scores one dataset; the config has {sorted(datasets)}")
            (splits,) = datasets.values()
            for split, dataset in splits.items():
                if split == "train":
                    continue
                if not all(isinstance(a.get("caption"), list) and isinstance(a.get("image_id"), int) for a in dataset.annotation):
                    raise ValueError(
                        f"caption_ground_truth: dataset needs, in every {split} annotation, an integer `image_id` and "
                        "a `caption` list (LAVIS's caption eval format); use coco_karpathy for COCO"
                    )
                self.references[split] = {a["image_id"]: a["caption"] for a in dataset.annotation}
        return datasets

    @main_process
    def _report_metrics(self, eval_result_file, split_name):
        if self.ground_truth == "coco_karpathy":
            return super()._report_metrics(eval_result_file, split_name)
        with open(eval_result_file) as f:
            results = {int(r["image_id"]): r["caption"] for r in json.load(f)}
        references = self.references[split_name]
        if set(results) != set(references):
            raise ValueError(
                f"{split_name}: captions for {len(results)} images, ground truth for {len(references)}; "
                "every image of the split needs exactly one generated caption"
            )
        scores = caption_scores(references, results)
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
            f.write(json.dumps({split_name: scores}) + "\n")
        return {**scores, "agg_metrics": scores["CIDEr"] + scores["Bleu_4"]}  # LAVIS's aggregate


class JavaMissingError(RuntimeError):
    """pycocoevalcap cannot score captions without Java."""


def unavailable_caption_metrics():
    """{metric: why it cannot run here}: SPICE needs Stanford CoreNLP, which pycocoevalcap downloads on first use,
    so offline it is left out. Without Java nothing can be scored (pycocoevalcap's PTB tokenizer, METEOR and SPICE
    are Java programs): ``JavaMissingError``."""
    if shutil.which("java") is None:
        raise JavaMissingError(
            "caption metrics need Java: pycocoevalcap's PTB tokenizer, METEOR and SPICE run it, and `java` is not on "
            "PATH; install a Java runtime (e.g. apt-get install default-jre-headless) and rerun"
        )
    corenlp_jar = os.path.join(corenlp.SPICEDIR, corenlp.SPICELIB, f"{corenlp.JAR}.jar")
    if not os.path.isfile(corenlp_jar):
        return {"SPICE": "no Stanford CoreNLP"}
    return {}


def caption_metrics(references, captions, per_image=("CIDEr",)):
    """pycocoevalcap's COCO caption metrics (the scorers ``COCOEvalCap.evaluate`` runs, on its PTB tokenisation) of
    ``captions`` ({image_id: caption}) against ``references`` ({image_id: [captions]}) -> (corpus scores,
    {metric: {image_id: that image's score}} for the ``per_image`` metrics, {metric: why it was left out}).
    A corpus CIDEr / METEOR / SPICE is the mean of the per-image scores; BLEU is not (its n-gram counts pool)."""
    unavailable = unavailable_caption_metrics()
    # one tokenizer run (a Java start) for the references and the captions together
    tokens = PTBTokenizer().tokenize(
        {**{("ref", i): [{"caption": c} for c in refs] for i, refs in references.items()},
         **{("cap", i): [{"caption": captions[i]}] for i in references}}
    )
    gts = {i: tokens[("ref", i)] for i in references}
    res = {i: tokens[("cap", i)] for i in references}
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor, "METEOR"), (Rouge(), "ROUGE_L"),
               (Cider(), "CIDEr"), (Spice, "SPICE")]
    for metric, why in unavailable.items():
        logging.warning("%s left out: %s%s", metric, why, " (pycocoevalcap downloads it to its spice/lib with `python -c "
                        "'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'`)"
                        if "CoreNLP" in why else "")
    scores, per_image_scores = {}, {}
    for scorer, names in scorers:
        if isinstance(names, str) and names in unavailable:
            continue
        scorer = scorer() if isinstance(scorer, type) else scorer  # Meteor and Spice start Java when built
        score, image_scores = scorer.compute_score(gts, res)
        if isinstance(names, list):
            scores.update({name: float(value) for name, value in zip(names, score)})
            continue
        scores[names] = float(score)
        if names in per_image:
            if names == "SPICE":  # one dict of sub-scores per image
                image_scores = [s["All"]["f"] for s in image_scores]
            per_image_scores[names] = {i: float(s) for i, s in zip(gts.keys(), image_scores)}
    return scores, per_image_scores, unavailable


def caption_scores(references, captions):
    """The corpus scores of ``caption_metrics`` (SPICE only where Java and Stanford CoreNLP are installed)."""
    return caption_metrics(references, captions, per_image=())[0]


class _PredictAnswersWith:
    """A view of ``model`` whose ``predict_answers`` receives extra keyword arguments; everything else is the
    model's. Lets the tasks below reuse LAVIS's ``valid_step`` unchanged."""

    def __init__(self, model, **extra):
        self._model = model
        self._extra = extra

    def predict_answers(self, *args, **kwargs):
        return self._model.predict_answers(*args, **kwargs, **self._extra)

    def __getattr__(self, name):
        return getattr(self._model, name)


class LengthPenaltyMixin:
    """Reads ``run.length_penalty`` and passes it to ``model.predict_answers``."""

    length_penalty = None

    @classmethod
    def setup_task(cls, cfg):
        task = super().setup_task(cfg)
        value = cfg.run_cfg.get("length_penalty", None)
        task.length_penalty = None if value is None else float(value)
        return task

    def valid_step(self, model, samples):
        if self.length_penalty is not None:
            model = _PredictAnswersWith(model, length_penalty=self.length_penalty)
        return super().valid_step(model, samples)


@registry.register_task("xformer_vqa")
class XFormerVQATask(LengthPenaltyMixin, VQATask):
    """LAVIS's ``vqa`` (VQAv2, OK-VQA: official VQA accuracy) with ``run.length_penalty``."""


@registry.register_task("xformer_gqa")
class XFormerGQATask(LengthPenaltyMixin, GQATask):
    """LAVIS's ``gqa`` (exact-match accuracy) with ``run.length_penalty``."""


# ---------------------------------------------------------------------------------------------------------------
# xformer_finegrained: the OC / MCI benchmark (datasets/finegrained.py derives its questions)
# ---------------------------------------------------------------------------------------------------------------
# The paper's protocol (section 3.1 and Table 3: prompt, 5 beams, length penalty 0; max_len / min_len are LAVIS's VQA
# defaults, a choice): the defaults of the ``xformer_finegrained`` task.
FINEGRAINED_PROTOCOL = {
    "prompt": "Question: {} Short Answer:",  # section 3.1's, as printed (config_llm.PAPER_VQA_PROMPT)
    "num_beams": 5,
    "length_penalty": 0.0,
    "inference_method": "generate",
    "max_len": 10,
    "min_len": 1,
}


@registry.register_task("xformer_finegrained")
class FinegrainedVQATask(XFormerVQATask):
    """LAVIS's ``vqa`` task (official VQA accuracy, per answer type) with the paper's OC/MCI protocol as defaults:
    prompt "Question: {} Short Answer:", beam search with 5 beams, length penalty 0, generated answers. Keys set
    in ``run:`` win."""

    @classmethod
    def setup_task(cls, cfg):
        from types import SimpleNamespace

        from omegaconf import OmegaConf

        run_cfg = OmegaConf.merge(OmegaConf.create(FINEGRAINED_PROTOCOL), cfg.run_cfg)
        return super().setup_task(SimpleNamespace(run_cfg=run_cfg))
