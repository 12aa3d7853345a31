"""Does it work on CUDA? ``python -m lavis_xformer.gpucheck [--out gpucheck.json] [--sizes tiny bench]`` (``make
gpu-check``): the CUDA paths no CPU run exercises, on one GPU, in a few minutes; one JSON, and a plain PASS / FAIL
line per check.

Checks, at the bench's ``tiny`` and ``bench`` sizes (``analysis.bench``: paper-scale proportions, widths / 8):

* ``amp/stage{1,2}/{size}/{fp16,bf16}/{blip2,xformer}`` -- a training step under ``torch.autocast`` (fp16 with a
  ``GradScaler``) from fp32 weights: the loss equals the fp32 loss of the same weights, inputs and random draws
  within ``AMP_TOLERANCE`` (|amp - fp32| <= rel * |fp32| + abs), every gradient finite, the trainable parameters
  move;
* ``shipped/stage{1,2}/{size}/{blip2,xformer}`` -- a training step with the models as they build on CUDA (frozen
  CLIP-ViT / MAE / OPT in half precision, the bf16 MAE attention) under fp16 autocast, as the bench runs them: loss
  and gradients finite;
* ``sdpa/{size}/{fp16,bf16}`` -- X-Former's stage-1 forward with only the fused SDPA kernels allowed (flash,
  memory-efficient; the math fallback forbidden): every attention call of the model runs a fused kernel (the
  kernels the profiler saw are listed);
* ``predict_answers/{size}/{blip2,xformer}`` -- zero-shot VQA generation on CUDA (beam 5): one string per question;
* ``nccl`` -- a one-GPU NCCL process group (a fresh process): ``all_reduce``, the plugin's ``concat_all_gather``
  and ``gather_objects``;
* ``bench/{size}`` -- ``python -m lavis_xformer.analysis.bench --device cuda`` (a short run) writes its tables;
* every check records its peak CUDA memory (``max_memory_allocated``).

Exit status: 0 when every check passed, 1 otherwise. Without CUDA the check says so, writes a JSON that claims
nothing (``"cuda": false``, no checks) and exits 0.
"""

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

AMP_TOLERANCE = {  # (relative, absolute) on the training loss: fp16 keeps 11 mantissa bits, bf16 8
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
    torch.float32: (0.0, 0.0),  # the CPU dry run: fp32 against itself, bit for bit
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SIZES = ("tiny", "bench")
NO_CUDA = "No CUDA device (torch.cuda.is_available() is False): the GPU check ran nothing and claims nothing."


@dataclass
class CheckResult:
    name: str
    passed: bool
    seconds: float
    peak_memory_mb: Optional[float] = None
    details: dict = field(default_factory=dict)
    error: Optional[str] = None


class CheckFailed(AssertionError):
    """A check ran and its result is wrong (as opposed to an exception from the code under test)."""


# ================================================================================================================
# Models, inputs, seeds
# ================================================================================================================
def bench_size(name: str):
    from lavis_xformer.analysis import bench

    return bench.TINY if name == "tiny" else bench.BenchSize()


def build_model(stage: int, row: str, size_name: str, device, fp32: bool):
    """The bench's model ``row`` ("blip2+impl" or "xformer") at ``size_name``, on ``device``; ``fp32``: every part
    in fp32 (the reference of the AMP checks), else as it builds on that device."""
    from lavis_xformer.analysis import bench
    from lavis_xformer.models.blip2_baseline import Blip2Baseline
    from lavis_xformer.models.blip2_baseline_llm import Blip2BaselineOPT
    from lavis_xformer.models.config import BackboneConfig, XFormerConfig
    from lavis_xformer.models.config_llm import Blip2OPTConfig, XFormerOPTConfig
    from lavis_xformer.models.xformer import XFormer
    from lavis_xformer.models.xformer_llm import XFormerOPT

    size = bench_size(size_name)
    fields = bench.xformer_fields(size) if row == "xformer" else bench.backbone_fields(size, optimised=True)
    if stage == 2:
        fields = {**fields, **bench.llm_fields(size)}
        if row == "xformer":
            fields.update(reconstruction_loss=False, mask_ratio=0.0)
    if fp32:
        fields.update(vit_precision="fp32", frozen_precision="fp32")
        if stage == 2:
            fields["llm_precision"] = "fp32"
    classes = {
        (1, "xformer"): (XFormer, XFormerConfig),
        (1, "blip2+impl"): (Blip2Baseline, BackboneConfig),
        (2, "xformer"): (XFormerOPT, XFormerOPTConfig),
        (2, "blip2+impl"): (Blip2BaselineOPT, Blip2OPTConfig),
    }
    model_cls, config_cls = classes[(stage, row)]
    torch.manual_seed(0)
    return model_cls(config_cls(**fields)).to(device)


def training_samples(size_name: str, device) -> dict:
    from lavis_xformer.analysis import bench

    return bench.image_text_samples(bench_size(size_name), torch.device(device))


def seeded(seed: int = 0):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def ensure_process_group():
    """LAVIS's BLIP-2 forward calls ``dist.get_rank()``: a one-process gloo group, as the bench makes."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from lavis_xformer.common.distributed import init_single_process_group

        init_single_process_group("gloo")


# ================================================================================================================
# The checks
# ================================================================================================================
def amp_training_step(stage: int, row: str, size_name: str, dtype: torch.dtype, device="cuda") -> dict:
    """Loss under autocast(dtype) vs the fp32 loss of the same weights, inputs and random draws; then one step."""
    ensure_process_group()
    model = build_model(stage, row, size_name, device, fp32=True).train()
    samples = training_samples(size_name, device)
    seeded()
    with torch.no_grad():
        reference = float(model(samples)["loss"])
    seeded()
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with autocast:
        loss = model(samples)["loss"]
    relative, absolute = AMP_TOLERANCE[dtype]
    difference = abs(float(loss.detach()) - reference)
    details = {"loss_fp32": reference, "loss_amp": float(loss.detach()), "difference": difference,
               "tolerance": relative * abs(reference) + absolute}
    if not difference <= details["tolerance"]:
        raise CheckFailed(f"loss under {dtype} autocast {float(loss.detach()):.6f} vs fp32 {reference:.6f}: |diff| {difference:.3g}"
                          f" > {details['tolerance']:.3g}")
    params = trainable(model)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    bad = [i for i, p in enumerate(params) if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise CheckFailed(f"{len(bad)} trainable parameter(s) with non-finite gradients after the {dtype} step")
    scaler.step(optimizer)
    scaler.update()
    moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    details["parameters_moved"] = f"{moved}/{len(params)}"
    if moved == 0:
        raise CheckFailed("no trainable parameter changed after the optimiser step")
    return details


def shipped_training_step(stage: int, row: str, size_name: str, device="cuda") -> dict:
    """A training step with the model as it builds on CUDA (frozen parts in half precision), fp16 autocast."""
    ensure_process_group()
    model = build_model(stage, row, size_name, device, fp32=False).train()
    samples = training_samples(size_name, device)
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
    seeded()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(samples)["loss"]
    loss.backward()
    if not torch.isfinite(loss) or any(p.grad is not None and not torch.isfinite(p.grad).all() for p in trainable(model)):
        raise CheckFailed(f"non-finite loss ({float(loss.detach())}) or gradients with the shipped CUDA precisions")
    optimizer.step()
    dtypes = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})
    return {"loss": float(loss.detach()), "frozen_parameter_dtypes": dtypes}


def sdpa_kernels(size_name: str, dtype: torch.dtype, device="cuda") -> dict:
    """X-Former's stage-1 forward with the math fallback forbidden: any attention that cannot use a fused kernel
    raises ('No available kernel')."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    ensure_process_group()
    model = build_model(1, "xformer", size_name, device, fp32=False).eval()
    samples = training_samples(size_name, device)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype), sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    ), profile(activities=[ProfilerActivity.CUDA]) as prof:
        seeded()
        model(samples)
    kernels = sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in ("flash", "fmha", "efficient"))})
    if not kernels:
        raise CheckFailed("no fused attention kernel ran (flash / memory-efficient)")
    return {"fused_kernels": kernels[:10]}


def predict_answers_check(size_name: str, row: str, device="cuda") -> dict:
    from lavis_xformer.analysis.bench import QUESTIONS

    ensure_process_group()
    model = build_model(2, row, size_name, device, fp32=False).eval()
    image = training_samples(size_name, device)["image"]
    questions = [QUESTIONS[i % 2] for i in range(image.shape[0])]
    answers = model.predict_answers({"image": image, "text_input": questions}, num_beams=5, max_len=5)
    if len(answers) != len(questions) or not all(isinstance(a, str) for a in answers):
        raise CheckFailed(f"predict_answers returned {answers!r} for {len(questions)} questions")
    return {"answers": answers, "llm_dtype": str(next(model.opt_model.parameters()).dtype)}


def nccl_probe() -> dict:
    """In this (fresh) process: a one-GPU NCCL group, a collective, the plugin's gather helpers."""
    import torch.distributed as dist

    from lavis_xformer.common import distributed

    store = dist.FileStore(tempfile.mktemp(prefix="gpucheck-nccl-"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        x = torch.arange(4.0, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        gathered = distributed.concat_all_gather(torch.ones(2, 3, device="cuda"))
        objects = distributed.gather_objects({"rank": 0})
        ok = x.tolist() == [0.0, 1.0, 2.0, 3.0] and tuple(gathered.shape) == (2, 3) and objects[0] == {"rank": 0}
        return {"backend": dist.get_backend(), "all_reduce": x.tolist(), "gather_shape": list(gathered.shape), "ok": ok}
    finally:
        dist.destroy_process_group()


def nccl_check() -> dict:
    out = subprocess.run([sys.executable, "-m", "lavis_xformer.gpucheck", "--nccl-probe"], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise CheckFailed(f"the NCCL probe exited {out.returncode}: {(out.stdout + out.stderr)[-2000:]}")
    details = json.loads(out.stdout.strip().splitlines()[-1])
    if not details.get("ok"):
        raise CheckFailed(f"wrong collective results: {details}")
    return details


def bench_check(size_name: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "bench.json")
        command = [sys.executable, "-m", "lavis_xformer.analysis.bench", "--device", "cuda", "--size", size_name,
                   "--repeats", "3", "--warmup", "1", "--no-memory", "--no-paper-scale", "--no-scaling",
                   "--json", report, "--markdown", os.path.join(folder, "bench.md")]
        out = subprocess.run(command, capture_output=True, text=True, timeout=240)
        if out.returncode != 0:
            raise CheckFailed(f"{' '.join(command)} exited {out.returncode}: {(out.stdout + out.stderr)[-2000:]}")
        data = json.load(open(report))
        tables = open(os.path.join(folder, "bench.md")).read()
    stages = [key for key in data if key.startswith("stage")]
    if not stages:
        raise CheckFailed(f"the bench report has no stage tables (keys {sorted(data)})")
    return {"stages": stages, "markdown_lines": len(tables.splitlines())}


# ================================================================================================================
# Running them
# ================================================================================================================
def planned_checks(sizes=SIZES) -> Dict[str, Callable[[], dict]]:
    """Every check by name, in the order they run."""
    checks = {}
    for size in sizes:
        for stage in (1, 2):
            for dtype_name, dtype in DTYPES.items():
                for row, label in (("blip2+impl", "blip2"), ("xformer", "xformer")):
                    checks[f"amp/stage{stage}/{size}/{dtype_name}/{label}"] = (
                        lambda s=stage, r=row, z=size, d=dtype: amp_training_step(s, r, z, d))
            for row, label in (("blip2+impl", "blip2"), ("xformer", "xformer")):
                checks[f"shipped/stage{stage}/{size}/{label}"] = lambda s=stage, r=row, z=size: shipped_training_step(s, r, z)
        for dtype_name, dtype in DTYPES.items():
            checks[f"sdpa/{size}/{dtype_name}"] = lambda z=size, d=dtype: sdpa_kernels(z, d)
        for row, label in (("blip2+impl", "blip2"), ("xformer", "xformer")):
            checks[f"predict_answers/{size}/{label}"] = lambda z=size, r=row: predict_answers_check(z, r)
    checks["nccl"] = nccl_check
    for size in sizes:
        checks[f"bench/{size}"] = lambda z=size: bench_check(z)
    return checks


def run_check(name: str, fn: Callable[[], dict], cuda: bool) -> CheckResult:
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    try:
        details, error, passed = fn() or {}, None, True
    except Exception as exc:  # a check that fails never stops the others
        details, passed = {}, False
        error = f"{type(exc).__name__}: {exc}" if isinstance(exc, CheckFailed) else traceback.format_exc(limit=6)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return CheckResult(name, passed, round(time.time() - start, 2), None if peak is None else round(peak, 1), details, error)


def run_checks(checks: Dict[str, Callable[[], dict]], cuda: bool, log=print) -> List[CheckResult]:
    results = []
    for name, fn in checks.items():
        result = run_check(name, fn, cuda)
        memory = f", peak {result.peak_memory_mb:.0f} MiB" if result.peak_memory_mb is not None else ""
        log(f"{'PASS' if result.passed else 'FAIL'}  {name}  ({result.seconds:.1f}s{memory})"
            + ("" if result.passed else f"\n      {result.error.strip().splitlines()[-1]}"))
        results.append(result)
    return results


def report(results: List[CheckResult], cuda: bool) -> dict:
    info = {"cuda": cuda, "torch": torch.__version__, "python": platform.python_version()}
    if cuda:
        info.update(device=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda,
                    bf16_supported=torch.cuda.is_bf16_supported())
    else:
        info["message"] = NO_CUDA
    info["tolerances"] = {"fp16": AMP_TOLERANCE[torch.float16], "bf16": AMP_TOLERANCE[torch.bfloat16]}
    info["checks"] = [asdict(r) for r in results]
    info["passed"] = sum(r.passed for r in results)
    info["failed"] = sum(not r.passed for r in results)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lavis_xformer.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpucheck.json", help="the JSON report (default: gpucheck.json)")
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--only", nargs="+", default=None, metavar="PREFIX", help="run the checks named with a prefix")
    parser.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_probe:
        print(json.dumps(nccl_probe()))
        return 0
    cuda = torch.cuda.is_available()
    if not cuda:
        print(NO_CUDA)
        results = []
    else:
        print(f"GPU check on {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
        checks = planned_checks(args.sizes)
        if args.only:
            checks = {n: f for n, f in checks.items() if n.startswith(tuple(args.only))}
        results = run_checks(checks, cuda)
    data = report(results, cuda)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1, default=str)
    if cuda:
        print(f"{data['passed']} passed, {data['failed']} failed; report: {args.out}")
    return 0 if data["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
