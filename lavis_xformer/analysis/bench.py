"""Side-by-side cost of X-Former and LAVIS's BLIP-2, measured in one process, on the same inputs and threads.

    python -m lavis_xformer.analysis.bench [--size bench|tiny] [--device cpu|cuda] [--json PATH] [--repeats N]

What it measures, for stage 1 (``xformer`` vs LAVIS ``Blip2Qformer``) and stage 2 (``xformer_opt`` vs LAVIS
``Blip2OPT``):
- trainable and frozen parameters and forward FLOPs per sample at paper scale: built on the ``meta`` device
  from the published model types (``common.meta.build_on_meta``), FLOPs by ``torch.utils.flop_counter.FlopCounterMode``;
- training-step time (forward + backward + AdamW step), median and interquartile range over repeated steps
  after warm-up, the models interleaved step by step so that machine noise hits both; and peak memory;
- inference latency of feature extraction (Z' / Z_q) and of ``predict_answers`` with beam 5;
at a ``bench`` size that keeps the paper-scale proportions (every width divided by one factor, every depth by
another; token counts, queries and text length unchanged). On ``--device cuda`` time comes from CUDA events and
memory from ``max_memory_allocated``, with the frozen parts in fp16 as the paper runs them; on the CPU memory is
the peak resident set of a fresh process per model, minus the interpreter's own.

Every ratio is X-Former / BLIP-2. Rows:
- ``blip2``: LAVIS's code as shipped (``blip2_baseline`` with LAVIS's attention and LAVIS's precision: the frozen
  CLIP-ViT in fp16 with CUDA, fp32 on a CPU, where LAVIS's half precision does not run);
- ``blip2+impl``: the same BLIP-2 with X-Former's implementation choices that apply to it (SDPA attention, frozen
  CLIP-ViT in half precision on every device: bf16 on a CPU), so the second ratio column is the architecture's
  own overhead;
- ``xformer``: X-Former as it ships at the bench size.
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
    """Paper-scale architecture with widths divided by ``width_divisor`` and depths by ``depth_divisor``."""

    name: str = "bench"
    width_divisor: int = 8  #: every hidden width (and FFN width) divided by this
    depth_divisor: int = 2  #: every layer count divided by this (at least 1 layer is kept)
    batch_size: int = 4  #: images per training step
    image_size: int = 224  #: the paper's resolution (token counts as at paper scale)
    max_txt_len: int = 32  #: text tokens, as at paper scale

    def width(self, paper: int, heads: int) -> int:
        # Round to a multiple of the head count so that the head layout of the paper model is kept.
        return max(heads, round(paper / self.width_divisor / heads) * heads)

    def depth(self, paper: int) -> int:
        return max(1, round(paper / self.depth_divisor))


TINY = BenchSize(name="tiny", width_divisor=32, depth_divisor=13, batch_size=2, image_size=56, max_txt_len=12)


def backbone_fields(size: BenchSize, optimised: bool) -> dict:
    from lavis_xformer.models import published

    vit, bert = published.EVA_VIT_G, published.BERT_BASE_UNCASED
    return dict(
        image_size=size.image_size,
        vit_weights=None,
        vit_patch_size=vit["patch_size"],
        vit_embed_dim=size.width(vit["embed_dim"], vit["num_heads"]),
        vit_depth=size.depth(vit["depth"]),
        vit_num_heads=vit["num_heads"],
        vit_mlp_ratio=vit["mlp_ratio"],
        vit_precision="fp16",
        # LAVIS as shipped runs the frozen ViT in fp32 on a CPU (its fp16 is CUDA-only); the optimised rows in bf16.
        frozen_cpu_precision="bf16" if optimised else "fp32",
        qformer_weights=None,
        qformer_hidden_size=size.width(bert["hidden_size"], bert["num_attention_heads"]),
        qformer_num_layers=size.depth(bert["num_hidden_layers"]),
        qformer_num_heads=bert["num_attention_heads"],
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
        mae_num_heads=mae["num_attention_heads"],
        mae_intermediate_size=size.width(mae["intermediate_size"], mae["num_attention_heads"]),
        mae_decoder_hidden_size=size.width(mae["decoder_hidden_size"], mae["decoder_num_attention_heads"]),
        mae_decoder_num_layers=size.depth(mae["decoder_num_hidden_layers"]),
        mae_decoder_num_heads=mae["decoder_num_attention_heads"],
        mae_decoder_intermediate_size=size.width(mae["decoder_intermediate_size"], mae["decoder_num_attention_heads"]),
        dual_num_layers=size.depth(dual.dual_num_layers),
        dual_num_heads=dual.dual_num_heads,
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
        llm_precision="fp16",
        llm_hidden_size=size.width(opt["hidden_size"], opt["num_attention_heads"]),
        llm_num_layers=size.depth(opt["num_hidden_layers"]),
        llm_num_heads=opt["num_attention_heads"],
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


def forward_flops(model: torch.nn.Module, samples: dict, batch_size: int) -> float:
    """Forward FLOPs per sample of the training objective (no gradient is taken)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, _meta_scalars_on_cpu():  # grad enabled: the module tracker hooks need it; no backward runs
        model(samples)
    return counter.get_total_flops() / batch_size


def paper_scale_rows(model_types: Dict[str, Tuple[str, str]]) -> Dict[str, dict]:
    """Parameter counts and forward FLOPs per sample of each (architecture, model type), built on the ``meta``
    device (no weights)."""
    batch = 2  # ITC needs more than one sample; FLOPs are reported per sample
    rows = {}
    for name, (arch, model_type) in model_types.items():
        model = build_on_meta(arch, model_type).train()
        with on_meta():
            samples = {"image": torch.zeros(batch, 3, 224, 224), "text_input": [CAPTION] * batch}
            rows[name] = {
                **count_parameters(model)._asdict(),
                "forward_flops_per_sample": forward_flops(model, samples, batch),
            }
        del model
    return rows


def paper_scale_stage2() -> Dict[str, dict]:
    """Stage 2 with OPT-6.7B, the LLM of the paper's cost table."""
    return paper_scale_rows({"blip2": ("blip2_baseline_opt", "pretrain_opt6.7b"),
                             "xformer": ("xformer_opt", "pretrain_opt6.7b")})


def paper_scale_stage1() -> Dict[str, dict]:
    return paper_scale_rows({"blip2": ("blip2_baseline", "pretrain"), "xformer": ("xformer", "pretrain")})


# ----------------------------------------------------------------------------------------------------------------
# Time and memory at bench size
# ----------------------------------------------------------------------------------------------------------------
class Timer:
    """Wall-clock on the CPU; CUDA events (after a synchronise) on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


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
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def summarize(times: List[float]) -> dict:
    ordered = sorted(times)
    q = lambda f: ordered[min(len(ordered) - 1, int(round(f * (len(ordered) - 1))))]  # noqa: E731
    return {"median_s": statistics.median(ordered), "iqr_s": q(0.75) - q(0.25), "n": len(ordered)}


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
    return {
        "blip2": lambda: Blip2BaselineOPT(Blip2OPTConfig(**backbone(False))),
        "blip2+impl": lambda: Blip2BaselineOPT(Blip2OPTConfig(**backbone(True))),
        "xformer": lambda: XFormerOPT(XFormerOPTConfig(**xformer)),
    }


def build_rows(size: BenchSize, stage: int) -> Dict[str, Callable[[], torch.nn.Module]]:
    return {1: build_stage1, 2: build_stage2}[stage](size)


def measure_memory(rows: List[str], size: BenchSize, stage: int) -> Dict[str, dict]:
    results = {}
    for row in rows:
        command = [sys.executable, "-m", "lavis_xformer.analysis.bench", "--memory-probe", row, "--stage", str(stage), "--size", size.name]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
        results[row] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def _init_single_process_group():
    # LAVIS's BLIP-2 forward calls dist.get_rank(); give it a one-process group.
    from lavis_xformer.common.distributed import init_single_process_group

    init_single_process_group("gloo")


QUESTIONS = ["how many circles are there in the image?", "is there a red square in the image?"]


def bench_stage(stage: int, size: BenchSize, device: torch.device, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    models = {name: build().to(device).train() for name, build in build_rows(size, stage).items()}
    samples = image_text_samples(size, device)
    timer = Timer(device)
    steps = {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        steps[name] = train_step_fn(model, samples, optimizer, device)
    result = {"parameters": {name: count_parameters(m)._asdict() for name, m in models.items()}}
    result["train_step"] = interleaved(steps, timer, warmup, repeats)

    for model in models.values():
        model.eval()
    image = samples["image"]

    def features(model):
        if stage == 2:  # what reaches the LLM: projected Z' (X-Former) or projected Q-Former output (BLIP-2)
            return lambda: torch.no_grad()(model.llm_image_inputs)(image)
        if hasattr(model, "encode_image"):
            return lambda: model.encode_image(image)
        return lambda: torch.no_grad()(model.forward_image)(image)

    result["feature_extraction"] = interleaved({n: features(m) for n, m in models.items()}, timer, warmup, repeats)
    if stage == 2:
        # Beam 5, as the paper evaluates; min_len = max_len so every model decodes the same number of tokens.
        vqa = {"image": image, "text_input": [QUESTIONS[i % 2] for i in range(image.shape[0])]}

        def answer(model):
            return lambda: model.predict_answers(vqa, num_beams=5, max_len=5, min_len=5, length_penalty=0)

        result["predict_answers"] = interleaved({n: answer(m) for n, m in models.items()}, timer, 1, max(3, repeats // 2))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def ratio(results: dict, key: str, numerator: str = "xformer", denominator: str = "blip2") -> float:
    return results[numerator][key] / results[denominator][key]


def markdown(report: dict) -> str:
    lines = [f"# X-Former vs BLIP-2 cost ({report['machine']['device']}, size `{report['size']['name']}`)", ""]
    paper = report.get("paper_scale", {}).get("stage1")
    if paper:
        lines += ["## Paper scale (meta device)", "", "| stage 1 | trainable | frozen | forward GFLOPs / sample |", "|---|---:|---:|---:|"]
        for name, row in paper.items():
            lines.append(f"| {name} | {row['trainable'] / 1e6:.2f}M | {row['frozen'] / 1e6:.1f}M | {row['forward_flops_per_sample'] / 1e9:.1f} |")
        flops = ratio(paper, "forward_flops_per_sample")
        lines += ["", f"FLOPs ratio X-Former / BLIP-2, stage 1: **{flops:.3f}** (paper: {PAPER['stage1_flops_ratio']:.3f})", ""]
    paper2 = report.get("paper_scale", {}).get("stage2")
    if paper2:
        lines += ["| stage 2 (OPT-6.7B) | trainable | frozen | forward GFLOPs / sample |", "|---|---:|---:|---:|"]
        for name, row in paper2.items():
            lines.append(f"| {name} | {row['trainable'] / 1e6:.2f}M | {row['frozen'] / 1e6:.1f}M | {row['forward_flops_per_sample'] / 1e9:.1f} |")
        flops = ratio(paper2, "forward_flops_per_sample")
        lines += ["", f"FLOPs ratio X-Former / BLIP-2, stage 2: **{flops:.3f}** (paper: {PAPER['stage2_flops_ratio']:.3f})", ""]
    for stage in (1, 2):
        result = report.get(f"stage{stage}")
        if not result:
            continue
        lines += [f"## Stage {stage} at size `{report['size']['name']}` (batch {report['size']['batch_size']}, {report['machine']['threads']} threads)", ""]
        timed = [key for key in ("train_step", "feature_extraction", "predict_answers") if key in result]
        lines += ["| row | " + " | ".join(f"{k} median s (IQR)" for k in timed) + " | peak memory MB |", "|---|" + "---:|" * (len(timed) + 1)]
        for name in result["train_step"]:
            memory = result.get("memory", {}).get(name, {}).get("peak_mb", float("nan"))
            cells = [f"{result[k][name]['median_s']:.4f} ({result[k][name]['iqr_s']:.4f})" for k in timed]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {memory:.0f} |")
        lines += ["", "| ratio X-Former / BLIP-2 | vs LAVIS as shipped | vs blip2+impl | target | paper |", "|---|---:|---:|---:|---:|"]
        targets = {
            "train_step": (TARGETS["stage1_train_step"] if stage == 1 else None, PAPER["train_time_ratio"]),
            "feature_extraction": (TARGETS["inference"], PAPER["inference_ratio"]),
            "predict_answers": (TARGETS["inference"], PAPER["inference_ratio"]),
        }
        for key in timed:
            target, paper_value = targets[key]
            shipped = ratio(result[key], "median_s")
            same = ratio(result[key], "median_s", denominator="blip2+impl")
            target_text = f"<= {target:.2f}" if target else ""
            lines.append(f"| stage-{stage} {key} | {shipped:.3f} | {same:.3f} | {target_text} | {paper_value:.3f} |")
        if result.get("memory"):
            target_text = f"<= {TARGETS['stage2_peak_memory']:.2f}" if stage == 2 else ""
            paper_value = PAPER["stage2_memory_ratio"] if stage == 2 else 4.6 / 3.3
            lines.append(
                f"| stage-{stage} peak memory | {ratio(result['memory'], 'peak_mb'):.3f} | "
                f"{ratio(result['memory'], 'peak_mb', denominator='blip2+impl'):.3f} | {target_text} | {paper_value:.3f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lavis_xformer.analysis.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--no-paper-scale", action="store_true", help="skip the meta-device parameter/FLOP count")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-model memory processes")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import lavis_xformer  # noqa: F401  (registers the models)

    size = BenchSize() if args.size == "bench" else TINY
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, size, args.stage)))
        return {}

    device = torch.device(args.device)
    _init_single_process_group()
    report = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "size": asdict(size),
        "paper": PAPER,
        "targets": TARGETS,
    }
    if not args.no_paper_scale:
        print("counting parameters and FLOPs at paper scale (meta device)...", file=sys.stderr)
        report["paper_scale"] = {"stage1": paper_scale_stage1(), "stage2": paper_scale_stage2()}
    for stage in args.stages:
        print(f"timing stage {stage} at size {size.name} ({args.warmup} warm-up + {args.repeats} interleaved steps)...", file=sys.stderr)
        report[f"stage{stage}"] = bench_stage(stage, size, device, args.warmup, args.repeats)
        if not args.no_memory:
            print(f"measuring stage-{stage} peak memory, one process per model...", file=sys.stderr)
            report[f"stage{stage}"]["memory"] = measure_memory(list(build_rows(size, stage)), size, stage)

    text = markdown(report)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)
    return report


if __name__ == "__main__":
    main()
