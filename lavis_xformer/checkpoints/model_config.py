"""The model config a checkpoint carries, compared with the model it is loaded into.

A training checkpoint holds its run's ``config["model"]`` node (LAVIS saves the run config); an exported folder holds
the full typed config in ``config.json``. ``stored_model_config`` turns either into the full typed fields (the node
merged over its model type's yaml, as ``task.build_model`` does); ``check_model_config`` refuses a load whose stored
config differs from the target model's in any field that shapes the network or names its frozen weights, naming the
fields and how to build the checkpoint's own model instead. The fields in ``RUNTIME_FIELDS`` may differ (precision,
dropout, loss weights, prompts, ...): a choice, listed so that a new field is compared unless it is added here.
"""

import json
import os
from typing import List, Optional, Tuple

from lavis_xformer.checkpoints.names import PRETRAINED_CONFIG, CheckpointError

# Fields that do not change the network's parameters or frozen weights, or that a documented recipe step changes
# (VQA fine-tuning turns qformer_text_input on over a stage-2 checkpoint): checkpoint and model may differ in them.
RUNTIME_FIELDS = frozenset("""
    vit_precision frozen_precision frozen_cpu_precision llm_precision drop_path_rate use_grad_checkpoint
    qformer_dropout dual_dropout dual_attention_dropout sdpa_attention allow_partial_load
    checkpoint_trainable_layers mask_ratio eval_mask_ratio norm_pix_loss reconstruction_loss loss_weight_itc
    loss_weight_itm loss_weight_itg loss_weight_rec prompt vqa_prompt qformer_text_input qformer_text_init
    max_txt_len freeze_vit freeze_vit_layernorms freeze_xformer
""".split())
_IGNORED = frozenset({"arch", "model_type", "load_pretrained", "load_finetuned", "pretrained", "finetuned"})


def typed_fields(model) -> Optional[dict]:
    """The typed config fields of a plugin model (``None`` for other models)."""
    typed = getattr(model, "_build_cfg", None) or getattr(model, "config", None)
    return typed.to_dict() if hasattr(typed, "to_dict") else None


def read_pretrained_config(config_path) -> dict:
    """The fields of an exported folder's ``config.json``; a file that is not a JSON object is a ``CheckpointError``
    naming it (it was a bare ``JSONDecodeError``)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            fields = json.load(f)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{config_path} is not valid JSON ({err}); re-export the folder with "
                              "`python -m lavis_xformer.checkpoints export CHECKPOINT FOLDER`") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{config_path} holds a {type(fields).__name__}, not a JSON object of model fields")
    return fields


def stored_model_config(checkpoint: dict, path: str = "") -> Optional[dict]:
    """The full typed fields of the model a checkpoint was written from, or ``None`` when it carries no model config
    (a bare state dict, or a LAVIS architecture without a typed config)."""
    folder_config = os.path.join(path, PRETRAINED_CONFIG) if path and os.path.isdir(path) else None
    if folder_config and os.path.isfile(folder_config):
        return read_pretrained_config(folder_config)
    node = ((checkpoint or {}).get("config", None) or {}).get("model", None) if isinstance(checkpoint, dict) else None
    if not node or not node.get("arch"):
        return None
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cls = registry.get_model_class(str(node["arch"]))
    config_class = getattr(cls, "config_class", None)
    if config_class is None or not hasattr(config_class, "from_lavis_cfg"):
        return None
    merged = OmegaConf.create(dict(node))
    if merged.get("model_type", None) is not None:
        merged = OmegaConf.merge(OmegaConf.load(cls.default_config_path(merged.model_type)).model, merged)
    try:
        fields = config_class.from_lavis_cfg(merged).to_dict()
    except Exception:  # an old or foreign config: nothing reliable to compare
        return None
    return {"arch": node["arch"], "model_type": node.get("model_type"), **fields}


def config_differences(stored: dict, model_fields: dict) -> List[Tuple[str, object, object]]:
    """(field, checkpoint's value, model's value) of every compared field both configs have and that differs."""
    return [(key, stored[key], model_fields[key]) for key in sorted(set(stored) & set(model_fields))
            if key not in RUNTIME_FIELDS | _IGNORED and stored[key] != model_fields[key]]


def check_model_config(checkpoint: dict, model, source: str) -> None:
    """Refuse to load ``checkpoint`` into ``model`` when their configs differ in an architectural or frozen field
    (``CheckpointError`` naming each field with both values and the fix)."""
    model_fields = typed_fields(model)
    stored = stored_model_config(checkpoint, source) if model_fields is not None else None
    if stored is None:
        return
    differences = config_differences(stored, model_fields)
    if not differences:
        return
    listed = "; ".join(f"{key}: checkpoint {a!r} vs model {b!r}" for key, a, b in differences)
    options = " ".join(f"model.{key}={a}" for key, a, _ in differences)
    folder = os.path.isdir(source)
    how = (f"build the checkpoint's own model with lavis_xformer.checkpoints.from_pretrained({source!r})" if folder else
           f"build the checkpoint's model: --options {options} (or export it and use lavis_xformer.checkpoints.from_pretrained)")
    raise CheckpointError(f"checkpoint {source!r} was written by a different {type(model).__name__} config "
                          f"({len(differences)} architectural/frozen field(s) differ: {listed}); {how}")
