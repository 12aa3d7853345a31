"""The path a new user follows from a fresh clone, scripted on the tiny types and the shapes data, with no traceback
on the way: caption an image (the README's quick start), train two iterations, resume, export, load the export back,
and read the curves (TensorBoard event files with scalars, the iteration log).

In-process ``lavis-xformer`` calls (``cli.main``, the console script's function) rather than subprocesses: the same
code, without a 30 s interpreter start-up per command on this machine.
"""

import contextlib
import io
import re
from pathlib import Path

import torch
from lavis.common.registry import registry

from helpers import REPO
from lavis_xformer import cli
from lavis_xformer.checkpoints import from_pretrained, read_checkpoint
from lavis_xformer.runners.logs import read_iteration_log

DEMO_YAML = "projects/xformer/demo/pretrain_stage1_shapes.yaml"  # as the README and `train --help` name it
BUILDER = "xformer_shapes_caption"


def lavis_xformer(*args) -> str:
    """``lavis-xformer ARGS`` in this process; returns what it printed (stdout and stderr); asserts exit 0."""
    for key in ("result_dir", "output_dir"):  # LAVIS's runner registers these once per process
        registry.mapping["paths"].pop(key, None)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = cli.main(list(map(str, args)))
    assert code == 0, f"lavis-xformer {' '.join(map(str, args))} exited {code}:\n{printed.getvalue()[-4000:]}"
    return printed.getvalue()


def scalar_steps(event_files) -> dict:
    """``{tag: {steps}}`` of the scalars in TensorBoard event files (read with tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = {}
    for path in event_files:
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            steps.setdefault(tag, set()).update(event.step for event in events.Scalars(tag))
    return steps


def test_a_new_user_captions_trains_resumes_exports_loads_and_reads_the_curves(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(REPO)  # the fresh clone

    # 1. the README's quick start: caption and answer an image (tiny types, offline)
    readme = (REPO / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start"):].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", quick_start, flags=re.S)[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "README.md quick start", "exec"), {"__name__": "__main__"})
    assert printed.getvalue().startswith("[") and "] [" in printed.getvalue()  # captions, then answers

    # 2. train two iterations, 3. resume for two more (run.resume_ckpt_path=auto finds the first run's checkpoint)
    out = tmp_path / "output"
    options = [f"datasets.{BUILDER}.shapes.root={tmp_path / 'shapes'}", f"datasets.{BUILDER}.shapes.num_train=16",
               f"datasets.{BUILDER}.shapes.num_val=4", f"datasets.{BUILDER}.shapes.num_test=4",
               "run.batch_size_train=4", "run.batch_size_eval=4", "run.iters_per_inner_epoch=2", "run.log_freq=1",
               "run.tensorboard=True", f"run.output_dir={out}"]
    lavis_xformer("train", "--cfg-path", DEMO_YAML, "--options", "run.max_iters=2", *options)
    (first,) = out.glob("*/checkpoint_0.pth")
    resumed = lavis_xformer("train", "--cfg-path", DEMO_YAML, "--options", "run.max_iters=4",
                            "run.resume_ckpt_path=auto", *options)
    (last,) = out.glob("*/checkpoint_1.pth")
    trainer = read_checkpoint(str(last))["trainer"]
    assert (trainer["epoch"], trainer["iteration"]) == (1, 2) and "resume" in resumed.lower()

    # 4. export the last checkpoint as a shareable folder, 5. load it back: the trained weights, bit for bit
    folder = tmp_path / "my_xformer"
    lavis_xformer("export", last, folder)
    model = from_pretrained(folder)
    trained = read_checkpoint(str(last))["model"]
    state = model.state_dict()
    assert trained and all(torch.equal(state[key], value) for key, value in trained.items())
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: lavis-xformer" in card and "arXiv:2407.13851" in card

    # 6. the curves: TensorBoard scalars and the iteration log cover iterations 1..4 across the run and its resume
    # (one job folder per run today; the same iterations if a resumed run continues its predecessor's folder)
    event_files = sorted(out.rglob("events.out.tfevents.*"))
    assert event_files
    steps = scalar_steps(event_files)
    loss_tags = [tag for tag in steps if tag.endswith("loss")]
    assert loss_tags and {1, 2, 3, 4} <= set().union(*(steps[tag] for tag in loss_tags)), steps
    iterations = {line["iteration"] for job in out.iterdir() if job.is_dir() for line in read_iteration_log(job)}
    assert iterations == {1, 2, 3, 4}

    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err + printed.getvalue() + resumed
