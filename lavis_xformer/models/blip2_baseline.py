"""BLIP-2 as the paper's baseline: LAVIS's own ``Blip2Qformer``, unchanged, built from a typed config.

Only the builders differ (``ConfigBuildersMixin``): ``tiny`` builds offline with random weights, ``pretrain`` loads
the same hub weights LAVIS does. Its forward is LAVIS's and needs a process group, as LAVIS's does (the plugin's
runner always has one, gloo on CPU).
"""

from typing import Optional

from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

from lavis_xformer.models.builders import ConfigBuildersMixin, blip2_init_kwargs, unfreeze_layernorms
from lavis_xformer.models.config import BackboneConfig
from lavis_xformer.models.sdpa import use_sdpa_attention
from lavis_xformer.paths import model_config_path


@registry.register_model("blip2_baseline")
class Blip2Baseline(ConfigBuildersMixin, Blip2Qformer):
    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain": model_config_path("blip2_baseline/blip2_pretrain.yaml"),
        "tiny": model_config_path("blip2_baseline/blip2_tiny.yaml"),
    }
    config_class = BackboneConfig

    def __init__(self, config: Optional[BackboneConfig] = None):
        config = config or BackboneConfig()
        self.attach_build_config(config)
        super().__init__(**blip2_init_kwargs(config))
        self.config = config
        if config.freeze_vit and not config.freeze_vit_layernorms:  # LAVIS's constructor has no such switch
            unfreeze_layernorms(self.visual_encoder)
        if config.sdpa_attention:  # off by default: the baseline is LAVIS's code as shipped
            use_sdpa_attention(self)
