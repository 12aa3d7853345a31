"""Trainable and frozen parameters of every architecture and variant at paper scale, beside the paper's figures.

    python -m lavis_xformer.analysis.params           # Markdown tables
    python -m lavis_xformer.analysis.params --json    # the same numbers as JSON

Every registered paper-scale model type (all but the ``tiny`` ones) of the plugin's architectures is built from
its yaml by ``common.meta.build_on_meta``: full size, no weights, no download, about a second each.
That includes the baselines and ablations of ``lavis_xformer.models.variants`` (stage 1 ``xformer/<variant>``,
stage 2 ``xformer_opt/<variant>_opt2.7b`` and ``_opt6.7b``).

Trainable: parameters with ``requires_grad``; frozen: the others (CLIP-ViT, MAE-ViT and decoder, LLM). The paper
gives stage-2 trainable counts: Table 1 (BLIP-2 107M / 108M, X-Former 129M / 130M with OPT-2.7B / OPT-6.7B) and
supplement Table 3 (OPT-6.7B: BLIP-2 108M, Concat 110M, Early CA 183M, X-Former 130M).

``stage2_equivalent_counts`` is the stage-2 counting rule written out (what LAVIS's ``Blip2OPT`` removes from a
stage-1 model, plus its projection); tests/test_params.py checks that it agrees with the stage-2 classes.
"""

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch.nn as nn

from lavis_xformer.common.meta import build_on_meta, count_parameters

# The plugin's architectures, in table order: (arch, stage).
ARCHS = (
    ("blip2_baseline", 1),
    ("xformer", 1),
    ("blip2_baseline_opt", 2),
    ("xformer_opt", 2),
    ("blip2_baseline_t5", 2),
    ("xformer_t5", 2),
    # the connectors of the systems that followed (models/connector_llm.py; docs/connectors.md)
    ("perceiver_opt", 2),
    ("perceiver_t5", 2),
    ("projector_opt", 2),
    ("projector_t5", 2),
    ("perceiver_dual_opt", 2),
    ("perceiver_dual_t5", 2),
)
# The connector comparison with OPT-2.7B (forward FLOPs per sample counted too): each connector's base type; with
# ``--flops all`` also the token-count and resolution rows (variants.SCALE_VARIANTS) of each.
CONNECTOR_ROWS = (
    ("blip2_baseline_opt", "pretrain_opt2.7b"),
    ("xformer_opt", "pretrain_opt2.7b"),
    ("perceiver_opt", "pretrain_opt2.7b"),
    ("perceiver_opt", "pretrain_matched_opt2.7b"),
    ("projector_opt", "pretrain_opt2.7b"),
    ("projector_opt", "pretrain_llava_opt2.7b"),
    ("perceiver_dual_opt", "pretrain_opt2.7b"),
)


def paper_trainable() -> dict:
    """(arch, model type) -> the paper's trainable-parameter figure in millions."""
    from lavis_xformer.models.variants import VARIANTS, variant_type_name

    figures = {
        ("blip2_baseline_opt", "pretrain_opt2.7b"): 107.0,  # Table 1
        ("blip2_baseline_opt", "pretrain_opt6.7b"): 108.0,  # Table 1, supplement Table 3
        ("xformer_opt", "pretrain_opt2.7b"): 129.0,  # Table 1
        ("xformer_opt", "pretrain_opt6.7b"): 130.0,  # Table 1, supplement Table 3
        ("xformer_opt", "vqa_ft_opt2.7b"): 216.0,  # supplement section 2, VQA fine-tuning (LLM not stated)
    }
    for variant in VARIANTS.values():  # supplement Table 3: Concat 110M, Early CA 183M
        for base, figure in variant.paper_trainable.items():
            figures[("xformer_opt", variant_type_name(variant.name, base))] = figure
    return figures


@dataclass
class Row:
    stage: int
    arch: str
    model_type: str
    trainable: int
    frozen: int
    paper_trainable_m: Optional[float] = None

    @property
    def deviation(self) -> Optional[float]:
        """Relative difference to the paper's figure (0.01 = +1%)."""
        if self.paper_trainable_m is None:
            return None
        return self.trainable / 1e6 / self.paper_trainable_m - 1.0


# ================================================================================================================
# The stage-2 counting rule
# ================================================================================================================
# What LAVIS's Blip2OPT.__init__ sets to None on its Q-Former (the text-only parts stage 2 never runs), and the
# stage-1 heads Blip2OPT (a Blip2Base, not a Blip2Qformer) does not have.
_STAGE2_REMOVED_PREFIXES = (
    "Qformer.cls.",
    "Qformer.bert.embeddings.word_embeddings.",
    "Qformer.bert.embeddings.position_embeddings.",
    "vision_proj.",
    "text_proj.",
    "itm_head.",
)
_STAGE2_REMOVED_NAMES = ("temp",)
# ``for layer in self.Qformer.bert.encoder.layer: layer.output = None; layer.intermediate = None``: each Q-Former
# layer's own text feed-forward, nothing deeper (not ``output_query``, not ``attention.output``, not a submodule's).
_STAGE2_REMOVED_LAYER_FFN = re.compile(r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.")


def stage2_removed(name: str) -> bool:
    """Whether LAVIS ``Blip2OPT`` leaves the stage-1 parameter ``name`` out of its stage-2 model."""
    return (
        name.startswith(_STAGE2_REMOVED_PREFIXES)
        or name in _STAGE2_REMOVED_NAMES
        or bool(_STAGE2_REMOVED_LAYER_FFN.match(name))
    )


def stage2_equivalent_counts(stage1_model: nn.Module, llm_width: int, llm_parameters: int = 0) -> Tuple[int, int]:
    """(trainable, frozen) of the stage-2 model made from a stage-1 model built with the stage-2 config.

    The counting rule: the stage-1 parameters minus exactly what LAVIS ``Blip2OPT`` removes (``Qformer.cls``, the
    word and position embeddings, each Q-Former layer's text ``intermediate`` / ``output``) and the stage-1 heads
    it does not have (``vision_proj``, ``text_proj``, ``itm_head``, ``temp``), plus its trainable projection
    ``Linear(qformer_hidden_size, llm_width)`` and the frozen LLM's ``llm_parameters``. Everything else - queries,
    ``ln_vision``, the rest of the Q-Former, the X-Former modules, the frozen encoders - counts as built.
    """
    trainable = frozen = 0
    for name, param in stage1_model.named_parameters():
        if stage2_removed(name):
            continue
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    trainable += stage1_model.Qformer.config.hidden_size * llm_width + llm_width
    return trainable, frozen + llm_parameters


# ================================================================================================================
# The table
# ================================================================================================================
def _registry():
    import lavis_xformer  # noqa: F401  (registers the plugin's models)
    from lavis.common.registry import registry

    return registry


def paper_scale_types(arch: str) -> List[str]:
    """The registered model types of ``arch`` that are paper scale (every type but the ``tiny`` ones)."""
    cls = _registry().get_model_class(arch)
    return [t for t in cls.PRETRAINED_MODEL_CONFIG_DICT if "tiny" not in t]


def collect(archs=ARCHS) -> List[Row]:
    """One row per paper-scale model type of each registered architecture (unregistered ones are skipped)."""
    figures = paper_trainable()
    rows = []
    for arch, stage in archs:
        if _registry().get_model_class(arch) is None:
            continue
        for model_type in paper_scale_types(arch):
            trainable, frozen = count_parameters(build_on_meta(arch, model_type))
            rows.append(Row(stage, arch, model_type, trainable, frozen, figures.get((arch, model_type))))
    return rows


@dataclass
class ConnectorRow:
    """A connector at paper scale with OPT-2.7B: its sizes and the forward FLOPs per sample of its training
    objective (one caption), the LLM's part of them apart."""

    arch: str
    model_type: str
    visual_tokens: int  # tokens the LLM reads
    image_size: int
    trainable: int
    frozen: int
    forward_flops: float  # per sample
    llm_flops: float  # per sample, the frozen LLM's part


def connector_rows(include_scale_variants: bool = False) -> List[ConnectorRow]:
    """``CONNECTOR_ROWS`` (and the token / resolution rows) built on the ``meta`` device, FLOPs counted by
    ``torch.utils.flop_counter`` (2 per multiply-accumulate) on a batch of 2 at the type's resolution."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lavis_xformer.analysis.bench import CAPTION, _meta_scalars_on_cpu
    from lavis_xformer.common.meta import on_meta
    from lavis_xformer.models.variants import SCALE_VARIANT_BASES, SCALE_VARIANTS, variant_type_name

    types = list(CONNECTOR_ROWS)
    if include_scale_variants:
        types += [(arch, variant_type_name(v, base)) for arch, bases in SCALE_VARIANT_BASES.items()
                  if arch != "xformer" for base in bases for v in SCALE_VARIANTS]
    rows = []
    for arch, model_type in types:
        model = build_on_meta(arch, model_type).train()
        trainable, frozen = count_parameters(model)
        size, batch = model.config.image_size, 2
        counter = FlopCounterMode(display=False)
        with on_meta(), counter, _meta_scalars_on_cpu():
            model({"image": torch.zeros(batch, 3, size, size), "text_input": [CAPTION] * batch})
        llm = sum(sum(counts.values()) for name, counts in counter.get_flop_counts().items()
                  if name.endswith((".opt_model", ".t5_model")))
        tokens = model.config.num_query_token or (size // model.config.vit_patch_size) ** 2  # 0: every patch
        rows.append(ConnectorRow(arch, model_type, tokens, size, trainable, frozen,
                                 counter.get_total_flops() / batch, llm / batch))
        del model
    return rows


def connectors_markdown(rows: List[ConnectorRow]) -> str:
    lines = [
        "## Connectors with OPT-2.7B, paper scale",
        "",
        "| architecture | model type | visual tokens | image | trainable | frozen | forward GFLOPs / sample | "
        "of which LLM |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.arch} | {r.model_type} | {r.visual_tokens} | {r.image_size} | {_m(r.trainable)} | "
                     f"{_m(r.frozen)} | {r.forward_flops / 1e9:,.0f} | {r.llm_flops / 1e9:,.0f} |")
    lines += ["", "Forward FLOPs of the training objective per sample (one shapes-length caption), counted by "
              "`torch.utils.flop_counter` on the `meta` device (2 FLOPs per multiply-accumulate); the connectors "
              "differ in the image side and in the tokens the LLM reads. docs/connectors.md describes each."]
    return "\n".join(lines)


# ================================================================================================================
# Output
# ================================================================================================================
def _m(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def to_markdown(rows: List[Row]) -> str:
    lines = []
    for stage, title in ((1, "Stage 1 (pre-training)"), (2, "Stage 2 (LLM alignment)")):
        lines += [
            f"## {title}, paper scale",
            "",
            "| architecture | model type | trainable | paper | difference | frozen |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            if r.stage == stage:
                paper = f"{r.paper_trainable_m:.0f}M" if r.paper_trainable_m is not None else ""
                diff = f"{100 * r.deviation:+.1f}%" if r.deviation is not None else ""
                lines.append(
                    f"| {r.arch} | {r.model_type} | {_m(r.trainable)} | {paper} | {diff} | {_m(r.frozen)} |"
                )
        lines.append("")
    lines += [
        "Built on the `meta` device from each model type's yaml (`load_model(architecture, model type)` builds the "
        "same model with weights). Trainable: parameters with `requires_grad`; frozen: CLIP-ViT, MAE-ViT (and "
        "decoder), LLM. Paper: Table 1 (OPT-2.7B / OPT-6.7B), supplement Table 3 (OPT-6.7B), supplement section 2 "
        "(VQA fine-tuning, 216M; `vqa_ft_*` types: the stage-2 count plus the Q-Former's text path and the "
        "CLIP-ViT's layer norms; README \"VQA fine-tuning\" explains the difference). `clip_recon` / "
        "`clip_recon_trainable`: supplement Table 6 \"CLIP w Recon.\" read with the frozen CLIP-ViT encoding the "
        "visible patches (the default; X-Former and the MAE decoder train) / with a trainable CLIP-ViT copy; the paper "
        "gives no count for either (docs/fidelity.md).",
    ]
    return "\n".join(lines)


def to_json(rows: List[Row]) -> str:
    return json.dumps([{**asdict(r), "deviation": r.deviation} for r in rows], indent=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lavis_xformer.analysis.params",
        description="Trainable and frozen parameters of every model type at paper scale, beside the paper's figures.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--flops", choices=("connectors", "all", "none"), default="connectors",
                        help="the connector table with FLOPs per sample: its base rows (default, ~15 s a row), "
                             "also the token-count and resolution rows (all), or none")
    args = parser.parse_args(argv)
    rows = collect()
    connectors = connector_rows(args.flops == "all") if args.flops != "none" else []
    if args.json:
        print(to_json(rows) if args.flops == "none" else json.dumps(
            {"parameters": json.loads(to_json(rows)), "connectors": [asdict(r) for r in connectors]}, indent=2))
    else:
        print(to_markdown(rows) + ("\n\n" + connectors_markdown(connectors) if connectors else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
