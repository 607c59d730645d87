"""Error-bounded saliency region (paper Sec. 2.1): the smallest image region that, with the rest of
the image masked, keeps the node's response within a relative error of its full-image response.

Masked pixels are set to the dataset mean (0 after the data preprocessor), the neutral input the
network was trained around. Exhaustive search over regions is hopeless, so the candidates are the
prefixes of a ranking of image cells by the node's receptive field ("progressively masking", as the
paper puts it); :func:`saliency_region` says how the prefix is found and what it costs.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .model import LoadedImage, normalise
from .nodes import Node


@dataclass
class SaliencyRegion:
    keep: Tensor  # (H, W) bool: the region
    error: float  # its relative error
    max_error: float
    cells_kept: int
    num_cells: int
    cell: int
    probes: List[Tuple[int, float]]  # every (k, error) evaluated, in order
    masked_images: int  # masked images evaluated (= len(probes))
    forward_passes: int  # batched forward passes: one per round of the search, plus the full image
    response: Tensor  # (outputs,) full image
    region_response: Tensor  # (outputs,) with only the region kept

    @property
    def area_fraction(self) -> float:
        return float(self.keep.float().mean())


def rank_cells(heat: Tensor, cell: int) -> Tensor:
    """Cell indices (row-major over the ceil(H/cell) x ceil(W/cell) grid), most influential first;
    on the CPU whatever the heat map's device, as the masks built from it."""
    height, width = heat.shape
    padded = nn.functional.pad(heat.detach().cpu()[None, None].double(), (0, (-width) % cell, 0, (-height) % cell))
    scores = nn.functional.avg_pool2d(padded, cell).flatten()
    return torch.argsort(scores, descending=True, stable=True)


def prefix_mask(order: Tensor, k: int, cell: int, size: Tuple[int, int]) -> Tensor:
    """(H, W) bool, on ``order``'s device: the pixels of the k top-ranked cells."""
    height, width = size
    rows, cols = math.ceil(height / cell), math.ceil(width / cell)
    cells = torch.zeros(rows * cols, dtype=torch.bool, device=order.device)
    cells[order[:k]] = True
    grid = cells.view(rows, cols).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return grid[:height, :width]


def relative_error(response: Tensor, reference: Tensor) -> Tensor:
    """||response - reference|| / ||reference|| along the last dimension."""
    return (response - reference).norm(dim=-1) / reference.norm()


def saliency_region(
    model: nn.Module,
    image: LoadedImage,
    node: Node,
    heat: Tensor,
    max_error: float = 0.1,
    cell: int = 4,
    batch_size: int = 16,
    progress: Optional[object] = None,
) -> SaliencyRegion:
    """The smallest prefix of the ``heat``-ranked ``cell`` x ``cell`` cells whose error
    ``||r(masked) - r(full)|| / ||r(full)||`` is within ``max_error``.

    Batched bracketing: k = N (the full image, error 0) always qualifies; each round evaluates up to
    ``batch_size`` equally spaced k strictly inside the bracket (lo fails, hi qualifies) as one batch
    of masked images and narrows it to the first qualifying k and the probe below it. The error is
    measured, not estimated, so the bound holds by construction; if the error is not monotone in k
    the region is minimal among the probed prefixes. Cost: ``ceil(log(N + 1) / log(batch_size + 1))``
    batched passes -- 1024 cells with batches of 16: 3 passes, <= 35 masked images (bisection: 10
    sequential passes); the result counts ``masked_images`` and ``forward_passes``.

    The bound is relative to the node's own response, so a node responding near 0 -- typically a
    ``reg`` node whose box already fits, deltas near 0 -- gets a tiny tolerance and may need most of
    the image: read its region with its ``response`` in mind, or raise ``max_error``.

    ``progress``: an object with ``update(n)`` (a tqdm bar) told of every masked image evaluated.
    """
    if not 0 < max_error < 1:
        raise ValueError(f"max_error must be in (0, 1), got {max_error}")
    if cell < 1 or batch_size < 1:
        raise ValueError(f"cell and batch_size must be positive, got cell={cell}, batch_size={batch_size}")
    if tuple(heat.shape) != image.size:
        raise ValueError(f"heat map of shape {tuple(heat.shape)} does not match the image {image.size}")
    pixels = image.pixels[None].to(next(model.parameters()))
    order = rank_cells(heat, cell)
    num_cells = order.numel()

    def responses(keeps: Tensor) -> Tensor:
        with torch.no_grad():
            batch = normalise(model, pixels.expand(keeps.shape[0], -1, -1, -1), keeps)
            return node.response(model, batch).double()

    reference = responses(torch.ones(1, *image.size, dtype=torch.bool))[0]
    if reference.norm() == 0:
        raise ValueError(
            f"node {node.name} responds 0 to the full image: a relative error is undefined "
            f"(choose another node or channel)"
        )
    probes, errors, found = [], {num_cells: 0.0}, {num_cells: reference}
    passes = 1  # the full image
    lo, hi = -1, num_cells  # lo: largest k known (or assumed, -1) to fail; hi: smallest k known to pass
    while hi - lo > 1:
        candidates = sorted(
            {lo + max(1, round((hi - lo) * i / (batch_size + 1))) for i in range(1, batch_size + 1)} - {hi}
        )
        keeps = torch.stack([prefix_mask(order, k, cell, image.size) for k in candidates])
        batch_responses = responses(keeps)
        passes += 1
        for k, response, error in zip(candidates, batch_responses, relative_error(batch_responses, reference).tolist()):
            errors[k], found[k] = error, response
            probes.append((k, error))
        if progress is not None:
            progress.update(len(candidates))
        passing = [k for k in candidates if errors[k] <= max_error]
        if passing:
            hi = passing[0]
            lo = max([k for k in candidates if k < hi], default=lo)
        else:
            lo = candidates[-1]
    return SaliencyRegion(
        prefix_mask(order, hi, cell, image.size),
        errors[hi],
        max_error,
        hi,
        num_cells,
        cell,
        probes,
        len(probes),
        passes,
        reference,
        found[hi],
    )
