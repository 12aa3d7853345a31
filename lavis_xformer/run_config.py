"""Run-config validation, before anything is built: what ``lavis_xformer.check`` reports and what
``lavis_xformer.launch`` (train / evaluate) refuses to start with.

``validate_config`` reads the yaml with its ``--options``: a missing or unregistered ``model.arch``,
``model.model_type``, ``run.task``, ``run.runner``, ``run.lr_sched`` or dataset name, a missing required run field,
a run field of the wrong type, a learning rate that is negative or not finite (``init_lr`` must be > 0), an unknown
``run.*`` or ``model.*`` key (with a did-you-mean) and malformed ``--options`` are reported together, with the valid
choices. ``validate_model_fields`` then runs the model's own typed config (``models/config.py``).
"""

import dataclasses
import difflib
import math
import re
from pathlib import Path

import lavis.common.optims  # noqa: F401  (registers LAVIS's lr schedulers, which run.lr_sched names)
from lavis.common.registry import registry
from omegaconf import OmegaConf

class ConfigError(ValueError):
    """A run config that cannot work: every problem found, each with the valid choices."""


FLOAT_FIELDS = ("init_lr", "min_lr", "warmup_lr", "weight_decay", "beta2", "lr_decay_rate", "max_bad_fraction",
                "length_penalty", "checkpoint_every_minutes")
INT_FIELDS = ("max_epoch", "batch_size_train", "batch_size_eval", "num_workers", "warmup_steps", "seed", "log_freq",
              "accum_grad_iters", "max_consecutive_bad_steps", "checkpoint_every_iters", "bad_fraction_min_samples",
              "max_image_pixels", "world_size", "k_test", "num_beams", "max_len", "min_len", "max_iters",
              "iters_per_inner_epoch")
BOOL_FIELDS = ("amp", "evaluate", "distributed", "robust_data", "use_dist_eval_sampler", "find_unused_parameters",
               "allow_downloads", "tensorboard", "allow_outside_image_paths", "resume_ignore_locks")
# (field, minimum) for the integer fields that have one
INT_MINIMUM = {"max_epoch": 1, "batch_size_train": 1, "batch_size_eval": 1, "num_workers": 0, "warmup_steps": 0,
               "log_freq": 1, "accum_grad_iters": 1, "max_consecutive_bad_steps": 1, "checkpoint_every_iters": 0,
               "bad_fraction_min_samples": 0, "max_image_pixels": 1}
# Run keys LAVIS 1.0.2 reads (runners, tasks, distributed init: lavis/runners, lavis/tasks, lavis/common).
LAVIS_RUN_KEYS = frozenset("""
    accum_grad_iters amp batch_size_eval batch_size_train beta2 device dist_backend dist_url distributed evaluate
    gpu inference_method init_lr iters_per_inner_epoch k_test log_freq lr_decay_rate lr_sched max_epoch max_iters
    max_len min_len min_lr num_ans_candidates num_beams num_workers output_dir prompt rank report_metric
    resume_ckpt_path runner seed task test_splits train_dataset_ratios train_splits use_dist_eval_sampler
    valid_splits warmup_lr warmup_steps weight_decay world_size
""".split())
# The learning rates: finite, >= 0 (warmup_lr may also be LAVIS's -1, "start the warm-up at init_lr"), init_lr > 0.
LR_FIELDS = ("init_lr", "min_lr", "warmup_lr")
REQUIRED_TRAINING = ("task", "lr_sched", "init_lr", "min_lr", "weight_decay", "max_epoch", "batch_size_train",
                     "output_dir", "train_splits")
REQUIRED_EVALUATION = ("task", "output_dir")


def _choices(value, valid) -> str:
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid: {', '.join(sorted(map(str, valid)))}"


def _type_problem(key, value):
    if value is None:
        return None
    if key in BOOL_FIELDS:
        if not isinstance(value, bool):
            return f"run.{key}={value!r} must be true or false"
        return None
    if key in INT_FIELDS:
        try:
            ok = not isinstance(value, (bool, float)) and str(int(value)) == str(value).strip()
        except (TypeError, ValueError):
            ok = False
        if not ok:
            return f"run.{key}={value!r} must be an integer"
        if key in INT_MINIMUM and int(value) < INT_MINIMUM[key]:
            return f"run.{key}={value!r} must be >= {INT_MINIMUM[key]}"
        return None
    if key in FLOAT_FIELDS:
        try:
            number = None if isinstance(value, bool) else float(value)  # YAML reads 5e-3 as a string
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            return f"run.{key}={value!r} must be a finite number"
        if key == "max_bad_fraction" and not 0.0 <= number < 1.0:
            return f"run.max_bad_fraction={value!r} must lie in [0, 1)"
        if key == "init_lr" and number <= 0:
            return f"run.init_lr={value!r} must be > 0 (the peak learning rate)"
        if key in LR_FIELDS and number < 0 and not (key == "warmup_lr" and number == -1):
            extra = " (or -1: start the warm-up at init_lr)" if key == "warmup_lr" else ""
            return f"run.{key}={value!r} must be >= 0{extra}"
        if key == "weight_decay" and number < 0:
            return f"run.weight_decay={value!r} must be >= 0"
    return None


def known_run_keys() -> frozenset:
    """Every ``run.*`` key something reads: LAVIS's (``LAVIS_RUN_KEYS``) and the plugin's, found in its own source
    (``run_cfg.get("<key>"`` / ``run_cfg.<key>``), so a key the plugin starts reading is known without a second list."""
    pattern = re.compile(r"run_cfg(?:\.get\(\s*[\"'](\w+)[\"']|\.(\w+))")
    plugin = set()
    for path in Path(__file__).resolve().parent.rglob("*.py"):
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            plugin.add(match.group(1) or match.group(2))
    return LAVIS_RUN_KEYS | (plugin - {"get"})


def _unknown_key(section: str, key, valid) -> str:
    close = difflib.get_close_matches(str(key), sorted(valid), n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(f'{section}.{c}' for c in close)}?" if close else ""
    return f"{section}.{key} is not a known {section} setting{hint}"


def _model_key_problems(model) -> list:
    """Unknown keys of a plugin model's ``model:`` section (the fields of its typed config, plus LAVIS's loading
    keys), each with a did-you-mean. LAVIS's own architectures read arbitrary keys and are not checked."""
    from lavis_xformer.models.config import LAVIS_LOADING_KEYS

    config_class = getattr(registry.get_model_class(str(model.get("arch"))), "config_class", None)
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return []
    valid = {f.name for f in dataclasses.fields(config_class)} | set(LAVIS_LOADING_KEYS) | {"arch", "model_type"}
    return [_unknown_key("model", key, valid) for key in model if str(key) not in valid]


def validate_config(cfg_path, options=None, training: bool = True) -> None:
    """Check a run config (yaml plus ``--options``) before anything is built; raise ``ConfigError`` listing every
    problem with the valid choices. Checks: model arch and type, task, runner, lr schedule and dataset names
    against LAVIS's registry (the plugin's included), required run fields, and run field types."""
    merged = OmegaConf.merge(OmegaConf.load(str(cfg_path)), OmegaConf.from_dotlist(dot_list(options)))
    problems = []

    model = merged.get("model", None)
    if model is None:
        problems.append("the config has no `model:` section (needs model.arch and model.model_type)")
    else:
        arch = model.get("arch", None)
        if arch is None:
            problems.append(f"model.arch is missing{_choices('', registry.list_models())}")
        elif registry.get_model_class(str(arch)) is None:
            choices = _choices(arch, registry.list_models())
            problems.append(f"model.arch={arch!r} is not a registered architecture{choices}")
        else:
            types = list(getattr(registry.get_model_class(str(arch)), "PRETRAINED_MODEL_CONFIG_DICT", {}) or {})
            model_type = model.get("model_type", None)
            if model_type is None:
                problems.append(f"model.model_type is missing; {arch} has the types {', '.join(sorted(types))}")
            elif types and str(model_type) not in types:
                problems.append(f"model.model_type={model_type!r} is not a type of {arch}{_choices(model_type, types)}")
            problems += _model_key_problems(model)

    datasets = merged.get("datasets", None)
    if not datasets:
        problems.append(f"the config has no `datasets:` section{_choices('', registry.list_datasets())}")
    else:
        for name in datasets:
            builder = registry.get_builder_class(str(name))
            if builder is None:
                choices = _choices(name, registry.list_datasets())
                problems.append(f"dataset {name!r} is not a registered builder{choices}")
                continue
            kind = (datasets[name] or {}).get("type", "default")
            kinds = list(getattr(builder, "DATASET_CONFIG_DICT", {}) or {})
            if kinds and kind not in kinds:
                problems.append(f"datasets.{name}.type={kind!r} is not a config type of {name}{_choices(kind, kinds)}")

    run = merged.get("run", None)
    if run is None:
        problems.append("the config has no `run:` section")
    else:
        training = training and not bool(run.get("evaluate", False))
        for key in REQUIRED_TRAINING if training else REQUIRED_EVALUATION:
            if key == "max_epoch" and run.get("max_iters", None) is not None:
                continue  # an iteration-based run counts iterations instead
            if run.get(key, None) is None:
                problems.append(f"run.{key} is missing (required for {'training' if training else 'evaluation'})")
        checks = (
            ("task", registry.get_task_class, registry.list_tasks),
            ("runner", registry.get_runner_class, registry.list_runners),
            ("lr_sched", registry.get_lr_scheduler_class, registry.list_lr_schedulers),
        )
        for key, lookup, listing in checks:
            value = run.get(key, None)
            if value is not None and lookup(str(value)) is None:
                problems.append(f"run.{key}={value!r} is not registered{_choices(value, listing())}")
        valid_keys = known_run_keys()
        for key in run:
            if str(key) not in valid_keys:
                problems.append(_unknown_key("run", key, valid_keys))
                continue
            problem = _type_problem(str(key), run.get(key))
            if problem:
                problems.append(problem)
        problems += run_value_problems(run)
        from lavis_xformer.runners.trackers import logger_problems  # (function level: runners imports this module)

        problems += logger_problems(run)  # run.loggers: known trackers, their packages installed

        if not any(str(key) in ("max_iters", "iters_per_inner_epoch") and _type_problem(str(key), run.get(key))
                   for key in run):
            try:
                iteration_mode(run)
            except ConfigError as error:
                problems.append(str(error))

    if problems:
        raise ConfigError(f"{cfg_path}: invalid config:\n  - " + "\n  - ".join(problems))


# An iteration-based run without run.iters_per_inner_epoch gets inner epochs of at most this many iterations (a
# choice: LAVIS's runner_iter has no default; validation, the epoch checkpoint and the cosine schedule's step come
# once per inner epoch, so one inner epoch of 100k iterations would hold the learning rate at its peak throughout).
DEFAULT_INNER_EPOCH_CAP = 1000


def default_iters_per_inner_epoch(max_iters: int) -> int:
    """``max_iters`` itself up to ``DEFAULT_INNER_EPOCH_CAP``, else its largest divisor not above the cap (0 when
    that divisor is below a tenth of the cap: the user must choose)."""
    if max_iters <= DEFAULT_INNER_EPOCH_CAP:
        return max_iters
    divisor = max(d for d in range(1, DEFAULT_INNER_EPOCH_CAP + 1) if max_iters % d == 0)
    return divisor if divisor >= DEFAULT_INNER_EPOCH_CAP // 10 else 0


def iteration_mode(run_cfg):
    """``(run.max_iters, run.iters_per_inner_epoch)`` of an iteration-based run, ``(0, 0)`` for an epoch-based one.
    ``max_iters`` alone gets ``default_iters_per_inner_epoch``. Bad combinations raise ``ConfigError``; ``check``
    and the runner both call this, so they agree."""
    max_iters = int(run_cfg.get("max_iters", 0) or 0)
    per_inner = int(run_cfg.get("iters_per_inner_epoch", 0) or 0)
    if not max_iters:
        if per_inner:
            raise ConfigError(f"run.iters_per_inner_epoch={per_inner} is set without run.max_iters: set run.max_iters "
                              "for an iteration-based run, or remove iters_per_inner_epoch for an epoch-based one")
        if run_cfg.get("train_dataset_ratios", None):
            raise ConfigError("run.train_dataset_ratios needs an iteration-based run: set run.max_iters (and "
                              "optionally run.iters_per_inner_epoch, as in LAVIS's runner_iter)")
        return 0, 0
    if max_iters < 0:
        raise ConfigError(f"run.max_iters={max_iters} must be > 0")
    if not per_inner:
        per_inner = default_iters_per_inner_epoch(max_iters)
        if not per_inner:
            raise ConfigError(f"run.max_iters={max_iters} has no divisor between {DEFAULT_INNER_EPOCH_CAP // 10} and "
                              f"{DEFAULT_INNER_EPOCH_CAP}: set run.iters_per_inner_epoch (a divisor of max_iters)")
    if per_inner <= 0 or max_iters % per_inner:
        raise ConfigError(f"run.max_iters={max_iters} must be a positive multiple of run.iters_per_inner_epoch="
                          f"{per_inner} (validation, the LR schedule's epochs and checkpoints come every inner "
                          f"epoch); e.g. run.iters_per_inner_epoch={default_iters_per_inner_epoch(max_iters) or 1}")
    return max_iters, per_inner


def dot_list(options):
    """LAVIS's ``--options`` as a dot list: ``k=v`` items, or ``k v`` pairs as LAVIS also accepts (LAVIS decides by
    the first item). Anything else raises ``ConfigError`` saying which item and what form is expected (LAVIS would
    drop a lone key silently or fail inside omegaconf)."""
    options = [str(item) for item in options or []]
    if not options:
        return options
    expected = "expected key=value items, e.g. --options run.max_epoch=1 run.init_lr=1e-4"
    if "=" in options[0]:
        bad = [item for item in options if "=" not in item or item.startswith("=")]
        if bad:
            raise ConfigError(f"--options {' '.join(bad)}: {expected} (every item needs '=' and a key)")
        return options
    keys, values = options[0::2], options[1::2]
    if len(options) % 2 or any("=" in key for key in keys):
        raise ConfigError(f"--options {' '.join(options)}: {expected} (or key value pairs: run.max_epoch 1)")
    return [f"{key}={value}" for key, value in zip(keys, values)]


def validate_model_fields(cfg) -> None:
    """The plugin's models check their own fields (typed configs) before any weight is built; run that check now,
    before the datasets are built."""
    model_cls = registry.get_model_class(cfg.model_cfg.arch)
    config_class = getattr(model_cls, "config_class", None)
    if config_class is not None and hasattr(config_class, "from_lavis_cfg"):
        config_class.from_lavis_cfg(cfg.model_cfg)


# ---------------------------------------------------------------------------------------------------------------
# Values that pass the type check but fail inside torch / numpy (issue 25): optimiser betas, seed, device, workers
# ---------------------------------------------------------------------------------------------------------------
SEED_LIMIT = 2 ** 32  # numpy's seeds; LAVIS seeds every rank with run.seed + rank
DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def max_workers() -> int:
    """The cap on ``run.num_workers`` (DataLoader worker processes per rank): 4 per core of this machine, at least 8."""
    import os

    return max(8, 4 * (os.cpu_count() or 1))


def run_value_problems(run) -> list:
    """``run.beta2`` in [0, 1) (AdamW's second-moment decay: betas (0.9, beta2)); ``run.seed`` in [0, 2**32 - world
    size) (numpy refuses larger seeds, negative ones too); ``run.device`` cpu, cuda, cuda:N or mps; ``run.num_workers``
    at most ``max_workers()``. Values of the wrong type are left to the type check."""
    problems = []
    beta2 = run.get("beta2", None)
    if _is_number(beta2) and not 0.0 <= float(beta2) < 1.0:
        problems.append(f"run.beta2={beta2!r} must lie in [0, 1) (AdamW's betas are (0.9, beta2); LAVIS uses 0.999)")
    seed = run.get("seed", None)
    if _is_integer(seed):
        world = int(run.get("world_size", 1) or 1) if _is_integer(run.get("world_size", 1)) else 1
        if not 0 <= int(seed) < SEED_LIMIT - world:
            problems.append(f"run.seed={seed!r} must lie in [0, {SEED_LIMIT - world}] (numpy's seed range; each rank "
                            "uses seed + rank)")
    device = run.get("device", None)
    if device is not None and not DEVICE_PATTERN.match(str(device)):
        problems.append(f"run.device={device!r} is not a device this plugin runs on: cpu, cuda, cuda:N or mps")
    workers = run.get("num_workers", None)
    if _is_integer(workers) and int(workers) > max_workers():
        problems.append(f"run.num_workers={workers!r} is more than this machine can run ({max_workers()}: 4 per core, "
                        "per rank); 4-8 per GPU is usual")
    return problems


def _is_number(value) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _is_integer(value) -> bool:
    try:
        return value is not None and not isinstance(value, (bool, float)) and str(int(value)) == str(value).strip()
    except (TypeError, ValueError):
        return False
