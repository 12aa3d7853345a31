"""Side-by-side cost of X-Former and LAVIS's BLIP-2, measured in one process, on the same inputs and threads.

    python -m lavis_xformer.analysis.bench [--size bench|tiny] [--device cpu|cuda] [--clock wall|process]
        [--threads N] [--repeats N] [--connectors] [--quick] [--json PATH] [--markdown PATH] [--readme PATH] [--figures DIR]

Parameters and FLOPs at paper scale on the ``meta`` device; time, FLOPs, memory and where the time goes at a
``bench`` size that keeps the paper's proportions, for the training step, feature extraction and ``predict_answers``
of stage 1 and stage 2, the rows interleaved call by call. What each row is and how it is measured is in
docs/speed.md; ``bench_report`` reads the results against BLIP-2 and writes the tables and figures.

Every figure depends on the processor: the report records it (``machine.processor``: model name, torch's capability,
native bf16 yes/no, AMX; on CUDA the GPU's compute capability and the host CPU) and the precision each row's frozen
parts ran in (``stage<N>.precision``). ``blip2`` runs LAVIS's precision as shipped (fp16 with CUDA, fp32 on a CPU);
``blip2+impl`` and the X-Former rows ``frozen_precision: auto`` (models/precision.py), so the ratio against
``blip2+impl`` stays the architecture's own overhead on every processor.
"""

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from lavis_xformer.analysis.bench_report import (
    OPERATIONS,
    PAPER,
    REFERENCE,
    TARGETS,
    TIME_PER_FLOP_TARGET,
    markdown,
    quartiles,
    target_ratios,
    write_figures,
    write_readme,
)
from lavis_xformer.analysis.breakdown import OPTIMISER, profile_components
from lavis_xformer.common.distributed import init_single_process_group
from lavis_xformer.common.meta import build_on_meta, count_parameters, on_meta
from lavis_xformer.models import published, published_llm
from lavis_xformer.models.blip2_baseline import Blip2Baseline
from lavis_xformer.models.blip2_baseline_llm import Blip2BaselineOPT
from lavis_xformer.models.config import BackboneConfig, XFormerConfig
from lavis_xformer.models.config_connectors import PerceiverDualOPTConfig, PerceiverOPTConfig, ProjectorOPTConfig
from lavis_xformer.models.config_llm import Blip2OPTConfig, XFormerOPTConfig
from lavis_xformer.models.connector_llm import PerceiverDualOPT, PerceiverOPT, ProjectorOPT
from lavis_xformer.models.xformer import XFormer
from lavis_xformer.models.xformer_llm import XFormerOPT

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
        "xformer": ("xformer_opt", "pretrain_opt6.7b", {"mask_ratio": 0.0}),  # the _unmasked yamls
        "xformer-mask50": ("xformer_opt", "pretrain_opt6.7b", {"mask_ratio": 0.5}),
    })


def paper_scale_stage1() -> Dict[str, dict]:
    return paper_scale_rows({"blip2": ("blip2_baseline", "pretrain", {}), "xformer": ("xformer", "pretrain", {})})


# ----------------------------------------------------------------------------------------------------------------
# Time, FLOPs and memory at bench size
# ----------------------------------------------------------------------------------------------------------------
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

    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = model(samples)["loss"]
        loss.backward()
        with record_function(OPTIMISER):  # a label for the profiled breakdown; costs nothing otherwise
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def summarize(times: List[float]) -> dict:
    q1, median, q3 = quartiles(times)
    return {"median_s": median, "iqr_s": q3 - q1, "n": len(times), "times_s": list(times)}


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
    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop.__wrapped__,
    }


def count_flops(fn: Callable[[], None]) -> float:
    """FLOPs of one call of ``fn``, forward and backward alike (FlopCounterMode: 2 per multiply-accumulate; attention
    products on every device, ``_cpu_attention_flop_formulas``)."""
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
    backbone = lambda optimised: {**backbone_fields(size, optimised), **llm_fields(size)}  # noqa: E731
    xformer = {**xformer_fields(size), **llm_fields(size), "reconstruction_loss": False, "mask_ratio": 0.0}
    masked = {**xformer, "mask_ratio": 0.5, "eval_mask_ratio": 0.5}
    return {
        "blip2": lambda: Blip2BaselineOPT(Blip2OPTConfig(**backbone(False))),
        "blip2+impl": lambda: Blip2BaselineOPT(Blip2OPTConfig(**backbone(True))),
        "xformer": lambda: XFormerOPT(XFormerOPTConfig(**xformer)),
        "xformer-mask50": lambda: XFormerOPT(XFormerOPTConfig(**masked)),
    }


def perceiver_fields(size: BenchSize) -> dict:
    """xGen-MM (BLIP-3)'s Perceiver Resampler (depth 6, 16 heads x 96, 128 latents, feed-forward x4) at the CLIP-ViT's
    width, scaled like the rest: the inner width 16 x 96 divided as a hidden width, the latents (visual tokens) kept."""
    heads = size.heads(16)
    return dict(
        num_query_token=128,
        perceiver_depth=size.depth(6),
        perceiver_num_heads=heads,
        perceiver_head_dim=size.width(16 * 96, 16) // heads,
        perceiver_ff_mult=4,
    )


def build_connectors(size: BenchSize) -> Dict[str, Callable[[], torch.nn.Module]]:
    """Constructors of the stage-2 connector rows (OPT), by row name: BLIP-2 (``REFERENCE``) and X-Former as in the
    stage-2 table, BLIP-3's perceiver, MM1's average pooling to 64 tokens with LLaVA-1.5's MLP (hidden = the LLM's
    width; at most every patch at a small image size), and ``perceiver_dual`` (its own recipe: 50% MAE masking and the
    reconstruction in training). All with the stage-2 rows' frozen CLIP-ViT, OPT and precision policy."""
    stage2 = build_stage2(size)
    base = {**backbone_fields(size, optimised=True), **llm_fields(size), "tokenizer": None}  # no Q-Former, no BERT
    perceiver = {**base, **perceiver_fields(size)}
    grid_tokens = (size.image_size // published.EVA_VIT_G["patch_size"]) ** 2
    projector = {**base, "num_query_token": min(64, grid_tokens), "projector_layers": 2,
                 "projector_hidden_size": base["llm_hidden_size"]}
    # The dual block at the CLIP width, as perceiver_dual builds it (its config checks the heads against
    # qformer_hidden_size, which this type replaces by that width: there is no Q-Former).
    dual = {**xformer_fields(size), **perceiver, "dual_num_heads": size.heads(16),
            "dual_intermediate_size": size.width(5632, 16), "qformer_hidden_size": perceiver["vit_embed_dim"]}
    return {
        REFERENCE: stage2[REFERENCE],
        "xformer": stage2["xformer"],
        "perceiver": lambda: PerceiverOPT(PerceiverOPTConfig(**perceiver)),
        "projector": lambda: ProjectorOPT(ProjectorOPTConfig(**projector)),
        "perceiver_dual": lambda: PerceiverDualOPT(PerceiverDualOPTConfig(**dual)),
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


def row_precision(model: torch.nn.Module) -> Dict[str, str]:
    """The precision each frozen part of a built row runs in: ``clip_vit``, ``mae_encoder`` (where built) and ``llm``
    (its weights' dtype, stage 2)."""
    from lavis_xformer.models.precision import DTYPES, runs_in_half_precision

    names = {dtype: name for name, dtype in DTYPES.items()}
    parts = {"clip_vit": getattr(model, "visual_encoder", None), "mae_encoder": getattr(model, "mae_encoder", None)}
    precision = {part: names[runs_in_half_precision(module) or torch.float32] for part, module in parts.items() if module is not None}
    llm = getattr(model, "opt_model", None) or getattr(model, "t5_model", None)
    if llm is not None:
        precision["llm"] = names.get(next(llm.parameters()).dtype, str(next(llm.parameters()).dtype))
    return precision


def processor_record(device: torch.device) -> dict:
    """What the figures depend on: the device's model name, torch's capability, native bf16 yes/no, AMX; on CUDA the
    GPU's (with its compute capability) and the host CPU's."""
    from lavis_xformer.models.precision import probe_cpu, probe_device

    record = probe_device(device.type).as_record()
    if device.type == "cuda":
        record["host_cpu"] = probe_cpu().as_record()
    return record


def bench_stage(stage: int, size: BenchSize, device: torch.device, warmup: int, repeats: int, timer: Timer,
                breakdown: bool = True) -> dict:
    """Time, FLOPs (of the same calls) and the profiled component breakdown of every operation of one stage."""
    torch.manual_seed(0)
    models = {name: build().to(device) for name, build in build_rows(size, stage).items()}
    fns = operation_fns(stage, models, image_text_samples(size, device), device)
    result = {"parameters": {name: count_parameters(m)._asdict() for name, m in models.items()},
              "precision": {name: row_precision(m) for name, m in models.items()}, "flops": {}, "breakdown": {}}
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


def bench_connectors(size: BenchSize, device: torch.device, warmup: int, repeats: int, timer: Timer) -> dict:
    """The stage-2 connector rows (``build_connectors``): parameters, the visual tokens each hands the LLM, forward
    FLOPs per sample of its training objective, and the training step and visual prefix (``llm_image_inputs``) timed
    interleaved, with the FLOPs of the same calls."""
    torch.manual_seed(0)
    models = {name: build().to(device) for name, build in build_connectors(size).items()}
    samples = image_text_samples(size, device)
    fns = operation_fns(2, models, samples, device)
    result = {"parameters": {name: count_parameters(m)._asdict() for name, m in models.items()},
              "precision": {name: row_precision(m) for name, m in models.items()},
              "visual_tokens": {}, "forward_flops_per_sample": {}, "flops": {}}
    for op in ("train_step", "feature_extraction"):
        for model in models.values():
            model.train(op == "train_step")
        result[op] = interleaved(fns[op], timer, warmup, repeats)
        result["flops"][op] = {row: count_flops(call) for row, call in fns[op].items()}
    for name, model in models.items():
        model.train()
        result["forward_flops_per_sample"][name] = count_flops(lambda: model(samples)) / size.batch_size
        model.eval()
        with torch.no_grad():
            result["visual_tokens"][name] = int(model.llm_image_inputs(samples["image"])[0].shape[1])
    return result


def bench_scaling(points, size: BenchSize, device: torch.device, warmup: int, repeats: int, timer: Timer) -> List[dict]:
    """BLIP-2 (``blip2+impl``) and X-Former, stage 1, at each (batch, image size): the training step and feature
    extraction, timed interleaved, and each call's peak memory above what the process held before it. No training
    step at batch 1: ITC and ITM draw their negatives from the batch (LAVIS's loss fails on one sample)."""
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
# The stage-1 targets again, in fresh processes
# ----------------------------------------------------------------------------------------------------------------


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
    parser.add_argument("--quick", action="store_true",
                        help="tiny size, few repeats, small scaling grid, the connector table (tests)")
    parser.add_argument("--connectors", action="store_true",
                        help="time the stage-2 connectors (perceiver, projector, perceiver_dual) against BLIP-2")
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
        args.size, args.repeats, args.warmup, args.scaling_repeats, args.connectors = "tiny", 2, 1, 2, True
    if args.threads:
        torch.set_num_threads(args.threads)
    size = BenchSize(head_divisor=args.head_divisor) if args.size == "bench" else TINY
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, size, args.stage)))
        return {}

    device = torch.device(args.device)
    timer = Timer(device, args.clock)
    _init_single_process_group()
    processor = processor_record(device)
    report = {
        "machine": {
            "device": processor["name"] if device.type == "cuda" else f"CPU ({processor['name']}, {os.cpu_count()} cores)",
            "processor": processor,
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
    if args.connectors:
        print(f"timing the stage-2 connectors at size {size.name} ({args.warmup} warm-up + {args.repeats} interleaved calls)...", file=sys.stderr)
        report["connectors"] = bench_connectors(size, device, args.warmup, args.repeats, timer)
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
