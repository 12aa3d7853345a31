"""The plugin's datasets; importing this module registers their builders with LAVIS: the shapes data
(``shapes``, ``builders``) and the fine-grained OC / MCI benchmark (``finegrained``). ``robust`` wraps any
LAVIS dataset so that a long run survives bad samples."""

from lavis_xformer.datasets import finegrained  # noqa: F401  (the OC/MCI builders)
from lavis_xformer.datasets.builders import ShapesCaptionBuilder, ShapesRetrievalBuilder, ShapesVQABuilder

__all__ = ["ShapesCaptionBuilder", "ShapesRetrievalBuilder", "ShapesVQABuilder"]
