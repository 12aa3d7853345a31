"""The few-shot tasks, ``xformer_fewshot_vqa`` and ``xformer_fewshot_captioning``: the plugin's ``xformer_vqa`` /
``xformer_captioning`` (same datasets, generation settings and scoring) evaluated in context (``lavis_xformer.fewshot``).

``run:`` keys besides the base task's:

    shots: [0, 4, 8]          demonstrations per query, one evaluation per entry
    trial_seeds: [42, 43, 44] one evaluation per seed (demonstrations and query set); 0 shots runs once
    query_set_size: 2048      OpenFlamingo's query set: training examples the demonstrations are drawn from
    demo_split: train         the split of the same dataset that supplies them

The dataset config must build ``demo_split`` (the training annotations) besides the evaluated split; demonstration
images go through the evaluated split's eval processor, their questions / captions through its text processor.
Each (shots, seed) is scored by the base task (official VQA accuracy; COCO caption metrics) and written to
``evaluate.txt``; ``fewshot.json`` in the output folder holds every trial and, per shot count, the mean and the
standard deviation over trials (OpenFlamingo's report). The main metric (``agg_metrics``) is the mean at the
largest shot count.
"""

import json
import logging
import os
from collections import defaultdict
from functools import lru_cache

import numpy as np
from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from PIL import Image

from lavis_xformer import fewshot
from lavis_xformer.models.llm_head import vqa_prompts
from lavis_xformer.tasks import XFormerCaptionTask, XFormerVQATask

DEFAULT_SHOTS = (0, 4, 8)
DEFAULT_TRIAL_SEEDS = (42,)


def underlying(dataset):
    """The dataset under ``Subset`` / ``RobustDataset`` wrappers (the one whose ``annotation`` the samples index)."""
    while not hasattr(dataset, "annotation"):
        dataset = dataset.dataset
    return dataset


class FewShotMixin:
    """Demonstration pool, the loop over (shots, trial seed) and the per-setting scoring, for a LAVIS task."""

    example_kind = None  # "vqa" or "caption"
    shots = DEFAULT_SHOTS
    trial_seeds = DEFAULT_TRIAL_SEEDS

    @classmethod
    def setup_task(cls, cfg):
        task = super().setup_task(cfg)
        run_cfg = cfg.run_cfg
        task.shots = tuple(int(k) for k in run_cfg.get("shots", DEFAULT_SHOTS))
        task.trial_seeds = tuple(int(s) for s in run_cfg.get("trial_seeds", DEFAULT_TRIAL_SEEDS))
        task.query_set_size = int(run_cfg.get("query_set_size", fewshot.DEFAULT_QUERY_SET_SIZE))
        task.demo_split = run_cfg.get("demo_split", "train")
        if not task.shots or min(task.shots) < 0 or not task.trial_seeds:
            raise ValueError(
                f"run.shots={list(task.shots)} must be a non-empty list of counts >= 0 and run.trial_seeds="
                f"{list(task.trial_seeds)} a non-empty list of seeds"
            )
        if cls.example_kind == "vqa":  # no run.prompt: the model's vqa_prompt (predict_answers' default)
            task.prompt = run_cfg.get("prompt", None)
        task.pool = None
        task.setting = (0, task.trial_seeds[0])
        return task

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        if len(datasets) != 1:
            raise ValueError(f"few-shot evaluation takes one dataset; the config has {sorted(datasets)}")
        ((name, splits),) = datasets.items()
        if self.demo_split not in splits:
            raise ValueError(
                f"{name}: few-shot evaluation draws demonstrations from the {self.demo_split!r} split, which the "
                f"dataset config does not build (it builds {sorted(splits)}); add its annotations to build_info"
            )
        source = underlying(splits[self.demo_split])
        eval_split = next((s for s in splits if s != self.demo_split), None)
        if eval_split is None:
            raise ValueError(f"{name}: no split to evaluate besides the demonstration split {self.demo_split!r}")
        evaluated = underlying(splits[eval_split])
        self.demo_vis_processor, self.demo_text_processor = evaluated.vis_processor, evaluated.text_processor
        self.pool = fewshot.DemoPool(
            fewshot.examples_from_annotation(source.annotation, source.vis_root, self.example_kind), self.query_set_size
        )
        self._demo_image = lru_cache(maxsize=4096)(self._load_demo_image)
        return datasets

    def _load_demo_image(self, path):
        return self.demo_vis_processor(Image.open(path).convert("RGB"))

    # ---- per batch ----------------------------------------------------------------------------------------------
    def demonstrations(self, model, samples, query_keys):
        """Each query's demonstrations for the current (shots, seed)."""
        shots, seed = self.setting
        dataset = self._evaluated
        demos = []
        for key, instance in zip(query_keys, samples["instance_id"]):
            query_image = os.path.join(dataset.vis_root, dataset.annotation[int(instance)]["image"])
            drawn = self.pool.draw(key, query_image, shots, seed)
            demos.append([self.make_demonstration(model, example) for example in drawn])
        return demos

    def make_demonstration(self, model, example):
        raise NotImplementedError

    # ---- the loop over settings ---------------------------------------------------------------------------------
    def settings(self):
        """(shots, trial seed) pairs; 0 shots has no demonstrations to vary and runs once."""
        return [(k, s) for k in self.shots for s in (self.trial_seeds if k else self.trial_seeds[:1])]

    def evaluation(self, model, data_loader, cuda_enabled=True):
        if self.pool is None:
            raise RuntimeError("build_datasets must run first: it sets up the demonstration pool")
        self._evaluated = underlying(data_loader.dataset)
        results = []
        for shots, seed in self.settings():
            self.setting = (shots, seed)
            logging.info("few-shot: %d shots, trial seed %d", shots, seed)
            for result in super().evaluation(model, data_loader, cuda_enabled=cuda_enabled):
                results.append({**result, "shots": shots, "trial_seed": seed})
        return results

    def after_evaluation(self, val_result, split_name, epoch=None, **kwargs):
        by_setting = defaultdict(list)
        for result in val_result:
            result = dict(result)
            by_setting[(result.pop("shots"), result.pop("trial_seed"))].append(result)
        trials = {}
        for (shots, seed), results in sorted(by_setting.items()):
            metrics = self.score_setting(results, f"{split_name}_{shots}shot_seed{seed}", split_name)
            trials[(shots, seed)] = metrics
        return self.summarise(trials, split_name)

    def score_setting(self, results, tag, split_name):
        raise NotImplementedError

    @main_process
    def summarise(self, trials, split_name):
        """Per shot count: every trial's main metric, their mean and standard deviation (``fewshot.json``)."""
        summary = {}
        for shots in self.shots:
            values = {seed: trials[(k, seed)] for (k, seed) in trials if k == shots}
            main = {seed: float(m[self.main_metric]) for seed, m in values.items()}
            summary[str(shots)] = {
                "metric": self.main_metric,
                "trials": {str(seed): v for seed, v in main.items()},
                "mean": float(np.mean(list(main.values()))),
                "std": float(np.std(list(main.values()))),
                "all_metrics": {str(seed): m for seed, m in values.items()},
            }
        report = {"split": split_name, "query_set_size": self.query_set_size, "shots": summary}
        output_dir = registry.get_path("output_dir")
        with open(os.path.join(output_dir, "fewshot.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(output_dir, "evaluate.txt"), "a") as f:
            f.write(json.dumps({"fewshot": {k: {"mean": v["mean"], "std": v["std"]} for k, v in summary.items()}}) + "\n")
        for shots, entry in summary.items():
            logging.info("%s shots: %s %.2f ± %.2f over %d trial(s)", shots, self.main_metric, entry["mean"],
                         entry["std"], len(entry["trials"]))
        return {"agg_metrics": summary[str(max(self.shots))]["mean"], "fewshot": summary}


@registry.register_task("xformer_fewshot_vqa")
class FewShotVQATask(FewShotMixin, XFormerVQATask):
    """``xformer_vqa`` in context: "Question: q Short answer: a" demonstrations (the run's ``prompt``, else the
    model's ``vqa_prompt``) before each question."""

    example_kind = "vqa"
    main_metric = "agg_metrics"  # the official VQA accuracy

    def make_demonstration(self, model, example):
        question = self.demo_text_processor(example.text)
        template = model.config.vqa_prompt if self.prompt is None else self.prompt
        (prompt,) = vqa_prompts([question], template)
        return fewshot.Demonstration(example, self._demo_image(example.image_path), prompt, example.answer, question)

    def valid_step(self, model, samples):
        keys = [int(q) for q in samples["question_id"]]
        answers = fewshot.answer_in_context(
            model,
            samples,
            self.demonstrations(model, samples, keys),
            num_beams=self.num_beams,
            max_len=self.max_len,
            min_len=self.min_len,
            prompt=self.prompt,
            length_penalty=self.length_penalty,
            keys=keys,
        )
        return [{"question_id": key, "answer": answer} for key, answer in zip(keys, answers)]

    def score_setting(self, results, tag, split_name):
        result_file = self.save_result(
            results, result_dir=registry.get_path("result_dir"), filename=f"{tag}_vqa_result",
            remove_duplicate="question_id",
        )
        return self._report_metrics(result_file=result_file, split=split_name)


@registry.register_task("xformer_fewshot_captioning")
class FewShotCaptionTask(FewShotMixin, XFormerCaptionTask):
    """``xformer_captioning`` in context: caption demonstrations (the model's caption prompt, then the caption)
    before each image."""

    example_kind = "caption"
    main_metric = "CIDEr"

    def make_demonstration(self, model, example):
        # the caption cleaned as the text processor cleans it, without the processor's own prompt: the demonstration's
        # prompt is the model's, as at the query
        clean = getattr(self.demo_text_processor, "pre_caption", self.demo_text_processor)
        caption = clean(example.text)
        return fewshot.Demonstration(example, self._demo_image(example.image_path), model.prompt, caption)

    def valid_step(self, model, samples):
        keys = [int(i) for i in samples["image_id"]]
        captions = fewshot.caption_in_context(
            model,
            samples,
            self.demonstrations(model, samples, keys),
            keys=keys,
            use_nucleus_sampling=False,
            num_beams=self.num_beams,
            max_length=self.max_len,
            min_length=self.min_len,
        )
        return [{"caption": caption, "image_id": key} for key, caption in zip(keys, captions)]

    def score_setting(self, results, tag, split_name):
        result_file = self.save_result(
            results, result_dir=registry.get_path("result_dir"), filename=tag, remove_duplicate="image_id"
        )
        return self._report_metrics(eval_result_file=result_file, split_name=split_name)
