"""lavis-xformer: X-Former (arXiv 2407.13851) as a plugin for Salesforce LAVIS.

``import lavis_xformer`` registers the plugin's models, processors, tasks, runners and dataset builders into
``lavis.common.registry``; LAVIS's ``load_model``, ``load_model_and_preprocess`` and runners then find them. It
also applies the few LAVIS 1.0.2 patches that have no extension point (``lavis_xformer.compat``) and moves LAVIS's
``cache_root`` off its shipped ``/export/home`` default (``lavis_xformer.paths.apply_cache_root``).
"""

from lavis_xformer import quiet

quiet.filter_third_party_warnings()  # before LAVIS's imports emit them (fairscale, torch.jit)

import lavis  # noqa: F401,E402  (LAVIS registers its own classes first)

from lavis_xformer import compat
from lavis_xformer import paths
from lavis_xformer import processors  # noqa: F401
from lavis_xformer import models  # noqa: F401
from lavis_xformer import tasks  # noqa: F401
from lavis_xformer import tasks_fewshot  # noqa: F401
from lavis_xformer import runners  # noqa: F401
from lavis_xformer.runners import schedulers  # noqa: F401  (linear_warmup_cosine_iter_lr)
from lavis_xformer import datasets  # noqa: F401

compat.apply()
paths.apply_cache_root()  # never LAVIS's /export/home default: $LAVIS_CACHE_ROOT or ~/.cache/lavis


def _model_zoo():
    """Every registered architecture and its model types, the plugin's included. LAVIS's ``lavis.models.model_zoo``
    is a snapshot taken when LAVIS was imported; its table is refreshed too."""
    import lavis.models

    zoo = lavis.models.ModelZoo()
    lavis.models.model_zoo.model_zoo = dict(zoo.model_zoo)
    return zoo


model_zoo = _model_zoo()

__version__ = "0.1.0"
