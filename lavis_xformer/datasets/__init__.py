"""The plugin's datasets; importing this module registers the shapes builders with LAVIS."""

from lavis_xformer.datasets.builders import ShapesCaptionBuilder, ShapesRetrievalBuilder, ShapesVQABuilder

__all__ = ["ShapesCaptionBuilder", "ShapesRetrievalBuilder", "ShapesVQABuilder"]
