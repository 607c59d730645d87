"""Modulated deformable convolution (DCNv2): the functional API, fake kernels and autograd."""

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (registers the C++ ops)
from ._args import check_tensor, forbid_double_backward, pair

_forward_op = torch.ops.mmdet_dcnv2.modulated_deform_conv2d.default
_backward_op = torch.ops.mmdet_dcnv2.modulated_deform_conv2d_backward.default

IntPair = Union[int, Sequence[int]]


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> Tensor:
    """y(p) = sum_k w_k * x(p + p_k + dp_k) * m_k, with x(.) bilinear against a zero border.

    Same arguments and semantics as mmcv 2.x's ``modulated_deform_conv2d``:

    - ``offset``: (N, 2 * deform_groups * kh * kw, H_out, W_out), a (dy, dx) pair per kernel point,
      kernel points in row-major order, grouped by deform group (mmcv's and torchvision's layout).
    - ``mask``: (N, deform_groups * kh * kw, H_out, W_out), or None for all ones (DCNv1).
    - input, mask, weight and bias are cast to ``offset``'s dtype, as mmcv does (this is what lets
      mixed-precision models run); the result has that dtype.
    - A sample with a non-finite offset contributes zero and receives zero gradient.
    """
    check_tensor(offset, "offset", floating=True)
    dtype = offset.dtype
    input = check_tensor(input, "input").to(dtype)
    weight = check_tensor(weight, "weight").to(dtype)
    if mask is not None:
        mask = check_tensor(mask, "mask").to(dtype)
    if bias is not None:
        bias = check_tensor(bias, "bias").to(dtype)
    return _forward_op(
        input,
        offset,
        mask,
        weight,
        bias,
        pair(stride, "stride"),
        pair(padding, "padding"),
        pair(dilation, "dilation"),
        groups,
        deform_groups,
    )


def _output_size(input: Tensor, weight: Tensor, stride, padding, dilation) -> Tuple[int, int]:
    sizes = []
    for dim in range(2):
        span = dilation[dim] * (weight.shape[2 + dim] - 1) + 1
        sizes.append((input.shape[2 + dim] + 2 * padding[dim] - span) // stride[dim] + 1)
    return sizes[0], sizes[1]


@torch.library.register_fake("mmdet_dcnv2::modulated_deform_conv2d")
def _forward_fake(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
    torch._check(input.dim() == 4, lambda: f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    torch._check(weight.dim() == 4, lambda: f"weight must be 4-D, got shape {tuple(weight.shape)}")
    out_h, out_w = _output_size(input, weight, stride, padding, dilation)
    taps = weight.shape[2] * weight.shape[3]
    expected = (input.shape[0], 2 * deform_groups * taps, out_h, out_w)
    torch._check(
        tuple(offset.shape) == expected, lambda: f"offset must have shape {expected}, got {tuple(offset.shape)}"
    )
    return input.new_empty((input.shape[0], weight.shape[0], out_h, out_w))


@torch.library.register_fake("mmdet_dcnv2::modulated_deform_conv2d_backward")
def _backward_fake(
    grad_output, input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups, output_mask
):
    def grad_like(tensor, wanted):
        return tensor.new_empty(tensor.shape) if wanted and tensor is not None else input.new_empty((0,))

    need_input, need_offset, need_weight = output_mask
    return (
        grad_like(input, need_input),
        grad_like(offset, need_offset),
        grad_like(mask, need_offset),
        grad_like(weight, need_weight),
        grad_like(bias, need_weight),
    )


def _setup_context(ctx, inputs, output):
    input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups = inputs
    ctx.save_for_backward(input, offset, mask, weight, bias)
    ctx.params = (stride, padding, dilation, groups, deform_groups)


def _backward(ctx, grad_output):
    input, offset, mask, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1] or need[2], need[3] or need[4]]
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = _backward_op(
        grad_output, input, offset, mask, weight, bias, *ctx.params, output_mask
    )
    return (
        grad_input if need[0] else None,
        grad_offset if need[1] else None,
        grad_mask if need[2] and mask is not None else None,
        grad_weight if need[3] else None,
        grad_bias if need[4] and bias is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("mmdet_dcnv2::modulated_deform_conv2d", _backward, setup_context=_setup_context)
forbid_double_backward("mmdet_dcnv2::modulated_deform_conv2d_backward")
