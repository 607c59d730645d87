"""Embedded datasets: generated deterministically by the package, nothing downloaded.

``shapes``: glyph-like shapes under rotation, scale, shear, elastic warps, occlusion and clutter,
in COCO format (``python -m mmdet_dcnv2.datasets.shapes --out data/shapes``).
"""

from .shapes import CLASSES, generate, is_generated

__all__ = ["CLASSES", "generate", "is_generated"]
