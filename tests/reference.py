"""Slow, obviously-correct plain-PyTorch references for the DCNv2 operators.

Every kernel result and gradient in the test-suite is compared against these functions. They are
written for clarity, not speed: explicit bilinear interpolation, Python loops over kernel points
(convolution) or RoIs/bins (pooling), and nothing but differentiable torch ops, so that autograd
through them *is* the reference gradient. They work in any floating dtype; the tests run them in
float64.

Non-finite coordinates. A sample whose coordinate is NaN or infinite contributes zero and must
receive zero gradient. ``torch.where(valid, f(y), 0)`` alone is not enough: autograd still evaluates
``f'(y)`` at the NaN and multiplies it by the zero coming from ``where``, and ``0 * NaN = NaN``. So
invalid coordinates are first replaced by a harmless finite value (``torch.where`` on the
coordinate itself, whose backward routes a zero to the NaN), every later quantity is computed from
that sanitised coordinate, and the sample's weights are zeroed with ``torch.where`` at the end.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

IntPair = Union[int, Sequence[int]]


def pair(value: IntPair) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


def conv_output_size(in_size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (floor division, as torch.nn.functional.conv2d)."""
    return (in_size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# --------------------------------------------------------------------------------------------------
# Modulated deformable convolution (DCNv2), mmcv / torchvision semantics
# --------------------------------------------------------------------------------------------------


def _sample_zero_border(plane: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Bilinear sample of ``plane`` (N, C, H, W) at (y, x) (each (N, L)) against a zero border.

    The DCN convention (mmcv ``dmcn_im2col_bilinear``, torchvision ``bilinear_interpolate``): a
    sample is valid iff -1 < y < H and -1 < x < W (and finite); each of its four integer corners
    that lies outside the map reads zero. Returns (N, C, L).
    """
    n, c, height, width = plane.shape
    valid = torch.isfinite(y) & torch.isfinite(x) & (y > -1) & (y < height) & (x > -1) & (x < width)
    # Sanitise first (see the module docstring): nothing below may see a NaN, an inf or a huge value.
    y = torch.where(valid, y, torch.zeros_like(y))
    x = torch.where(valid, x, torch.zeros_like(x))

    y0 = torch.floor(y).detach()
    x0 = torch.floor(x).detach()
    ly = y - y0  # fractional parts carry the gradient w.r.t. the coordinate
    lx = x - x0
    hy = 1 - ly
    hx = 1 - lx
    flat = plane.reshape(n, c, height * width)
    result = plane.new_zeros((n, c, y.shape[1]))
    for corner_y, weight_y in ((y0, hy), (y0 + 1, ly)):
        for corner_x, weight_x in ((x0, hx), (x0 + 1, lx)):
            inside = valid & (corner_y >= 0) & (corner_y <= height - 1) & (corner_x >= 0) & (corner_x <= width - 1)
            index = (corner_y.clamp(0, height - 1) * width + corner_x.clamp(0, width - 1)).long()
            values = torch.gather(flat, 2, index.unsqueeze(1).expand(n, c, index.shape[1]))
            weight = torch.where(inside, weight_y * weight_x, torch.zeros_like(weight_y))
            result = result + weight.unsqueeze(1) * values
    return result


def modulated_deform_conv2d_ref(
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
    """y[n, o, p] = bias[o] + sum_{c, k} weight[o, c, k] * x[n, c](p0 + p_k + dp_k) * m_k.

    ``offset``: (N, 2 * deform_groups * kh * kw, Ho, Wo); channel ``(g * K + k) * 2`` is dy and
    ``+ 1`` is dx of kernel point k (row-major) of deformable group g. ``mask``: (N, deform_groups *
    K, Ho, Wo) or None (all ones). Input channel c belongs to deformable group
    ``c // (C / deform_groups)`` and to convolution group ``c // (C / groups)``. All tensors are
    used in their own dtype (no casting policy here: the tests cast before calling).
    """
    stride_h, stride_w = pair(stride)
    pad_h, pad_w = pair(padding)
    dil_h, dil_w = pair(dilation)
    n, channels, height, width = input.shape
    out_channels, channels_per_group, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    assert channels == channels_per_group * groups and out_channels % groups == 0
    assert channels % deform_groups == 0
    out_h = conv_output_size(height, kernel_h, stride_h, pad_h, dil_h)
    out_w = conv_output_size(width, kernel_w, stride_w, pad_w, dil_w)
    assert out_h > 0 and out_w > 0
    assert offset.shape == (n, 2 * deform_groups * taps, out_h, out_w), offset.shape
    if mask is not None:
        assert mask.shape == (n, deform_groups * taps, out_h, out_w), mask.shape

    # Undeformed sampling grid: row of output pixel (i, j) for kernel point (a, b) is
    # i * stride - pad + a * dilation (integers, which is why tests keep offsets off integers).
    rows = torch.arange(out_h, dtype=offset.dtype, device=offset.device) * stride_h - pad_h
    cols = torch.arange(out_w, dtype=offset.dtype, device=offset.device) * stride_w - pad_w
    base_y = rows.view(out_h, 1).expand(out_h, out_w).reshape(1, -1)
    base_x = cols.view(1, out_w).expand(out_h, out_w).reshape(1, -1)

    offset = offset.reshape(n, deform_groups, taps, 2, out_h * out_w)
    if mask is not None:
        mask = mask.reshape(n, deform_groups, taps, out_h * out_w)
    group_channels = channels // deform_groups
    columns = []  # per kernel point: (N, C, L) modulated samples
    for k in range(taps):
        a, b = divmod(k, kernel_w)
        per_group = []
        for g in range(deform_groups):
            y = base_y + a * dil_h + offset[:, g, k, 0]
            x = base_x + b * dil_w + offset[:, g, k, 1]
            plane = input[:, g * group_channels : (g + 1) * group_channels]
            sampled = _sample_zero_border(plane, y, x)
            if mask is not None:
                sampled = sampled * mask[:, g, k].unsqueeze(1)
            per_group.append(sampled)
        columns.append(torch.cat(per_group, dim=1))
    columns = torch.stack(columns, dim=2)  # (N, C, K, L)

    columns = columns.reshape(n, groups, channels_per_group, taps, out_h * out_w)
    grouped_weight = weight.reshape(groups, out_channels // groups, channels_per_group, taps)
    output = torch.einsum("ngckl,gock->ngol", columns, grouped_weight)
    output = output.reshape(n, out_channels, out_h, out_w)
    if bias is not None:
        output = output + bias.view(1, out_channels, 1, 1)
    return output


# --------------------------------------------------------------------------------------------------
# Deformable RoI pooling, mmcv 2.x semantics (RoIAlign-style sampling, aligned=True shift)
# --------------------------------------------------------------------------------------------------


def _sample_roi_align(plane: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """RoIAlign's bilinear sample of ``plane`` (C, H, W) at points (y, x) (each (S,)). Returns (C, S).

    mmcv/torchvision ``bilinear_interpolate`` of RoIAlign: a point with y < -1, y > H, x < -1 or
    x > W reads 0; otherwise the coordinate is clamped into [0, H - 1] x [0, W - 1] (so in the band
    [-1, 0] and [H - 1, H] the value does not move with the coordinate: its derivative is 0 there)
    and interpolated from its four corners, which then all lie inside the map.
    """
    _, height, width = plane.shape
    valid = torch.isfinite(y) & torch.isfinite(x) & (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    y = torch.where(valid, y, torch.zeros_like(y))
    x = torch.where(valid, x, torch.zeros_like(x))
    y = torch.clamp(y, 0, height - 1)
    x = torch.clamp(x, 0, width - 1)
    y0 = torch.floor(y).detach()
    x0 = torch.floor(x).detach()
    y1 = (y0 + 1).clamp(max=height - 1)
    x1 = (x0 + 1).clamp(max=width - 1)
    ly = y - y0
    lx = x - x0
    hy = 1 - ly
    hx = 1 - lx
    flat = plane.reshape(plane.shape[0], height * width)

    def corner(cy, cx):
        return flat[:, (cy * width + cx).long()]

    value = (
        (hy * hx) * corner(y0, x0)
        + (hy * lx) * corner(y0, x1)
        + (ly * hx) * corner(y1, x0)
        + (ly * lx) * corner(y1, x1)
    )
    return torch.where(valid, value, torch.zeros_like(value))


def deform_roi_pool_ref(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor] = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """mmcv 2.x ``deform_roi_pool`` forward: (R, C, out_h, out_w).

    For RoI r = (batch_index, x1, y1, x2, y2): start = coordinate * spatial_scale - 0.5 (the
    aligned shift), size = end - start with no minimum, bin = size / pooled. Each bin averages a
    grid of ``sampling_ratio`` (or, if <= 0, ceil(size / pooled), which is <= 0 for an empty RoI:
    then no samples and the output is 0) points per side, shifted by
    ``gamma * roi_size * offset[r, :, i, j]`` (offset channel 0 is x, channel 1 is y).
    """
    pooled_h, pooled_w = pair(output_size)
    _, channels, height, width = input.shape
    num_rois = rois.shape[0]
    if offset is not None:
        assert offset.shape == (num_rois, 2, pooled_h, pooled_w), offset.shape
    output = input.new_zeros((num_rois, channels, pooled_h, pooled_w))
    rows = []
    for r in range(num_rois):
        batch_index = int(rois[r, 0])
        start_w = rois[r, 1] * spatial_scale - 0.5
        start_h = rois[r, 2] * spatial_scale - 0.5
        roi_w = rois[r, 3] * spatial_scale - 0.5 - start_w
        roi_h = rois[r, 4] * spatial_scale - 0.5 - start_h
        bin_w = roi_w / pooled_w
        bin_h = roi_h / pooled_h
        grid_h = sampling_ratio if sampling_ratio > 0 else max(math.ceil(float(roi_h) / pooled_h), 0)
        grid_w = sampling_ratio if sampling_ratio > 0 else max(math.ceil(float(roi_w) / pooled_w), 0)
        count = max(grid_h * grid_w, 1)
        plane = input[batch_index]
        bins = []
        for i in range(pooled_h):
            for j in range(pooled_w):
                if grid_h == 0 or grid_w == 0:
                    bins.append(input.new_zeros((channels,)))
                    continue
                bin_start_w = start_w
                bin_start_h = start_h
                if offset is not None:
                    bin_start_w = bin_start_w + gamma * roi_w * offset[r, 0, i, j]
                    bin_start_h = bin_start_h + gamma * roi_h * offset[r, 1, i, j]
                iy = torch.arange(grid_h, dtype=input.dtype, device=input.device) + 0.5
                ix = torch.arange(grid_w, dtype=input.dtype, device=input.device) + 0.5
                ys = bin_start_h + i * bin_h + iy * bin_h / grid_h
                xs = bin_start_w + j * bin_w + ix * bin_w / grid_w
                y = ys.view(-1, 1).expand(grid_h, grid_w).reshape(-1)
                x = xs.view(1, -1).expand(grid_h, grid_w).reshape(-1)
                bins.append(_sample_roi_align(plane, y, x).sum(dim=1) / count)
        rows.append(torch.stack(bins, dim=1).view(channels, pooled_h, pooled_w))
    if rows:
        output = torch.stack(rows, dim=0)
    return output
