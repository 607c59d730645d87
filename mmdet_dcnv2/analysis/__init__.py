"""Spatial-support analysis of a detector's nodes (DCNv2 paper, Sec. 2.1 and Figs. 1-2).

For a node -- a unit of the last c5 layer at an image position, or the classification / box-regression
node of an RoI -- three views:

- :func:`effective_receptive_field` -- the gradient of the node's response w.r.t. every image pixel;
- :func:`effective_sampling_locations` -- where the sampling layers below the node (the c5 3x3
  convolutions, deformable or regular; the box head's RoI layer and its bins) actually sample, each
  point weighted by the node's gradient w.r.t. the value sampled there;
- :func:`saliency_region` -- the smallest image region that keeps the node's response within a
  relative error of its full-image response, by progressively masking the image.

``python -P -m mmdet_dcnv2.tools.spatial_support CONFIG CHECKPOINT IMAGE`` draws them.
"""

from .model import LoadedImage, detect, load_detector, load_image, normalise
from .nodes import NODE_KINDS, ConvNode, RoINode, parse_spec, resolve_nodes
from .receptive_field import ReceptiveField, effective_receptive_field
from .record import analyse_node
from .saliency import SaliencyRegion, saliency_region
from .sampling_locations import LayerSamples, effective_sampling_locations

__all__ = [
    "LoadedImage",
    "detect",
    "load_detector",
    "load_image",
    "normalise",
    "NODE_KINDS",
    "ConvNode",
    "RoINode",
    "parse_spec",
    "resolve_nodes",
    "ReceptiveField",
    "effective_receptive_field",
    "analyse_node",
    "SaliencyRegion",
    "saliency_region",
    "LayerSamples",
    "effective_sampling_locations",
]
