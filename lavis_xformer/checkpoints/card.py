"""The model card of a shareable folder: ``huggingface_hub``'s ``ModelCard`` with ``ModelCardData`` metadata (licence,
base models, datasets, tags) over a body written from the run's own files (``run_summary``: stage, data, steps,
losses, metrics) and the citation of the paper and LAVIS (as in the repository's ``CITATION.cff``)."""

import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from lavis_xformer.checkpoints.names import PRETRAINED_CONFIG, PRETRAINED_INDEX, PRETRAINED_WEIGHTS
from lavis_xformer.common.run_log import read_log

LICENSE = "bsd-3-clause"  # the hub's identifier of the repository's LICENSE (LAVIS's licence)
LIBRARY_NAME = "lavis-xformer"

# Config fields naming the sources of the frozen parts (the folder's base models) and the fields' display names
FROZEN_SOURCE_FIELDS = {"vit_weights": "image encoder", "mae_weights": "MAE encoder", "opt_model": "LLM",
                        "t5_model": "LLM"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name: a hub repository (eva_clip_g is LAVIS's URL)

# The citation of CITATION.cff (the paper, and LAVIS which this plugin extends) as BibTeX; a test keeps them equal
CITATION_BIBTEX = """\
@article{swetha2024xformer,
  title   = {X-Former: Unifying Contrastive and Reconstruction Learning for MLLMs},
  author  = {Swetha, Sirnam and Yang, Jinyu and Neiman, Tal and Rizve, Mamshad Nayeem and Tran, Son and
             Yao, Benjamin and Chilimbi, Trishul and Shah, Mubarak},
  journal = {arXiv preprint arXiv:2407.13851},
  year    = {2024}
}

@inproceedings{li2023lavis,
  title     = {LAVIS: A One-stop Library for Language-Vision Intelligence},
  author    = {Li, Dongxu and Li, Junnan and Le, Hung and Wang, Guangsen and Savarese, Silvio and Hoi, Steven C. H.},
  booktitle = {ACL 2023 System Demonstrations},
  note      = {arXiv:2209.09019},
  year      = {2023}
}"""


def frozen_sources(config: dict) -> dict:
    """``{field: source}`` of the frozen parts a config names (hub ids, LAVIS names, files); empty for random ones."""
    return {key: config[key] for key in FROZEN_SOURCE_FIELDS if isinstance(config.get(key), str) and config[key]}


def card_data(config: dict, datasets: Iterable[str] = ()):
    """``ModelCardData``: licence, library, base models (the frozen sources that are hub ids), datasets, tags."""
    from huggingface_hub import ModelCardData

    arch = str(config.get("arch"))
    llm = arch.endswith(("_opt", "_t5"))
    tags = ["lavis", "lavis-xformer", arch, "blip-2" if arch.startswith("blip2") else "x-former",
            "image-to-text" if llm else "feature-extraction"]
    base = sorted({source for source in frozen_sources(config).values() if _HUB_ID.match(source)})
    return ModelCardData(license=LICENSE, library_name=LIBRARY_NAME, tags=tags, base_model=base or None,
                         datasets=sorted(datasets) or None, pipeline_tag="image-to-text" if llm else None)


def run_summary(checkpoint: dict, source: str) -> dict:
    """What the model card says of the run, from the checkpoint and the log.txt / evaluate.txt beside it."""
    config = checkpoint.get("config") or {}
    run, model = config.get("run") or {}, config.get("model") or {}
    trainer = checkpoint.get("trainer") or {}
    llm = str(model.get("arch", "")).endswith(("_opt", "_t5"))
    task = run.get("task")
    stage = {"xformer_pretrain": "stage 2, vision-to-language generative learning with a frozen LLM" if llm
             else "stage 1, vision-language representation learning"}.get(task, f"trained with the {task!r} task")
    steps = None
    if trainer:
        iters = int(trainer.get("iters_per_epoch", 0))
        steps = int(trainer.get("epoch", 0)) * iters + int(trainer.get("iteration", 0))
    job = Path(source).parent
    # log.txt across the resumes that led here (a resumed run's log continues its predecessor's), up to this
    # checkpoint, as the run's own epoch and iteration label them
    logged = [r for r in read_log(job) if r["kind"] in ("epoch", "eval")
              and (steps is None or r.get("iteration") is None or r["iteration"] <= steps)]
    eval_lines = []
    path = job / "evaluate.txt"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("{") and line.endswith("}"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "run" not in record:
                    eval_lines.append(record)
    metrics = [{k: v for k, v in r.items() if k != "kind"} for r in logged if r["kind"] == "eval"] + eval_lines
    return {"stage": stage, "task": task, "datasets": config.get("datasets") or {}, "steps": steps,
            "epoch": trainer.get("epoch", checkpoint.get("epoch")), "run": run, "source": os.path.basename(source),
            "train": [r for r in logged if r["kind"] == "epoch"], "metrics": metrics}


def _cell(value) -> str:
    """A table cell: a number to 4 significant digits, nan for a null (non-finite) average."""
    if value is None:
        return "nan"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _body(config: dict, summary: Optional[dict], weights: dict) -> str:
    arch, model_type = config["arch"], config.get("model_type")
    name = f"{arch} ({model_type})" if model_type else arch
    title = summary["stage"] if summary else "saved with save_pretrained"
    origin = (f"Exported with `lavis-xformer export` from `{summary['source']}`; what follows comes from the run's "
              "own files" if summary else "Saved from a model in memory with `save_pretrained`")
    sources = frozen_sources(config)
    files = (f"`{PRETRAINED_INDEX}` and {weights['shards']} shards `model-0000k-of-...safetensors`"
             if weights["shards"] > 1 else f"`{PRETRAINED_WEIGHTS}`")
    rebuilt = ("from their own sources (below)" if sources else
               "as the config builds them (random stand-ins seeded by the config: a `tiny` type)")
    held = (f"the trainable weights only; the frozen parts load {rebuilt}" if weights["trainable_only"] else
            "every weight, frozen ones included: the folder needs nothing else")
    yaml_node = f"arch: {arch}" + (f", model_type: {model_type}" if model_type else "")
    lines = [
        f"# {name}: {title}", "",
        f"{origin}. No X-Former weights were released with the paper: this is a model trained with lavis-xformer, "
        "the paper's method as a plugin of Salesforce LAVIS.", "",
        "## Use", "",
        "```python",
        "from lavis_xformer.checkpoints import from_pretrained",
        "model = from_pretrained(\"<this folder or hub repository id>\")  # in eval mode",
        "```", "",
        "or in a LAVIS yaml: `model: {" + yaml_node + ", pretrained: <this folder>}`.", "",
        f"Files: `{PRETRAINED_CONFIG}` (the model's full config), {files} ({weights['tensors']} tensors, "
        f"{weights['elements']:,} values: {held}).",
    ]
    if sources:
        lines += ["", "## Frozen parts", ""]
        lines += [f"- {FROZEN_SOURCE_FIELDS[key]} (`{key}`): `{value}`" for key, value in sources.items()]
    if summary:
        run = summary["run"]
        lines += [
            "", "## Training", "",
            f"- Task: `{summary['task']}`",
            f"- Training iterations done: {summary['steps'] if summary['steps'] is not None else 'unknown'} "
            f"(epoch {summary['epoch']}), batch size {run.get('batch_size_train')} per rank, "
            f"{run.get('world_size', 1)} rank(s), lr schedule `{run.get('lr_sched')}` (init_lr {run.get('init_lr')})",
            "- Data:",
        ]
        for name, dataset in summary["datasets"].items():
            settings = {k: v for k, v in (dataset or {}).items()
                        if k not in ("vis_processor", "text_processor", "build_info")}
            lines.append(f"  - `{name}`" + (f": `{json.dumps(settings, default=str)}`" if settings else ""))
        if summary["train"]:
            keys = [k for k in summary["train"][-1] if k.startswith("train_loss")]
            lines += ["", "## Training losses (per-epoch averages, from log.txt)", "",
                      "| epoch | " + " | ".join(k[len("train_"):] for k in keys) + " |",
                      "|---" * (len(keys) + 1) + "|"]
            lines += [f"| {record.get('epoch', i)} | " + " | ".join(_cell(record[k]) if k in record else "" for k in keys) + " |"
                      for i, record in enumerate(summary["train"])]
        lines += ["", "## Evaluation metrics (from log.txt / evaluate.txt)", ""]
        if summary["metrics"]:
            lines += [f"- `{json.dumps(record, default=str)}`" for record in summary["metrics"]]
        else:
            lines.append("None were logged in the run's folder.")
    lines += ["", "## Licence and citation", "",
              "BSD-3-Clause, as LAVIS. If you use this model, cite the paper it implements and LAVIS:", "",
              "```bibtex", CITATION_BIBTEX, "```"]
    return "\n".join(lines) + "\n"


def model_card(config: dict, weights: dict, summary: Optional[dict] = None):
    """The ``ModelCard`` of a folder: ``config`` its ``config.json``; ``weights`` ``{tensors, elements, shards,
    trainable_only}``; ``summary`` the run's (``run_summary``), or ``None`` for a model saved from memory."""
    from huggingface_hub import ModelCard

    datasets = list((summary or {}).get("datasets") or {})
    data = card_data(config, datasets)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(config, summary, weights)}")
