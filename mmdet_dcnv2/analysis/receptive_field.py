"""Effective receptive field (paper Sec. 2.1): how strongly each image pixel can move a node.

The map is the gradient of the node's response with respect to every pixel of the network-input
image (raw 0-255 intensities, before the data preprocessor's normalisation), as the paper defines it.
A node with several outputs (the 4 box deltas) has a Jacobian; the heat map is its norm per pixel,
``sqrt(sum over outputs and colour channels of (d response_j / d pixel_c)^2)``, which does not let
gradients of opposite sign cancel and reduces to |gradient| for a one-output node. The signed
Jacobian is kept too (for the npz and the finite-difference tests).

Cost: one forward pass and one backward pass per output of the node (1, or 4 for ``reg``).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .model import LoadedImage, normalise
from .nodes import Node


@dataclass
class ReceptiveField:
    gradient: Tensor  # (outputs, 3, H, W): d response_j / d pixel, pipeline channel order
    heat: Tensor  # (H, W): the Jacobian's norm per pixel
    response: Tensor  # (outputs,): the node's response on the full image


def effective_receptive_field(model: nn.Module, image: LoadedImage, node: Node) -> ReceptiveField:
    parameter = next(model.parameters())
    pixels = image.pixels[None].to(parameter).requires_grad_()
    response = node.response(model, normalise(model, pixels))[0]
    rows = []
    for j in range(response.numel()):
        (grad,) = torch.autograd.grad(response[j], pixels, retain_graph=j + 1 < response.numel())
        rows.append(grad[0])
    gradient = torch.stack(rows)
    return ReceptiveField(gradient, gradient.square().sum((0, 1)).sqrt(), response.detach())
