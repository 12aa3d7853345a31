"""Helpers the test files share: the repository's paths and running the plugin's commands in subprocesses."""

import hashlib
import os
import subprocess
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
PROJECTS = REPO / "projects" / "xformer"
DEMO_TRAIN = PROJECTS / "demo" / "pretrain_stage1_shapes.yaml"
DEMO_TRAIN_BLIP2 = PROJECTS / "demo" / "pretrain_stage1_shapes_blip2.yaml"
DEMO_EVAL = PROJECTS / "demo" / "ret_shapes_eval.yaml"


def subprocess_env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # this checkout's plugin
    for launcher_variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(launcher_variable, None)  # a single-process run must not think it was launched by torchrun/SLURM
    return env


def run_cli(args, cwd, timeout=240):
    """Run a command; on failure show its output (the last part) in the assertion message."""
    result = subprocess.run(args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed ({result.returncode}):\n{output[-6000:]}"
    return output


def shapes_options(builder, root, **sizes):
    """--options entries pointing a shapes dataset at ``root`` with the given sizes."""
    items = [f"datasets.{builder}.shapes.root={root}"]
    items += [f"datasets.{builder}.shapes.{key}={value}" for key, value in sizes.items()]
    return items


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def tiny_with_moved_weights(arch: str):
    """A ``tiny`` model of ``arch`` whose trainable weights moved away from their initialisation (seed 0), so a copy
    that loads back equal proves the load, not the initialisation."""
    import torch

    from lavis_xformer.common.meta import build_without_checkpoints

    torch.manual_seed(0)
    model = build_without_checkpoints(arch, "tiny")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    return model
