"""Running the experiment: the stand-ins, then every (seed, arm) -- in ``jobs`` worker processes of one thread each
-- with a progress line per finished task and an ETA, then the report (``report``) written to ``out``."""

import functools
import hashlib
import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from lavis_xformer.experiment.design import ARMS, READING, Arm, ExperimentSize

class Progress:
    """``[stage k/n] what -- elapsed, ETA`` lines (the ETA: the mean time per finished task times those left, over
    the parallel jobs)."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say

    def stage(self, title: str, total: int, jobs: int):
        self.title, self.total, self.jobs, self.done, self.start = title, total, jobs, 0, time.time()
        self.say(f"\n== {title}: {total} task(s), {jobs} at a time")

    def finished(self, what: str):
        self.done += 1
        elapsed = time.time() - self.start
        left = elapsed / self.done * (self.total - self.done)
        self.say(f"[{self.title} {self.done}/{self.total}] {what} -- elapsed {_clock(elapsed)}, ETA {_clock(left)}")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _one_thread():
    import torch

    torch.set_num_threads(1)


@functools.lru_cache(maxsize=2)
def _splits(seed: int, size: ExperimentSize):
    from lavis_xformer.experiment.data import make_split

    return make_split(seed, "train", size), make_split(seed, "test", size)


STANDIN_VERSION = 1  #: bump when the stand-ins' training changes: older cached stand-ins are then not reused


def standin_key(name: str, size: ExperimentSize) -> str:
    """What a stand-in is a function of (its data, sizes, recipe, the base model): its file name's hash."""
    from lavis_xformer.datasets.shapes import FORMAT_VERSION
    from lavis_xformer.experiment.design import BASE_MODEL, PRETRAIN_SEED

    fields = {k: v for k, v in asdict(size).items() if k in ("image_px", "model_px", "min_objects", "max_objects",
                                                             "num_pretrain", "clip_epochs" if name != "mae" else "mae_epochs")}
    identity = json.dumps([name, fields, BASE_MODEL, PRETRAIN_SEED, FORMAT_VERSION, STANDIN_VERSION], sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _standin_task(name: str, size: ExperimentSize, folder: str) -> dict:
    """Train one stand-in into ``folder`` (or reuse the one already there for the same key: training is
    deterministic, so a reused stand-in is the one this run would train); its record."""
    from lavis_xformer.experiment import standins

    _one_thread()
    target = Path(folder) / f"{name}-{standin_key(name, size)}"
    record = target.parent / f"{target.name}.json"
    if record.is_file():
        result = json.loads(record.read_text())
        if Path(result["file"]).exists():
            return dict(result, cached=True)
    start = time.process_time()
    if name == "mae":
        result = standins.train_mae(size, target)
    else:
        result = standins.train_clip(size, int(name[len("clip"):]), target.parent / f"{target.name}.pth")
    result["cpu_seconds"] = round(time.process_time() - start, 1)
    record.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _arm_task(arm: Arm, seed: int, size: ExperimentSize, files: Dict[str, str]) -> dict:
    """One (arm, seed) in a worker: its seed's splits (cached per worker), ``train.run_arm``, the CPU seconds."""
    from lavis_xformer.experiment.train import run_arm

    _one_thread()
    start = time.process_time()
    result = run_arm(arm, seed, size, files, *_splits(seed, size))
    result["cpu_seconds"] = round(time.process_time() - start, 1)
    return result


def _run_all(standin_tasks: List[tuple], arm_tasks: List[tuple], jobs: int, describe, progress: Progress):
    """The stand-ins, then the arms, ``jobs`` at a time in spawned worker processes of one thread (in this process for
    1 job); an arm starts as soon as the stand-ins it needs are saved. Returns (stand-in results, arm results), each
    in task order whatever order they finished in."""
    standins: List[Optional[dict]] = [None] * len(standin_tasks)
    arms: List[Optional[dict]] = [None] * len(arm_tasks)
    if jobs <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            for i, task in enumerate(standin_tasks):
                standins[i] = _standin_task(*task)
                progress.finished(describe(standins[i]))
            files = {s["name"]: s["file"] for s in standins}
            for i, (arm, seed, size, needs) in enumerate(arm_tasks):
                arms[i] = _arm_task(arm, seed, size, {n: files[n] for n in needs})
                progress.finished(describe(arms[i]))
        finally:
            torch.set_num_threads(threads)
        return standins, arms
    import multiprocessing
    import signal
    import sys

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the workers' BLAS / OpenMP pools: one thread each
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends the workers too (the pool's exit)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    files: Dict[str, str] = {}
    waiting = list(enumerate(arm_tasks))
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        pending = {pool.apply_async(_standin_task, task): ("standin", i) for i, task in enumerate(standin_tasks)}
        while pending or waiting:
            ready = [(i, t) for i, t in waiting if all(n in files for n in t[3])]
            for i, (arm, seed, size, needs) in ready:  # queued behind the stand-ins still training
                pending[pool.apply_async(_arm_task, (arm, seed, size, {n: files[n] for n in needs}))] = ("arm", i)
            waiting = [(i, t) for i, t in waiting if (i, t) not in ready]
            for handle in [h for h in pending if h.ready()]:
                kind, i = pending.pop(handle)
                result = handle.get()  # re-raises a worker's error here
                if kind == "standin":
                    standins[i] = result
                    files[result["name"]] = result["file"]
                else:
                    arms[i] = result
                progress.finished(describe(result))
            time.sleep(0.2)
    return standins, arms


def _describe(result: dict) -> str:
    from lavis_xformer.experiment.report import scores_of

    if "arm" not in result:
        return (f"stand-in {result['name']}: {result['health']} "
                f"({'healthy' if result['healthy'] else 'SETUP FAILURE'}; {result['cpu_seconds']:.0f} CPU s"
                f"{', reused from ' + str(Path(result['file']).parent) if result.get('cached') else ''})")
    health = result["health"]
    return (f"seed {result['seed']} {result['arm']}: {health['text']} "
            f"({'healthy' if health['healthy'] else 'SETUP FAILURE'}); probe detail score "
            f"{scores_of(result)['detail']:.1f} ({result['cpu_seconds']:.0f} CPU s)")


def run_experiment(seeds: Sequence[int], size: ExperimentSize, out: Path, jobs: int = 2,
                   arms: Sequence[Arm] = ARMS, say: Callable[[str], None] = print,
                   standin_dir: Optional[Path] = None) -> dict:
    """The whole experiment; writes ``experiment.json``, ``experiment.md`` and ``experiment_accuracy.png`` to ``out``
    and returns the summary (``report.summarise``) with the Markdown under ``"markdown"``. The stand-ins go to (and
    are reused from) ``standin_dir``, by default ``out/standins``."""
    from lavis_xformer.experiment import report
    from lavis_xformer.experiment.models import arm_image_size

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    progress = Progress(say)
    say(READING)

    def needs(arm: Arm) -> List[str]:
        return [f"clip{arm_image_size(arm, size)}"] + (["mae"] if arm.overrides.get("use_mae", True) else [])

    names = sorted({n for arm in arms for n in needs(arm)}, key=lambda n: (n != "clip64", n))  # longest first
    arm_tasks = [(arm, seed, size, needs(arm)) for seed in seeds for arm in arms]
    progress.stage(f"{len(names)} stand-ins, then stage 1 + probe for {len(seeds)} seeds x {len(arms)} arms",
                   len(names) + len(arm_tasks), jobs)
    standin_dir = Path(standin_dir or out / "standins").expanduser()
    standin_dir.mkdir(parents=True, exist_ok=True)
    standins, runs = _run_all([(n, size, str(standin_dir)) for n in names], arm_tasks, jobs, _describe, progress)

    summary = report.summarise(runs, standins, arms, size.apply_health)
    seconds = time.time() - start
    header = (f"Probe accuracy (%) on {size.num_test} fresh test images per seed, seeds {list(seeds)}, size "
              f"'{size.name}' (mean over seeds [t 95% interval]):\n")
    summary["markdown"] = report.markdown(summary, header)
    summary["health"] = report.health_lines(runs, standins)
    figure_path = out / "experiment_accuracy.png"
    report.figure(summary, figure_path)
    record = {"summary": summary, "runs": runs, "standins": standins, "size": asdict(size), "seeds": list(seeds),
              "arms": [asdict(a) for a in arms], "reading": READING, "seconds": round(seconds, 1), "jobs": jobs,
              "cpu": _cpu_name()}
    (out / "experiment.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (out / "experiment.md").write_text(summary["markdown"] + "\nHealth:\n\n" + "\n".join(
        f"- {line}" for line in summary["health"]) + f"\n\nTook {_clock(seconds)} with {jobs} job(s) on "
        f"{_cpu_name()}.\n")
    say("\n== Health\n" + "\n".join(summary["health"]))
    say("\n== Result\n" + summary["markdown"])
    say(f"Took {_clock(seconds)} ({jobs} jobs, {_cpu_name()}); written: {out / 'experiment.md'}, "
        f"{out / 'experiment.json'}, {figure_path}")
    return summary


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"
