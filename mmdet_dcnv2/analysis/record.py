"""All three views of one node, as one dict of numpy arrays: what the command saves to ``<node>.npz``
and what ``drawing`` draws from (so pictures can be redrawn, or compared, from the files alone)."""

import time
from typing import Dict, Optional

import numpy as np
from torch import nn

from .model import LoadedImage
from .nodes import Node
from .receptive_field import effective_receptive_field
from .saliency import saliency_region
from .sampling_locations import effective_sampling_locations


def analyse_node(
    model: nn.Module,
    image: LoadedImage,
    node: Node,
    max_error: float = 0.1,
    cell: int = 4,
    batch_size: int = 16,
    progress: Optional[object] = None,
) -> Dict[str, np.ndarray]:
    record: Dict[str, np.ndarray] = {
        "image": image.rgb().numpy(),
        "image_path": np.array(image.path),
        "scale_factor": np.array(image.scale_factor),
        "mean_rgb": _mean_rgb(model),
        "node_name": np.array(node.name),
        "node_kind": np.array(node.kind),
        "node_label": np.array(node.label),
    }
    if node.kind == "conv":
        channel = -1 if node.channel is None else node.channel  # -1: the sum over channels
        record.update(
            node_xy=np.array([node.x, node.y]),
            node_feature_rowcol=np.array([node.row, node.col]),
            node_stride=np.array(node.stride),
            node_channel=np.array(channel),
        )
    else:
        record.update(node_box=np.array(node.box), node_class=np.array(node.class_index))

    start = time.perf_counter()
    field = effective_receptive_field(model, image, node)
    record.update(
        response=_np(field.response),
        erf_gradient=_np(field.gradient),
        erf_heat=_np(field.heat),
        erf_seconds=np.array(time.perf_counter() - start),
    )

    start = time.perf_counter()
    layers = effective_sampling_locations(model, image, node)
    record.update(
        sampling_names=np.array([layer.name for layer in layers]),
        sampling_types=np.array([layer.layer_type for layer in layers]),
        sampling_seconds=np.array(time.perf_counter() - start),
    )
    for i, layer in enumerate(layers):
        record.update(
            {
                f"sampling_{i}_points": _np(layer.points),
                f"sampling_{i}_strength": _np(layer.strength),
                f"sampling_{i}_location_strength": _np(layer.location_strength),
                f"sampling_{i}_feature_points": _np(layer.feature_points),
                f"sampling_{i}_grid_shape": np.array(layer.grid_shape),
                f"sampling_{i}_input_stride": np.array(layer.input_stride),
            }
        )

    start = time.perf_counter()
    region = saliency_region(model, image, node, field.heat, max_error, cell, batch_size, progress)
    record.update(
        saliency_keep=region.keep.numpy(),
        saliency_error=np.array(region.error),
        saliency_max_error=np.array(region.max_error),
        saliency_cells_kept=np.array(region.cells_kept),
        saliency_num_cells=np.array(region.num_cells),
        saliency_cell=np.array(region.cell),
        saliency_area_fraction=np.array(region.area_fraction),
        saliency_probes=np.array(region.probes, dtype=np.float64).reshape(-1, 2),
        saliency_masked_images=np.array(region.masked_images),
        saliency_forward_passes=np.array(region.forward_passes),
        saliency_region_response=_np(region.region_response),
        saliency_seconds=np.array(time.perf_counter() - start),
    )
    return record


def summary(record: Dict[str, np.ndarray]) -> Dict:
    """The JSON-friendly headline numbers of a record."""
    return {
        "node": str(record["node_name"]),
        "label": str(record["node_label"]),
        "response": record["response"].tolist(),
        "sampling_layers": [f"{n} ({t})" for n, t in zip(record["sampling_names"], record["sampling_types"])],
        "saliency": {
            "area_fraction": round(float(record["saliency_area_fraction"]), 4),
            "error": float(record["saliency_error"]),
            "max_error": float(record["saliency_max_error"]),
            "cells_kept": int(record["saliency_cells_kept"]),
            "num_cells": int(record["saliency_num_cells"]),
            "masked_images": int(record["saliency_masked_images"]),
            "forward_passes": int(record["saliency_forward_passes"]),
        },
        "seconds": {view: round(float(record[f"{view}_seconds"]), 3) for view in ("erf", "sampling", "saliency")},
    }


def _mean_rgb(model: nn.Module) -> np.ndarray:
    """The colour masked pixels get (the preprocessor's mean), RGB, for drawing the saliency view."""
    pre = model.data_preprocessor
    mean = pre.mean.flatten().cpu().numpy() if getattr(pre, "_enable_normalize", False) else np.zeros(3)
    rgb = mean if getattr(pre, "_channel_conversion", False) else mean[::-1]  # mean is in the model's order
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _np(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
