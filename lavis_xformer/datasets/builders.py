"""Dataset builders for the embedded shapes data: ``xformer_shapes_caption``, ``xformer_shapes_vqa``,
``xformer_shapes_retrieval``.

They are LAVIS ``BaseDatasetBuilder``s feeding LAVIS's own dataset classes (``CaptionDataset`` /
``CaptionEvalDataset``, ``COCOVQADataset`` / ``COCOVQAEvalDataset``, ``RetrievalDataset`` /
``RetrievalEvalDataset``). The only difference from LAVIS's builders is where the files come from: instead of
downloading, ``_download_data`` (run by rank 0 while the other ranks wait, as LAVIS does) generates the data at
first use, and ``build_info`` is derived from the dataset config's ``shapes:`` node::

    datasets:
      xformer_shapes_caption:
        shapes:
          root: xformer_shapes     # relative: under LAVIS's env.cache_root; absolute or ~/ paths as given
          seed: 0
          image_size: 64
          num_train: 512
          num_val: 64
          num_test: 64

Several builders with the same ``shapes:`` settings share one generated folder.

The train split comes wrapped in ``RobustDataset`` (unusable samples are replaced, logged and counted; the run stops
past 1% of them): robust by default, whichever runner trains on it. ``runner_xformer`` applies ``run.max_bad_fraction``
and friends to it, and ``run.robust_data: False`` unwraps it.
"""

import logging

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.caption_datasets import CaptionDataset, CaptionEvalDataset
from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset, COCOVQAEvalDataset
from lavis.datasets.datasets.retrieval_datasets import RetrievalDataset, RetrievalEvalDataset
from omegaconf import OmegaConf

from lavis_xformer.datasets import shapes
from lavis_xformer.datasets.robust import RobustDataset
from lavis_xformer.paths import dataset_config_path


class ShapesBuilder(BaseDatasetBuilder):
    """Generates the shapes data where the config says, and points LAVIS's ``build()`` at its files."""

    def __init__(self, cfg=None):
        super().__init__(cfg)
        settings = self.config.get("shapes", None) or {}
        self.spec = shapes.ShapesSpec.from_config(settings)
        self.root = shapes.resolve_root(settings.get("root", None))
        self.data_dir = self.root / self.spec.folder_name()
        build_info = OmegaConf.create(
            {
                "annotations": {
                    split: {"storage": [str(shapes.annotation_path(self.data_dir, n)) for n in self.annotation_names(split)]}
                    for split in shapes.SPLITS
                },
                "images": {"storage": str(self.data_dir / "images")},
            }
        )
        configured = self.config.get("build_info", None)
        if configured is not None and configured != build_info:
            logging.warning("%s: build_info is derived from `shapes:`; the configured one is ignored", type(self).__name__)
        self.config.build_info = build_info

    def annotation_names(self, split: str):
        """The annotation files (by name) LAVIS's dataset class for ``split`` takes, in its order."""
        raise NotImplementedError

    def _download_data(self):
        self.data_dir = shapes.ensure_generated(self.spec, self.root)
        logging.info("shapes data: %s", self.data_dir)

    def build_datasets(self):
        datasets = super().build_datasets()
        if "train" in datasets and not isinstance(datasets["train"], RobustDataset):
            datasets["train"] = RobustDataset(datasets["train"])
        return datasets


@registry.register_builder("xformer_shapes_caption")
class ShapesCaptionBuilder(ShapesBuilder):
    """COCO-caption format; eval images carry integer ids (``CaptionTask`` needs them; LAVIS's
    ``COCOCapEvalDataset`` would parse ids out of ``*.jpg`` file names instead)."""

    train_dataset_cls = CaptionDataset
    eval_dataset_cls = CaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": dataset_config_path("xformer_shapes/defaults_caption.yaml")}

    def annotation_names(self, split):
        return [f"caption_{split}"]


@registry.register_builder("xformer_shapes_vqa")
class ShapesVQABuilder(ShapesBuilder):
    """coco_vqa format; val/test also carry the answer list and the official question/annotation files, so
    LAVIS's ``vqa`` task scores them with the official VQA accuracy."""

    train_dataset_cls = COCOVQADataset
    eval_dataset_cls = COCOVQAEvalDataset
    DATASET_CONFIG_DICT = {"default": dataset_config_path("xformer_shapes/defaults_vqa.yaml")}

    def annotation_names(self, split):
        if split == "train":
            return ["vqa_train"]
        return [f"vqa_{split}", "vqa_answer_list", f"vqa_{split}_questions", f"vqa_{split}_annotations"]


@registry.register_builder("xformer_shapes_retrieval")
class ShapesRetrievalBuilder(ShapesBuilder):
    """Retrieval format (as COCO / Flickr30k in LAVIS): train pairs, val/test images with caption lists."""

    train_dataset_cls = RetrievalDataset
    eval_dataset_cls = RetrievalEvalDataset
    DATASET_CONFIG_DICT = {"default": dataset_config_path("xformer_shapes/defaults_retrieval.yaml")}

    def annotation_names(self, split):
        return [f"retrieval_{split}"]
