"""Modulated deformable RoI pooling (DCNv2): the functional API, fake kernels and autograd."""

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (registers the C++ ops)
from ._args import check_tensor, forbid_double_backward, pair

_forward_op = torch.ops.mmdet_dcnv2.deform_roi_pool.default
_backward_op = torch.ops.mmdet_dcnv2.deform_roi_pool_backward.default

IntPair = Union[int, Sequence[int]]


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor] = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """RoIAlign-style pooling whose bins are shifted by learned, normalised offsets.

    Same arguments and forward semantics as mmcv 2.x's ``deform_roi_pool``:

    - ``rois``: (R, 5) rows of (batch_index, x1, y1, x2, y2) in input-image coordinates. A RoI starts
      at ``x1 * spatial_scale - 0.5`` (the aligned convention, no minimum size) and is split into
      ``output_size`` bins; each bin averages a grid of bilinear samples, ``sampling_ratio`` per side,
      or ``ceil(bin size)`` when ``sampling_ratio <= 0``. Samples more than one pixel outside the map
      read zero, those within that band read the clamped border. A degenerate, inverted or non-finite
      RoI pools to zeros.
    - ``offset``: (R, 2, out_h, out_w) or None. Channel 0 shifts bin (i, j) along x by
      ``gamma * roi_width * offset[:, 0, i, j]``, channel 1 along y by ``gamma * roi_height * ...``.
      With ``offset=None`` the op equals ``torchvision.ops.roi_align(..., aligned=True)``.
    - Returns (R, C, out_h, out_w). With an offset, ``input`` and ``rois`` are cast to its dtype (this
      is what lets mixed-precision models run); otherwise ``rois`` is cast to ``input``'s, as mmcv does.
    - Batch indices must be integers in [0, N): the CPU kernel raises otherwise. The CUDA kernel does
      not check (it would cost a device-to-host sync per call): a RoI with an invalid batch index pools
      to zeros and receives no gradient.

    Gradients flow to ``input`` and ``offset`` (never to ``rois``, as in mmcv) and are the true
    derivatives of this forward. They differ from mmcv's backward in one place: in the one-pixel band
    around the map the sampling coordinate is clamped, so a sample's value does not depend on it there
    and its derivative with respect to the offset is zero, whereas mmcv's backward differentiates the
    unclamped bilinear formula. Where the forward is not differentiable (a sample exactly on a grid
    line or on an edge of that band) the kernels return a one-sided derivative.
    """
    check_tensor(input, "input", floating=True)
    check_tensor(rois, "rois")
    if offset is not None:
        check_tensor(offset, "offset", floating=True)
        input = input.to(offset.dtype)
    rois = rois.to(input.dtype)
    return _forward_op(
        input, rois, offset, pair(output_size, "output_size"), float(spatial_scale), int(sampling_ratio), float(gamma)
    )


def _check_shapes(input: Tensor, rois: Tensor, offset: Optional[Tensor], output_size) -> tuple:
    torch._check(input.dim() == 4, lambda: f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    torch._check(
        rois.dim() == 2 and rois.shape[1] == 5, lambda: f"rois must have shape (R, 5), got shape {tuple(rois.shape)}"
    )
    out_shape = (rois.shape[0], input.shape[1], output_size[0], output_size[1])
    if offset is not None:
        expected = (rois.shape[0], 2, output_size[0], output_size[1])
        torch._check(
            tuple(offset.shape) == expected, lambda: f"offset must have shape {expected}, got {tuple(offset.shape)}"
        )
    return out_shape


@torch.library.register_fake("mmdet_dcnv2::deform_roi_pool")
def _forward_fake(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma):
    return input.new_empty(_check_shapes(input, rois, offset, output_size))


@torch.library.register_fake("mmdet_dcnv2::deform_roi_pool_backward")
def _backward_fake(grad_output, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, output_mask):
    _check_shapes(input, rois, offset, output_size)
    need_input, need_offset = output_mask
    grad_input = input.new_empty(input.shape) if need_input else input.new_empty((0,))
    grad_offset = offset.new_empty(offset.shape) if need_offset and offset is not None else input.new_empty((0,))
    return grad_input, grad_offset


def _setup_context(ctx, inputs, output):
    input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma = inputs
    ctx.save_for_backward(input, rois, offset)
    ctx.params = (output_size, spatial_scale, sampling_ratio, gamma)


def _backward(ctx, grad_output):
    input, rois, offset = ctx.saved_tensors
    need = ctx.needs_input_grad
    want_offset = need[2] and offset is not None
    grad_input, grad_offset = _backward_op(grad_output, input, rois, offset, *ctx.params, [need[0], want_offset])
    return (grad_input if need[0] else None, None, grad_offset if want_offset else None, None, None, None, None)


torch.library.register_autograd("mmdet_dcnv2::deform_roi_pool", _backward, setup_context=_setup_context)
forbid_double_backward("mmdet_dcnv2::deform_roi_pool_backward")
