"""The plugin's model classes; importing this module registers them with LAVIS."""

from lavis_xformer.models.blip2_baseline import Blip2Baseline
from lavis_xformer.models.blip2_baseline_llm import Blip2BaselineOPT, Blip2BaselineT5
from lavis_xformer.models.xformer import XFormer
from lavis_xformer.models.xformer_llm import XFormerOPT, XFormerT5
from lavis_xformer.models.connector_llm import (
    PerceiverDualOPT,
    PerceiverDualT5,
    PerceiverOPT,
    PerceiverT5,
    ProjectorOPT,
    ProjectorT5,
)

__all__ = ["Blip2Baseline", "Blip2BaselineOPT", "Blip2BaselineT5", "XFormer", "XFormerOPT", "XFormerT5",
    "PerceiverOPT", "PerceiverT5", "ProjectorOPT", "ProjectorT5", "PerceiverDualOPT", "PerceiverDualT5",
]
