"""The paper's baselines and ablations as configs of the X-Former classes (issue 7): the one table of what each is.

Every variant is the same ``XFormer`` (stage 1) or stage-2 class with a few ``XFormerConfig`` fields changed:

    field                         values
    ``mae_fusion``                "dual" (X-Former), "concat" (Fig. 1b), "early_ca" (Fig. 1c): models/fusion.py
    ``mae_source``                "mae" (frozen MAE-ViT), "clip_layer" (CLIP-ViT block ``clip_feature_layer``),
                                  "frozen_clip_vit" / "clip_vit" (the frozen CLIP-ViT / a trainable copy of it on
                                  the visible patches of the masked image)
    ``reconstruction_loss``       frozen MAE decoder + reconstruction loss on/off
    ``dual_query_self_attention`` self-attention over Z_q before it attends to M' (supplement "w/o SA")

M below is the second feature stream: the frozen MAE-ViT's features of the (masked) image, or for ``clip_layer`` the
output of an intermediate CLIP-ViT block.

concat (Fig. 1b; supplement Table 3 "Concat", 110M) and early_ca (Fig. 1c; supplement Table 3 "Early CA", 183M)
    M inside the Q-Former instead of the dual block (``fusion.ConcatFusion``, ``fusion.EarlyCrossAttention``, where
    the early-CA block's size is derived from the paper's 183M). Neither has a reconstruction loss, so their MAE
    sees the unmasked image (``mask_ratio: 0``): masking would only remove information.

no_recon (Table 6 row 1)
    X-Former without the MAE decoder (never built) and the reconstruction loss; the MAE sees the unmasked image.

no_self_attn (supplement Table 5 "w/o SA")
    The dual block without the self-attention over Z_q before its second cross-attention (Z_q attends to M').

clip_layer26 / 28 / 30 (Table 5)
    M = the output of CLIP-ViT block N (1-based; LAVIS's ViT-g keeps 39 blocks and C is block 39's), read from the
    same CLIP forward pass by a forward hook, then projected into the dual block exactly as MAE features would be.
    No MAE is built; no reconstruction loss.

clip_recon and clip_recon_trainable (supplement Table 6 row 1 "CLIP w Recon."; models/clip_recon.py)
    "We replace MAE encoder with CLIP-ViT and pass masked image to CLIP-ViT which is then optimized for image
    reconstruction with MAE decoder." A CLIP-ViT takes the MAE encoder's place: it encodes the visible patches of the
    image masked at ``mask_ratio`` (MAE's visible-only encoding), the dual block fuses it, and M' goes through the MAE
    decoder to the reconstruction loss. What "optimized" trains is the open question; two readings:
    ``clip_recon`` (default; ``mae_source: frozen_clip_vit``): the frozen CLIP-ViT itself encodes the visible patches,
    X-Former and the MAE decoder (``mae_decoder_trainable``, a choice) are optimised. The supplement's own constraint
    implies it: "BLIP-2 completely unfreezes the CLIP ViT, resulting in a total of 1.2 Billion trainable parameters
    during fine-tuning. However, due to resource constraints, we are unable to train such large models."
    ``clip_recon_trainable`` (``mae_source: clip_vit``): "optimized" read literally, a trainable fp32 copy of the
    CLIP-ViT (C still comes from the frozen one), trained by the reconstruction loss and, through Z', the stage-1
    losses; it stays trainable in stage 2 (checkpoints hold trainable weights only, so a frozen copy would not reach
    a stage-2 checkpoint's evaluation): about a billion trainable parameters more than X-Former's, which is what the
    sentence above says the authors could not train.

stage2_recon (Table 6 row 2, stage 2 only)
    Stage 2 with the frozen MAE decoder and the reconstruction loss kept next to the language-modelling loss.

Model types: a variant ``v`` of an architecture ``arch`` is the yaml ``configs/models/<arch>/<arch>_<v>_<base>.yaml``
for each base type ``<base>``, registered as type ``v`` for ``pretrain``, ``v_<llm>`` for ``pretrain_<llm>`` and
``v_<base>`` otherwise: ``xformer``: ``concat``, ``concat_tiny``, ``clip_layer28``, ...; ``xformer_opt``:
``concat_opt2.7b``, ``concat_opt6.7b``, ``concat_tiny``, ..., ``stage2_recon_opt6.7b``. Each yaml is its base yaml
with ``Variant.model_section``'s fields (``python tools/generate_variant_yamls.py`` writes them; the tests check
them). A stage-2 variant type starts from the same variant's stage-1 checkpoint (``pretrained:``).
"""

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from lavis_xformer.paths import configs_root


@dataclass(frozen=True)
class Variant:
    """One baseline or ablation: the config fields that define it, on top of a base model type."""

    name: str
    paper: str  # where the paper defines it
    summary: str
    overrides: Dict[str, object]  # XFormerConfig fields, applied to the base type's yaml
    stages: Tuple[int, ...] = (1, 2)  # stage-1 (xformer) and/or stage-2 (xformer_opt, ...) types
    tiny_overrides: Dict[str, object] = field(default_factory=dict)  # extra fields of the `tiny` types
    drop: Tuple[str, ...] = ()  # base-yaml keys the variant leaves out (fields it does not use)
    paper_trainable: Dict[str, float] = field(default_factory=dict)  # stage-2 base type -> paper's figure (M)

    def losses(self, stage: int) -> frozenset:
        """The loss keys the variant's models return (``loss`` is their weighted total). The reconstruction loss
        is on by default in stage 1 and off in stage 2 (the base yamls), unless the variant says otherwise."""
        losses = {"loss", "loss_itc", "loss_itm", "loss_lm"} if stage == 1 else {"loss", "loss_lm"}
        if self.overrides.get("reconstruction_loss", stage == 1):
            losses.add("loss_rec")
        return frozenset(losses)

    def model_section(self, base_model: dict, tiny: bool) -> dict:
        """The ``model:`` section of the variant's yaml: the base type's, minus ``drop``, plus the overrides."""
        section = {k: v for k, v in base_model.items() if k not in self.drop}
        section.update(self.overrides)
        if tiny:
            section.update(self.tiny_overrides)
        return section


_NO_MAE_FIELDS = (
    "mae_weights", "mae_image_size", "mae_patch_size", "mae_hidden_size", "mae_num_layers", "mae_num_heads",
    "mae_intermediate_size", "mae_decoder_hidden_size", "mae_decoder_num_layers", "mae_decoder_num_heads",
    "mae_decoder_intermediate_size", "norm_pix_loss", "mask_ratio", "eval_mask_ratio",
)


def _clip_layer(n: int) -> Variant:
    return Variant(
        name=f"clip_layer{n}",
        paper="Table 5 (main paper) and supplement Fig. 1",
        summary=f"CLIP-ViT block {n}'s output in place of the MAE features; no MAE, no reconstruction",
        overrides={"mae_source": "clip_layer", "clip_feature_layer": n, "reconstruction_loss": False},
        tiny_overrides={"vit_depth": 39},  # block n must exist: the tiny ViT gets ViT-g's 39 (narrow) blocks
        drop=_NO_MAE_FIELDS,
    )


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            name="concat",
            paper="section 2.2, Fig. 1b; supplement Table 3",
            summary="MAE features aligned to the CLIP width by a linear layer, concatenated with C as the Q-Former's "
            "cross-attention input",
            overrides={"mae_fusion": "concat", "reconstruction_loss": False, "mask_ratio": 0.0},
            paper_trainable={"pretrain_opt6.7b": 110.0},
        ),
        Variant(
            name="early_ca",
            paper="section 2.2, Fig. 1c; supplement Table 3",
            summary="cross-attention blocks to the MAE features inside the Q-Former, alternating with the CLIP ones",
            overrides={"mae_fusion": "early_ca", "reconstruction_loss": False, "mask_ratio": 0.0},
            paper_trainable={"pretrain_opt6.7b": 183.0},
        ),
        Variant(
            name="no_recon",
            paper="Table 6 row 1",
            summary="no MAE decoder and no reconstruction loss; the MAE sees the unmasked image",
            overrides={"reconstruction_loss": False, "mask_ratio": 0.0},
        ),
        Variant(
            name="no_self_attn",
            paper="supplement Table 5 'w/o SA'",
            summary="dual block without the self-attention over Z_q before its cross-attention to M'",
            overrides={"dual_query_self_attention": False},
        ),
        Variant(
            name="clip_recon",
            paper="supplement Table 6 row 1 'CLIP w Recon.' (frozen-CLIP reading, the default)",
            summary="the frozen CLIP-ViT encodes the visible patches of the masked image in the MAE encoder's place; the "
            "dual block's M' is reconstructed by the MAE decoder, which trains (a choice) with X-Former",
            overrides={"mae_source": "frozen_clip_vit", "mae_decoder_trainable": True},
        ),
        Variant(
            name="clip_recon_trainable",
            paper="supplement Table 6 row 1 'CLIP w Recon.' (trainable-copy reading)",
            summary="a trainable copy of the CLIP-ViT in the MAE encoder's place, encoding the visible patches of the "
            "masked image; the dual block's M' is reconstructed by the frozen MAE decoder",
            overrides={"mae_source": "clip_vit"},
        ),
        _clip_layer(26),
        _clip_layer(28),
        _clip_layer(30),
        Variant(
            name="stage2_recon",
            paper="Table 6 row 2",
            summary="stage 2 keeps the frozen MAE decoder and adds the reconstruction loss to the LM loss",
            overrides={"reconstruction_loss": True, "mask_ratio": 0.5},
            stages=(2,),
        ),
    )
}


@dataclass(frozen=True)
class ScaleVariant:
    """MM1's two axes (seed 004: "Number of visual tokens and image resolution matters most, while the type of VL
    connector has little effect") as a row: a base type with another token count or image resolution. Its yaml
    (``tools/generate_variant_yamls.py``) is the base yaml with ``num_query_token`` or ``image_size`` (model and
    processors) replaced. Paper-scale bases only; a stage-2 type of a two-stage connector (Q-Former, X-Former)
    starts from a stage-1 checkpoint trained with the same token count."""

    name: str
    summary: str
    num_query_token: Optional[int] = None  # visual tokens: Q-Former queries, perceiver latents, pooled tokens
    image_size: Optional[int] = None  # CLIP-ViT input resolution (px), model and processors

    def render(self, base_text: str) -> str:
        """The variant's yaml text from its base yaml's text."""
        text = base_text
        if self.num_query_token is not None:
            text = re.sub(r"(?m)^(  num_query_token:) \d+", rf"\g<1> {self.num_query_token}", text)
            # a released checkpoint (BLIP-2's) has 32 queries: the type starts from one trained with this count
            text = re.sub(r'(?m)^  pretrained: "http.*', '  pretrained: ""', text)
        if self.image_size is not None:
            text = re.sub(r"(?m)^(\s+image_size:) \d+", rf"\g<1> {self.image_size}", text)
        header = f"# Generated by `python tools/generate_variant_yamls.py`: the base type with {self.summary}.\n"
        return header + text


SCALE_VARIANTS: Dict[str, ScaleVariant] = {
    v.name: v
    for v in (
        *(ScaleVariant(f"tokens{n}", f"{n} visual tokens", num_query_token=n) for n in (32, 64, 128)),
        *(ScaleVariant(f"res{px}", f"{px} px images", image_size=px) for px in (224, 364, 490)),
    )
}
# architecture -> the paper-scale base types its scale variants are made from
SCALE_VARIANT_BASES: Dict[str, Tuple[str, ...]] = {
    "xformer": ("pretrain",),
    "xformer_opt": ("pretrain_opt2.7b",),
    "blip2_baseline_opt": ("pretrain_opt2.7b",),
    "perceiver_opt": ("pretrain_opt2.7b", "pretrain_matched_opt2.7b"),
}


def variant_type_name(variant: str, base: str) -> str:
    """Model type of a variant on a base type: ``pretrain`` -> ``v``; ``tiny`` -> ``v_tiny``;
    ``pretrain_opt2.7b`` -> ``v_opt2.7b``."""
    if base == "pretrain":
        return variant
    return f"{variant}_{base[len('pretrain_'):] if base.startswith('pretrain_') else base}"


def variant_model_types(arch: str, base_types, stage: int) -> Dict[str, str]:
    """``PRETRAINED_MODEL_CONFIG_DICT`` entries of every variant yaml present for ``arch``'s ``base_types``."""
    folder = configs_root() / "models" / arch
    types = {}
    for variant in VARIANTS.values():
        if stage not in variant.stages:
            continue
        for base in base_types:
            path = folder / f"{arch}_{variant.name}_{base}.yaml"
            if path.is_file():
                types[variant_type_name(variant.name, base)] = str(path)
    for name in SCALE_VARIANTS:  # token count and resolution, both stages
        for base in base_types:
            path = folder / f"{arch}_{name}_{base}.yaml"
            if path.is_file():
                types[variant_type_name(name, base)] = str(path)
    return types
