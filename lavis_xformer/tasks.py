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
"""

from lavis.common.registry import registry
from lavis.tasks.image_text_pretrain import ImageTextPretrainTask
from lavis.tasks.vqa import GQATask, VQATask

STAGE1_LOSSES = ("loss_itc", "loss_itm", "loss_lm", "loss_rec")


@registry.register_task("xformer_pretrain")
class XFormerPretrainTask(ImageTextPretrainTask):
    """Stage-1 pre-training (LAVIS's ``image_text_pretrain``) with every loss term logged.

    ``runner_xformer`` runs the training loop; it averages the model output's ``logged_loss_terms`` over the steps
    it keeps, next to the total."""

    logged_loss_terms = STAGE1_LOSSES


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
# The paper's protocol (section 3.1 and Table 3): the defaults of the ``xformer_finegrained`` task.
FINEGRAINED_PROTOCOL = {
    "prompt": "Question: {} Short answer:",
    "num_beams": 5,
    "length_penalty": 0.0,
    "inference_method": "generate",
    "max_len": 10,
    "min_len": 1,
}


@registry.register_task("xformer_finegrained")
class FinegrainedVQATask(XFormerVQATask):
    """LAVIS's ``vqa`` task (official VQA accuracy, per answer type) with the paper's OC/MCI protocol as defaults:
    prompt "Question: {} Short answer:", beam search with 5 beams, length penalty 0, generated answers. Keys set
    in ``run:`` win."""

    @classmethod
    def setup_task(cls, cfg):
        from types import SimpleNamespace

        from omegaconf import OmegaConf

        run_cfg = OmegaConf.merge(OmegaConf.create(FINEGRAINED_PROTOCOL), cfg.run_cfg)
        return super().setup_task(SimpleNamespace(run_cfg=run_cfg))
