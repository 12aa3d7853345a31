"""Side-by-side cost of X-Former and LAVIS's BLIP-2, measured in one process, on the same inputs and threads.

    python -m lavis_xformer.analysis.bench [--size bench|tiny] [--device cpu|cuda] [--clock wall|process]
        [--threads N] [--repeats N] [--quick] [--json PATH] [--markdown PATH] [--readme PATH] [--figures DIR]

What it measures, for stage 1 (``xformer`` vs LAVIS ``Blip2Qformer``) and stage 2 (``xformer_opt`` vs LAVIS
``Blip2OPT``):
- paper scale, on the ``meta`` device from the published model types (``common.meta.build_on_meta``): trainable and
  frozen parameters, forward FLOPs and MACs per sample of the training objective, and the frozen MAE encoder's
  share of them (``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-accumulate of every
  matmul, convolution and attention product; MACs = FLOPs / 2);
- at a ``bench`` size that keeps the paper-scale proportions (every width divided by one factor, every depth by
  another; token counts, queries and text length unchanged), per operation (training step = forward + backward +
  AdamW step; feature extraction of Z' / Z_q; ``predict_answers`` with beam 5): time, and the FLOPs of that very call
  at that very size, so that the time ratio is read beside the FLOPs ratio of the same work;
- time: warm-up calls, then ``repeats`` calls per row, the rows interleaved call by call so that machine noise hits
  all of them; each row's median and interquartile range, and each ratio as the median and IQR of the per-repeat
  paired ratios (repeat i of X-Former over repeat i of BLIP-2). ``--clock process`` times the process's CPU time
  instead of the wall clock, for a machine other jobs share; threads are fixed (``--threads``) and recorded;
- where the time goes: one profiled call per operation (``torch.profiler``), attributed to CLIP-ViT, MAE encoder,
  Q-Former, fusion, MAE decoder, LLM, optimiser and other (``analysis.breakdown``), for BLIP-2 and X-Former;
- memory: on the CPU the peak resident set of a fresh process per model, minus the interpreter's own; on CUDA
  ``max_memory_allocated``; activation checkpointing (``checkpoint_trainable_layers``) as a row of its own;
- stage 2 with the MAE unmasked (the shipped default) and masked at 50% (the paper's stage-1 ratio);
- issue 17's stage-1 targets (time / FLOPs against ``blip2+impl`` at most 1.05) run by run: ``--target-runs N``
  times stage 1 again in N fresh processes, since a ratio moves more between processes than within one;
- scaling: the stage-1 training step of BLIP-2 and X-Former at batch 1 / 4 / 16 and image size 224 / 490 (the VQA
  fine-tuning size), time and the step's peak memory.
On ``--device cuda`` time comes from CUDA events after a synchronise, with the frozen parts in fp16 as the paper runs
them, and memory from ``max_memory_allocated``.

Every ratio is X-Former / BLIP-2. Rows:
- ``blip2``: LAVIS's code as shipped (``blip2_baseline`` with LAVIS's attention and LAVIS's precision: the frozen
  CLIP-ViT in fp16 with CUDA, fp32 on a CPU, where LAVIS's half precision does not run);
- ``blip2+impl``: the same BLIP-2 with X-Former's implementation choices that apply to it (SDPA attention, frozen
  CLIP-ViT in half precision on every device: bf16 on a CPU), so the ratio against it is the architecture's own
  overhead, and the one the FLOPs ratio is read against;
- ``xformer``: X-Former as it ships at the bench size; ``xformer+ckpt``: with ``checkpoint_trainable_layers``;
  ``xformer-mask50`` (stage 2): the MAE masked at 50% in training and inference.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from lavis_xformer.common.meta import build_on_meta, count_parameters, on_meta

# The paper's supplement, Table 1 (OPT-6.7B): the figures the benchmark is read against.
PAPER = {
    "stage1_flops_ratio": 3.16 / 3.08,
    "stage2_flops_ratio": 17.2 / 17.12,
    "train_time_ratio": 43 / 39,
    "stage2_memory_ratio": 22 / 21,
    "inference_ratio": 890 / 680,
}
TARGETS = {"stage1_train_step": 1.05, "inference": 1.10, "stage2_peak_memory": 1.05}
CAPTION = "two red circles and a blue square on the left of a green triangle"


# ----------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class BenchSize:
    """Paper-scale architecture with widths divided by ``width_divisor`` and depths by ``depth_divisor``.

    Head counts stay the paper's by default, so heads are ``width_divisor`` times narrower (4 to 11 wide at bench
    size): attention's softmax, which FLOP counts leave out, then weighs far more than at paper scale.
    ``head_divisor = width_divisor`` keeps the paper's head widths instead (``--head-divisor 8``)."""

    name: str = "bench"
    width_divisor: int = 8  #: every hidden width (and FFN width) divided by this
    depth_divisor: int = 2  #: every layer count divided by this (at least 1 layer is kept)
    batch_size: int = 4  #: images per training step
    image_size: int = 224  #: the paper's resolution (token counts as at paper scale)
    max_txt_len: int = 32  #: text tokens, as at paper scale
    head_divisor: int = 1  #: every head count divided by this (at least 1 head); = width_divisor keeps head widths

    def heads(self, paper: int) -> int:
        return max(1, round(paper / self.head_divisor))

    def width(self, paper: int, paper_heads: int) -> int:
        # Round to a multiple of the (scaled) head count so that every head has the same width.
        heads = self.heads(paper_heads)
        return max(heads, round(paper / self.width_divisor / heads) * heads)

    def depth(self, paper: int) -> int:
        return max(1, round(paper / self.depth_divisor))


TINY = BenchSize(name="tiny", width_divisor=32, depth_divisor=13, batch_size=2, image_size=56, max_txt_len=12)


def lavis_shipped_precision() -> str:
    """The frozen CLIP-ViT's precision in LAVIS's BLIP-2 as shipped: fp16 with CUDA, fp32 on a CPU."""
    return "fp16" if torch.cuda.is_available() else "fp32"


def backbone_fields(size: BenchSize, optimised: bool) -> dict:
    from lavis_xformer.models import published

    vit, bert = published.EVA_VIT_G, published.BERT_BASE_UNCASED
    return dict(
        image_size=size.image_size,
        vit_weights=None,
        vit_patch_size=vit["patch_size"],
        vit_embed_dim=size.width(vit["embed_dim"], vit["num_heads"]),
        vit_depth=size.depth(vit["depth"]),
        vit_num_heads=size.heads(vit["num_heads"]),
        vit_mlp_ratio=vit["mlp_ratio"],
        vit_precision="fp16",
        # LAVIS as shipped runs the frozen ViT in fp16 with CUDA and fp32 on a CPU (its autocast is CUDA-only); the
        # optimised rows follow the plugin's policy (bf16 only where the device has it natively: models/precision.py).
        frozen_precision="auto" if optimised else lavis_shipped_precision(),
        qformer_weights=None,
        qformer_hidden_size=size.width(bert["hidden_size"], bert["num_attention_heads"]),
        qformer_num_layers=size.depth(bert["num_hidden_layers"]),
        qformer_num_heads=size.heads(bert["num_attention_heads"]),
        qformer_intermediate_size=size.width(bert["intermediate_size"], bert["num_attention_heads"]),
        tokenizer="tiny_bert_vocab.txt",
        max_txt_len=size.max_txt_len,
        sdpa_attention=optimised,
    )


def xformer_fields(size: BenchSize) -> dict:
    from lavis_xformer.models import published
    from lavis_xformer.models.config import XFormerConfig

    mae, dual = published.VIT_MAE_HUGE, XFormerConfig()
    return dict(
        backbone_fields(size, optimised=True),
        mae_weights=None,
        mae_image_size=size.image_size,
        mae_hidden_size=size.width(mae["hidden_size"], mae["num_attention_heads"]),
        mae_num_layers=size.depth(mae["num_hidden_layers"]),
        mae_num_heads=size.heads(mae["num_attention_heads"]),
        mae_intermediate_size=size.width(mae["intermediate_size"], mae["num_attention_heads"]),
        mae_decoder_hidden_size=size.width(mae["decoder_hidden_size"], mae["decoder_num_attention_heads"]),
        mae_decoder_num_layers=size.depth(mae["decoder_num_hidden_layers"]),
        mae_decoder_num_heads=size.heads(mae["decoder_num_attention_heads"]),
        mae_decoder_intermediate_size=size.width(mae["decoder_intermediate_size"], mae["decoder_num_attention_heads"]),
        dual_num_layers=size.depth(dual.dual_num_layers),
        dual_num_heads=size.heads(dual.dual_num_heads),
        dual_intermediate_size=size.width(dual.dual_intermediate_size, dual.dual_num_heads),
    )


def llm_fields(size: BenchSize) -> dict:
    """OPT-6.7B (the LLM of the paper's cost table), scaled like the rest. The vocabulary is the shipped tiny
    tokenizer's (a random LLM with OPT's 50272 rows would decode ids the tokenizer does not have); the LM head is
    about 3% of OPT-6.7B, so this barely moves the proportions."""
    from lavis_xformer.models import published_llm

    opt = published_llm.OPT_6_7B
    return dict(
        opt_model=None,
        llm_tokenizer="tiny_opt",
        llm_precision="auto",  # LAVIS's: OPT in fp16 with CUDA, fp32 on a CPU
        llm_hidden_size=size.width(opt["hidden_size"], opt["num_attention_heads"]),
        llm_num_layers=size.depth(opt["num_hidden_layers"]),
        llm_num_heads=size.heads(opt["num_attention_heads"]),
        llm_ffn_dim=size.width(opt["ffn_dim"], opt["num_attention_heads"]),
        llm_max_positions=opt["max_position_embeddings"],
    )


def build_stage1(size: BenchSize) -> Dict[str, Callable[[], torch.nn.Module]]:
    """Constructors of the stage-1 models compared, by row name."""
    from lavis_xformer.models.blip2_baseline import Blip2Baseline
    from lavis_xformer.models.config import BackboneConfig, XFormerConfig
    from lavis_xformer.models.xformer import XFormer

    return {
        "blip2": lambda: Blip2Baseline(BackboneConfig(**backbone_fields(size, optimised=False))),
        "blip2+impl": lambda: Blip2Baseline(BackboneConfig(**backbone_fields(size, optimised=True))),
        "xformer": lambda: XFormer(XFormerConfig(**xformer_fields(size))),
        "xformer+ckpt": lambda: XFormer(XFormerConfig(**xformer_fields(size), checkpoint_trainable_layers=True)),
        # without the reconstruction (no MAE decoder): splits X-Former's extra time per FLOP into its two parts
        "xformer-norec": lambda: XFormer(XFormerConfig(**xformer_fields(size), reconstruction_loss=False)),
    }


# ----------------------------------------------------------------------------------------------------------------
# Paper scale: parameters and FLOPs on the meta device
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _meta_scalars_on_cpu():
    """Two library lines read a tensor's value, impossible on ``meta``: ITM's hard-negative sampling
    (``torch.multinomial(...).item()``, any valid index will do for counting FLOPs, so draw it on the CPU) and
    LAVIS's OPT causal mask (``torch.full(shape, torch.tensor(min))``: keep that scalar tensor on the CPU)."""
    multinomial, tensor = torch.multinomial, torch.tensor

    def cpu_multinomial(weights, num_samples, *args, **kwargs):
        if weights.is_meta:
            return multinomial(torch.ones(weights.shape, device="cpu"), num_samples, *args, **kwargs)
        return multinomial(weights, num_samples, *args, **kwargs)

    def cpu_scalar_tensor(data, *args, **kwargs):
        if isinstance(data, (int, float)) and "device" not in kwargs:
            kwargs["device"] = "cpu"
        return tensor(data, *args, **kwargs)

    torch.multinomial, torch.tensor = cpu_multinomial, cpu_scalar_tensor
    try:
        yield
    finally:
        torch.multinomial, torch.tensor = multinomial, tensor


def forward_flops(model: torch.nn.Module, samples: dict, batch_size: int) -> Tuple[float, float]:
    """(forward FLOPs per sample of the training objective, the frozen MAE encoder's part of them); no gradient is
    taken."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, _meta_scalars_on_cpu():  # grad enabled: the module tracker hooks need it; no backward runs
        model(samples)
    mae = [sum(counts.values()) for name, counts in counter.get_flop_counts().items() if name.endswith(".mae_encoder")]
    return counter.get_total_flops() / batch_size, (mae[0] if mae else 0.0) / batch_size


def paper_scale_rows(model_types: Dict[str, Tuple[str, str, dict]]) -> Dict[str, dict]:
    """Parameter counts, forward FLOPs and MACs per sample of each (architecture, model type, overrides), built on
    the ``meta`` device (no weights)."""
    batch = 2  # ITC needs more than one sample; FLOPs are reported per sample
    rows = {}
    for name, (arch, model_type, overrides) in model_types.items():
        model = build_on_meta(arch, model_type, **overrides).train()
        with on_meta():
            samples = {"image": torch.zeros(batch, 3, 224, 224), "text_input": [CAPTION] * batch}
            flops, mae_flops = forward_flops(model, samples, batch)
        rows[name] = {
            **count_parameters(model)._asdict(),
            "forward_flops_per_sample": flops,
            "forward_macs_per_sample": flops / 2,
            "mae_encoder_macs_per_sample": mae_flops / 2,
        }
        del model
    return rows


def paper_scale_stage2() -> Dict[str, dict]:
    """Stage 2 with OPT-6.7B, the LLM of the paper's cost table; X-Former with the MAE unmasked (shipped) and masked
    at 50%."""
    return paper_scale_rows({
        "blip2": ("blip2_baseline_opt", "pretrain_opt6.7b", {}),
        "xformer": ("xformer_opt", "pretrain_opt6.7b", {}),
        "xformer-mask50": ("xformer_opt", "pretrain_opt6.7b", {"mask_ratio": 0.5}),
    })


def paper_scale_stage1() -> Dict[str, dict]:
    return paper_scale_rows({"blip2": ("blip2_baseline", "pretrain", {}), "xformer": ("xformer", "pretrain", {})})


# ----------------------------------------------------------------------------------------------------------------
# Time, FLOPs and memory at bench size
# ----------------------------------------------------------------------------------------------------------------
REFERENCE = "blip2+impl"  # what the FLOPs ratio is read against: BLIP-2 built as well as X-Former
TIME_PER_FLOP_TARGET = 1.05  # issue 17: time ratio <= FLOPs ratio x 1.05 (stage-1 train step, feature extraction)
OPERATIONS = ("train_step", "feature_extraction", "predict_answers")
# Rows timed per operation (the others would repeat a row: checkpointing changes only the training step).
ROWS_OF = {
    1: {"train_step": ("blip2", "blip2+impl", "xformer", "xformer+ckpt", "xformer-norec"),
        "feature_extraction": ("blip2", "blip2+impl", "xformer")},
    2: {op: ("blip2", "blip2+impl", "xformer", "xformer-mask50") for op in OPERATIONS},
}
SCALING_POINTS = ((1, 224), (4, 224), (16, 224), (1, 490), (4, 490))  # (batch, image size) of the scaling rows
QUICK_SCALING_POINTS = ((1, 56), (2, 56), (2, 84))


class Timer:
    """Seconds of one call: the wall clock (``clock="wall"``) or this process's CPU time (``"process"``, for a
    machine other jobs share) on the CPU; CUDA events after a synchronise on a GPU."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.device, self.clock = device, clock

    @property
    def name(self) -> str:
        return "cuda events" if self.device.type == "cuda" else {"wall": "wall clock", "process": "process CPU time"}[self.clock]

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        now = time.perf_counter if self.clock == "wall" else time.process_time
        begin = now()
        fn()
        return now() - begin


def image_text_samples(size: BenchSize, device: torch.device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(size.batch_size, 3, size.image_size, size.image_size, generator=generator)
    return {"image": image.to(device), "text_input": [f"{CAPTION} {i}" for i in range(size.batch_size)]}


def train_step_fn(model, samples, optimizer, device):
    from torch.autograd.profiler import record_function

    from lavis_xformer.analysis.breakdown import OPTIMISER

    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = model(samples)["loss"]
        loss.backward()
        with record_function(OPTIMISER):  # a label for the profiled breakdown; costs nothing otherwise
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def quartiles(values: List[float]) -> Tuple[float, float, float]:
    """(first quartile, median, third quartile), linearly interpolated."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def summarize(times: List[float]) -> dict:
    q1, median, q3 = quartiles(times)
    return {"median_s": median, "iqr_s": q3 - q1, "n": len(times), "times_s": list(times)}


def paired_ratio(numerator: dict, denominator: dict) -> dict:
    """Median and quartiles of the per-repeat ratios numerator[i] / denominator[i] (the same interleaved round)."""
    ratios = [a / b for a, b in zip(numerator["times_s"], denominator["times_s"])]
    q1, median, q3 = quartiles(ratios)
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1}


def interleaved(fns: Dict[str, Callable[[], None]], timer: Timer, warmup: int, repeats: int) -> Dict[str, dict]:
    """Time each function ``repeats`` times after ``warmup`` calls, alternating between them every call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: summarize(values) for name, values in times.items()}


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker, whose hooks fail on LAVIS's feature extraction (a view of a
    parameter made under ``no_grad``); only the total is read at bench size."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def _cpu_attention_flop_formulas() -> dict:
    """FlopCounterMode's formulas for SDPA's CPU kernel, which torch registers only for the CUDA kernels: without them
    every SDPA attention on the CPU (the Q-Former's in both models, the dual block's, the MAE decoder's) counts 0
    FLOPs, while the same attention on CUDA, on the meta device (paper scale: the math path's matmuls) or written as
    matmuls (the bf16 CLIP-ViT and MAE encoder) is counted. The CUDA flash kernel's formulas, as torch counts them."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop.__wrapped__,
    }


def count_flops(fn: Callable[[], None]) -> float:
    """FLOPs of one call of ``fn``, forward and backward alike (FlopCounterMode: 2 per multiply-accumulate; attention
    products on every device, ``_cpu_attention_flop_formulas``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flop_formulas())
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return float(counter.get_total_flops())


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so that it covers only what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def call_peak_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak of the memory torch allocates during one call, above what was allocated before it (activations,
    gradients, temporaries): CUDA's ``max_memory_allocated`` minus the allocation before; on the CPU the same
    quantity from the profiler's allocation records (``profile_memory``: every allocation and free, in order), since
    the CPU has no allocator statistics and the resident set of a process that already ran other models does not
    grow when freed memory is reused."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def memory_probe(row: str, size: BenchSize, stage: int, steps: int = 2) -> dict:
    """Peak memory of building one model and running ``steps`` training steps, in a fresh process.

    CPU: the peak resident set (VmHWM, reset after the imports) minus the resident set after the imports, i.e.
    weights, gradients, optimiser state and activations at their peak. GPU: ``max_memory_allocated``.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _init_single_process_group()
    base_mb = _status_mb("VmRSS")
    exact = _reset_peak_rss()
    torch.manual_seed(0)
    model = build_rows(size, stage)[row]().to(device).train()
    samples = image_text_samples(size, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = train_step_fn(model, samples, optimizer, device)
    for _ in range(steps):
        step()
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "method": "cuda max_memory_allocated"}
    if exact:
        return {"peak_mb": _status_mb("VmHWM") - base_mb, "method": "VmHWM after reset - RSS after imports"}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"peak_mb": peak_mb - base_mb, "method": "ru_maxrss - RSS after imports (includes import peak)"}


def build_stage2(size: BenchSize) -> Dict[str, Callable[[], torch.nn.Module]]:
    """Constructors of the stage-2 models compared (OPT), by row name."""
    from lavis_xformer.models.blip2_baseline_llm import Blip2BaselineOPT
    from lavis_xformer.models.config_llm import Blip2OPTConfig, XFormerOPTConfig
    from lavis_xformer.models.xformer_llm import XFormerOPT

    backbone = lambda optimised: {**backbone_fields(size, optimised), **llm_fields(size)}  # noqa: E731
    xformer = {**xformer_fields(size), **llm_fields(size), "reconstruction_loss": False, "mask_ratio": 0.0}
    masked = {**xformer, "mask_ratio": 0.5, "eval_mask_ratio": 0.5}
    return {
        "blip2": lambda: Blip2BaselineOPT(Blip2OPTConfig(**backbone(False))),
        "blip2+impl": lambda: Blip2BaselineOPT(Blip2OPTConfig(**backbone(True))),
        "xformer": lambda: XFormerOPT(XFormerOPTConfig(**xformer)),
        "xformer-mask50": lambda: XFormerOPT(XFormerOPTConfig(**masked)),
    }


def build_rows(size: BenchSize, stage: int) -> Dict[str, Callable[[], torch.nn.Module]]:
    return {1: build_stage1, 2: build_stage2}[stage](size)


def measure_memory(rows: List[str], size: BenchSize, stage: int) -> Dict[str, dict]:
    results = {}
    for row in rows:
        command = [sys.executable, "-m", "lavis_xformer.analysis.bench", "--memory-probe", row, "--stage", str(stage), "--size", size.name,
                   "--head-divisor", str(size.head_divisor)]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
        results[row] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def _init_single_process_group():
    # LAVIS's BLIP-2 forward calls dist.get_rank(); give it a one-process group.
    from lavis_xformer.common.distributed import init_single_process_group

    init_single_process_group("gloo")


QUESTIONS = ["how many circles are there in the image?", "is there a red square in the image?"]


def operation_fns(stage: int, models: Dict[str, torch.nn.Module], samples: dict, device: torch.device) -> Dict[str, Dict[str, Callable[[], None]]]:
    """{operation: {row: a call of it}}: the training step (models in train mode when it runs) and inference."""
    image = samples["image"]
    fns = {"train_step": {}, "feature_extraction": {}}
    for name, model in models.items():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        fns["train_step"][name] = train_step_fn(model, samples, optimizer, device)
        if stage == 2:  # what reaches the LLM: projected Z' (X-Former) or projected Q-Former output (BLIP-2)
            fns["feature_extraction"][name] = lambda model=model: torch.no_grad()(model.llm_image_inputs)(image)
        elif hasattr(model, "encode_image"):
            fns["feature_extraction"][name] = lambda model=model: model.encode_image(image)
        else:
            fns["feature_extraction"][name] = lambda model=model: torch.no_grad()(model.forward_image)(image)
    if stage == 2:
        # Beam 5, as the paper evaluates; min_len = max_len so every model decodes the same number of tokens.
        vqa = {"image": image, "text_input": [QUESTIONS[i % 2] for i in range(image.shape[0])]}
        fns["predict_answers"] = {
            name: lambda model=model: model.predict_answers(vqa, num_beams=5, max_len=5, min_len=5, length_penalty=0)
            for name, model in models.items()
        }
    return fns


def bench_stage(stage: int, size: BenchSize, device: torch.device, warmup: int, repeats: int, timer: Timer,
                breakdown: bool = True) -> dict:
    """Time, FLOPs (of the same calls) and the profiled component breakdown of every operation of one stage."""
    from lavis_xformer.analysis.breakdown import profile_components

    torch.manual_seed(0)
    models = {name: build().to(device) for name, build in build_rows(size, stage).items()}
    fns = operation_fns(stage, models, image_text_samples(size, device), device)
    result = {"parameters": {name: count_parameters(m)._asdict() for name, m in models.items()}, "flops": {}, "breakdown": {}}
    for op, rows in ROWS_OF[stage].items():
        training = op == "train_step"
        for model in models.values():
            model.train(training)
        calls = {row: fns[op][row] for row in rows}
        op_repeats = repeats if op != "predict_answers" else max(3, repeats // 2)
        result[op] = interleaved(calls, timer, warmup if op != "predict_answers" else 1, op_repeats)
        # FLOPs of the same call (after the timing: the optimiser state already exists, as in a timed step)
        result["flops"][op] = {row: count_flops(call) for row, call in calls.items()}
        if breakdown and op != "predict_answers":
            result["breakdown"][op] = {row: profile_components(calls[row], models[row]) for row in (REFERENCE, "xformer")}
    return result


def bench_scaling(points, size: BenchSize, device: torch.device, warmup: int, repeats: int, timer: Timer) -> List[dict]:
    """BLIP-2 (``blip2+impl``) and X-Former, stage 1, at each (batch, image size): the training step and feature
    extraction, timed interleaved, and each call's peak memory above what the process held before it. No training
    step at batch 1: ITC and ITM draw their negatives from the batch (LAVIS's loss fails on one sample)."""
    from dataclasses import replace

    rows = []
    for batch_size, image_size in points:
        point = replace(size, batch_size=batch_size, image_size=image_size)
        torch.manual_seed(0)
        builders = build_stage1(point)
        models = {row: builders[row]().to(device) for row in (REFERENCE, "xformer")}
        fns = operation_fns(1, models, image_text_samples(point, device), device)
        for op in ("train_step", "feature_extraction") if batch_size > 1 else ("feature_extraction",):
            for model in models.values():
                model.train(op == "train_step")
            times = interleaved(fns[op], timer, warmup, repeats)
            for row, call in fns[op].items():
                rows.append({"row": row, "operation": op, "batch_size": batch_size, "image_size": image_size,
                             **times[row], "peak_mb": call_peak_mb(call, device)})
        del models, fns
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
README_MARKER = "<!-- analysis.bench writes everything below this line (python -m lavis_xformer.analysis.bench --readme) -->"


def ratio(results: dict, key: str, numerator: str = "xformer", denominator: str = "blip2") -> float:
    return results[numerator][key] / results[denominator][key]


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _ratio_text(r: dict) -> str:
    return f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]"


def paper_scale_markdown(paper: dict) -> List[str]:
    lines = ["## Paper scale (meta device, per sample, forward of the training objective)", ""]
    for stage, title in (("stage1", "stage 1"), ("stage2", "stage 2 (OPT-6.7B)")):
        rows = paper.get(stage)
        if not rows:
            continue
        lines += _table(
            [title, "trainable", "frozen", "forward GFLOPs", "forward GMACs", "of which MAE encoder GMACs"],
            [[name, f"{row['trainable'] / 1e6:.2f}M", f"{row['frozen'] / 1e6:.1f}M", f"{row['forward_flops_per_sample'] / 1e9:.1f}",
              f"{row['forward_macs_per_sample'] / 1e9:.1f}", f"{row['mae_encoder_macs_per_sample'] / 1e9:.1f}"] for name, row in rows.items()],
        )
        key = "stage1_flops_ratio" if stage == "stage1" else "stage2_flops_ratio"
        lines += [f"FLOPs ratio X-Former / BLIP-2, {title.split(' (')[0]}: **{ratio(rows, 'forward_flops_per_sample'):.3f}** "
                  f"(paper: {PAPER[key]:.3f})", ""]
    stage1, stage2 = paper.get("stage1"), paper.get("stage2")
    if stage1 and stage2:
        tera = lambda value: f"{value / 1e12:.3f}T"  # noqa: E731
        delta1 = stage1["xformer"]["forward_macs_per_sample"] - stage1["blip2"]["forward_macs_per_sample"]
        mae1 = stage1["xformer"]["mae_encoder_macs_per_sample"]
        delta2 = stage2["xformer"]["forward_macs_per_sample"] - stage2["blip2"]["forward_macs_per_sample"]
        mae2 = stage2["xformer"]["mae_encoder_macs_per_sample"]
        masked2 = stage2.get("xformer-mask50", {}).get("mae_encoder_macs_per_sample", float("nan"))
        base1, base2 = stage1["blip2"]["forward_macs_per_sample"], stage2["blip2"]["forward_macs_per_sample"]
        lines += [
            "**The paper's deltas.** The paper's X-Former - BLIP-2 difference is +0.08T in both stages (3.16T - 3.08T, "
            f"17.2T - 17.12T). The frozen MAE-ViT-H encoder on 50% of the patches costs **{tera(mae1)} MACs** per image "
            f"here (stage 1), and the same masked pass in stage 2 costs {tera(masked2)}: the paper's delta is one masked "
            "MAE encoder pass counted in multiply-accumulates, in stage 2 as well. This project's whole difference is "
            f"larger ({tera(delta1)} MACs in stage 1: the MAE pass, the dual block, the decoder and the second ITM "
            f"input), and in stage 2 it runs the MAE unmasked by default, which doubles the MAE term ({tera(mae2)}; "
            f"difference {tera(delta2)}). The paper's bases do not match a per-sample count of either kind: BLIP-2's "
            f"forward here is {tera(base1)} MACs (stage 1) and {tera(base2)} (stage 2), {3.08e12 / base1:.1f}x and "
            f"{17.12e12 / base2:.1f}x below 3.08T and 17.12T, two different factors, so no common batch size explains "
            "both.",
            "",
        ]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Issue 17's stage-1 targets, run by run
# ----------------------------------------------------------------------------------------------------------------
TARGET_OPERATIONS = ("train_step", "feature_extraction")


def target_ratios(stage1: dict) -> Dict[str, dict]:
    """Per target operation of one run: the paired time ratio X-Former / ``blip2+impl`` (median, quartiles), the
    FLOPs ratio of the same calls, and time / FLOPs at the median and at the third quartile."""
    ratios = {}
    for op in TARGET_OPERATIONS:
        time_ratio = paired_ratio(stage1[op]["xformer"], stage1[op][REFERENCE])
        flops_ratio = stage1["flops"][op]["xformer"] / stage1["flops"][op][REFERENCE]
        ratios[op] = {**time_ratio, "flops_ratio": flops_ratio, "per_flop": time_ratio["median"] / flops_ratio,
                      "per_flop_q3": time_ratio["q3"] / flops_ratio}
    return ratios


def repeat_stage1_targets(runs: int, args) -> List[Dict[str, dict]]:
    """``target_ratios`` of ``runs`` more stage-1 timings, each in a fresh process with this run's settings (no
    memory, breakdown, scaling or paper scale). Between processes a ratio moves by a few percent (heap layout, thread
    placement), more than its quartiles within one run show; a target is met only where every run meets it."""
    results = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "stage1.json")
            command = [sys.executable, "-m", "lavis_xformer.analysis.bench", "--stages", "1", "--no-memory",
                       "--no-breakdown", "--no-scaling", "--no-paper-scale", "--size", args.size, "--head-divisor",
                       str(args.head_divisor), "--device", args.device, "--clock", args.clock, "--repeats",
                       str(args.repeats), "--warmup", str(args.warmup), "--json", path]
            command += ["--threads", str(args.threads)] if args.threads else []
            completed = subprocess.run(command, capture_output=True, text=True)
            if completed.returncode != 0:
                raise RuntimeError(f"a stage-1 target run failed (exit {completed.returncode}): {' '.join(command)}\n"
                                   + completed.stderr[-3000:])
            with open(path) as handle:
                results.append(target_ratios(json.load(handle)["stage1"]))
    return results


def target_runs_markdown(runs: List[Dict[str, dict]]) -> List[str]:
    lines = [f"## Issue 17's targets, run by run (time / FLOPs at most {TIME_PER_FLOP_TARGET})", "",
             "Stage 1, X-Former against `blip2+impl`: the run above, then fresh processes with the same settings "
             "(`--target-runs`). Each cell: the run's median paired time ratio, and time / FLOPs at its median "
             "and third quartile.", ""]
    table = [[("this run" if index == 0 else f"fresh process {index}")]
             + [f"{run[op]['median']:.3f} -> {run[op]['per_flop']:.3f} (Q3 {run[op]['per_flop_q3']:.3f})"
                for op in TARGET_OPERATIONS] for index, run in enumerate(runs)]
    lines += _table(["run"] + [f"stage-1 {op}" for op in TARGET_OPERATIONS], table)
    verdicts = []
    for op in TARGET_OPERATIONS:
        median = sum(run[op]["per_flop"] <= TIME_PER_FLOP_TARGET for run in runs)
        q3 = sum(run[op]["per_flop_q3"] <= TIME_PER_FLOP_TARGET for run in runs)
        verdicts.append(f"{op}: met at the median in {median} of {len(runs)} runs, at Q3 in {q3}"
                        + (" (met)" if median == len(runs) else " (not met)"))
    return lines + ["Verdict, a target met only if every run meets it: " + "; ".join(verdicts) + ".", ""]


def size_label(size: dict) -> str:
    """The size's name as Markdown code, and its head divisor where head counts are divided too."""
    divisor = size.get("head_divisor", 1)
    return f"`{size['name']}`" + (f" with heads / {divisor}" if divisor > 1 else "")


def stage_markdown(stage: int, result: dict, report: dict) -> List[str]:
    size, machine = report["size"], report["machine"]
    lines = [f"## Stage {stage} at size {size_label(size)} (batch {size['batch_size']}, {machine['threads']} threads, "
             f"{machine['clock']})", ""]
    timed = [op for op in OPERATIONS if op in result]
    rows = list(result["train_step"])
    for row in result.get("feature_extraction", {}):
        rows += [] if row in rows else [row]
    memory = result.get("memory", {})
    table = []
    for row in rows:
        cells = [f"{result[op][row]['median_s']:.4f} ({result[op][row]['iqr_s']:.4f})" if row in result[op] else "" for op in timed]
        flops = [f"{result['flops'][op][row] / 1e9:.2f}" if row in result["flops"].get(op, {}) else "" for op in timed]
        peak = memory.get(row, {}).get("peak_mb")
        table.append([row] + cells + flops + [f"{peak:.0f}" if peak is not None else ""])
    lines += _table(["row"] + [f"{op} median s (IQR)" for op in timed] + [f"{op} GFLOPs" for op in timed] + ["peak memory MB"], table)

    # X-Former against BLIP-2 built equally well: time ratio beside FLOPs ratio of the same calls.
    table = []
    for op in timed:
        for row in (r for r in result[op] if r.startswith("xformer") and r not in ("xformer+ckpt", "xformer-norec")):
            time_ratio = paired_ratio(result[op][row], result[op][REFERENCE])
            flops_ratio = result["flops"][op][row] / result["flops"][op][REFERENCE]
            shipped = paired_ratio(result[op][row], result[op]["blip2"])
            bound = flops_ratio * TIME_PER_FLOP_TARGET
            target = stage == 1 and op in ("train_step", "feature_extraction") and row == "xformer"
            verdict = ""
            if target:
                verdict = ("yes" if time_ratio["median"] <= bound else "no") + (" (also at Q3)" if time_ratio["q3"] <= bound else " (not at Q3)")
            table.append([f"stage-{stage} {op}" + ("" if row == "xformer" else f" ({row})"), _ratio_text(time_ratio),
                          f"{flops_ratio:.3f}", f"{time_ratio['median'] / flops_ratio:.3f}",
                          f"<= {bound:.3f}" if target else "", verdict, _ratio_text(shipped)])
    lines += [f"Ratios X-Former / BLIP-2: median [Q1, Q3] of the {result['train_step']['xformer']['n']} per-repeat paired ratios.", ""]
    lines += _table(["operation", f"time ratio vs {REFERENCE}", "FLOPs ratio", "time / FLOPs", "target (time)",
                     "met (median)", "time ratio vs blip2 (LAVIS as shipped)"], table)
    if "xformer+ckpt" in result["train_step"]:
        slower = paired_ratio(result["train_step"]["xformer+ckpt"], result["train_step"]["xformer"])
        text = f"Activation checkpointing (`checkpoint_trainable_layers`): training step x{_ratio_text(slower)} of X-Former's"
        if "xformer+ckpt" in memory and "xformer" in memory:
            text += f", peak memory {memory['xformer+ckpt']['peak_mb']:.0f} MB vs {memory['xformer']['peak_mb']:.0f} MB"
        lines += [text + ".", ""]
    if memory and "blip2" in memory:
        lines += [f"Peak memory ratio X-Former / BLIP-2: {ratio(memory, 'peak_mb'):.3f} vs LAVIS as shipped, "
                  f"{ratio(memory, 'peak_mb', denominator=REFERENCE):.3f} vs {REFERENCE}"
                  + (f" (target {TARGETS['stage2_peak_memory']:.2f}, paper {PAPER['stage2_memory_ratio']:.3f})" if stage == 2 else "") + ".", ""]
    if "xformer-norec" in result["train_step"]:
        lines += [part_throughput_markdown(result), ""]
    if "xformer-mask50" in result["train_step"]:
        cells = [f"{op} x{_ratio_text(paired_ratio(result[op]['xformer-mask50'], result[op]['xformer']))}" for op in timed]
        lines += ["MAE masked at 50% in stage 2 (`xformer-mask50`) against unmasked (`xformer`, the shipped default): "
                  + ", ".join(cells) + ".", ""]
    return lines


def part_throughput(result: dict, op: str = "train_step") -> Dict[str, float]:
    """GFLOP/s of BLIP-2 (``blip2+impl``) and of X-Former's two added parts, from the median times and counted FLOPs
    of the rows: the MAE branch with the fusion (``xformer-norec`` - BLIP-2) and the reconstruction (the frozen MAE
    decoder and its loss: ``xformer`` - ``xformer-norec``). A part slower per FLOP than BLIP-2 is where the time
    ratio exceeds the FLOPs ratio."""
    time = {row: result[op][row]["median_s"] for row in (REFERENCE, "xformer-norec", "xformer")}
    flops = {row: result["flops"][op][row] for row in time}

    def rate(high, low=None):
        seconds = time[high] - (time[low] if low else 0.0)
        work = flops[high] - (flops[low] if low else 0.0)
        return work / seconds / 1e9 if seconds > 0 else float("nan")

    return {"BLIP-2": rate(REFERENCE), "MAE branch + fusion": rate("xformer-norec", REFERENCE),
            "reconstruction": rate("xformer", "xformer-norec")}


def part_throughput_markdown(result: dict) -> str:
    rates = part_throughput(result)
    reference = rates["BLIP-2"]
    parts = ", ".join(f"{part} {value:.1f} GFLOP/s (x{reference / value:.2f} BLIP-2's time per FLOP)"
                      for part, value in rates.items() if part != "BLIP-2")
    return (f"Time per FLOP by part, training step (median times, counted FLOPs; `xformer-norec` is X-Former without "
            f"the reconstruction): BLIP-2 ({REFERENCE}) {reference:.1f} GFLOP/s; X-Former's {parts}.")


def breakdown_markdown(report: dict) -> List[str]:
    from lavis_xformer.analysis.breakdown import LABELS

    lines = []
    for stage in (1, 2):
        breakdown = report.get(f"stage{stage}", {}).get("breakdown")
        if not breakdown:
            continue
        columns = [(op, row) for op, rows in breakdown.items() for row in rows]
        header = ["component"] + [f"{row} {op} s (%)" for op, row in columns]
        totals = {(op, row): sum(breakdown[op][row].values()) for op, row in columns}
        table = []
        for label in LABELS:
            values = [breakdown[op][row][label] for op, row in columns]
            if any(values):
                table.append([label] + [f"{v:.4f} ({100 * v / totals[c]:.0f}%)" for v, c in zip(values, columns)])
        table.append(["total (profiled)"] + [f"{totals[c]:.4f}" for c in columns])
        lines += [f"### Where the time goes, stage {stage} (one profiled call each; chart: `breakdown_stage{stage}.png`)", ""]
        lines += _table(header, table)
    if lines:
        lines = ["## Component breakdown", "",
                 "Self CPU time (on CUDA: kernel time) per component from `torch.profiler` (`analysis/breakdown.py`; backward ops go to the "
                 "component whose forward op created them). Profiling adds its own overhead, so read the shares; the "
                 "timed medians above are the costs.", ""] + lines
    return lines


def scaling_markdown(points: List[dict]) -> List[str]:
    by_key = {(p["operation"], p["row"], p["batch_size"], p["image_size"]): p for p in points}
    lines = ["## Scaling: stage 1 against batch size and image size (chart: `scaling.png`)", "",
             "No training step at batch 1: ITC and ITM draw their negatives from the batch. Peak memory of a call: the "
             "peak of what torch allocates during it above what was allocated before it (activations, gradients, "
             "temporaries; weights and optimiser state are already held), from the profiler's allocation records on "
             "the CPU and `max_memory_allocated` on CUDA.", ""]
    table, growth = [], []
    for op in ("train_step", "feature_extraction"):
        keys = sorted({(i, b) for o, _, b, i in by_key if o == op})
        for image_size, batch in keys:
            ref, xf = by_key[(op, REFERENCE, batch, image_size)], by_key[(op, "xformer", batch, image_size)]
            table.append([op, f"{batch}", f"{image_size}", f"{ref['median_s']:.3f}", f"{xf['median_s']:.3f}",
                          _ratio_text(paired_ratio(xf, ref)), f"{xf['median_s'] / batch:.4f}", f"{ref['peak_mb']:.0f}",
                          f"{xf['peak_mb']:.0f}", f"{xf['peak_mb'] / ref['peak_mb']:.2f}"])
        sizes = sorted({i for i, _ in keys})
        for image_size in sizes:
            batches = sorted(b for i, b in keys if i == image_size)
            if len(batches) > 1:
                low, high = by_key[(op, "xformer", batches[0], image_size)], by_key[(op, "xformer", batches[-1], image_size)]
                per_image = (high["median_s"] / batches[-1]) / (low["median_s"] / batches[0])
                growth.append(f"{op} at {image_size} px, batch {batches[0]} -> {batches[-1]}: X-Former's time "
                              f"x{high['median_s'] / low['median_s']:.2f} (per image x{per_image:.2f}), peak memory "
                              f"x{high['peak_mb'] / low['peak_mb']:.2f}")
        if len(sizes) > 1:
            for batch in sorted({b for i, b in keys if i == sizes[0]} & {b for i, b in keys if i == sizes[-1]}):
                small, large = by_key[(op, "xformer", batch, sizes[0])], by_key[(op, "xformer", batch, sizes[-1])]
                patches = (sizes[-1] // 14) ** 2 / (sizes[0] // 14) ** 2
                growth.append(f"{op} at batch {batch}, {sizes[0]} -> {sizes[-1]} px ({patches:.1f}x the patches): time "
                              f"x{large['median_s'] / small['median_s']:.2f}, peak memory x{large['peak_mb'] / small['peak_mb']:.2f}")
    lines += _table(["operation", "batch", "image px", f"{REFERENCE} s", "xformer s", "time ratio [Q1, Q3]",
                     "xformer s / image", f"{REFERENCE} peak MB", "xformer peak MB", "memory ratio"], table)
    if growth:
        lines += ["How cost grows (measured above): " + "; ".join(growth) + ".", ""]
    return lines


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [f"# X-Former vs BLIP-2 cost ({machine['device']}, size {size_label(report['size'])})", "",
             f"torch {machine['torch']} | {machine['threads']} threads | clock: {machine['clock']} | "
             f"{report['settings']['warmup']} warm-up + {report['settings']['repeats']} interleaved repeats | {report['date']}", ""]
    if report.get("paper_scale"):
        lines += paper_scale_markdown(report["paper_scale"])
    for stage in (1, 2):
        if report.get(f"stage{stage}"):
            lines += stage_markdown(stage, report[f"stage{stage}"], report)
    if report.get("target_runs"):
        lines += target_runs_markdown(report["target_runs"])
    lines += breakdown_markdown(report)
    if report.get("scaling"):
        lines += scaling_markdown(report["scaling"])
    return "\n".join(lines) + "\n"


def write_figures(report: dict, directory: str) -> List[str]:
    from lavis_xformer.analysis.breakdown import LABELS
    from lavis_xformer.analysis.figures import component_breakdown_chart, cost_vs_batch_chart

    paths = []
    for stage in (1, 2):
        breakdown = report.get(f"stage{stage}", {}).get("breakdown")
        if breakdown:
            bars = {f"{row}, {op}": breakdown[op][row] for op in breakdown for row in breakdown[op]}
            paths += component_breakdown_chart(bars, LABELS, os.path.join(directory, f"breakdown_stage{stage}"),
                                               f"Stage {stage}: where the time goes (size {report['size']['name']})")
    if report.get("scaling"):
        paths += cost_vs_batch_chart(report["scaling"], os.path.join(directory, "scaling"),
                                     f"Stage 1 ({report['machine']['clock']}, {report['machine']['threads']} threads)")
    return [str(p) for p in paths]


def write_readme(path: str, text: str) -> None:
    """Replace everything below ``README_MARKER`` in ``path`` (the prose above it is kept) by ``text``."""
    prose = ""
    if os.path.exists(path):
        with open(path) as handle:
            prose = handle.read().split(README_MARKER)[0]
    with open(path, "w") as handle:
        handle.write(prose.rstrip("\n") + "\n\n" + README_MARKER + "\n\n" + text)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lavis_xformer.analysis.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="CPU timing: wall clock, or this process's CPU time on a machine other jobs share")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as torch starts)")
    parser.add_argument("--head-divisor", type=int, default=1,
                        help="divide every head count too (8: the paper's head widths at bench size)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scaling-repeats", type=int, default=3)
    parser.add_argument("--target-runs", type=int, default=0,
                        help="time the stage-1 targets again in this many fresh processes (a verdict per run)")
    parser.add_argument("--quick", action="store_true", help="tiny size, few repeats, small scaling grid (tests)")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--markdown", help="write the Markdown tables here")
    parser.add_argument("--readme", help="rewrite the generated part of this README (below its marker)")
    parser.add_argument("--figures", help="write the breakdown and scaling charts (PNG + SVG) into this folder")
    parser.add_argument("--no-paper-scale", action="store_true", help="skip the meta-device parameter/FLOP count")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-model memory processes")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the profiled component breakdown")
    parser.add_argument("--no-scaling", action="store_true", help="skip the batch / image size rows")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.warmup, args.scaling_repeats = "tiny", 2, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    import lavis_xformer  # noqa: F401  (registers the models)

    size = BenchSize(head_divisor=args.head_divisor) if args.size == "bench" else TINY
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, size, args.stage)))
        return {}

    device = torch.device(args.device)
    timer = Timer(device, args.clock)
    _init_single_process_group()
    report = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "clock": timer.name,
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "scaling_repeats": args.scaling_repeats},
        "size": asdict(size),
        "paper": PAPER,
        "targets": {**TARGETS, "time_per_flop_vs_blip2+impl": TIME_PER_FLOP_TARGET},
    }
    if not args.no_paper_scale:
        print("counting parameters and FLOPs at paper scale (meta device)...", file=sys.stderr)
        report["paper_scale"] = {"stage1": paper_scale_stage1(), "stage2": paper_scale_stage2()}
    for stage in args.stages:
        print(f"timing stage {stage} at size {size.name} ({args.warmup} warm-up + {args.repeats} interleaved calls, {timer.name})...", file=sys.stderr)
        report[f"stage{stage}"] = bench_stage(stage, size, device, args.warmup, args.repeats, timer, not args.no_breakdown)
        if not args.no_memory:
            print(f"measuring stage-{stage} peak memory, one process per model...", file=sys.stderr)
            report[f"stage{stage}"]["memory"] = measure_memory(list(build_rows(size, stage)), size, stage)
    if args.target_runs and 1 in args.stages:
        print(f"stage-1 targets again in {args.target_runs} fresh processes...", file=sys.stderr)
        report["target_runs"] = [target_ratios(report["stage1"])] + repeat_stage1_targets(args.target_runs, args)
    if not args.no_scaling:
        points = QUICK_SCALING_POINTS if size.name == "tiny" else SCALING_POINTS
        print(f"scaling rows {points} (batch, image px), {args.scaling_repeats} repeats...", file=sys.stderr)
        report["scaling"] = bench_scaling(points, size, device, 1, args.scaling_repeats, timer)

    text = markdown(report)
    print(text)
    if args.figures:
        report["figures"] = write_figures(report, args.figures)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)
    if args.readme:
        write_readme(args.readme, text)
    return report


if __name__ == "__main__":
    main()
