"""Typed model configs: every size and switch of the models is a named field with a default and a docstring line.

LAVIS hands a model its yaml ``model:`` section as an OmegaConf node. ``from_lavis_cfg`` turns it into one of these
dataclasses and refuses unknown or mistyped fields before any weights are built, listing the valid choices. Each
value is checked against its field's annotation by pydantic in strict mode (an int is not a bool, "32" is not an
int, an int is a float); omegaconf's structured configs were not used because they convert strings to numbers.
"""

import dataclasses
import functools
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, get_type_hints

from pydantic import TypeAdapter, ValidationError

from lavis_xformer.models import published
from lavis_xformer.models.precision import PRECISIONS

# Keys LAVIS itself reads from a model config (checkpoint loading, registry); they are not model fields.
LAVIS_LOADING_KEYS = frozenset(
    {"arch", "model_type", "load_finetuned", "load_pretrained", "pretrained", "finetuned"}
)
# Fields that were renamed or removed: what to write instead.
REPLACED_FIELDS = {
    "frozen_cpu_precision": "frozen_precision (auto | fp32 | bf16 | fp16; auto picks bf16 only where the device runs "
                            "it natively): frozen_cpu_precision: fp32 is frozen_precision: auto on a CPU without native "
                            "bf16 (or fp32 everywhere), frozen_cpu_precision: bf16 is frozen_precision: bf16",
}


@dataclass
class BackboneConfig:
    """The BLIP-2 part shared by BLIP-2 and X-Former: frozen CLIP-ViT, Q-Former, text tokenizer.

    Defaults are the paper's EVA-CLIP ViT-g (second-to-last layer) and 32 queries (supplement Fig. 7's 32x32), and
    BLIP-2's BERT-base Q-Former, which the paper extends.
    """

    # --- frozen CLIP-ViT (LAVIS's EVA ViT class) ---
    image_size: int = 224  #: input resolution of the CLIP-ViT
    vit_weights: Optional[str] = "eva_clip_g"  #: "eva_clip_g" (EVA-CLIP ViT-g), a .pth ViT state dict, None = random
    vit_patch_size: int = published.EVA_VIT_G["patch_size"]  #: CLIP-ViT patch size
    vit_embed_dim: int = published.EVA_VIT_G["embed_dim"]  #: CLIP-ViT width
    vit_depth: int = published.EVA_VIT_G["depth"]  #: blocks kept (EVA-g has 40; 39 = second-to-last layer output)
    vit_num_heads: int = published.EVA_VIT_G["num_heads"]  #: CLIP-ViT attention heads
    vit_mlp_ratio: float = published.EVA_VIT_G["mlp_ratio"]  #: CLIP-ViT MLP width / embed width
    vit_precision: str = "fp16"  #: LAVIS's key: "fp16" lets ``frozen_precision`` choose; "fp32": never half precision
    #: frozen CLIP-ViT and MAE encoder: "auto" = bf16 where the device has it natively (CPU AVX512-BF16/AMX, CUDA
    #: >= 8.0), fp16 on older GPUs, else fp32; "fp32" / "bf16" / "fp16" force one (models/precision.py)
    frozen_precision: str = "auto"
    drop_path_rate: float = 0.0  #: stochastic depth of the (frozen) CLIP-ViT
    use_grad_checkpoint: bool = False  #: activation checkpointing inside the CLIP-ViT
    freeze_vit: bool = True  #: keep the CLIP-ViT frozen (the paper always does)
    freeze_vit_layernorms: bool = True  #: keep the CLIP-ViT layer norms frozen (False for the VQA fine-tuning)

    # --- Q-Former (LAVIS's BertLMHeadModel) ---
    qformer_weights: Optional[str] = "bert-base-uncased"  #: initial Q-Former weights from the hub; None = random
    qformer_hidden_size: int = published.BERT_BASE_UNCASED["hidden_size"]  #: Q-Former width
    qformer_num_layers: int = published.BERT_BASE_UNCASED["num_hidden_layers"]  #: Q-Former depth
    qformer_num_heads: int = published.BERT_BASE_UNCASED["num_attention_heads"]  #: Q-Former attention heads
    qformer_intermediate_size: int = published.BERT_BASE_UNCASED["intermediate_size"]  #: Q-Former FFN width
    qformer_max_positions: int = published.BERT_BASE_UNCASED["max_position_embeddings"]  #: text positions
    qformer_dropout: float = published.BERT_BASE_UNCASED["hidden_dropout_prob"]  #: hidden and attention dropout
    num_query_token: int = 32  #: learnable queries (32 in BLIP-2 and X-Former)
    cross_attention_freq: int = 2  #: a CLIP cross-attention every this many Q-Former layers
    embed_dim: int = 256  #: ITC projection width
    max_txt_len: int = 32  #: caption tokens fed to the Q-Former

    # --- speed ---
    sdpa_attention: bool = False  #: compute every attention (Q-Former, CLIP-ViT, MAE) with torch SDPA kernels

    # --- tokenizer ---
    tokenizer: str = "bert-base-uncased"  #: hub name, or a vocab.txt path (relative paths: lavis_xformer/assets)

    # --- checkpoint loading ---
    allow_partial_load: bool = False  #: let `pretrained`/`finetuned` lack trainable tensors (WARNING lists them)

    def __post_init__(self):
        _check_choice("vit_precision", self.vit_precision, ("fp16", "fp32"))
        _check_choice("frozen_precision", self.frozen_precision, PRECISIONS)
        if self.vit_precision == "fp32" and self.frozen_precision in ("bf16", "fp16"):
            raise ValueError(
                f"vit_precision='fp32' (never half precision) contradicts frozen_precision={self.frozen_precision!r}; "
                "set vit_precision: fp16 to let frozen_precision choose, or frozen_precision: auto"
            )

    @classmethod
    def from_lavis_cfg(cls, cfg) -> "BackboneConfig":
        """Build from a LAVIS ``model:`` config (dict or OmegaConf), refusing unknown or mistyped fields."""
        return _build(cls, cfg)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class XFormerConfig(BackboneConfig):
    """X-Former: the BLIP-2 backbone plus a frozen MAE-ViT and the trainable dual cross-attention block.

    The dual block's shape is not given by the paper; these defaults are this implementation's choice (README:
    "The dual cross-attention"): one layer at the Q-Former's width, each branch BERT-like (post-norm
    self-attention, cross-attention, FFN), MAE features projected 1280 -> 768 and back for the frozen decoder.
    """

    sdpa_attention: bool = True  #: SDPA kernels everywhere (equal to the reference attention to 1e-5)
    #: activation checkpointing of the Q-Former and dual-block layers: less training memory, a recomputed forward
    #: (models/activation_checkpointing.py; the CLIP-ViT's own switch is ``use_grad_checkpoint``)
    checkpoint_trainable_layers: bool = False

    # --- frozen MAE-ViT encoder and decoder (transformers' ViTMAEForPreTraining) ---
    use_mae: bool = True  #: False switches the MAE branch off: the model is then exactly BLIP-2
    mae_weights: Optional[str] = "facebook/vit-mae-huge"  #: hub checkpoint of the MAE; None = random
    mae_image_size: int = published.VIT_MAE_HUGE["image_size"]  #: MAE input size (images are resized to it)
    mae_patch_size: int = published.VIT_MAE_HUGE["patch_size"]  #: MAE patch size
    mae_hidden_size: int = published.VIT_MAE_HUGE["hidden_size"]  #: MAE encoder width (M's width)
    mae_num_layers: int = published.VIT_MAE_HUGE["num_hidden_layers"]  #: MAE encoder depth
    mae_num_heads: int = published.VIT_MAE_HUGE["num_attention_heads"]  #: MAE encoder heads
    mae_intermediate_size: int = published.VIT_MAE_HUGE["intermediate_size"]  #: MAE encoder FFN width
    mae_decoder_hidden_size: int = published.VIT_MAE_HUGE["decoder_hidden_size"]  #: MAE decoder width
    mae_decoder_num_layers: int = published.VIT_MAE_HUGE["decoder_num_hidden_layers"]  #: MAE decoder depth
    mae_decoder_num_heads: int = published.VIT_MAE_HUGE["decoder_num_attention_heads"]  #: MAE decoder heads
    mae_decoder_intermediate_size: int = published.VIT_MAE_HUGE["decoder_intermediate_size"]  #: decoder FFN
    mask_ratio: float = 0.5  #: fraction of MAE patches masked in training (the paper's 50%)
    eval_mask_ratio: float = 0.0  #: fraction masked when not training (MAE sees the whole image)
    norm_pix_loss: bool = False  #: MAE's per-patch normalised target (False matches the released HF decoders)

    # --- dual cross-attention block (trainable) ---
    dual_num_layers: int = 1  #: stacked dual cross-attention layers
    dual_num_heads: int = 12  #: heads of every attention in the dual block
    dual_intermediate_size: int = 3072  #: FFN width in both branches
    dual_mae_self_attention: bool = True  #: self-attention over MAE tokens before they attend to Z_q
    dual_query_self_attention: bool = True  #: self-attention over Z_q before it attends to M' (paper ablation)
    dual_dropout: float = 0.1  #: dropout on the residual branches (attention and FFN outputs)
    dual_attention_dropout: float = 0.0  #: dropout on attention probabilities (0 keeps SDPA's fused kernel; see README)
    #: "enriched_cache": ITG text sees Z' (this project's choice: the paper says only that Z' is optimised for ITG);
    #: "qformer_cache": BLIP-2's
    itg_conditioning: str = "enriched_cache"

    # --- the paper's baselines and ablations (models/variants.py): where M comes from, how it meets the queries ---
    mae_fusion: str = "dual"  #: "dual": the dual block; "concat" (Fig. 1b), "early_ca" (Fig. 1c): M inside the Q-Former
    mae_source: str = "mae"  #: "mae": the frozen MAE-ViT; "clip_layer": a CLIP-ViT block's output (no MAE built);
    #: "frozen_clip_vit" / "clip_vit": the frozen CLIP-ViT itself / a trainable copy of it on the visible patches of
    #: the masked image (supplement Table 6 "CLIP w Recon.", its two readings: models/clip_recon.py)
    clip_feature_layer: int = 26  #: mae_source="clip_layer": 1-based CLIP-ViT block whose output replaces M (Table 5)
    early_ca_feed_forward: bool = True  #: early_ca: each MAE cross-attention carries BertLayer's query and text FFNs

    # --- losses ---
    reconstruction_loss: bool = True  #: build the frozen MAE decoder and add the reconstruction loss
    #: train the MAE decoder (a choice for "CLIP w Recon." read with a frozen CLIP-ViT; X-Former's decoder is frozen)
    mae_decoder_trainable: bool = False
    itc_loss: str = "softmax"  #: stage 1's contrastive loss: "softmax" (BLIP-2's) or "sigmoid" (SigLIP, contrastive.py)
    loss_weight_itc: float = 1.0  #: weight of the image-text contrastive loss in the total
    loss_weight_itm: float = 1.0  #: weight of the image-text matching loss in the total
    loss_weight_itg: float = 1.0  #: weight of the image-grounded text generation loss in the total
    loss_weight_rec: float = 1.0  #: weight of the MAE reconstruction loss in the total

    def __post_init__(self):
        BackboneConfig.__post_init__(self)
        _check_choice("itg_conditioning", self.itg_conditioning, ("enriched_cache", "qformer_cache"))
        _check_choice("itc_loss", self.itc_loss, ("softmax", "sigmoid"))
        if not 0.0 <= self.mask_ratio < 1.0 or not 0.0 <= self.eval_mask_ratio < 1.0:
            raise ValueError(
                f"mask_ratio={self.mask_ratio} and eval_mask_ratio={self.eval_mask_ratio} must lie in [0, 1): "
                "at least one MAE patch has to stay visible"
            )
        for name in ("dual_dropout", "dual_attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1)")
        if self.qformer_hidden_size % self.dual_num_heads:
            raise ValueError(
                f"dual_num_heads={self.dual_num_heads} must divide qformer_hidden_size={self.qformer_hidden_size}"
            )
        if self.reconstruction_loss and self.mask_ratio == 0:
            raise ValueError("reconstruction_loss=True needs mask_ratio > 0: with no masked patch there is nothing to reconstruct")
        if self.reconstruction_loss and not self.use_mae:
            raise ValueError("reconstruction_loss=True needs use_mae=True (the loss reconstructs MAE patches)")
        _check_choice("mae_fusion", self.mae_fusion, ("dual", "concat", "early_ca"))
        _check_choice("mae_source", self.mae_source, ("mae", "clip_layer", "clip_vit", "frozen_clip_vit"))
        if self.mae_source == "clip_layer" and not 1 <= self.clip_feature_layer <= self.vit_depth:
            raise ValueError(
                f"clip_feature_layer={self.clip_feature_layer} must be a CLIP-ViT block: 1 to {self.vit_depth}"
            )
        if self.reconstruction_loss and (self.mae_fusion != "dual" or self.mae_source == "clip_layer"):
            raise ValueError(
                f"reconstruction_loss=True needs mae_fusion='dual' and mae_source='mae', 'clip_vit' or 'frozen_clip_vit' "
                f"(the MAE decoder reads the dual block's M' of a masked image); got mae_fusion={self.mae_fusion!r}, "
                f"mae_source={self.mae_source!r}"
            )
        if self.use_mae and self.mae_source in ("clip_vit", "frozen_clip_vit"):
            clip_grid, mae_grid = self.image_size // self.vit_patch_size, self.mae_image_size // self.mae_patch_size
            if self.image_size % self.vit_patch_size or clip_grid != mae_grid:
                raise ValueError(
                    f"mae_source={self.mae_source!r} masks the CLIP-ViT's patches and the MAE decoder reconstructs them: the "
                    f"patch grids must be the same, but image_size/vit_patch_size = {self.image_size}/"
                    f"{self.vit_patch_size} and mae_image_size/mae_patch_size = {self.mae_image_size}/{self.mae_patch_size}"
                )

    @property
    def mae_feature_width(self) -> int:
        """Width of M as the trainable modules receive it: the MAE encoder's, or the CLIP-ViT's for ``clip_layer``,
        ``clip_vit`` and ``frozen_clip_vit``."""
        return self.vit_embed_dim if self.mae_source in ("clip_layer", "clip_vit", "frozen_clip_vit") else self.mae_hidden_size


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


@functools.lru_cache(maxsize=None)
def _validator(annotation) -> TypeAdapter:
    return TypeAdapter(annotation)


def _build(cls, cfg):
    if cfg is None:
        cfg = {}
    if hasattr(cfg, "items") and not isinstance(cfg, dict):  # OmegaConf DictConfig
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    known = {f.name for f in fields(cls)}
    annotations = get_type_hints(cls)  # resolves postponed (string) annotations too
    values = {}
    unknown = []
    for key, value in dict(cfg).items():
        if key in LAVIS_LOADING_KEYS:
            continue
        if key in REPLACED_FIELDS and key not in known:
            raise ValueError(f"model config field {key!r} of {cls.__name__} was replaced: use {REPLACED_FIELDS[key]}")
        if key not in known:
            unknown.append(key)
            continue
        try:
            values[key] = _validator(annotations[key]).validate_python(value, strict=True)
        except ValidationError:
            raise ValueError(
                f"model config field {key!r} of {cls.__name__} has value {value!r} "
                f"({type(value).__name__}); expected {annotations[key]}"
            ) from None
    if unknown:
        raise ValueError(
            f"unknown model config field(s) {sorted(unknown)} for {cls.__name__}; "
            f"valid fields: {sorted(known)} (plus LAVIS's {sorted(LAVIS_LOADING_KEYS)})"
        )
    return cls(**values)
