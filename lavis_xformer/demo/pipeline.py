"""The demo (``make demo``): X-Former and BLIP-2, trained and evaluated side by side on the embedded shapes data.

    python -m lavis_xformer.demo                      # CPU: about 3 minutes on 2 idle cores; output/demo/
    python -m lavis_xformer.demo --smoke --out /tmp/d # the same pipeline on a few images (the test suite runs it)
    python -m lavis_xformer.demo --device cuda --jobs 1 --options run.batch_size_train=128

Setup: the shapes data is generated (once, before any run), and the frozen encoders get their stand-ins. The paper's
are hub weights; the ``tiny`` types' are random, which leaves nothing for a frozen MAE decoder to reconstruct with
or for a visual prefix to steer in a frozen LLM. So the demo pretrains the tiny MAE (``MaeStandIn``: MAE's own
objective on the training images) and the tiny OPT (``LLMStandIn``: a text LM on the training captions and
question-answer pairs), saves them with ``save_pretrained`` and passes them to the runs as ``model.mae_weights``
(X-Former) and ``model.opt_model`` (stage 2 and VQA, both models), frozen like hub weights (``--random-mae``,
``--random-llm``: keep the random ones). The CLIP-ViT stays random (both models share it).

For each model -- X-Former (``xformer`` / ``xformer_opt``) and its twin BLIP-2 (LAVIS's ``Blip2Qformer`` /
``Blip2OPT`` as ``blip2_baseline`` / ``blip2_baseline_opt``) -- it runs, as subprocesses, the plugin's LAVIS entry
points on the yamls in ``projects/xformer/demo/`` (each ``_blip2`` twin differs only in ``model:`` and its output
folder)::

    1. stage 1   python -m lavis_xformer.train    --cfg-path pretrain_stage1_shapes.yaml    (ITC, ITM, ITG [, rec])
    2. retrieval python -m lavis_xformer.evaluate --cfg-path ret_shapes_eval.yaml           (zero-shot, test split)
    3. stage 2   python -m lavis_xformer.train    --cfg-path pretrain_stage2_shapes.yaml    (LM loss, frozen OPT)
    4. VQA       python -m lavis_xformer.evaluate --cfg-path vqa_shapes_eval.yaml           (zero-shot, test split)

each stage starting from the checkpoint of the one before (``model.finetuned`` / ``model.pretrained``). The two
models' pipelines run side by side on the CPU (``--jobs 2``: one thread each, which on 2 cores is faster than one
after the other) and their output is streamed with a ``[X-Former]`` / ``[BLIP-2]`` prefix. Then it reads LAVIS's
outputs (``<run>/<job id>/log.txt``: one json line of epoch averages per epoch; ``evaluate.txt``: the metrics;
``result/*.json``: the predictions) and writes to ``--out``:

* ``demo_results.json`` / ``demo_results.md`` -- the side-by-side table (also printed): parameter counts, final
  stage-1 losses, retrieval R@1/5/10 (text and image), the final stage-2 LM loss, VQA accuracy overall and per
  question type (counting = the "number" answers, identification = "yes/no"), plus a few example answers;
* ``loss_curves.png`` -- per-epoch training losses of both models (stage 1: total and each term; stage 2: LM);
* ``reconstructions.png`` -- test images, their MAE masks (ratio 0.5, a fixed draw) and what the trained X-Former
  reconstructs from M' through the frozen MAE decoder;
* ``runs/<model>/<stage>/`` -- the LAVIS output folders, ``logs/<model>_<stage>.log`` -- each run's full output.

Sizes and steps live in the yamls alone (the ``tiny`` models, 2048 training images, epochs, learning rates), so
the same demo runs larger by editing them or with ``--options`` (applied to every run, e.g. ``run.device=cuda``).
``--smoke`` shrinks the data and epochs (``SMOKE_OPTIONS``) for the test suite.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch

# ================================================================================================================
# What runs
# ================================================================================================================
PACKAGE_ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG_DIR = PACKAGE_ROOT.parent / "projects" / "xformer" / "demo"


@dataclass(frozen=True)
class DemoModel:
    key: str  #: folder name
    label: str  #: table and log label
    suffix: str  #: yaml name suffix of its twin ("" for X-Former)


MODELS = (DemoModel("xformer", "X-Former", ""), DemoModel("blip2", "BLIP-2", "_blip2"))


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    yaml: str  #: file name stem in the config folder (the model's suffix is appended)
    entry: str  #: lavis_xformer.train or lavis_xformer.evaluate
    weights_key: Optional[str]  #: model config key that receives the previous stage's checkpoint


STAGES = (
    Stage("stage1", "stage 1: pre-training (ITC, ITM, ITG; X-Former: + reconstruction)", "pretrain_stage1_shapes",
          "lavis_xformer.train", None),
    Stage("retrieval", "zero-shot image-text retrieval (stage-1 checkpoint)", "ret_shapes_eval",
          "lavis_xformer.evaluate", "finetuned"),
    Stage("stage2", "stage 2: alignment with a frozen OPT (LM loss)", "pretrain_stage2_shapes",
          "lavis_xformer.train", "pretrained"),
    Stage("vqa", "zero-shot VQA (stage-2 checkpoint)", "vqa_shapes_eval", "lavis_xformer.evaluate", "pretrained"),
)
WEIGHTS_FROM = {"retrieval": "stage1", "stage2": "stage1", "vqa": "stage2"}  # which run's last checkpoint

# --smoke: the same pipeline on a few images and epochs (applied on top of the yamls).
SMOKE_SHAPES = {"num_train": 48, "num_val": 4, "num_test": 12}
SMOKE_OPTIONS = {
    "stage1": ["run.max_epoch=2", "run.batch_size_train=16", "run.warmup_steps=2", "run.log_freq=1"],
    "retrieval": ["run.k_test=8", "run.batch_size_eval=12"],
    "stage2": ["run.max_epoch=2", "run.batch_size_train=16", "run.warmup_steps=2", "run.log_freq=1"],
    "vqa": ["run.batch_size_eval=12", "run.num_beams=2", "run.max_len=4"],
}

# The table: (key, label, format). Formats: "params", "loss", "recall", "acc".
METRICS = (
    ("params_stage1_trainable", "params, stage 1 trainable", "params"),
    ("params_stage1_total", "params, stage 1 total", "params"),
    ("stage1_loss", "stage 1 final loss (sum of the terms)", "loss"),
    ("stage1_loss_itc", "  ITC", "loss"),
    ("stage1_loss_itm", "  ITM", "loss"),
    ("stage1_loss_lm", "  ITG", "loss"),
    ("stage1_loss_rec", "  reconstruction", "loss"),
    ("txt_r1", "retrieval image->text R@1", "recall"),
    ("txt_r5", "retrieval image->text R@5", "recall"),
    ("txt_r10", "retrieval image->text R@10", "recall"),
    ("img_r1", "retrieval text->image R@1", "recall"),
    ("img_r5", "retrieval text->image R@5", "recall"),
    ("img_r10", "retrieval text->image R@10", "recall"),
    ("params_stage2_trainable", "params, stage 2 trainable", "params"),
    ("params_stage2_total", "params, stage 2 total", "params"),
    ("stage2_loss_lm", "stage 2 final LM loss", "loss"),
    ("vqa_overall", "VQA accuracy, overall", "acc"),
    ("vqa_counting", "VQA accuracy, counting", "acc"),
    ("vqa_identification", "VQA accuracy, identification", "acc"),
)
NOT_APPLICABLE = {("blip2", "stage1_loss_rec")}  # BLIP-2 has no reconstruction loss
NO_DELTA = {"stage1_loss"}  # X-Former's sum has one term more: compare the terms
TABLE_GROUPS = (
    ("Stage 1 (pre-training)", ("params_stage1_trainable", "params_stage1_total", "stage1_loss", "stage1_loss_itc",
                                "stage1_loss_itm", "stage1_loss_lm", "stage1_loss_rec")),
    ("Zero-shot retrieval (shapes test split)", ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")),
    ("Stage 2 and zero-shot VQA (shapes test split)", ("params_stage2_trainable", "params_stage2_total",
                                                       "stage2_loss_lm", "vqa_overall", "vqa_counting",
                                                       "vqa_identification")),
)
STANDINS_NOTE = (
    "The frozen encoders are stand-ins for the paper's hub weights: the CLIP-ViT is random, the MAE (X-Former) and "
    "the OPT (both models) are pretrained by the demo on the shapes training split (MaeStandIn, LLMStandIn). At "
    "this size the OPT answers VQA from its language prior (e.g. 'yes', '0' for every image): the VQA rows show "
    "the pipeline, not a difference between the models. The tables measure these tiny models, not the paper."
)
# shapes VQA answer types (the official files' answer_type) -> the question types they are
ANSWER_TYPE_OF = {"vqa_counting": "number", "vqa_identification": "yes/no"}


# ================================================================================================================
# Running the entry points
# ================================================================================================================
class Console:
    """Thread-safe printing with a per-model prefix; ``verbose`` shows every line of the runs' output."""

    def __init__(self, verbose: bool = False):
        self.lock = threading.Lock()
        self.verbose = verbose
        self.width = max(len(m.label) for m in MODELS) + 2

    def say(self, message: str = "", prefix: str = "") -> None:
        with self.lock:
            for line in message.splitlines() or [""]:
                print(f"{prefix:<{self.width + 1}}{line}" if prefix else line, flush=True)

    def header(self, title: str) -> None:
        self.say(f"\n{'=' * 100}\n{title}\n{'=' * 100}")


# LAVIS's progress lines (MetricLogger) and anything that looks like trouble; --verbose shows everything.
PROGRESS = re.compile(r"^(Train: |Evaluation|Averaged loss terms)|Error|Traceback|WARNING|ERROR|Exception")


@dataclass
class RunResult:
    model: str
    stage: str
    run_dir: Path
    job_dir: Path
    seconds: float


class DemoError(RuntimeError):
    pass


def child_env(threads: Optional[int]) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONWARNINGS", "ignore")  # torch / fairscale deprecation notices would drown the progress
    env["PYTHONUNBUFFERED"] = "1"  # progress lines as they come, not in pipe-buffer chunks
    # the children import this very copy of the plugin
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT.parent), env.get("PYTHONPATH")]))
    for launcher_variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(launcher_variable, None)  # one process per run, whatever launched the demo
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


class Runner:
    """Runs one model's stages one after the other; ``stop()`` ends the current one (another pipeline failed)."""

    def __init__(self, settings: "DemoSettings", model: DemoModel, console: Console, threads: Optional[int]):
        self.settings, self.model, self.console, self.threads = settings, model, console, threads
        self.process: Optional[subprocess.Popen] = None
        self.stopped = threading.Event()
        self.results: Dict[str, RunResult] = {}
        self.error: Optional[BaseException] = None

    def stop(self) -> None:
        self.stopped.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()

    def run_all(self) -> None:
        try:
            for stage in STAGES:
                if self.stopped.is_set():
                    return
                self.results[stage.key] = self.run_stage(stage)
                self.console.say(summary_line(stage.key, self.results[stage.key]), prefix=f"[{self.model.label}]")
        except BaseException as error:  # reported by the main thread
            self.error = error

    def command(self, stage: Stage) -> List[str]:
        settings = self.settings
        yaml = settings.config_dir / f"{stage.yaml}{self.model.suffix}.yaml"
        options = [f"run.output_dir={self.run_dir(stage.key)}"]
        options += settings.stage_options(stage.key, yaml, self.model)
        if stage.weights_key is not None:
            source = self.results[WEIGHTS_FROM[stage.key]]
            options.append(f"model.{stage.weights_key}={last_checkpoint(source.job_dir)}")
        return [sys.executable, "-m", stage.entry, "--cfg-path", str(yaml), "--options", *options]

    def run_dir(self, stage_key: str) -> Path:
        return self.settings.out_dir / "runs" / self.model.key / stage_key

    def run_stage(self, stage: Stage) -> RunResult:
        prefix = f"[{self.model.label}]"
        command = self.command(stage)
        run_dir = self.run_dir(stage.key)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a previous demo's run: LAVIS would add a second job folder next to it
        log_path = self.settings.out_dir / "logs" / f"{self.model.key}_{stage.key}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.console.say(f"--- {stage.title}\n    {' '.join(_short(c) for c in command)}", prefix=prefix)
        start = time.time()
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                env=child_env(self.threads),
            )
            if self.stopped.is_set():  # stop() came between two runs
                self.process.terminate()
            tail: List[str] = []
            for line in self.process.stdout:
                log.write(line)
                line = line.rstrip("\n")
                tail = (tail + [line])[-40:]
                if self.console.verbose or PROGRESS.search(line):
                    self.console.say(line, prefix=prefix)
            returncode = self.process.wait()
        self.process = None
        if returncode != 0:
            if self.stopped.is_set():
                raise DemoError(f"{self.model.label} {stage.key}: stopped")
            raise DemoError(
                f"{self.model.label} {stage.key} failed (exit {returncode}); full output in {log_path}\n"
                + "\n".join(tail)
            )
        return RunResult(self.model.key, stage.key, run_dir, job_folder(run_dir), time.time() - start)


def _short(argument: str) -> str:
    """Paths under the working directory, relative (for readable command lines)."""
    try:
        return str(Path(argument).relative_to(Path.cwd())) if argument.startswith("/") else argument
    except ValueError:
        return argument


# ================================================================================================================
# LAVIS's output layout
# ================================================================================================================
def job_folder(run_dir: Path) -> Path:
    """``<run.output_dir>/<job id>``: the newest job folder (LAVIS names them by the minute they started)."""
    jobs = sorted((p for p in Path(run_dir).iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not jobs:
        raise DemoError(f"no LAVIS job folder in {run_dir}")
    return jobs[-1]


def last_checkpoint(job_dir: Path) -> Path:
    """``checkpoint_<last epoch>.pth``."""
    found = []
    for path in Path(job_dir).glob("checkpoint_*.pth"):
        match = re.fullmatch(r"checkpoint_(\d+)\.pth", path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        raise DemoError(f"no checkpoint_<epoch>.pth in {job_dir}")
    return max(found)[1]


def epoch_stats(job_dir: Path) -> List[Dict[str, float]]:
    """The per-epoch training averages LAVIS appends to log.txt (``{"train_loss": ..., "epoch": ...}``)."""
    epochs = []
    for line in (Path(job_dir) / "log.txt").read_text().splitlines():
        if line.startswith('{"train'):
            stats = json.loads(line)
            epochs.append({key: float(value) for key, value in stats.items()})
    if not epochs:
        raise DemoError(f"{job_dir}/log.txt has no training statistics")
    return epochs


def eval_metrics(job_dir: Path) -> Dict[str, float]:
    """The last metrics line of ``evaluate.txt`` (LAVIS's retrieval and VQA tasks append one per evaluation)."""
    path = Path(job_dir) / "evaluate.txt"
    if not path.is_file():
        raise DemoError(f"{path} is missing: the evaluation wrote no metrics")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])


def summary_line(stage_key: str, result: RunResult) -> str:
    took = f"({result.seconds:.0f}s)"
    if stage_key in ("stage1", "stage2"):
        epochs = epoch_stats(result.job_dir)
        terms = "  ".join(f"{k[len('train_'):]} {v:.3f}" for k, v in epochs[-1].items() if k.startswith("train_loss"))
        return f"    done {took}: {len(epochs)} epochs; last epoch's averages: {terms}"
    metrics = eval_metrics(result.job_dir)
    if stage_key == "retrieval":
        return (f"    done {took}: image->text R@1 {metrics['txt_r1']:.1f}  text->image R@1 {metrics['img_r1']:.1f}  "
                f"mean recall {metrics['r_mean']:.1f}")
    parts = [f"overall {metrics['agg_metrics']:.2f}"]
    parts += [f"{key[len('vqa_'):]} {metrics[t]:.2f}" for key, t in ANSWER_TYPE_OF.items() if t in metrics]
    return f"    done {took}: VQA accuracy " + "  ".join(parts)


# ================================================================================================================
# Settings
# ================================================================================================================
@dataclass
class DemoSettings:
    out_dir: Path
    config_dir: Path = DEFAULT_CONFIG_DIR
    smoke: bool = False
    device: Optional[str] = None
    jobs: int = 2
    data_root: Optional[str] = None
    options: List[str] = field(default_factory=list)  #: applied to every run
    verbose: bool = False
    grid_images: int = 8
    pretrain_mae: bool = True  #: pretrain X-Former's frozen MAE first (MaeStandIn); False: the random one
    mae_weights: Optional[Path] = None  #: set once the MAE is pretrained: passed as model.mae_weights
    pretrain_llm: bool = True  #: pretrain the frozen OPT first (LLMStandIn); False: the random one
    opt_weights: Optional[Path] = None  #: set once the OPT is pretrained: passed as model.opt_model (stage 2, VQA)

    def dataset_names(self, yaml: Path) -> List[str]:
        from omegaconf import OmegaConf

        return list(OmegaConf.load(yaml).datasets)

    def stage_options(self, stage_key: str, yaml: Path, model: Optional[DemoModel] = None) -> List[str]:
        """``--options`` for a run: smoke sizes, data root, device, the frozen MAE (X-Former), then the user's."""
        options = []
        for name in self.dataset_names(yaml):
            if self.smoke:
                options += [f"datasets.{name}.shapes.{k}={v}" for k, v in SMOKE_SHAPES.items()]
            if self.data_root:
                options.append(f"datasets.{name}.shapes.root={self.data_root}")
        if self.smoke:
            options += SMOKE_OPTIONS[stage_key]
        if self.device:
            options.append(f"run.device={self.device}")
        if self.mae_weights is not None and model is not None and model.key == "xformer":
            options.append(f"model.mae_weights={self.mae_weights}")
        if self.opt_weights is not None and model is not None and stage_key in ("stage2", "vqa"):
            options.append(f"model.opt_model={self.opt_weights}")
        return options + list(self.options)

    def lavis_config(self, stage: Stage, model: DemoModel, standins: bool = True):
        """LAVIS's ``Config`` of a stage's yaml with the run's options (model defaults and dataset defaults merged);
        ``standins=False``: without the pretrained frozen MAE and OPT (the random ones of the same sizes)."""
        from lavis.common.config import Config

        yaml = self.config_dir / f"{stage.yaml}{model.suffix}.yaml"
        options = self.stage_options(stage.key, yaml, model if standins else None)
        return Config(SimpleNamespace(cfg_path=str(yaml), options=options))

    @property
    def run_device(self) -> str:
        return self.device or "cpu"


def threads_per_job(settings: DemoSettings) -> Optional[int]:
    """On the CPU the two pipelines share the cores; elsewhere each child keeps torch's default."""
    if settings.run_device != "cpu" or settings.jobs < 2:
        return None
    return max(1, (os.cpu_count() or 2) // settings.jobs)


# ================================================================================================================
# Data, parameters
# ================================================================================================================
def prepare_data(settings: DemoSettings, console: Console) -> List[Path]:
    """Generate the shapes data every run reads, once, before the runs start (they would otherwise race to it)."""
    from lavis_xformer.datasets import shapes

    folders = {}
    for stage in STAGES:
        for model in MODELS:
            cfg = settings.lavis_config(stage, model, standins=False)
            for dataset_cfg in cfg.datasets_cfg.values():
                node = dataset_cfg.get("shapes", None)
                if node is None:
                    continue
                spec = shapes.ShapesSpec.from_config(node)
                root = shapes.resolve_root(node.get("root", None))
                folders[(spec, str(root))] = (spec, root)
    made = []
    for spec, root in folders.values():
        start = time.time()
        folder = shapes.ensure_generated(spec, root)
        console.say(f"shapes data: {folder} ({spec.num_train}/{spec.num_val}/{spec.num_test} images, "
                    f"{time.time() - start:.1f}s)")
        made.append(folder)
    return made


def data_folder(cfg) -> Path:
    """The generated shapes folder a LAVIS config's (first) dataset reads."""
    from lavis_xformer.datasets import shapes

    node = next(iter(cfg.datasets_cfg.values())).shapes
    return shapes.resolve_root(node.get("root", None)) / shapes.ShapesSpec.from_config(node).folder_name()


def build_model(cfg, device="meta"):
    """A model from a LAVIS config's ``model:`` section, without its checkpoints; on ``meta`` (counting) it is
    built inside ``no_hub()`` (no weights, no download)."""
    import contextlib

    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_xformer.models.builders import no_hub

    model_cfg = OmegaConf.merge(cfg.model_cfg, {"load_pretrained": False, "load_finetuned": False})
    model_cls = registry.get_model_class(model_cfg.arch)
    context = contextlib.ExitStack()
    if device == "meta":
        context.enter_context(torch.device("meta"))
        context.enter_context(no_hub())
    with context:
        return model_cls.from_config(model_cfg)


def parameter_counts(settings: DemoSettings) -> Dict[str, Dict[str, int]]:
    from lavis_xformer.params import count

    counts = {}
    for model in MODELS:
        counts[model.key] = {}
        for stage in (STAGES[0], STAGES[2]):
            trainable, frozen = count(build_model(settings.lavis_config(stage, model, standins=False)))
            counts[model.key][f"params_{stage.key}_trainable"] = trainable
            counts[model.key][f"params_{stage.key}_total"] = trainable + frozen
    return counts


# ================================================================================================================
# X-Former's frozen MAE: a pretrained stand-in
# ================================================================================================================
@dataclass(frozen=True)
class MaeStandIn:
    """How the demo pretrains the tiny frozen MAE before the runs.

    X-Former's frozen MAE is a pretrained one (``facebook/vit-mae-huge`` at paper scale). The ``tiny`` types build a
    random MAE instead, and a random frozen decoder reconstructs nothing, whatever M' it is given. So the demo first
    trains the tiny MAE (encoder and decoder, transformers' ``ViTMAEForPreTraining`` and its own loss) on the shapes
    training images, saves it with ``save_pretrained`` and passes that folder to every X-Former run as
    ``model.mae_weights``, where it is frozen as the hub MAE would be. BLIP-2 has no MAE. A config that names real
    MAE weights (``mae_weights``) is used as it is.
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0


SMOKE_MAE = MaeStandIn(epochs=2)


def mae_training_images(cfg, folder: Path) -> torch.Tensor:
    """Every training image as the X-Former's MAE sees it: the eval processor's resize and CLIP normalisation
    (what the model is given), then ``mae_pixels``' re-normalisation to ImageNet's statistics."""
    from lavis.common.registry import registry
    from PIL import Image

    from lavis_xformer.datasets import shapes
    from lavis_xformer.models.xformer import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    processor_cfg = next(iter(cfg.datasets_cfg.values())).vis_processor.eval
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    scenes = shapes.read_annotation(folder, "scenes_train")
    images = torch.stack([processor(Image.open(folder / "images" / s["image"]).convert("RGB")) for s in scenes])

    def stats(values):
        return torch.tensor(values).view(1, 3, 1, 1)

    raw = images * stats(CLIP_STD) + stats(CLIP_MEAN)
    return (raw - stats(IMAGENET_MEAN)) / stats(IMAGENET_STD)


def pretrain_mae(settings: DemoSettings, console: Console) -> Optional[dict]:
    """Train the stand-in MAE (``MaeStandIn``) and point ``settings.mae_weights`` at it; None when the config
    already names MAE weights or the model has no MAE to reconstruct with."""
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from lavis_xformer.models.builders import build_mae
    from lavis_xformer.models.config import XFormerConfig

    cfg = settings.lavis_config(STAGES[0], MODELS[0], standins=False)
    typed = XFormerConfig.from_lavis_cfg(OmegaConf.to_container(cfg.model_cfg, resolve=True))
    if typed.mae_weights or not typed.use_mae or typed.mae_source != "mae":
        return None
    recipe = SMOKE_MAE if settings.smoke else MaeStandIn()
    if typed.mae_image_size != typed.image_size:
        raise DemoError("the MAE stand-in is trained at the model's image size; set mae_image_size = image_size")
    start = time.time()
    pixels = mae_training_images(cfg, data_folder(cfg))
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    device = torch.device(settings.run_device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # a model this small runs fastest on one thread (and a busy machine ruins two)
    mae = build_mae(typed).to(device).train()  # the random stand-in of this config, trained from here
    try:
        losses = _train_mae(mae, pixels, recipe, generator, device, console)
    finally:
        torch.set_num_threads(threads)
    folder = settings.out_dir / "pretrained" / "mae"
    if folder.exists():
        shutil.rmtree(folder)
    mae.eval().to("cpu").save_pretrained(str(folder))
    settings.mae_weights = folder
    baseline = F.mse_loss(pixels, pixels.mean(dim=(0, 2, 3), keepdim=True).expand_as(pixels)).item()
    console.say(f"MAE stand-in saved to {folder} ({time.time() - start:.0f}s; the dataset's mean colour everywhere "
                f"would score {baseline:.4f}); X-Former runs get model.mae_weights={folder}")
    return {"recipe": asdict(recipe), "epoch_losses": losses, "mean_colour_loss": baseline,
            "folder": str(folder), "seconds": round(time.time() - start, 1)}


def _train_mae(mae, pixels, recipe: MaeStandIn, generator, device, console) -> List[float]:
    optimizer = torch.optim.AdamW(mae.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(pixels) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, max(1, steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    losses = []
    for epoch in range(recipe.epochs):
        order, epoch_loss = torch.randperm(len(pixels), generator=generator), 0.0
        for first in range(0, len(pixels), recipe.batch_size):
            batch = pixels[order[first : first + recipe.batch_size]].to(device)
            flip = torch.rand(len(batch), generator=generator).to(device) < 0.5  # MAE's only augmentation here
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            noise = torch.rand(len(batch), mae.vit.embeddings.num_patches, generator=generator).to(device)
            loss = mae(pixel_values=batch, noise=noise).loss  # mask_ratio of the stage-1 config
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item() * len(batch)
        losses.append(epoch_loss / len(pixels))
        if epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == recipe.epochs:
            console.say(f"MAE stand-in: epoch {epoch + 1}/{recipe.epochs}  reconstruction loss {losses[-1]:.4f}")
    return losses


@dataclass(frozen=True)
class LLMStandIn:
    """How the demo pretrains the tiny frozen OPT before stage 2.

    A random frozen OPT (the ``tiny`` types') gives a near-flat next-token distribution that no visual prefix can
    steer: stage 2 cannot lower its loss and zero-shot VQA answers nothing. The paper's frozen LLMs know language;
    here the tiny OPT first learns the shapes domain's language as a plain text LM (no image): the training
    split's captions, and its questions answered from the caption in the evaluation's format
    (``caption\nQuestion: q Short answer: a``, and without the caption). It is saved with ``save_pretrained``
    and handed to both models' stage-2 and VQA runs as ``model.opt_model``, where it stays frozen. What it cannot
    know is the test image: answering from the image is left to each model's visual prefix.
    """

    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    seed: int = 0


SMOKE_LLM = LLMStandIn(epochs=1)


def llm_training_texts(cfg, folder: Path) -> List[str]:
    """The stand-in OPT's corpus from the training split, through the runs' own text processors."""
    from lavis.common.registry import registry

    from lavis_xformer.datasets import shapes

    caption = registry.get_processor_class("blip_caption").from_config(None)
    question = registry.get_processor_class("blip_question").from_config(None)
    captions = {int(str(a["image_id"]).split("_")[-1]): caption(a["caption"])
                for a in shapes.read_annotation(folder, "caption_train")}
    texts = [f"{text}\n" for text in captions.values()]
    for qa in shapes.read_annotation(folder, "vqa_train"):
        pair = f"Question: {question(qa['question'])} Short answer: {qa['answer'][0]}\n"
        texts += [f"{captions[qa['image_id']]}\n{pair}", pair]
    return texts


def pretrain_llm(settings: DemoSettings, console: Console) -> Optional[dict]:
    """Train the stand-in OPT (``LLMStandIn``) and point ``settings.opt_weights`` at it; None when the stage-2
    config already names an OPT checkpoint (``opt_model``)."""
    from omegaconf import OmegaConf

    from lavis_xformer.models.config_llm import XFormerOPTConfig
    from lavis_xformer.models.llm_builders import build_opt

    cfg = settings.lavis_config(STAGES[2], MODELS[0], standins=False)
    typed = XFormerOPTConfig.from_lavis_cfg(OmegaConf.to_container(cfg.model_cfg, resolve=True))
    if typed.opt_model is not None:
        return None
    recipe = SMOKE_LLM if settings.smoke else LLMStandIn()
    start = time.time()
    texts = llm_training_texts(cfg, data_folder(cfg))
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    tokenizer, opt = build_opt(typed)  # the random stand-in of this config, trained from here
    device = torch.device(settings.run_device)
    opt = opt.to(device).train()
    for param in opt.parameters():
        param.requires_grad_(True)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        losses = _train_llm(opt, tokenizer, texts, recipe, generator, device, console, typed.max_txt_len * 2)
    finally:
        torch.set_num_threads(threads)
    folder = settings.out_dir / "pretrained" / "opt"
    if folder.exists():
        shutil.rmtree(folder)
    opt.eval().to("cpu").save_pretrained(str(folder))
    settings.opt_weights = folder
    console.say(f"OPT stand-in saved to {folder} ({len(texts)} texts, {time.time() - start:.0f}s); stage 2 and VQA "
                f"runs get model.opt_model={folder}")
    return {"recipe": asdict(recipe), "epoch_losses": losses, "num_texts": len(texts), "folder": str(folder),
            "seconds": round(time.time() - start, 1)}


def _train_llm(opt, tokenizer, texts, recipe: LLMStandIn, generator, device, console, max_length: int) -> List[float]:
    optimizer = torch.optim.AdamW(opt.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(texts) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, max(1, steps_per_epoch // 2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    tokenizer.padding_side = "right"
    losses = []
    for epoch in range(recipe.epochs):
        order, epoch_loss, seen = torch.randperm(len(texts), generator=generator), 0.0, 0
        for first in range(0, len(texts), recipe.batch_size):
            batch = [texts[i] for i in order[first : first + recipe.batch_size].tolist()]
            tokens = tokenizer(batch, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
            tokens = tokens.to(device)
            labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
            loss = opt(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss, seen = epoch_loss + loss.item() * len(batch), seen + len(batch)
        losses.append(epoch_loss / seen)
        console.say(f"OPT stand-in: epoch {epoch + 1}/{recipe.epochs}  LM loss {losses[-1]:.4f}")
    return losses


# ================================================================================================================
# The table
# ================================================================================================================
def collect_rows(results: Dict[str, Dict[str, RunResult]], counts) -> List[dict]:
    rows = []
    for model in MODELS:
        runs = results[model.key]
        stage1 = epoch_stats(runs["stage1"].job_dir)[-1]
        stage2 = epoch_stats(runs["stage2"].job_dir)[-1]
        retrieval = eval_metrics(runs["retrieval"].job_dir)
        vqa = eval_metrics(runs["vqa"].job_dir)
        row = {"model": model.label, "key": model.key, **counts[model.key]}
        row["stage1_loss"] = stage1["train_loss"]
        for term in ("itc", "itm", "lm", "rec"):
            row[f"stage1_loss_{term}"] = stage1.get(f"train_loss_{term}")
        row.update({k: retrieval[k] for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")})
        row["stage2_loss_lm"] = stage2.get("train_loss_lm", stage2["train_loss"])
        row["vqa_overall"] = vqa["agg_metrics"]
        for key, answer_type in ANSWER_TYPE_OF.items():
            row[key] = vqa.get(answer_type)
        rows.append(row)
    return rows


def format_value(value, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "params":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}K"
    if kind == "loss":
        return f"{value:.3f}"
    if kind == "recall":
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_delta(a, b, kind: str, key: str = "") -> str:
    if a is None or b is None or kind == "params" or key in NO_DELTA:
        return ""
    return f"{a - b:+.3f}" if kind == "loss" else f"{a - b:+.2f}"


def text_table(rows: List[dict]) -> str:
    """Metrics down, models side by side, then X-Former - BLIP-2."""
    labels = [row["model"] for row in rows]
    header = ["metric", *labels, f"Δ {labels[0]} − {labels[1]}"]
    body = []
    for key, label, kind in METRICS:
        values = [row[key] for row in rows]
        body.append([label, *(format_value(v, kind) for v in values), format_delta(values[0], values[1], kind, key)])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    rows = report["rows"]
    labels = {key: label for key, label, _ in METRICS}
    kinds = {key: kind for key, _, kind in METRICS}
    parts = [
        "# X-Former vs BLIP-2 on the shapes data",
        "",
        f"`python -m lavis_xformer.demo{' --smoke' if report['settings']['smoke'] else ''}` "
        f"({report['settings']['device']}, {report['timings']['total_seconds']:.0f}s). Both models are the `tiny` "
        "types, trained from random weights by LAVIS's runner on the same data with the same settings; stage 2 "
        "starts from each model's own stage-1 checkpoint. " + STANDINS_NOTE + " Losses are the last epoch's "
        "averages; retrieval is LAVIS's (R@K in %, ITC ranking re-scored by ITM on the top k); VQA is the official "
        "VQA accuracy with the paper's protocol (prompt \"Question: {} Short answer:\", 5 beams, length penalty 0), "
        "counting = the \"how many\" questions, identification = \"is there a ...\".",
    ]
    for title, keys in TABLE_GROUPS:
        parts += ["", f"## {title}", "", "| model | " + " | ".join(labels[k].strip() for k in keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        for row in rows:
            parts.append(f"| {row['model']} | " + " | ".join(format_value(row[k], kinds[k]) for k in keys) + " |")
    examples = report.get("examples") or []
    if examples:
        parts += ["", "## Example answers (VQA, first test images)", "",
                  "| question | answer | " + " | ".join(r["model"] for r in rows) + " |",
                  "|---|---|" + "---|" * len(rows)]
        for example in examples:
            answers = " | ".join(f"`{example['predictions'].get(r['model'], '')}`" for r in rows)
            parts.append(f"| {example['question']} | {example['answer']} | {answers} |")
    parts += ["", "Figures: `loss_curves.png`, `reconstructions.png`.", ""]
    return "\n".join(parts)


def vqa_examples(results, folder: Path, count: int = 6) -> List[dict]:
    """The first questions of the test split with each model's answer (from LAVIS's result files)."""
    from lavis_xformer.datasets import shapes

    questions = {q["question_id"]: q for q in shapes.read_annotation(folder, "vqa_test")}
    predictions = {}
    for model in MODELS:
        files = sorted((results[model.key]["vqa"].job_dir / "result").glob("*vqa_result.json"))
        if not files:
            return []
        predictions[model.label] = {int(p["question_id"]): p["answer"] for p in json.loads(files[-1].read_text())}
    shared = sorted(set.intersection(*(set(p) for p in predictions.values())))
    return [
        {
            "question_id": qid,
            "question": questions[qid]["question"],
            "answer": questions[qid]["answer"][0],
            "predictions": {label: answers[qid] for label, answers in predictions.items()},
        }
        for qid in shared[:count]
        if qid in questions
    ]


# ================================================================================================================
# Figures (PIL: no plotting library needed)
# ================================================================================================================
def _font(size: int):
    from lavis_xformer.query_diversity import pil_font

    return pil_font(size)


def _palette(index: int):
    from lavis_xformer.compare import _PALETTE

    return _PALETTE[index % len(_PALETTE)]


def _nice_range(values: Sequence[float]):
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    pad = 0.06 * (high - low)
    return low - pad, high + pad


def draw_panel(draw, box, title: str, series: Dict[str, List[float]], colors: Dict[str, tuple]) -> None:
    """One line chart: ``series`` maps a label to its per-epoch values (epoch 1 first)."""
    left, top, right, bottom = box
    font, small = _font(13), _font(10)
    draw.text((left, top), title, fill=(0, 0, 0), font=font)
    plot = (left + 50, top + 22, right - 8, bottom - 22)
    draw.rectangle(plot, outline=(170, 170, 170))
    values = [v for vs in series.values() for v in vs]
    if not values:
        draw.text((plot[0] + 8, plot[1] + 8), "n/a", fill=(120, 120, 120), font=small)
        return
    low, high = _nice_range(values)
    epochs = max(len(vs) for vs in series.values())

    def xy(i, v):
        x = plot[0] + 10 + (plot[2] - plot[0] - 20) * (i / max(1, epochs - 1))
        y = plot[3] - (plot[3] - plot[1]) * (v - low) / (high - low)
        return x, y

    decimals = min(5, max(1, 1 - math.floor(math.log10((high - low) / 4))))  # enough to tell the ticks apart
    for tick in range(5):  # y grid and labels
        v = low + (high - low) * tick / 4
        _, y = xy(0, v)
        draw.line([(plot[0], y), (plot[2], y)], fill=(232, 232, 232))
        draw.text((left, y - 6), f"{v:.{decimals}f}", fill=(90, 90, 90), font=small)
    step = max(1, math.ceil(epochs / 8))
    for i in range(0, epochs, step):  # x labels: epochs, 1-based
        x, _ = xy(i, low)
        draw.text((x - 3, plot[3] + 4), str(i + 1), fill=(90, 90, 90), font=small)
    for label, vs in series.items():
        points = [xy(i, v) for i, v in enumerate(vs)]
        if len(points) > 1:
            draw.line(points, fill=colors[label], width=2)
        for x, y in points:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colors[label])


def loss_curves_png(stats: Dict[str, Dict[str, List[dict]]], path: Path) -> Path:
    """Per-epoch losses of every model: stage 1 total and each term, stage 2 LM loss (``stats[model][stage]``)."""
    from PIL import Image, ImageDraw

    panels = [
        ("Stage 1: total loss", "stage1", "train_loss"),
        ("Stage 1: ITC", "stage1", "train_loss_itc"),
        ("Stage 1: ITM", "stage1", "train_loss_itm"),
        ("Stage 1: ITG", "stage1", "train_loss_lm"),
        ("Stage 1: reconstruction (X-Former)", "stage1", "train_loss_rec"),
        ("Stage 2: LM loss", "stage2", "train_loss_lm"),
    ]
    labels = {model.key: model.label for model in MODELS}
    colors = {labels[key]: _palette(i) for i, key in enumerate(stats)}
    cols, panel_w, panel_h, legend_h = 3, 330, 230, 36
    rows = math.ceil(len(panels) / cols)
    image = Image.new("RGB", (cols * panel_w + 16, legend_h + rows * panel_h + 24), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x = 16
    for label, color in colors.items():  # legend
        draw.rectangle([x, 12, x + 22, 16], fill=color)
        draw.text((x + 28, 6), label, fill=(0, 0, 0), font=_font(13))
        x += 40 + int(draw.textlength(label, font=_font(13)))
    draw.text((x + 10, 6), "per-epoch averages (x: epoch)", fill=(110, 110, 110), font=_font(11))
    for index, (title, stage, key) in enumerate(panels):
        r, c = divmod(index, cols)
        box = (8 + c * panel_w, legend_h + r * panel_h, 8 + (c + 1) * panel_w - 8, legend_h + (r + 1) * panel_h - 8)
        series = {}
        for model_key, per_stage in stats.items():
            values = [e[key] for e in per_stage.get(stage, []) if key in e]
            if key == "train_loss_lm" and stage == "stage2" and not values:
                values = [e["train_loss"] for e in per_stage.get(stage, [])]
            if values:
                series[labels[model_key]] = values
        draw_panel(draw, box, title, series, colors)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """[B, h*w, p*p*C] (MAE's layout: row-major patches, channels last) -> [B, C, h*p, w*p]; the inverse of
    ``XFormerImageMixin.patchify`` for square images."""
    batch, num_patches, dim = patches.shape
    side = int(round(math.sqrt(num_patches)))
    if side * side != num_patches or dim != patch_size * patch_size * channels:
        raise ValueError(f"cannot unpatchify {tuple(patches.shape)} with patch size {patch_size} and {channels} "
                         "channels (need a square number of patches of p*p*C values)")
    x = patches.reshape(batch, side, side, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, channels, side * patch_size, side * patch_size)


@torch.no_grad()
def reconstruct(model, image: torch.Tensor, mask_ratio: float = 0.5, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Original, masked input and reconstructions in [0, 1] ([B, 3, H, W] each) from a stage-1 X-Former: the MAE
    masks ``mask_ratio`` of the patches (a fixed draw, ``seed``), the dual block turns (Z_q, M) into M', and the
    frozen MAE decoder predicts every patch from M'."""
    model.eval()
    num_patches = model.mae_encoder.embeddings.num_patches
    noise = torch.rand(image.shape[0], num_patches, generator=torch.Generator().manual_seed(seed)).to(image.device)
    clip_features, mae = model.forward_encoders(image, mask_ratio, noise)
    query_states = model.forward_queries(clip_features, mae_features=mae.features).last_hidden_state
    _, enriched_mae = model.enrich(query_states, mae.features)
    predicted = model.forward_decoder(enriched_mae, mae.ids_restore)  # [B, L, p*p*3], MAE-normalised pixels
    target = model.patchify(mae.pixels)
    if model.config.norm_pix_loss:  # predictions are per-patch normalised: use the target's statistics to show them
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        predicted = predicted * (var + 1.0e-6) ** 0.5 + mean
    p = model.config.mae_patch_size
    mask = mae.mask.unsqueeze(-1)  # [B, L, 1], 1 = masked
    pasted = predicted * mask + target * (1 - mask)  # the visible patches as they were

    def to_unit(pixels):  # undo MAE's normalisation
        return (pixels * model._mae_std + model._mae_mean).clamp(0, 1)

    original = to_unit(mae.pixels)
    masked_pixels = unpatchify(mask.expand_as(target), p)[:, :1].bool()  # [B, 1, H, W]
    return {
        "original": original,
        "masked": torch.where(masked_pixels, torch.full_like(original, 0.5), original),
        "reconstruction": to_unit(unpatchify(predicted, p)),
        "reconstruction_visible": to_unit(unpatchify(pasted, p)),
        "loss": model.reconstruction_loss(mae.pixels, predicted, mae.mask),
    }


def reconstruction_grid_png(views: Dict[str, torch.Tensor], path: Path, title: str) -> Path:
    """Rows: images; columns: image | MAE mask | reconstruction from M' | reconstruction with the visible patches."""
    from PIL import Image, ImageDraw

    columns = [("original", "image"), ("masked", "MAE mask (grey: masked)"),
               ("reconstruction", "reconstruction from M'"), ("reconstruction_visible", "+ visible patches")]
    count, _, height, width = views["original"].shape
    scale = max(1, 112 // max(height, width))
    tile_w, tile_h, gap = width * scale, height * scale, 8
    col_w = max(tile_w, 150)
    canvas_w = len(columns) * (col_w + gap) + gap
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, words = [""], title.split()
    for word in words:  # wrap the title to the canvas
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and measure.textlength(candidate, font=_font(13)) > canvas_w - 2 * gap:
            lines.append(word)
        else:
            lines[-1] = candidate
    top = 30 + 17 * len(lines)
    canvas = Image.new("RGB", (canvas_w, top + count * (tile_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((gap, 6 + 17 * i), line, fill=(0, 0, 0), font=_font(13))
    for c, (key, label) in enumerate(columns):
        draw.text((gap + c * (col_w + gap), top - 20), label, fill=(60, 60, 60), font=_font(11))
        for r in range(count):
            pixels = (views[key][r].permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(pixels, "RGB").resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (gap + c * (col_w + gap), top + r * (tile_h + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def load_test_images(cfg, folder: Path, count: int) -> torch.Tensor:
    """The first ``count`` test images through the config's eval image processor."""
    from lavis.common.registry import registry
    from PIL import Image

    from lavis_xformer.datasets import shapes

    processor_cfg = next(iter(cfg.datasets_cfg.values())).vis_processor.eval
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    scenes = shapes.read_annotation(folder, "scenes_test")[:count]
    return torch.stack([processor(Image.open(folder / "images" / s["image"]).convert("RGB")) for s in scenes])


def make_reconstruction_grid(settings: DemoSettings, checkpoint: Path, path: Path) -> Optional[Path]:
    """Load the trained stage-1 X-Former (the same frozen stand-in encoders as in training, then its checkpoint)
    and draw ``reconstructions.png`` for the first test images."""
    from lavis_xformer.checkpoints import load_model_weights

    cfg = settings.lavis_config(STAGES[0], MODELS[0])
    model = build_model(cfg, device="cpu")
    if getattr(model, "mae_decoder", None) is None:
        return None  # a variant without the reconstruction branch: nothing to draw
    load_model_weights(model, str(checkpoint), strict_unexpected=True)
    model = model.to(settings.run_device).eval()
    images = load_test_images(cfg, data_folder(cfg), settings.grid_images)
    views = reconstruct(model, images.to(settings.run_device), mask_ratio=0.5, seed=0)
    title = (f"X-Former stage 1 ({checkpoint.name}): MAE mask ratio 0.5, fixed draw; "
             f"reconstruction loss on these images {views['loss'].item():.3f}")
    return reconstruction_grid_png(views, path, title)


# ================================================================================================================
# The demo
# ================================================================================================================
def run_pipelines(settings: DemoSettings, console: Console) -> Dict[str, Dict[str, RunResult]]:
    threads = threads_per_job(settings)
    runners = [Runner(settings, model, console, threads) for model in MODELS]
    if settings.jobs >= 2:
        workers = [threading.Thread(target=r.run_all, name=r.model.key, daemon=True) for r in runners]
        for worker in workers:
            worker.start()
        try:
            while any(w.is_alive() for w in workers):
                for worker in workers:
                    worker.join(timeout=0.5)
                if any(r.error is not None for r in runners):  # one failed: end the other
                    for runner in runners:
                        runner.stop()
        except KeyboardInterrupt:
            for runner in runners:
                runner.stop()
            raise
    else:
        for runner in runners:
            runner.run_all()
            if runner.error is not None:
                break
    errors = [r.error for r in runners if r.error is not None]
    if errors:  # the one that failed first, not the one it stopped
        raise sorted(errors, key=lambda e: str(e).endswith(": stopped"))[0]
    return {runner.model.key: runner.results for runner in runners}


def run_demo(settings: DemoSettings) -> dict:
    settings.out_dir = Path(settings.out_dir).resolve()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    console = Console(settings.verbose)
    start = time.time()
    console.header(
        f"X-Former vs BLIP-2 demo{' (smoke size)' if settings.smoke else ''}: configs {settings.config_dir}, "
        f"output {settings.out_dir}"
    )
    if not settings.config_dir.is_dir():
        raise DemoError(f"no demo configs in {settings.config_dir}: run from a checkout of the repository or pass "
                        "--config-dir projects/xformer/demo")

    console.header("Setup: shapes data, the frozen MAE and OPT stand-ins, parameter counts")
    prepare_data(settings, console)
    mae_standin = pretrain_mae(settings, console) if settings.pretrain_mae else None
    llm_standin = pretrain_llm(settings, console) if settings.pretrain_llm else None
    counts = parameter_counts(settings)
    for model in MODELS:
        c = counts[model.key]
        console.say(f"{model.label}: stage 1 {c['params_stage1_trainable']:,} trainable / "
                    f"{c['params_stage1_total']:,} total; stage 2 {c['params_stage2_trainable']:,} trainable / "
                    f"{c['params_stage2_total']:,} total")

    parallel = "side by side" if settings.jobs >= 2 else "one after the other"
    console.header(f"Training and evaluation through LAVIS's runner ({parallel}; per-run logs in "
                   f"{settings.out_dir / 'logs'})")
    results = run_pipelines(settings, console)

    console.header("Report")
    rows = collect_rows(results, counts)
    stats = {m.key: {s: epoch_stats(results[m.key][s].job_dir) for s in ("stage1", "stage2")} for m in MODELS}
    files = {
        "json": settings.out_dir / "demo_results.json",
        "markdown": settings.out_dir / "demo_results.md",
        "loss_curves": loss_curves_png(stats, settings.out_dir / "loss_curves.png"),
    }
    grid = make_reconstruction_grid(
        settings, last_checkpoint(results["xformer"]["stage1"].job_dir), settings.out_dir / "reconstructions.png"
    )
    if grid is not None:
        files["reconstructions"] = grid
    timings = {f"{model}/{stage}": round(r.seconds, 1) for model, runs in results.items() for stage, r in runs.items()}
    timings["total_seconds"] = round(time.time() - start, 1)
    report = {
        "rows": rows,
        "metrics": {key: label.strip() for key, label, _ in METRICS},
        "not_applicable": sorted(f"{model}/{key}" for model, key in NOT_APPLICABLE),
        "settings": {
            "smoke": settings.smoke, "device": settings.run_device, "jobs": settings.jobs,
            "config_dir": str(settings.config_dir), "options": settings.options,
        },
        "runs": {model: {stage: str(r.job_dir) for stage, r in runs.items()} for model, runs in results.items()},
        "epochs": stats,
        "mae_standin": mae_standin,
        "llm_standin": llm_standin,
        "examples": vqa_examples(results, data_folder(settings.lavis_config(STAGES[3], MODELS[0]))),
        "timings": timings,
        "files": {k: str(v) for k, v in files.items()},
    }
    files["json"].write_text(json.dumps(report, indent=1) + "\n")
    files["markdown"].write_text(markdown_report(report))
    console.say(text_table(rows))
    console.say("")
    console.say(
        "Loss: last epoch's average; retrieval: R@K in % (LAVIS, ITC top-k re-scored by ITM); VQA: official accuracy "
        "(counting = 'how many', identification = 'is there a').\n" + textwrap.fill(STANDINS_NOTE, 118)
    )
    for key, path in files.items():
        console.say(f"{key:>15}: {path}")
    console.say(f"{'total time':>15}: {timings['total_seconds']:.0f}s")
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lavis_xformer.demo",
        description="Train and evaluate X-Former and BLIP-2 side by side on the shapes data (see module docstring).",
    )
    parser.add_argument("--out", default="output/demo", help="output folder (default: output/demo)")
    parser.add_argument("--size", choices=("demo", "small"), default="demo",
                        help="demo: the yamls as they are; small: a few images and epochs (the test suite's)")
    parser.add_argument("--smoke", action="store_true", help="same as --size small")
    parser.add_argument("--device", default=None, help="run.device for every run (default: the yamls', cpu)")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                        help="2: both models' pipelines at once (CPU default); 1: one after the other (GPU default)")
    parser.add_argument("--config-dir", default=str(DEFAULT_CONFIG_DIR), help="folder of the demo yamls")
    parser.add_argument("--data-root", default=None, help="shapes data root for every run (default: the yamls')")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="LAVIS --options applied to every run, e.g. run.batch_size_train=64")
    parser.add_argument("--verbose", action="store_true", help="stream every line of the runs' output")
    parser.add_argument("--random-mae", action="store_true",
                        help="give X-Former the tiny type's random frozen MAE instead of pretraining one first")
    parser.add_argument("--random-llm", action="store_true",
                        help="give stage 2 the tiny type's random frozen OPT instead of pretraining one first")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    jobs = args.jobs or (2 if (device or "cpu") == "cpu" else 1)
    settings = DemoSettings(
        out_dir=Path(args.out), config_dir=Path(args.config_dir).resolve(), smoke=args.smoke or args.size == "small",
        device=device, jobs=jobs, data_root=args.data_root, options=list(args.options), verbose=args.verbose,
        pretrain_mae=not args.random_mae, pretrain_llm=not args.random_llm,
    )
    import lavis_xformer  # noqa: F401  (registers the plugin: models for the parameter counts, processors, builders)

    try:
        return run_demo(settings)
    except DemoError as error:
        print(f"\ndemo failed: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
