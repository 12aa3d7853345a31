"""Running the demo's pipelines: which stages run for which model, the settings, and the runner that starts the
plugin's LAVIS entry points as subprocesses (both models side by side) and reads their output folders."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

from omegaconf import OmegaConf

# ================================================================================================================
# What runs
# ================================================================================================================
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # lavis_xformer/
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
    weights: Tuple[Tuple[str, str], ...] = ()  #: (model config key, stage) pairs: the key gets that stage's checkpoint


STAGES = (
    Stage("stage1", "stage 1: pre-training (ITC, ITM, ITG; X-Former: + reconstruction)", "pretrain_stage1_shapes",
          "lavis_xformer.train"),
    Stage("retrieval", "zero-shot image-text retrieval (stage-1 checkpoint)", "ret_shapes_eval",
          "lavis_xformer.evaluate", (("finetuned", "stage1"),)),
    Stage("stage2", "stage 2: alignment with a frozen OPT (LM loss)", "pretrain_stage2_shapes",
          "lavis_xformer.train", (("pretrained", "stage1"),)),
    Stage("vqa", "zero-shot VQA (stage-2 checkpoint)", "vqa_shapes_eval",
          "lavis_xformer.evaluate", (("pretrained", "stage2"),)),
    # the Q-Former's text parts, which stage 2 drops, come back from stage 1 (qformer_text_init)
    Stage("vqa_ft", "VQA fine-tuning with the answers (stage-2 checkpoint), then VQA on the test split",
          "vqa_ft_shapes", "lavis_xformer.train", (("pretrained", "stage2"), ("qformer_text_init", "stage1"))),
)
TRAINED = ("stage1", "stage2", "vqa_ft")  # the stages that train (their per-epoch losses are plotted)
EVALUATED = ("retrieval", "vqa", "vqa_ft")  # the stages that score the test split (evaluate.txt)

# --smoke: the same pipeline on a few images and epochs (applied on top of the yamls).
SMOKE_SHAPES = {"num_train": 48, "num_val": 4, "num_test": 12}
SMOKE_OPTIONS = {
    "stage1": ["run.max_epoch=2", "run.batch_size_train=16", "run.warmup_steps=2", "run.log_freq=1"],
    "retrieval": ["run.k_test=8", "run.batch_size_eval=12"],
    "stage2": ["run.max_epoch=2", "run.batch_size_train=16", "run.warmup_steps=2", "run.log_freq=1"],
    "vqa": ["run.batch_size_eval=12", "run.num_beams=2", "run.max_len=4"],
    "vqa_ft": ["run.max_epoch=2", "run.batch_size_train=16", "run.warmup_steps=2", "run.log_freq=1",
               "run.batch_size_eval=12", "run.num_beams=2", "run.max_len=4"],
}
SMOKE_SEEDS = 2  # --smoke: two seeds (the multi-seed table and its intervals, at the smallest size that has them)
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
        self.width = max(len(m.label) for m in MODELS) + 10

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

    def __init__(self, settings: "DemoSettings", model: DemoModel, seed: int, console: Console,
                 threads: Optional[int]):
        self.settings, self.model, self.seed, self.console, self.threads = settings, model, seed, console, threads
        self.label = f"[{model.label} seed {seed}]"
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
                self.console.say(summary_line(stage.key, self.results[stage.key]), prefix=self.label)
        except BaseException as error:  # reported by the main thread
            self.error = error

    def command(self, stage: Stage) -> List[str]:
        settings = self.settings
        yaml = settings.config_dir / f"{stage.yaml}{self.model.suffix}.yaml"
        options = [f"run.output_dir={self.run_dir(stage.key)}"]
        options += settings.stage_options(stage.key, yaml, self.model, self.seed)
        for key, source in stage.weights:  # each the last checkpoint of an earlier stage of this pipeline
            options.append(f"model.{key}={last_checkpoint(self.results[source].job_dir)}")
        return [sys.executable, "-m", stage.entry, "--cfg-path", str(yaml), "--options", *options]

    def run_dir(self, stage_key: str) -> Path:
        return self.settings.out_dir / "runs" / f"seed{self.seed}" / self.model.key / stage_key

    def run_stage(self, stage: Stage) -> RunResult:
        prefix = self.label
        command = self.command(stage)
        run_dir = self.run_dir(stage.key)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a previous demo's run: LAVIS would add a second job folder next to it
        log_path = self.settings.out_dir / "logs" / f"seed{self.seed}" / f"{self.model.key}_{stage.key}.log"
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


def model_section(cfg) -> dict:
    """The ``model:`` section a LAVIS ``Config`` builds its model from (yaml, model defaults and options)."""
    return OmegaConf.to_container(cfg.model_cfg, resolve=True)


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
    """The per-epoch training averages in log.txt (``{"train_loss": ..., ...}``, ``runners.logs.read_epoch_log``;
    a null, i.e. non-finite, average as nan).

    The only reader of LAVIS's training log: the losses in the table and the curves all come from here."""
    from lavis_xformer.runners.logs import read_epoch_log

    epochs = [{key: float("nan") if value is None else float(value) for key, value in record.items()
               if key.startswith("train_")} for record in read_epoch_log(job_dir)]
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
    """What a finished run printed: the last epoch's losses (training runs), the test metrics (evaluated runs)."""
    took = f"({result.seconds:.0f}s)"
    lines = []
    if stage_key in TRAINED:
        epochs = epoch_stats(result.job_dir)
        terms = "  ".join(f"{k[len('train_'):]} {v:.3f}" for k, v in epochs[-1].items() if k.startswith("train_loss"))
        lines.append(f"    done {took}: {len(epochs)} epochs; last epoch's averages: {terms}")
    if stage_key in EVALUATED:
        metrics = eval_metrics(result.job_dir)
        head = "    test split:" if lines else f"    done {took}:"
        if stage_key == "retrieval":
            lines.append(f"{head} image->text R@1 {metrics['txt_r1']:.1f}  text->image R@1 {metrics['img_r1']:.1f}  "
                         f"mean recall {metrics['r_mean']:.1f}")
        else:
            parts = [f"overall {metrics['agg_metrics']:.2f}"]
            parts += [f"{key[len('vqa_'):]} {metrics[t]:.2f}" for key, t in ANSWER_TYPE_OF.items() if t in metrics]
            lines.append(f"{head} VQA accuracy " + "  ".join(parts))
    return "\n".join(lines)


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
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])  #: run.seed of every trainable run, one pipeline each
    grid_images: int = 8
    pretrain_clip: bool = True  #: pretrain the frozen CLIP-ViT first (standins.CLIP_STANDIN); False: the random one
    clip_weights: Optional[Path] = None  #: set once the CLIP-ViT is pretrained: passed as model.vit_weights (all runs)
    pretrain_mae: bool = True  #: pretrain X-Former's frozen MAE first (standins.MAE_STANDIN); False: the random one
    mae_weights: Optional[Path] = None  #: set once the MAE is pretrained: passed as model.mae_weights
    pretrain_llm: bool = True  #: pretrain the frozen OPT first (standins.LLM_STANDIN); False: the random one
    opt_weights: Optional[Path] = None  #: set once the OPT is pretrained: passed as model.opt_model (stage 2, VQA)

    def dataset_names(self, yaml: Path) -> List[str]:
        from omegaconf import OmegaConf

        return list(OmegaConf.load(yaml).datasets)

    def stage_options(self, stage_key: str, yaml: Path, model: Optional[DemoModel] = None,
                      seed: Optional[int] = None) -> List[str]:
        """``--options`` for a run: smoke sizes, data root, device, the seed, the frozen stand-ins (CLIP-ViT: both
        models; MAE: X-Former; OPT: the LLM stages), then the user's."""
        options = [] if seed is None else [f"run.seed={seed}"]
        for name in self.dataset_names(yaml):
            if self.smoke:
                options += [f"datasets.{name}.shapes.{k}={v}" for k, v in SMOKE_SHAPES.items()]
            if self.data_root:
                options.append(f"datasets.{name}.shapes.root={self.data_root}")
        if self.smoke:
            options += SMOKE_OPTIONS[stage_key]
        if self.device:
            options.append(f"run.device={self.device}")
        if self.clip_weights is not None and model is not None:
            options.append(f"model.vit_weights={self.clip_weights}")
        if self.mae_weights is not None and model is not None and model.key == "xformer":
            options.append(f"model.mae_weights={self.mae_weights}")
        if self.opt_weights is not None and model is not None and stage_key in ("stage2", "vqa", "vqa_ft"):
            options.append(f"model.opt_model={self.opt_weights}")
        return options + list(self.options)

    def lavis_config(self, stage: Stage, model: DemoModel, standins: bool = True):
        """LAVIS's ``Config`` of a stage's yaml with the run's options (model defaults and dataset defaults merged);
        ``standins=False``: without the pretrained frozen encoders (the random ones of the same sizes)."""
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
# Data
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


# ================================================================================================================
# Both models' pipelines
# ================================================================================================================
def run_pipelines(settings: DemoSettings, console: Console) -> Dict[int, Dict[str, Dict[str, RunResult]]]:
    """Every seed's pipelines, one seed after the other: ``{seed: {model key: {stage key: RunResult}}}``."""
    results = {}
    for seed in settings.seeds:
        console.header(f"Seed {seed} (run.seed={seed} in every run; the frozen stand-ins are the same for all seeds)")
        results[seed] = run_seed(settings, seed, console)
    return results


def run_seed(settings: DemoSettings, seed: int, console: Console) -> Dict[str, Dict[str, RunResult]]:
    """Both models' pipelines for one seed (side by side with ``jobs`` = 2)."""
    threads = threads_per_job(settings)
    runners = [Runner(settings, model, seed, console, threads) for model in MODELS]
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
