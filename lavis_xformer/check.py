"""Check a run config before anything heavy is built:

    python -m lavis_xformer.check --cfg-path X.yaml [--options k=v ...] [--evaluate] [--no-memory]

One line per finding, ``ERROR`` / ``WARNING`` / ``OK``, and exit status 1 when there is an error. In order:

1. **The config** (``run_config.validate_config``): registered names, required and typed run fields, learning rates
   finite and >= 0 (init_lr > 0), unknown ``run.*`` / ``model.*`` keys with a did-you-mean, malformed ``--options``;
   then the model's typed config.
2. **Data**: every annotation file and image folder each dataset builder will read, resolved as LAVIS resolves them
   (relative paths under ``cache_root``). A missing one is an error naming the expected path and how to get it; no
   download is attempted (LAVIS's builders would download annotations that have a URL: ``run.allow_downloads: True``
   lets them, and the missing file is then a warning). The plugin's shapes data is generated at first use.
3. **Checkpoints**: ``model.finetuned`` / ``model.pretrained`` (whichever the load flags select) and
   ``run.resume_ckpt_path``: placeholders such as ``<job_id>`` are refused with the command that writes the file, a
   missing file is an error, an existing one is opened (memory-mapped, weights only) and must hold tensors of the
   model; a URL is looked up in the download cache.
4. **Hub weights** (CLIP-ViT, MAE, Q-Former/BERT, tokenizer, LLM): cached or not, from the local caches only.
5. **GPU memory** for ``run.batch_size_train`` per GPU (an estimate; ``--no-memory`` skips it): the model built on the
   ``meta`` device (no weights, no download); weights at their dtypes; for training, fp32 gradients and AdamW's two
   fp32 states of every trainable parameter, and the activations kept for backward, measured as the bytes autograd
   saves in a meta-device forward at batch 2 and 4 (half their difference is the per-sample cost).

``python -m lavis_xformer.train`` / ``evaluate`` run checks 1-4 first and stop on an error.
"""

import argparse
import dataclasses
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, List, Optional

import torch
from omegaconf import OmegaConf

from lavis_xformer.common.meta import on_meta
from lavis_xformer.models.precision import run_precision_report
from lavis_xformer.run_config import ConfigError
from lavis_xformer.paths import PLACEHOLDER

GIB = 1024 ** 3

# How to get each of LAVIS's datasets. The scripts live in LAVIS's GitHub repository
# (lavis/datasets/download_scripts), not in the pip wheel; README "Running at paper scale" has the layout.
_SCRIPTS = "https://github.com/salesforce/LAVIS/tree/main/lavis/datasets/download_scripts"
HOW_TO_GET = {
    "coco": f"python download_coco.py from {_SCRIPTS}",
    "vg": f"python download_vg.py from {_SCRIPTS}",
    "conceptual_caption_3m": f"the DownloadConceptualCaptions scripts in {_SCRIPTS} (img2dataset); LAVIS's default "
                             "annotation path is Salesforce-internal: write the json and set its url/storage",
    "conceptual_caption_12m": f"the DownloadConceptualCaptions scripts in {_SCRIPTS}; LAVIS's default annotation "
                              "path is Salesforce-internal: write the json and set its url/storage",
    "sbu_caption": f"python download_sbu.py from {_SCRIPTS}",
    "flickr30k": f"python download_flickr.py from {_SCRIPTS} (needs the Flickr30k request form's images)",
    "nocaps": f"python download_nocaps.py from {_SCRIPTS}",
    "gqa": f"python download_gqa.py from {_SCRIPTS}",
    "vqav2": f"COCO images: python download_coco.py from {_SCRIPTS}",
    "okvqa": f"COCO images: python download_coco.py from {_SCRIPTS}",
    "laion": "LAION-115M as BLIP's webdataset shards (img2dataset); set the shard pattern in build_info.images.storage",
}


@dataclasses.dataclass
class Finding:
    level: str  # "ERROR", "WARNING" or "OK"
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


class CheckFailed(ConfigError):
    """``check`` found errors; the message holds one line per finding."""


def _how_to_get(name: str) -> str:
    for key, how in HOW_TO_GET.items():
        if name.startswith(key) or key in name:
            return how
    return "see the dataset's documentation, README 'Running at paper scale'"


def _cache_path(path) -> Path:
    """LAVIS's rule for a dataset path: ``~`` expanded, relative paths under ``cache_root``."""
    from lavis.common.registry import registry

    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else Path(registry.get_path("cache_root")) / path


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    return list(value)


# ---------------------------------------------------------------------------------------------------------------
# 2. Data
# ---------------------------------------------------------------------------------------------------------------
def check_datasets(datasets_cfg, allow_downloads: bool = False) -> List[Finding]:
    findings = []
    for name in datasets_cfg:
        cfg = datasets_cfg[name]
        if cfg.get("shapes", None) is not None:
            from lavis_xformer.datasets import shapes

            root = shapes.resolve_root(cfg.shapes.get("root", None))
            findings.append(Finding("OK", f"{name}: shapes data, generated at first use under {root}"))
        elif cfg.get("finegrained", None) is not None:
            node = cfg.finegrained
            for kind in ("annotations", "images"):
                path = _cache_path(node.get(kind))
                if not path.exists():
                    findings.append(Finding("ERROR", f"{name}: {kind} {path} not found "
                                                     f"(datasets.{name}.finegrained.{kind}); get it: "
                                                     f"{_how_to_get('coco' if 'coco' in name else name)}"))
        else:
            findings += _lavis_dataset_findings(name, cfg, allow_downloads)
    return findings


def _lavis_dataset_findings(name, cfg, allow_downloads) -> List[Finding]:
    """The files LAVIS's ``BaseDatasetBuilder`` reads: every split's annotation ``storage`` (copied from a local
    ``url`` or downloaded from a remote one when missing) and the ``build_info.<data_type>.storage`` folder."""
    findings = []
    build_info = cfg.get("build_info", None)
    if build_info is None:
        return [Finding("WARNING", f"{name}: no build_info; its files cannot be checked")]
    annotations = build_info.get("annotations", None) or {}
    for split in annotations:
        info = annotations[split]
        urls, storages = _as_list(info.get("url", None)), _as_list(info.get("storage", None))
        if not storages:
            findings.append(Finding("ERROR", f"{name}: annotations.{split} has no storage path (LAVIS's default "
                                             f"for {name} is empty): set datasets.{name}.build_info.annotations."
                                             f"{split}.storage (and url); get it: {_how_to_get(name)}"))
            continue
        for index, storage in enumerate(storages):
            path = _cache_path(storage)
            if path.is_file():
                continue
            url = str(urls[index]) if index < len(urls) else ""
            where = f"{name}: annotation file {path} ({split}) not found"
            if url.startswith(("http://", "https://")):
                if allow_downloads:
                    findings.append(Finding("WARNING", f"{where}; LAVIS will download it from {url}"))
                else:
                    findings.append(Finding("ERROR", f"{where}; download {url} to that path, or set "
                                                     "run.allow_downloads=True to let LAVIS fetch it"))
            elif url and Path(os.path.expanduser(url)).is_file():
                findings.append(Finding("OK", f"{name}: {split} annotations will be copied from {url} to {path}"))
            else:
                source = f" and its url {url} does not exist either" if url else ""
                findings.append(Finding("ERROR", f"{where}{source}; get it: {_how_to_get(name)}"))
    data_type = cfg.get("data_type", "images")
    storage = (build_info.get(data_type, None) or {}).get("storage", None)
    if storage is None:
        return findings
    folder = _cache_path(storage)
    if "{" in str(storage):  # a webdataset shard pattern such as .../{00000..01743}.tar
        folder = folder.parent
    if not folder.exists():
        findings.append(Finding("ERROR", f"{name}: {data_type} folder {folder} not found "
                                         f"(datasets.{name}.build_info.{data_type}.storage); get it: "
                                         f"{_how_to_get(name)}"))
    elif not findings:
        findings.append(Finding("OK", f"{name}: annotations and {data_type} found under {folder.parent}"))
    return findings


# ---------------------------------------------------------------------------------------------------------------
# 3. Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _producing_command(path: str) -> str:
    """The project yaml whose ``run.output_dir`` the placeholder path lies in, as a train command."""
    folder = str(path).split("<", 1)[0].rstrip("/")
    return _output_dirs().get(folder, "the training run that writes it")


@functools.lru_cache(maxsize=1)
def _output_dirs() -> dict:
    """``run.output_dir`` -> the train command of the project yaml that writes it (plain yaml: fast)."""
    import yaml as pyyaml

    from lavis_xformer.paths import projects_root

    commands = {}
    for path in sorted(projects_root().rglob("*.yaml")):
        output_dir = ((pyyaml.safe_load(path.read_text()) or {}).get("run", None) or {}).get("output_dir", None)
        if output_dir:
            relative = path.relative_to(projects_root().parent)
            commands.setdefault(str(output_dir).rstrip("/"), f"python -m lavis_xformer.train --cfg-path {relative}")
    return commands


def _open_checkpoint(path: Path):
    """The checkpoint's state dict without reading its tensors (memory-mapped, weights only)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_slice(key).get_shape() for key in f.keys()}
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as mmap_error:
        if "mmap" not in str(mmap_error):
            raise
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model", None), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"holds a {type(checkpoint).__name__}, not a state dict")
    return {key: tuple(value.shape) for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def check_checkpoint(key: str, value, model_keys: Optional[set] = None) -> Finding:
    value = str(value)
    if not value:
        return Finding("ERROR", f"{key} is empty but the run loads it (load_finetuned: True): pass --options "
                                f"{key}=<a checkpoint file or exported folder>, or set model.load_finetuned=False")
    if PLACEHOLDER.search(value):
        return Finding("ERROR", f"{key}={value} is a placeholder ({PLACEHOLDER.search(value).group(0)}): train first "
                                f"with `{_producing_command(value)}`, then pass --options {key}=<its checkpoint>")
    if value.startswith(("http://", "https://")):
        import timm.models.hub as timm_hub

        cached = Path(timm_hub.get_cache_dir()) / os.path.basename(torch.hub.urlparse(value).path)
        if cached.is_file():
            return Finding("OK", f"{key}: {value} is cached at {cached}")
        return Finding("WARNING", f"{key}: {value} is not cached ({cached}), will download")
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        return Finding("ERROR", f"{key}={value}: no such file (resolved as {path.resolve()})")
    try:
        tensors = _open_checkpoint(path)
    except Exception as error:  # any reason the runner's load would fail: say it now
        return Finding("ERROR", f"{key}={value} cannot be loaded: {type(error).__name__}: {error}")
    if not tensors:
        return Finding("ERROR", f"{key}={value} holds no tensors")
    if model_keys is not None:
        matching = len(model_keys & set(tensors))
        if matching == 0:
            return Finding("ERROR", f"{key}={value}: none of its {len(tensors)} tensors is a parameter of this model "
                                    f"(e.g. {sorted(tensors)[:3]})")
        return Finding("OK", f"{key}: {path} loads ({matching} of its {len(tensors)} tensors are this model's)")
    return Finding("OK", f"{key}: {path} loads ({len(tensors)} tensors)")


def checkpoint_settings(model_cfg, run_cfg) -> List[tuple]:
    """(setting, path) of every checkpoint the run will read, as the plugin's loader selects them (an empty
    ``finetuned`` with ``load_finetuned: True`` included: the run refuses it)."""
    selected = []
    if model_cfg.get("load_finetuned", False):
        selected.append(("model.finetuned", model_cfg.get("finetuned", None) or ""))
    elif model_cfg.get("load_pretrained", True) and model_cfg.get("pretrained", None):
        selected.append(("model.pretrained", model_cfg.get("pretrained")))
    if selected and model_cfg.get("qformer_text_init", None):  # read when the checkpoint lacks the text parts
        selected.append(("model.qformer_text_init", model_cfg.get("qformer_text_init")))
    resume = run_cfg.get("resume_ckpt_path", None)
    if resume and str(resume).lower() != "auto" and not os.path.isdir(os.path.expanduser(str(resume))):
        selected.append(("run.resume_ckpt_path", resume))
    return [(key, value) for key, value in selected if value or key == "model.finetuned"]


def dry_run_load(model, model_cfg) -> Optional[Finding]:
    """The run's own loader (``load_checkpoint_from_config``) on the meta-device model: the checkpoints are read and
    matched exactly as the run will (required tensors, stage, Q-Former text parts, stored config), but copying into
    ``meta`` parameters is a no-op. An ERROR with the loader's message, or None when it loads."""
    import warnings

    try:
        with on_meta(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            model.load_checkpoint_from_config(model_cfg)
    except Exception as error:  # the run's set-up would stop here with this message
        return Finding("ERROR", f"{type(error).__name__}: {error}")
    return None


# ---------------------------------------------------------------------------------------------------------------
# 4. Hub weights
# ---------------------------------------------------------------------------------------------------------------
EVA_VIT_G_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
# typed-config field -> (what, a file the hub repository always has)
HUB_FIELDS = {
    "qformer_weights": ("Q-Former initialisation", "config.json"),
    "tokenizer": ("tokenizer", "vocab.txt"),
    "mae_weights": ("MAE-ViT", "config.json"),
    "opt_model": ("LLM", "config.json"),
    "t5_model": ("LLM", "config.json"),
}


def check_hub_weights(config) -> List[Finding]:
    from huggingface_hub import try_to_load_from_cache

    from lavis_xformer.models.builders import resolve_asset

    findings = []
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if getattr(config, "vit_weights", None) == "eva_clip_g":
        findings.append(check_checkpoint("model.vit_weights (eva_clip_g)", EVA_VIT_G_URL))
    for field, (what, probe) in HUB_FIELDS.items():
        name = getattr(config, field, None)
        if not name or (field == "mae_weights" and not getattr(config, "use_mae", True)):
            continue
        if resolve_asset(str(name)).exists() or Path(os.path.expanduser(str(name))).exists():
            continue  # a local file or folder
        try:
            cached = try_to_load_from_cache(str(name), probe)
        except ValueError:  # huggingface_hub's HFValidationError: neither a repo id nor an existing path
            findings.append(Finding("ERROR", f"model.{field}: {what} {name} is neither an existing path nor a hub "
                                             "repository id"))
            continue
        if isinstance(cached, str):
            findings.append(Finding("OK", f"model.{field}: {what} {name} is in the hub cache"))
        elif offline:
            findings.append(Finding("ERROR", f"model.{field}: {what} {name} is not cached and HF_HUB_OFFLINE is set"))
        else:
            findings.append(Finding("WARNING", f"model.{field}: {what} {name} is not cached, will download"))
    return findings


# ---------------------------------------------------------------------------------------------------------------
# 5. GPU memory (estimate)
# ---------------------------------------------------------------------------------------------------------------
def _meta_samples(batch_size: int, image_size: int, vqa: bool = False) -> dict:
    """A training batch on ``meta``: captions (pre-training, caption fine-tuning) or, for ``vqa``, questions with one
    answer each (LAVIS's VQA collater: flat answers, their weights and counts, which stay on the CPU as the draw of
    one answer per question reads them there)."""
    samples = {"image": torch.zeros(batch_size, 3, image_size, image_size, device="meta"),
               "epoch": 0, "iters": 0, "num_iters_per_epoch": 1}
    if vqa:
        samples.update(text_input=["how many red circles are there?"] * batch_size, answer=["two"] * batch_size,
                       weight=torch.ones(batch_size), n_answers=torch.ones(batch_size, dtype=torch.long))
    else:
        samples["text_input"] = ["a photo of two red circles and a small blue square on a grey table"] * batch_size
    return samples


def saved_activation_bytes(model, batch_size: int, image_size: int, vqa: bool = False) -> int:
    """Bytes autograd saves for backward in one training forward on ``meta`` (captions, or VQA with ``vqa``)."""
    from lavis_xformer.analysis.bench import _meta_scalars_on_cpu
    from lavis_xformer.common.distributed import init_single_process_group

    init_single_process_group()  # LAVIS's BLIP-2 forward calls dist.get_rank()
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _meta_scalars_on_cpu():
        model(_meta_samples(batch_size, image_size, vqa))
    return total


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / 2**20:.0f} MiB"


def gpu_weight_bytes(name: str, param, config) -> int:
    """A parameter's bytes on a GPU: the frozen CLIP-ViT and MAE encoder and the frozen LLM in half precision unless
    their config forces fp32 (with CUDA, ``frozen_precision`` / ``llm_precision: auto`` pick bf16 or fp16; on the
    meta device, built without CUDA, they are fp32); everything else at its built dtype."""
    if not param.requires_grad:
        vit_half = getattr(config, "vit_precision", "") != "fp32" and getattr(config, "frozen_precision", "") != "fp32"
        if name.startswith(("visual_encoder.", "mae_encoder.")) and vit_half:
            return param.numel() * 2
        if name.startswith(("opt_model.", "t5_model.")) and getattr(config, "llm_precision", "fp32") != "fp32":
            return param.numel() * 2
    return param.numel() * param.element_size()


def memory_estimate(model, config, batch_size: int, training: bool, vqa: bool = False) -> List[Finding]:
    named = list(model.named_parameters())
    n_trainable = sum(p.numel() for _, p in named if p.requires_grad)
    n_frozen = sum(p.numel() for _, p in named) - n_trainable
    weights = sum(gpu_weight_bytes(name, p, config) for name, p in named)
    grads = 4 * n_trainable if training else 0  # fp32 master weights' gradients (amp keeps them fp32)
    adam = 2 * 4 * n_trainable if training else 0  # AdamW's exp_avg and exp_avg_sq, fp32
    parts = [f"weights {_size(weights)} ({n_trainable / 1e6:.1f}M trainable fp32, {n_frozen / 1e6:.0f}M frozen)"]
    missing = None
    total = weights + grads + adam
    if training:
        parts += [f"gradients {_size(grads)}", f"AdamW states {_size(adam)}"]
        try:
            image_size = int(getattr(config, "image_size", 224))
            # batch 2 and 4 (in-batch ITC/ITM negatives need two samples): their difference is two samples' worth
            two, four = (saved_activation_bytes(model, b, image_size, vqa) for b in (2, 4))
            per_sample = max(four - two, 0) / 2
            activations = per_sample * batch_size
            parts.append(f"activations {_size(activations)} ({_size(per_sample)}/sample saved for backward, fp32; "
                         "amp stores many of them in fp16)")
            total += activations
        except Exception as error:  # the estimate is a courtesy, but an incomplete one is not OK: say why
            missing = f"activations not estimated ({type(error).__name__}: {str(error)[:120]})"
            parts.append(missing)
    else:
        parts.append("activations of a no-grad forward (not kept)")
    line = (f"GPU memory estimate per GPU at batch {batch_size}: ~{_size(total)} = " + " + ".join(parts)
            + "; an estimate from the meta-device model, add ~1-2 GiB of CUDA context and allocator slack")
    findings = [Finding("WARNING" if missing else "OK", line)]
    if torch.cuda.is_available():
        available = torch.cuda.get_device_properties(0).total_memory
        if total > available:
            findings.append(Finding("WARNING", f"the estimate ({_size(total)}) exceeds this GPU's "
                                               f"{_size(available)}: lower run.batch_size_train and raise "
                                               "run.accum_grad_iters (README 'Running at paper scale')"))
    return findings


# ---------------------------------------------------------------------------------------------------------------
# All together
# ---------------------------------------------------------------------------------------------------------------
def check(cfg_path, options=None, training: Optional[bool] = None, memory: bool = True) -> List[Finding]:
    """Every finding for the config (see the module docstring). ``training`` None: from ``run.evaluate``."""
    from lavis.common.config import Config
    from lavis.common.registry import registry

    from lavis_xformer import run_config
    from lavis_xformer.paths import resolve_cfg_path

    cfg_path = resolve_cfg_path(cfg_path)
    if not os.path.isfile(cfg_path):
        return [Finding("ERROR", f"--cfg-path {cfg_path}: no such file (nor a project path of the installed "
                                 "package, e.g. projects/xformer/train/pretrain_stage1.yaml)")]
    try:
        if training is None:
            run = OmegaConf.load(cfg_path).get("run", None) or {}
            training = not bool(run.get("evaluate", False))
        run_config.validate_config(cfg_path, options, training=training)
        cfg = Config(argparse.Namespace(cfg_path=cfg_path, options=run_config.dot_list(options)))
        run_config.validate_model_fields(cfg)
    except (run_config.ConfigError, ValueError) as error:
        lines = [line.strip()[2:] if line.strip().startswith("- ") else line for line in str(error).splitlines()]
        lines = [line for line in lines if line and not line.endswith("invalid config:")]
        return [Finding("ERROR", line) for line in lines]

    findings = [Finding("OK", f"config {cfg_path}: names, fields and learning rates valid")]
    findings += check_datasets(cfg.datasets_cfg, allow_downloads=bool(cfg.run_cfg.get("allow_downloads", False)))

    model_cls = registry.get_model_class(cfg.model_cfg.arch)
    model = config = None
    if getattr(model_cls, "config_class", None) is not None:
        config = model_cls.config_class.from_lavis_cfg(cfg.model_cfg)
        findings += [Finding(level, line) for level, line in run_precision_report(config)]  # precision on this device
        hub = check_hub_weights(config)
        findings += hub
        # The hub boundary: with hub weights missing offline the run cannot build its model, so nothing past this
        # point can agree with it; the meta-device build (seconds at paper scale) is then only made for the memory
        # estimate. train/evaluate (memory=False) stop here exactly as check does.
        if memory or not errors(hub):
            model = _build_on_meta(model_cls, config, findings)
    model_keys = set(model.state_dict()) if model is not None else None
    settings = checkpoint_settings(cfg.model_cfg, cfg.run_cfg)
    checkpoint_findings = [check_checkpoint(key, value, model_keys) for key, value in settings]
    findings += checkpoint_findings
    loads_model_weights = any(key.startswith("model.") for key, _ in settings)
    local = all(f.level == "OK" and "cached" not in f.message for f in checkpoint_findings)
    if model is not None and loads_model_weights and local and hasattr(model, "load_checkpoint_from_config"):
        problem = dry_run_load(model, cfg.model_cfg)
        findings += [problem] if problem else []
    findings += output_dir_findings(cfg.run_cfg, model if training else None)
    if memory and model is not None:
        batch = int(cfg.run_cfg.get("batch_size_train" if training else "batch_size_eval", 1) or 1)
        vqa = "vqa" in str(cfg.run_cfg.get("task", ""))  # the task's training batches: questions and answers
        findings += memory_estimate(model, config, batch, training, vqa=vqa)
    return findings


def _build_on_meta(model_cls, config, findings):
    try:  # the sizes of a local LLM or encoder folder are only known by loading it
        with on_meta():  # sizes only, no weights read
            return model_cls(config)
    except ValueError as error:
        findings.append(Finding("WARNING", f"model not built on the meta device ({error}): checkpoints are not "
                                           "matched against its parameters and memory is not estimated"))
    return None


def output_dir_findings(run_cfg, model=None) -> List[Finding]:
    """The output folder exists or can be created, is writable and has room for the run's checkpoints
    (``common.jobs.output_dir_problems``), before anything is built."""
    from lavis_xformer.common import jobs

    output_dir = run_cfg.get("output_dir", None)
    if output_dir is None:
        return []
    need = jobs.checkpoint_bytes_estimate(model) if model is not None else 0
    problems = jobs.output_dir_problems(output_dir, need)
    return [Finding("ERROR", problem) for problem in problems] or [Finding("OK", f"run.output_dir {output_dir} writable")]


def errors(findings: Iterable[Finding]) -> List[Finding]:
    return [f for f in findings if f.level == "ERROR"]


def check_before_launch(cfg_path, options, training: bool) -> None:
    """What train/evaluate run first: checks 1-4 (no memory estimate); warnings are logged, errors raise
    ``CheckFailed`` with one line each."""
    findings = check(cfg_path, options, training=training, memory=False)
    for finding in findings:
        if finding.level == "WARNING":
            logging.warning(finding.message)
    bad = errors(findings)
    if bad:
        raise CheckFailed(f"{cfg_path}: {len(bad)} problem(s) found before launch "
                          f"(python -m lavis_xformer.check --cfg-path {cfg_path} lists them):\n"
                          + "\n".join(str(f) for f in bad))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Check a LAVIS run config (yaml + --options) before launching: config, data, checkpoints, hub "
                    "weights, GPU memory estimate. One line per finding; exit 1 on any error.")
    parser.add_argument("--cfg-path", required=True, help="the run yaml (or a project path such as "
                                                          "projects/xformer/train/pretrain_stage1.yaml)")
    parser.add_argument("--options", nargs="+", help="overrides in key=value form, as for train/evaluate")
    parser.add_argument("--evaluate", action="store_true", help="check as lavis_xformer.evaluate would")
    parser.add_argument("--no-memory", action="store_true", help="skip the GPU memory estimate")
    args = parser.parse_args(argv)
    findings = check(args.cfg_path, args.options, training=False if args.evaluate else None,
                     memory=not args.no_memory)
    for finding in findings:
        print(finding)
    bad = errors(findings)
    print(f"{len(bad)} error(s), {sum(f.level == 'WARNING' for f in findings)} warning(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
