"""The paper's baselines and ablations as configs of the X-Former classes (issue 7).

Every variant is the same ``XFormer`` (stage 1) or stage-2 class with a few ``XFormerConfig`` fields changed; this
module holds the small pieces those fields switch on, and ``VARIANTS``, the one table of what each variant is.

    field                         values
    ``mae_fusion``                "dual" (X-Former), "concat" (Fig. 1b), "early_ca" (Fig. 1c)
    ``mae_source``                "mae" (frozen MAE-ViT), "clip_layer" (CLIP-ViT block ``clip_feature_layer``)
    ``reconstruction_loss``       frozen MAE decoder + reconstruction loss on/off
    ``dual_query_self_attention`` self-attention over Z_q before it attends to M' (supplement "w/o SA")

M below is the second feature stream: the frozen MAE-ViT's features of the (masked) image, or for ``clip_layer`` the
output of an intermediate CLIP-ViT block.

Concat (Fig. 1b; supplement Table 3 "Concat", 110M)
    M* = Linear(M) at the CLIP width (1280 -> 1408), concatenated with C along the tokens: the Q-Former's every
    cross-attention (queries alone, ITM's positives and hard negatives) reads (C, M*). No dual block.
    Concat and early CA have no reconstruction loss, so their MAE sees the unmasked image (``mask_ratio: 0``):
    masking would only remove information.

Early cross-attention (Fig. 1c; supplement Table 3 "Early CA", 183M)
    The Q-Former's layers without a CLIP cross-attention (LAVIS: layers 1, 3, ..., 11) get an MAE interaction block
    after them: LAVIS's ``BertLayer`` with its self-attention left out (the layer before it just ran one), i.e. a
    cross-attention from the queries to M (keys/values from M's 1280 width) followed by the query feed-forward, and
    the text feed-forward that text tokens take through every LAVIS Q-Former layer. How big the added layers are
    the paper does not say; its 183M (75M over BLIP-2's 108M, with OPT-6.7B) decides. Stage-2 counts of the
    candidates (BLIP-2's Q-Former reduced as LAVIS ``Blip2OPT`` reduces it, + the OPT-6.7B projection):

        bare cross-attention to M in the 6 layers                        +18.9M  -> 127.2M
        + a query feed-forward after each                                +47.3M  -> 155.6M
        + the text feed-forward as well (a BertLayer minus self-attn)    +75.6M  -> 183.9M   <- chosen, paper 183M
        full BertLayers (self-attention too) inserted after the 6        +89.8M  -> 198.1M

    Only the chosen structure is within 3% of the paper. Its text feed-forward is the one part stage 2 never runs
    (no text enters the Q-Former there); ``Blip2OPT``'s rule removes each Q-Former layer's own ``intermediate`` /
    ``output`` only, so it stays and counts, which is what makes 183M. (The same 183.9M also results from the bare
    cross-attention with the Q-Former's own 12 text feed-forwards left in stage 2.) ``early_ca_feed_forward: False``
    builds the bare cross-attention (127.2M).

no_recon (Table 6 row 1)
    X-Former without the MAE decoder (never built) and the reconstruction loss; the MAE sees the unmasked image.

no_self_attn (supplement Table 5 "w/o SA")
    The dual block without the self-attention over Z_q before its second cross-attention (Z_q attends to M').

clip_layer26 / 28 / 30 (Table 5)
    M = the output of CLIP-ViT block N (1-based; LAVIS's ViT-g keeps 39 blocks and C is block 39's), read from the
    same CLIP forward pass by a forward hook, then projected into the dual block exactly as MAE features would be.
    No MAE is built; no reconstruction loss.

stage2_recon (Table 6 row 2, stage 2 only)
    Stage 2 with the frozen MAE decoder and the reconstruction loss kept next to the language-modelling loss.

Model types: a variant ``v`` of an architecture ``arch`` is the yaml ``configs/models/<arch>/<arch>_<v>_<base>.yaml``
for each base type ``<base>`` in ``VARIANT_ARCHS``, registered as type ``v`` for ``pretrain``, ``v_<llm>`` for
``pretrain_<llm>`` and ``v_<base>`` otherwise: ``xformer``: ``concat``, ``concat_tiny``, ``clip_layer28``, ...;
``xformer_opt``: ``concat_opt2.7b``, ``concat_opt6.7b``, ``concat_tiny``, ..., ``stage2_recon_opt6.7b``. Each yaml
is its base yaml with ``VARIANTS[v]``'s fields (``python -m lavis_xformer.models.variants`` writes them; the tests
check them). A stage-2 variant type starts from the same variant's stage-1 checkpoint (``pretrained:``).
"""

import copy
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from lavis.models.blip2_models.Qformer import BertAttention, BertIntermediate, BertLayer, BertOutput
from transformers import ViTMAEModel

from lavis_xformer.models.builders import hub_allowed, mae_config, standin_mae_encoder
from lavis_xformer.paths import configs_root


# ================================================================================================================
# The variants
# ================================================================================================================
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
    return types


# ================================================================================================================
# Building: the MAE encoder alone, and the concat / early-CA modules
# ================================================================================================================
def build_mae_encoder(cfg) -> nn.Module:
    """transformers' ``ViTMAEModel`` (the encoder ``ViTMAEForPreTraining.vit`` is) without the decoder.

    Used when the reconstruction loss is off: the decoder is then never built, nor its weights loaded.
    """
    config = mae_config(cfg)
    if not (cfg.mae_weights and hub_allowed()):
        return standin_mae_encoder(config)  # the very encoder build_mae makes: stage 1 and stage 2 share it
    encoder = ViTMAEModel.from_pretrained(cfg.mae_weights, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss)
    for name in ("hidden_size", "patch_size", "image_size"):
        if getattr(encoder.config, name) != getattr(config, name):
            raise ValueError(
                f"MAE checkpoint {cfg.mae_weights!r} has {name}={getattr(encoder.config, name)} but the model "
                f"config says {getattr(config, name)}; set mae_{name} to match the checkpoint"
            )
    return encoder


def build_fusion(model, cfg) -> None:
    """The trainable modules that bring M into the Q-Former for ``concat`` and ``early_ca`` (nothing for ``dual``)."""
    model.mae_align = None
    if cfg.mae_fusion == "concat":
        model.mae_align = nn.Linear(cfg.mae_feature_width, model.visual_encoder.num_features)
    elif cfg.mae_fusion == "early_ca":
        add_early_cross_attention(model.Qformer, cfg.mae_feature_width, cfg.early_ca_feed_forward)


def qformer_context(model, clip_features, mae_features=None):
    """What the Q-Former's cross-attentions read, and its mask: C; (C, M*) for concat; [C, M] for early CA."""
    device = clip_features.device
    clip_atts = torch.ones(clip_features.shape[:-1], dtype=torch.long, device=device)
    cfg = model.config
    fusion = cfg.mae_fusion if getattr(cfg, "use_mae", False) else "dual"
    if fusion == "dual":
        return clip_features, clip_atts
    if mae_features is None:
        raise ValueError(
            f"mae_fusion={fusion!r}: the Q-Former reads the MAE features too; pass mae_features "
            "(model.forward_encoders(image) returns them)"
        )
    mae_atts = torch.ones(mae_features.shape[:-1], dtype=torch.long, device=device)
    if fusion == "concat":
        aligned = model.mae_align(mae_features.to(model.mae_align.weight.dtype))
        return torch.cat([clip_features, aligned], dim=1), torch.cat([clip_atts, mae_atts], dim=1)
    return [clip_features, mae_features], [clip_atts, mae_atts]


def clip_with_layer(model, image, layer: int):
    """(C, output of CLIP-ViT block ``layer``) from one CLIP forward pass (a forward hook on that block).

    The block output is detached and float32, as the frozen MAE's features are."""
    captured = []
    block = model.visual_encoder.blocks[layer - 1]

    def hook(module, inputs, output):
        if not captured:  # the first call only: activation checkpointing may run the block again
            captured.append(output)

    handle = block.register_forward_hook(hook)
    try:
        clip_features = model.forward_clip(image)
    finally:
        handle.remove()
    return clip_features, captured[0].detach().float()


# ================================================================================================================
# Early cross-attention inside the Q-Former
# ================================================================================================================
class MaeCrossAttentionBlock(nn.Module):
    """LAVIS's ``BertLayer`` without its self-attention, cross-attending to M (see the module docstring).

    Queries: cross-attention to M, then the query feed-forward; text tokens: the text feed-forward, as in every
    LAVIS Q-Former layer. Built from LAVIS's own ``BertAttention`` / ``BertIntermediate`` / ``BertOutput``.
    """

    def __init__(self, config, feed_forward: bool = True):
        super().__init__()
        self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate_query = BertIntermediate(config) if feed_forward else None
        self.output_query = BertOutput(config) if feed_forward else None
        self.intermediate = BertIntermediate(config) if feed_forward else None
        self.output = BertOutput(config) if feed_forward else None

    def forward(self, hidden_states, mae_states, mae_attention_mask, query_length: int):
        queries, text = hidden_states[:, :query_length], hidden_states[:, query_length:]
        if query_length > 0:
            if mae_states is None:
                raise ValueError(
                    "early_ca Q-Former: the queries cross-attend to the MAE features too; pass "
                    "encoder_hidden_states=[C, M] and encoder_attention_mask=[C mask, M mask] "
                    "(XFormerImageMixin.qformer_context builds them)"
                )
            queries = self.crossattention(queries, None, None, mae_states, mae_attention_mask)[0]
            if self.output_query is not None:
                queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1] and self.output is not None:
            text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class EarlyCrossAttentionLayer(BertLayer):
    """A LAVIS Q-Former layer reading ``encoder_hidden_states=[C, M]``: its own CLIP cross-attention (if any) reads C;
    an ``mae_block`` (layers without CLIP cross-attention) runs after the layer and reads M.

    Converted in place from LAVIS's ``BertLayer`` (parameter names, pretrained weights and the ITG cache format
    stay LAVIS's). A plain tensor ``encoder_hidden_states`` is C alone.
    """

    mae_block: Optional[MaeCrossAttentionBlock]

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_value=None,
        output_attentions=False,
        query_length=0,
    ):
        clip_states, mae_states = _split(encoder_hidden_states)
        clip_mask, mae_mask = _split(encoder_attention_mask)
        outputs = super().forward(
            hidden_states, attention_mask, head_mask, clip_states, clip_mask, past_key_value, output_attentions,
            query_length,
        )
        if self.mae_block is None:
            return outputs
        return (self.mae_block(outputs[0], mae_states, mae_mask, query_length),) + tuple(outputs[1:])


def _split(value):
    if isinstance(value, (list, tuple)):
        return value[0], value[1]
    return value, None


def add_early_cross_attention(qformer, mae_width: int, feed_forward: bool = True) -> List[int]:
    """Turn a built LAVIS Q-Former into the early-CA one in place; returns the indices of the layers given M.

    New modules are initialised as LAVIS initialises the Q-Former (``BertPreTrainedModel._init_weights``).
    """
    config = copy.deepcopy(qformer.config)
    config.encoder_width = mae_width
    given = []
    for index, layer in enumerate(qformer.bert.encoder.layer):
        layer.__class__ = EarlyCrossAttentionLayer
        layer.mae_block = None
        if not layer.has_cross_attention:
            block = MaeCrossAttentionBlock(config, feed_forward)
            block.apply(qformer._init_weights)
            layer.mae_block = block
            given.append(index)
    return given


# ================================================================================================================
# The variant yamls: the base type's yaml with the variant's fields (python -m lavis_xformer.models.variants)
# ================================================================================================================
def variant_model_section(base_model: dict, variant: Variant, tiny: bool) -> dict:
    """The ``model:`` section a variant yaml must have: the base type's, minus ``drop``, plus the overrides."""
    section = {k: v for k, v in base_model.items() if k not in variant.drop}
    section.update(variant.overrides)
    if tiny:
        section.update(variant.tiny_overrides)
    return section


def variant_yaml_path(arch: str, variant: str, base: str) -> Path:
    return configs_root() / "models" / arch / f"{arch}_{variant}_{base}.yaml"


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    return "null" if value is None else str(value)


def render_variant_yaml(base_text: str, variant: Variant, tiny: bool, title: str) -> str:
    """The variant's yaml text from its base yaml's text: same layout, overridden values edited in place, unused
    keys removed, new keys appended under a comment."""
    head, rest = base_text.split("\nmodel:\n", 1)
    model_part, preprocess = rest.split("\npreprocess:", 1)
    overrides = {**variant.overrides, **(variant.tiny_overrides if tiny else {})}
    lines, done = [], set()
    for line in model_part.split("\n"):
        key = re.match(r"^  (\w+):", line)
        key = key.group(1) if key else None
        if key in variant.drop:
            continue
        if key in overrides:
            line = f"  {key}: {_yaml_value(overrides[key])}"
            done.add(key)
        if not (line.strip() == "" and lines and lines[-1].strip() == ""):
            lines.append(line)
    while lines and not lines[-1].strip():
        lines.pop()
    new = [key for key in overrides if key not in done]
    if new:
        lines += ["", f"  # {variant.name}"] + [f"  {key}: {_yaml_value(overrides[key])}" for key in new]
    header = textwrap.wrap(f"{title}, variant `{variant.name}` ({variant.paper}): {variant.summary}.", 114)
    header.append("Generated by `python -m lavis_xformer.models.variants` from the base yaml and variants.VARIANTS.")
    return "".join(f"# {line}\n" for line in header) + "model:\n" + "\n".join(lines) + "\n\npreprocess:" + preprocess


def write_variant_yamls(arch: str, bases: Dict[str, str], stage: int) -> List[Path]:
    """Write ``<arch>_<variant>_<base>.yaml`` for every variant of ``stage`` and base type (base -> title)."""
    written = []
    for base, title in bases.items():
        base_text = (configs_root() / "models" / arch / f"{arch}_{base}.yaml").read_text()
        for variant in VARIANTS.values():
            if stage in variant.stages:
                path = variant_yaml_path(arch, variant.name, base)
                path.write_text(render_variant_yaml(base_text, variant, "tiny" in base, title))
                written.append(path)
    return written


# Every architecture with variant types: arch -> (stage, {base type: yaml title}).
VARIANT_ARCHS = {
    "xformer": (1, {"pretrain": "X-Former stage 1 at paper scale", "tiny": "X-Former stage 1, tiny (offline)"}),
    "xformer_opt": (
        2,
        {
            "pretrain_opt2.7b": "X-Former stage 2 with a frozen OPT-2.7B at paper scale",
            "pretrain_opt6.7b": "X-Former stage 2 with a frozen OPT-6.7B at paper scale",
            "tiny": "X-Former stage 2 with a frozen OPT, tiny (offline)",
        },
    ),
}

if __name__ == "__main__":
    for arch, (stage, bases) in VARIANT_ARCHS.items():
        for path in write_variant_yamls(arch, bases, stage):
            print(path)
