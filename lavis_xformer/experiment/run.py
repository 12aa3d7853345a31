"""Running the experiment: the stand-ins, then every (seed, arm) -- in ``jobs`` worker processes of one thread each
-- with a progress line per finished task and an ETA, then the report (``report``) written to ``out``."""

import functools
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from lavis_xformer.experiment.design import ARMS, READING, Arm, ExperimentSize

ARM_BY_NAME = {arm.name: arm for arm in ARMS}


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


def _standin_task(name: str, size: ExperimentSize, folder: str) -> dict:
    from lavis_xformer.experiment import standins

    _one_thread()
    start = time.process_time()
    if name == "mae":
        result = standins.train_mae(size, Path(folder) / "mae")
    else:
        image_size = int(name[len("clip"):])
        result = standins.train_clip(size, image_size, Path(folder) / f"{name}.pth")
    result["cpu_seconds"] = round(time.process_time() - start, 1)
    return result


def _arm_task(arm: Arm, seed: int, size: ExperimentSize, files: Dict[str, str]) -> dict:
    from lavis_xformer.experiment.train import run_arm

    _one_thread()
    start = time.process_time()
    result = run_arm(arm, seed, size, files, *_splits(seed, size))
    result["cpu_seconds"] = round(time.process_time() - start, 1)
    return result


def _map(tasks: List[tuple], function, jobs: int, describe, progress: Progress) -> List[dict]:
    """``function(*task)`` for every task, ``jobs`` at a time in spawned worker processes (in this process for 1);
    results in task order."""
    results: List[Optional[dict]] = [None] * len(tasks)
    if jobs <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            for i, task in enumerate(tasks):
                results[i] = function(*task)
                progress.finished(describe(results[i]))
        finally:
            torch.set_num_threads(threads)
        return results
    import multiprocessing

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the workers' BLAS / OpenMP pools: one thread each
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=None) as pool:
        pending = {pool.apply_async(function, task): i for i, task in enumerate(tasks)}
        while pending:
            for handle in [h for h in pending if h.ready()]:
                i = pending.pop(handle)
                results[i] = handle.get()  # re-raises a worker's error here
                progress.finished(describe(results[i]))
            time.sleep(0.2)
    return results


def run_experiment(seeds: Sequence[int], size: ExperimentSize, out: Path, jobs: int = 2,
                   arms: Sequence[Arm] = ARMS, say: Callable[[str], None] = print) -> dict:
    """The whole experiment; writes ``experiment.json``, ``experiment.md`` and ``experiment_accuracy.png`` to ``out``
    and returns the summary (``report.summarise``) with the Markdown under ``"markdown"``."""
    from lavis_xformer.experiment import report
    from lavis_xformer.experiment.models import arm_image_size

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    progress = Progress(say)
    say(READING)
    names = sorted({f"clip{arm_image_size(a, size)}" for a in arms}) + (
        ["mae"] if any(a.overrides.get("use_mae", True) for a in arms) else [])
    progress.stage("stand-ins", len(names), min(jobs, len(names)))
    standins = _map([(n, size, str(out / "standins")) for n in names], _standin_task, min(jobs, len(names)),
                    lambda r: f"{r['name']}: {r['health']} ({'healthy' if r['healthy'] else 'SETUP FAILURE'}; "
                              f"{r['cpu_seconds']:.0f} CPU s)", progress)
    files = {s["name"]: s["file"] for s in standins}

    tasks = [(arm, seed, size, files) for seed in seeds for arm in arms]
    progress.stage(f"stage 1 + probe, {len(seeds)} seeds x {len(arms)} arms", len(tasks), jobs)
    runs = _map(tasks, _arm_task, jobs, lambda r: (
        f"seed {r['seed']} {r['arm']}: {r['health']['text']} "
        f"({'healthy' if r['health']['healthy'] else 'SETUP FAILURE'}); "
        f"detail {report.scores_of(r)['detail']:.1f} ({r['cpu_seconds']:.0f} CPU s)"), progress)

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
