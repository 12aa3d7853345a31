"""Models on the ``meta`` device, and their parameter counts.

A model built on ``meta`` inside ``no_hub()`` has its full size and no storage: no weights are read, nothing is
downloaded, and a paper-scale model with a 6.7B-parameter LLM builds in about a second. That is how the plugin
counts parameters (``analysis.params``, ``analysis.bench``, the demo's table) and how it finds a checkpoint's
trainable weights (``checkpoints``).
"""

import contextlib
from typing import NamedTuple

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from lavis_xformer.common.hub import no_hub


@contextlib.contextmanager
def on_meta():
    """Everything built inside is on the ``meta`` device and from configs (``no_hub``): sizes only."""
    with torch.device("meta"), no_hub():
        yield


def build_without_checkpoints(arch: str, model_type=None, **overrides) -> nn.Module:
    """The registered ``arch`` as LAVIS would build it from a ``model:`` section: the yaml of ``model_type`` (when
    given) with ``overrides`` on top, built by the class's ``from_config`` with ``load_pretrained`` and
    ``load_finetuned`` off, so no checkpoint is read. Built on the current default device."""
    from lavis.common.registry import registry

    # (importing this module ran lavis_xformer/__init__, which registers the plugin's models)
    cls = registry.get_model_class(str(arch))
    if cls is None:
        raise ValueError(f"model architecture {arch!r} is not registered; known: {sorted(registry.list_models())}")
    cfg = OmegaConf.create({"arch": arch})
    if model_type is not None:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(cls.default_config_path(model_type)).model)
        cfg.model_type = model_type
    cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(overrides)), {"load_pretrained": False, "load_finetuned": False})
    return cls.from_config(cfg)


def build_on_meta(arch: str, model_type=None, **overrides) -> nn.Module:
    """``build_without_checkpoints`` on the ``meta`` device without the hub: full size, no memory, no weights."""
    with on_meta():
        return build_without_checkpoints(arch, model_type, **overrides)


class ParameterCount(NamedTuple):
    """``numel`` summed over a model's parameters with (trainable) and without (frozen) ``requires_grad``; tied
    parameters count once."""

    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def count_parameters(model: nn.Module) -> ParameterCount:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return ParameterCount(trainable, frozen)
