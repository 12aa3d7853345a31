"""lavis-xformer: X-Former (arXiv 2407.13851) as a plugin for Salesforce LAVIS.

``import lavis_xformer`` registers the plugin's models, processors, tasks, runners and dataset builders into
``lavis.common.registry``; LAVIS's ``load_model``, ``load_model_and_preprocess`` and runners then find them.
"""

import lavis  # noqa: F401  (LAVIS registers its own classes first)

from lavis_xformer import processors  # noqa: F401
from lavis_xformer import models  # noqa: F401

__version__ = "0.1.0"
