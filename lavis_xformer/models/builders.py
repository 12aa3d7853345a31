"""Builders for the tokenizer, CLIP-ViT, Q-Former and MAE: from the hub, or from configs with random weights.

LAVIS's ``Blip2Base`` downloads inside ``init_tokenizer``, ``init_Qformer`` and ``init_vision_encoder``.
``ConfigBuildersMixin`` overrides those three so that a model reads its sizes from its typed config: the paper
types still load the real hub weights (LAVIS's own ``create_eva_vit_g``, ``BertLMHeadModel.from_pretrained``,
``ViTMAEForPreTraining.from_pretrained``), while ``tiny`` types, and any build inside ``no_hub()``, construct the
same classes from config with random weights and reach no network.
"""

import contextlib
import functools
import logging
import os
import tempfile
import zlib
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from lavis.models.blip2_models.blip2 import LayerNorm, disabled_train
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
from lavis.models.eva_vit import VisionTransformer, create_eva_vit_g
from transformers import BertTokenizer, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

from lavis_xformer.checkpoints import CheckpointError, load_model_weights
from lavis_xformer.common.hub import hub_allowed, no_hub  # noqa: F401  (no_hub: re-exported for the builders' users)
from lavis_xformer.models import published
from lavis_xformer.models.precision import frozen_half_dtype, run_in_half_precision

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

@contextlib.contextmanager
def standin_weights(name: str):
    """Random weights that stand in for a hub checkpoint (the ``tiny`` types' frozen CLIP-ViT, MAE and LLM) are a
    function of the config alone: drawn from a generator seeded by ``name``, leaving the global RNG as it was.

    Checkpoints hold trainable weights only (LAVIS's rule), so a stage-1 checkpoint loaded into stage 2, or a
    checkpoint loaded for evaluation, must meet the same frozen encoders it was trained with, whatever the build
    order and the run's seed, as it would with hub weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(name.encode()))
        yield


def resolve_asset(name_or_path: str) -> Path:
    """A path as given, or relative to the package's ``assets`` folder."""
    path = Path(name_or_path)
    return path if path.is_absolute() else ASSETS_DIR / path


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a module and pin it in eval mode (dropout off, no train() toggling by the runner)."""
    for param in module.parameters():
        param.requires_grad = False
    module.eval()
    module.train = functools.partial(disabled_train, module)
    return module


def unfreeze_layernorms(module: nn.Module) -> nn.Module:
    """Make a frozen module's layer norms trainable again (``freeze_vit_layernorms: False``: the supplement's VQA
    and caption fine-tuning train the CLIP-ViT's layer norms only). The module stays in eval mode."""
    for submodule in module.modules():
        if isinstance(submodule, nn.LayerNorm):
            submodule.requires_grad_(True)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
def _size_only_tokenizer(vocab_size: int, truncation_side: str) -> BertTokenizer:
    """A tokenizer with the size of bert-base-uncased's vocabulary and its special tokens at the usual ids. Its
    vocab.txt lives in a temporary folder only while the tokenizer reads it (it keeps the vocabulary in memory)."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"tok{i}" for i in range(vocab_size - len(tokens))]
    with tempfile.TemporaryDirectory(suffix="-vocab") as folder:
        vocab = Path(folder) / "vocab.txt"
        vocab.write_text("\n".join(tokens) + "\n")
        return BertTokenizer(vocab_file=str(vocab), do_lower_case=True, truncation_side=truncation_side)


def build_bert_tokenizer(name_or_vocab: str, truncation_side: str = "right") -> BertTokenizer:
    """BERT tokenizer with BLIP-2's [DEC] bos token: a local vocab file, the hub, or a size-only stand-in."""
    local = resolve_asset(name_or_vocab)
    if local.is_file():
        tokenizer = BertTokenizer(vocab_file=str(local), do_lower_case=True, truncation_side=truncation_side)
    elif hub_allowed():
        tokenizer = BertTokenizer.from_pretrained(name_or_vocab, truncation_side=truncation_side)
    else:
        # Only the vocabulary size matters for an architecture built without weights.
        tokenizer = _size_only_tokenizer(published.BERT_BASE_UNCASED_VOCAB_SIZE, truncation_side)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# CLIP-ViT
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _linspace_on_cpu():
    """LAVIS's EVA ViT computes its drop-path schedule with ``torch.linspace(...)[i].item()`` (eva_vit.py:276),
    which fails when the default device is ``meta``; keep that one small schedule tensor on the CPU."""
    original = torch.linspace

    def linspace(*args, **kwargs):
        kwargs.setdefault("device", "cpu")
        return original(*args, **kwargs)

    torch.linspace = linspace
    try:
        yield
    finally:
        torch.linspace = original


def build_clip_vit(cfg) -> nn.Module:
    """LAVIS's EVA ViT: ``create_eva_vit_g`` with its weights, or the same class from the config's sizes (random,
    or a local state dict: ``vit_weights: <file>.pth``).

    A frozen ViT runs in the precision ``frozen_precision`` resolves to on this device (``precision.frozen_half_dtype``:
    bf16 where native, fp16 on a GPU without bf16, else fp32); a trainable one stays fp32.
    """
    half = frozen_half_dtype(cfg) if cfg.freeze_vit else None
    if cfg.vit_weights == "eva_clip_g" and hub_allowed():
        # fp32 here: LAVIS's own fp16 cast would also run on a CPU, where fp16 has no kernels worth the name.
        vit = create_eva_vit_g(cfg.image_size, cfg.drop_path_rate, cfg.use_grad_checkpoint, "fp32")
        return run_in_half_precision(vit, half)
    weights_file = None if cfg.vit_weights in (None, "eva_clip_g") else Path(cfg.vit_weights).expanduser()
    if weights_file is not None and not weights_file.is_file():
        raise ValueError(f"vit_weights={cfg.vit_weights!r} is neither 'eva_clip_g', null (random) nor an existing "
                         "file; pass the path of a CLIP-ViT state dict saved with torch.save(vit.state_dict(), path)")
    on_meta = torch.get_default_device().type == "meta"
    with _linspace_on_cpu() if on_meta else contextlib.nullcontext(), standin_weights("clip_vit"):
        vit = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.vit_patch_size,
            use_mean_pooling=False,
            embed_dim=cfg.vit_embed_dim,
            depth=cfg.vit_depth,
            num_heads=cfg.vit_num_heads,
            mlp_ratio=cfg.vit_mlp_ratio,
            qkv_bias=True,
            drop_path_rate=cfg.drop_path_rate,
            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
            use_checkpoint=cfg.use_grad_checkpoint,
        )
    if weights_file is not None and not on_meta:
        load_clip_vit_weights(vit, weights_file)
    return run_in_half_precision(vit, half)


def load_clip_vit_weights(vit: nn.Module, path: Path) -> None:
    """A local CLIP-ViT state dict (``vit_weights: <file>.pth``) into the ViT built from the config's sizes: every
    tensor present with the config's shape, or a ValueError that names the differences."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = vit.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [f"{k} {tuple(state[k].shape)} (config: {tuple(v.shape)})"
                for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"vit_weights={str(path)!r} does not fit the CLIP-ViT of this config (vit_embed_dim, vit_depth, "
            f"vit_patch_size, image_size, ...): missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"other shapes {reshaped[:5]}; set the model's vit_* sizes to those the file was trained with"
        )
    vit.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Q-Former
# ----------------------------------------------------------------------------------------------------------------
def qformer_bert_config(cfg, vision_width: int, vocab_size: int) -> BertConfig:
    bert = dict(published.BERT_BASE_UNCASED)
    bert.update(
        vocab_size=vocab_size,
        hidden_size=cfg.qformer_hidden_size,
        num_hidden_layers=cfg.qformer_num_layers,
        num_attention_heads=cfg.qformer_num_heads,
        intermediate_size=cfg.qformer_intermediate_size,
        max_position_embeddings=cfg.qformer_max_positions,
        hidden_dropout_prob=cfg.qformer_dropout,
        attention_probs_dropout_prob=cfg.qformer_dropout,
    )
    config = BertConfig(**bert)
    config.encoder_width = vision_width
    config.add_cross_attention = True  # every `cross_attention_freq`-th layer gets a CLIP cross-attention
    config.cross_attention_freq = cfg.cross_attention_freq
    config.query_length = cfg.num_query_token
    return config


def build_qformer(cfg, vision_width: int, lm_head_class=BertLMHeadModel):
    """LAVIS's ``BertLMHeadModel`` Q-Former and its query tokens, as ``Blip2Base.init_Qformer`` makes them.

    ``lm_head_class``: a subclass of it (same modules and weights) where a model decodes differently.
    """
    config = qformer_bert_config(cfg, vision_width, published.BERT_BASE_UNCASED_VOCAB_SIZE)
    if cfg.qformer_weights and hub_allowed():
        qformer = lm_head_class.from_pretrained(cfg.qformer_weights, config=config)
    else:
        qformer = lm_head_class(config)
    query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_token, config.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
    return qformer, query_tokens


# ----------------------------------------------------------------------------------------------------------------
# MAE-ViT encoder + decoder
# ----------------------------------------------------------------------------------------------------------------
def mae_config(cfg) -> ViTMAEConfig:
    mae = dict(published.VIT_MAE_HUGE)
    mae.update(
        image_size=cfg.mae_image_size,
        patch_size=cfg.mae_patch_size,
        hidden_size=cfg.mae_hidden_size,
        num_hidden_layers=cfg.mae_num_layers,
        num_attention_heads=cfg.mae_num_heads,
        intermediate_size=cfg.mae_intermediate_size,
        decoder_hidden_size=cfg.mae_decoder_hidden_size,
        decoder_num_hidden_layers=cfg.mae_decoder_num_layers,
        decoder_num_attention_heads=cfg.mae_decoder_num_heads,
        decoder_intermediate_size=cfg.mae_decoder_intermediate_size,
        norm_pix_loss=cfg.norm_pix_loss,
        mask_ratio=cfg.mask_ratio,
    )
    return ViTMAEConfig(**mae)


def build_mae(cfg) -> ViTMAEForPreTraining:
    """transformers' ``ViTMAEForPreTraining`` (encoder + decoder): hub weights or random from the config."""
    config = mae_config(cfg)
    if cfg.mae_weights and hub_allowed():
        mae = ViTMAEForPreTraining.from_pretrained(
            cfg.mae_weights, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss
        )
        _check_mae_checkpoint(cfg, mae.config, config)
        return mae
    with standin_weights("mae_decoder"):
        mae = ViTMAEForPreTraining(config)
    mae.vit = standin_mae_encoder(config)  # the same frozen encoder whether a decoder is built or not
    return mae


def build_mae_encoder(cfg) -> ViTMAEModel:
    """transformers' ``ViTMAEModel`` (the encoder ``ViTMAEForPreTraining.vit`` is) without the decoder.

    Used when the reconstruction loss is off: the decoder is then never built, nor its weights loaded.
    """
    config = mae_config(cfg)
    if not (cfg.mae_weights and hub_allowed()):
        return standin_mae_encoder(config)  # the very encoder build_mae makes: stage 1 and stage 2 share it
    encoder = ViTMAEModel.from_pretrained(cfg.mae_weights, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss)
    _check_mae_checkpoint(cfg, encoder.config, config)
    return encoder


def _check_mae_checkpoint(cfg, loaded: ViTMAEConfig, expected: ViTMAEConfig):
    for name in ("hidden_size", "patch_size", "image_size"):
        if getattr(loaded, name) != getattr(expected, name):
            raise ValueError(
                f"MAE checkpoint {cfg.mae_weights!r} has {name}={getattr(loaded, name)} but the model "
                f"config says {getattr(expected, name)}; set mae_{name} to match the checkpoint"
            )


def standin_mae_encoder(config: ViTMAEConfig) -> ViTMAEModel:
    """The random MAE encoder of a config without hub weights (see ``standin_weights``)."""
    with standin_weights("mae_encoder"):
        return ViTMAEModel(config)


class ConfigBuildersMixin:
    """Overrides ``Blip2Base``'s hub-bound builders with config-driven ones (see module docstring).

    The model's typed config must be attached as ``self._build_cfg`` before ``Blip2Base.__init__`` runs them:
    ``attach_build_config`` does that.
    """

    config_class = None  # the typed config dataclass of the model

    def attach_build_config(self, cfg):
        # nn.Module.__init__ has not run yet, so bypass its __setattr__.
        object.__setattr__(self, "_build_cfg", cfg)

    @classmethod
    def from_config(cls, cfg):
        """LAVIS's entry point: typed config from the yaml ``model:`` node, build, then load checkpoints."""
        model = cls(cls.config_class.from_lavis_cfg(cfg))
        model.load_checkpoint_from_config(cfg)
        return model

    def init_tokenizer(self, truncation_side="right"):
        return build_bert_tokenizer(self._build_cfg.tokenizer, truncation_side)

    def init_vision_encoder(self, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        visual_encoder = build_clip_vit(self._build_cfg)
        ln_vision = LayerNorm(visual_encoder.num_features)
        return visual_encoder, ln_vision

    def init_frozen_clip(self, config):
        """(CLIP-ViT, its layer norm) as LAVIS's BLIP-2 LLM classes build them, frozen when ``freeze_vit``; with
        ``freeze_vit_layernorms: False`` (fine-tuning, supplement section 2) the ViT's layer norms train."""
        visual_encoder, ln_vision = self.init_vision_encoder(
            "eva_clip_g", config.image_size, config.drop_path_rate, config.use_grad_checkpoint, config.vit_precision
        )
        if config.freeze_vit:
            freeze(visual_encoder)
            if not config.freeze_vit_layernorms:
                unfreeze_layernorms(visual_encoder)
        return visual_encoder, ln_vision

    def init_Qformer(self, num_query_token, vision_width, cross_attention_freq=2):
        return build_qformer(self._build_cfg, vision_width)

    # LAVIS's loader ignores `load_pretrained: False`, unpickles arbitrary objects and accepts a file that matches
    # nothing; this one honours the flag, reads weights only, and refuses a file that lacks trainable tensors. A path
    # that cannot be satisfied (a placeholder such as <job_id>, a missing file) is an error; a paper-scale model left
    # without trained weights says so.
    def load_checkpoint_from_config(self, cfg, **kwargs):
        if cfg.get("load_finetuned", False):
            path = cfg.get("finetuned")
            if not path:
                raise ValueError("load_finetuned is True but the model config has no `finetuned:` path")
            return self.load_checkpoint(_satisfiable("finetuned", path))
        if cfg.get("load_pretrained", True) and cfg.get("pretrained"):
            return self.load_from_pretrained(_satisfiable("pretrained", cfg.get("pretrained")))
        untrained = published.untrained_weights_notice(type(self).__name__, self._build_cfg)
        if untrained:
            logging.warning(untrained)
        else:
            logging.info("%s: no pretrained checkpoint loaded (load_pretrained false or no path)", type(self).__name__)
        return None

    def load_from_pretrained(self, url_or_filename, allow_partial_load: Optional[bool] = None):
        """The weights a stage starts from (``pretrained``: the previous stage's checkpoint). Its extra tensors (the
        previous stage's heads) are ignored; it must supply every trainable tensor of this stage that exists, trained,
        in the source stage: all but the image encoder's (frozen in both pretraining stages, loaded from its own
        weights) and the LLM projection when the file has none of it (a stage-1 checkpoint: the projection is new in
        stage 2). ``allow_partial_load`` (default: the config's) turns a refusal into a WARNING."""
        return load_model_weights(self, url_or_filename, strict_unexpected=False,
                                  required=self._required_from_previous_stage,
                                  allow_partial=self._allow_partial_load(allow_partial_load))

    def _required_from_previous_stage(self, state_dict) -> set:
        """The trainable tensors a ``pretrained`` file must supply (see ``load_from_pretrained``)."""
        not_required = ("visual_encoder.",)  # frozen in the source stage: loaded from its own weights
        projection = getattr(self, "llm_projection", None)  # LLMHead's, on stage-2 models
        if projection and not any(key.startswith(projection + ".") for key in state_dict):
            not_required += (projection + ".",)  # new in stage 2
        return {name for name, param in self.named_parameters()
                if param.requires_grad and not name.startswith(not_required)}

    def load_checkpoint(self, url_or_filename, allow_partial_load: Optional[bool] = None):
        """The weights of this very model (``finetuned``, evaluation): every trainable tensor, and nothing else
        (``allow_partial_load``, default: the config's, turns missing ones into a WARNING)."""
        return load_model_weights(
            self, url_or_filename, strict_unexpected=True,
            required=lambda _: {name for name, param in self.named_parameters() if param.requires_grad},
            allow_partial=self._allow_partial_load(allow_partial_load),
        )

    def _allow_partial_load(self, override: Optional[bool]) -> bool:
        return self._build_cfg.allow_partial_load if override is None else bool(override)


def _satisfiable(key: str, path) -> str:
    """``path`` unless it is a placeholder (``<job_id>``) or a local file or exported folder (``checkpoints export``)
    that does not exist: then a
    ``CheckpointError`` naming the key (URLs are left to the downloader)."""
    from lavis_xformer.paths import PLACEHOLDER

    path = str(path)
    if PLACEHOLDER.search(path):
        raise CheckpointError(f"model.{key}={path} is a placeholder: set it to a checkpoint file "
                              f"(--options model.{key}=PATH; python -m lavis_xformer.check names the run that "
                              "writes it)")
    if not path.startswith(("http://", "https://")) and not os.path.exists(os.path.expanduser(path)):
        raise CheckpointError(f"model.{key}={path}: no such checkpoint file or exported folder (load_{key}: True "
                              f"needs one; "
                              f"set load_{key}: False to build without it)")
    return os.path.expanduser(path)


def blip2_init_kwargs(cfg) -> dict:
    """The arguments LAVIS's BLIP-2 constructors take, from a typed config."""
    return dict(
        vit_model="eva_clip_g",
        img_size=cfg.image_size,
        drop_path_rate=cfg.drop_path_rate,
        use_grad_checkpoint=cfg.use_grad_checkpoint,
        vit_precision=cfg.vit_precision,
        freeze_vit=cfg.freeze_vit,
        num_query_token=cfg.num_query_token,
        cross_attention_freq=cfg.cross_attention_freq,
        embed_dim=cfg.embed_dim,
        max_txt_len=cfg.max_txt_len,
    )
