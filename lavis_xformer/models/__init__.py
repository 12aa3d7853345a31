"""The plugin's model classes; importing this module registers them with LAVIS."""

from lavis_xformer.models.blip2_baseline import Blip2Baseline
from lavis_xformer.models.xformer import XFormer

__all__ = ["Blip2Baseline", "XFormer"]
