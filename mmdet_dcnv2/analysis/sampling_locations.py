"""Effective sampling locations (conv nodes) and effective bin locations (RoI nodes), paper Sec. 2.1.

For every sampling layer below the node (the c5 3x3 convolutions for a ``conv`` node, the box head's
RoI layer for ``cls``/``reg``) we report every sampling point the forward pass used, where it lands
in the image, and its strength.

Strength is the gradient of the node's response w.r.t. the *value sampled* at the point (autograd
through the real network, residual paths included), not w.r.t. the point's *location* as in the
paper (Sec. 2.1): the location gradient is the value gradient times the feature map's spatial
gradient, so it vanishes wherever the map is flat -- the middle of an object, where the node reads
most. The value gradient has the receptive-field view's meaning, and a regular convolution's fixed
grid gets the same treatment, so the two compare. The paper's measure is kept beside it as
``location_strength``. Coordinates are network-input pixel indices; see :class:`LayerSamples`.
"""

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import Tensor, nn

from .model import LoadedImage, normalise
from .nodes import Node, as_pair, check_c5_size


@dataclass
class LayerSamples:
    """The sampling points of one layer, flattened in the order of ``grid_shape``:
    (deform_groups, taps, out_h, out_w) for a convolution, (bins_h, bins_w, samples_h, samples_w)
    for an RoI layer.

    ``strength``: ``|| m * W_k^T dn/dy(q) ||`` over input channels for tap k of output q (m the DCNv2
    modulation, 1 without), ``|| m_b * dn/dy_b || / n_b`` for each of the n_b samples of RoI bin b;
    the norm over the node's outputs too. ``location_strength``: ``|| dn / d(y, x) ||`` of the point,
    through the bilinear interpolant with the layer's border rule (one-sided at integer positions).

    ``points``: a convolution's point ``y = i*stride - pad + a*dilation + dy`` (tap (a, b) of output
    (i, j)) of its input map, drawn at ``S * (x, y)`` with S the input map's stride (the c5 stride over
    the layer's stride; mmdet's ResNet centres feature position u on image pixel S*u); an RoI layer's
    bin samples in the pool's aligned convention, image = (feature + 0.5) * S - 0.5, S = 1 / spatial_scale.
    """

    name: str
    layer_type: str
    kind: str  # "conv" or "roi"
    feature_points: Tensor  # (P, 2) x, y in the layer's input feature map
    points: Tensor  # (P, 2) x, y in network-input image pixels
    strength: Tensor  # (P,) || d node / d value sampled at the point ||
    location_strength: Tensor  # (P,) || d node / d the point's location (y, x) ||, in input-map pixels
    grid_shape: Tuple[int, ...]
    input_stride: float  # image pixels per input-map pixel


def effective_sampling_locations(model: nn.Module, image: LoadedImage, node: Node) -> List[LayerSamples]:
    """The sampling points of every sampling layer below ``node`` that its forward pass used,
    bottom layer first. Cost: one forward pass and one backward pass per output of the node."""
    layers = node.sampling_layers(model)
    calls = {}

    def capture(name):
        def hook(module, args, kwargs, output):
            if name in calls:  # one call per layer is what the analysis reads (and the nodes do)
                raise RuntimeError(f"{name} was called more than once in the node's forward pass")
            calls[name] = (args, kwargs, output)

        return hook

    handles = [module.register_forward_hook(capture(name), with_kwargs=True) for name, module in layers]
    try:
        parameter = next(model.parameters())
        pixels = image.pixels[None].to(parameter).requires_grad_()
        batch = normalise(model, pixels)
        response = node.response(model, batch)[0]
    finally:
        for handle in handles:
            handle.remove()
    used = [(name, module) for name, module in layers if name in calls]
    outputs = [calls[name][2] for name, _ in used]
    # d response_j / d output of each layer, for each output j of the node.
    grads = [
        torch.autograd.grad(response[j], outputs, retain_graph=j + 1 < response.numel(), allow_unused=True)
        for j in range(response.numel())
    ]
    result = []
    with torch.no_grad():
        for index, (name, module) in enumerate(used):
            args, kwargs, output = calls[name]
            layer_grads = [torch.zeros_like(output) if g[index] is None else g[index] for g in grads]
            if node.kind == "conv":
                result.append(_conv_samples(name, module, args[0], layer_grads, node.stride, tuple(batch.shape[-2:])))
            else:
                result.append(_roi_samples(name, module, args, kwargs, layer_grads))
    return result


# ------------------------------------------------------------------------------------ convolutions


def conv_offsets_and_masks(module: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(G, K, 2, Ho, Wo) offsets (dy, dx) and (G, K, Ho, Wo) masks the layer applies to input ``x``
    (batch of one): asked of our layers (``offset_and_mask``), recomputed from ``conv_offset`` for
    mmcv's (the same channel layout: DCNv2 chunks into o1, o2, m, offsets cat(o1, o2), masks
    sigmoid(m); DCNv1's channels are all offsets); zeros and ones for a regular convolution."""
    kh, kw = module.kernel_size
    groups = int(getattr(module, "deform_groups", 1))
    taps = kh * kw
    if hasattr(module, "offset_and_mask"):  # MDConv, DConv
        offset, mask = module.offset_and_mask(x)
        offset = offset[0]
        mask = torch.ones_like(offset[: groups * taps]) if mask is None else mask[0]
        out_h, out_w = offset.shape[-2:]
        return offset.view(groups, taps, 2, out_h, out_w), mask.view(groups, taps, out_h, out_w)
    if not hasattr(module, "conv_offset"):
        out_h, out_w = _conv_output_size(module, x)
        return x.new_zeros(1, taps, 2, out_h, out_w), x.new_ones(1, taps, out_h, out_w)
    out = module.conv_offset(x)[0]  # mmcv's layers
    if out.shape[0] == 3 * groups * taps:
        o1, o2, m = torch.chunk(out, 3, dim=0)
        offset, mask = torch.cat((o1, o2), dim=0), torch.sigmoid(m)
    elif out.shape[0] == 2 * groups * taps:
        offset, mask = out, torch.ones_like(out[: groups * taps])
    else:
        raise ValueError(
            f"{type(module).__name__}.conv_offset has {out.shape[0]} channels; expected "
            f"3*G*K or 2*G*K = {3 * groups * taps} or {2 * groups * taps}"
        )
    out_h, out_w = out.shape[-2:]
    return offset.view(groups, taps, 2, out_h, out_w), mask.view(groups, taps, out_h, out_w)


def regular_grid(module: nn.Module, out_h: int, out_w: int, dtype=torch.float64) -> Tuple[Tensor, Tensor]:
    """(K, Ho, Wo) y and x of a convolution's fixed sampling grid in its input map."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        as_pair(getattr(module, a)) for a in ("kernel_size", "stride", "padding", "dilation")
    )
    tap_y = (torch.arange(kh, dtype=dtype) * dh).repeat_interleave(kw)
    tap_x = (torch.arange(kw, dtype=dtype) * dw).repeat(kh)
    rows = torch.arange(out_h, dtype=dtype) * sh - ph
    cols = torch.arange(out_w, dtype=dtype) * sw - pw
    y = (tap_y[:, None, None] + rows[None, :, None]).expand(-1, -1, out_w)
    x = (tap_x[:, None, None] + cols[None, None, :]).expand(-1, out_h, -1)
    return y, x


def _conv_samples(
    name: str, module: nn.Module, x: Tensor, grads: List[Tensor], output_stride: int, batch_size: Tuple[int, int]
) -> LayerSamples:
    x = x.detach()
    offset, mask = conv_offsets_and_masks(module, x)
    groups, taps, _, out_h, out_w = offset.shape
    grid_y, grid_x = regular_grid(module, out_h, out_w, dtype=offset.dtype)
    ys = grid_y.to(offset.device) + offset[:, :, 0]
    xs = grid_x.to(offset.device) + offset[:, :, 1]
    feature_points = torch.stack((xs, ys), dim=-1).reshape(-1, 2)
    # The layer's output is the c5 map (a spatial conv of the last stage); its input is S / stride.
    check_c5_size(output_stride, batch_size, (out_h, out_w))
    layer_stride = as_pair(module.stride)
    if layer_stride[0] != layer_stride[1] or output_stride % layer_stride[0]:
        raise ValueError(f"{name}: stride {layer_stride} does not divide the c5 stride {output_stride}")
    stride = output_stride // layer_stride[0]

    # d n / d (value sampled at tap k of output q) = m * W_k^T d n / d y(q), per conv group.
    conv_groups = int(getattr(module, "groups", 1))
    weight = module.weight.reshape(conv_groups, module.weight.shape[0] // conv_groups, -1, taps)
    value_grads = []  # per output of the node: (G, C/G, K, Ho, Wo)
    for grad in grads:
        delta = grad[0].reshape(conv_groups, -1, out_h, out_w)
        value_grad = torch.einsum("gock,gohw->gckhw", weight, delta).reshape(groups, -1, taps, out_h, out_w)
        value_grads.append(value_grad * mask[:, None])
    strength = sum(g.square().sum(1) for g in value_grads).sqrt()
    # d n / d location: per deformable group, its channels sampled at its points (zero border).
    channels = x.shape[1] // groups
    location = torch.cat(
        [
            _location_gradient(
                x[0, g * channels : (g + 1) * channels],
                feature_points.view(groups, -1, 2)[g],
                [v[g].reshape(channels, -1) for v in value_grads],
                border="zeros",
            )
            for g in range(groups)
        ]
    )
    return LayerSamples(
        name,
        type(module).__name__,
        "conv",
        feature_points,
        feature_points * stride,
        strength.reshape(-1),
        location,
        (groups, taps, out_h, out_w),
        float(stride),
    )


def _location_gradient(plane: Tensor, points: Tensor, value_grads: List[Tensor], border: str) -> Tensor:
    """(P,) ``sqrt(sum_j || d n_j / d point ||^2)`` for ``points`` (P, 2) x, y sampled bilinearly from
    ``plane`` (C, H, W), given each node output's gradient w.r.t. the sampled values, (C, P) each.

    border: "zeros" -- the DCN rule, corners outside the map read 0 (valid for -1 < y < H); "clamp"
    -- the RoIAlign rule, coordinates clamped into the map, 0 beyond one pixel outside."""
    channels, height, width = plane.shape
    dtype = torch.promote_types(plane.dtype, torch.float32)
    with torch.enable_grad():
        xy = points.detach().to(dtype).clone().requires_grad_()
        # align_corners=False: pixel index p <-> normalised (2p + 1) / size - 1 (works for size 1 too).
        grid = torch.stack(((2 * xy[:, 0] + 1) / width - 1, (2 * xy[:, 1] + 1) / height - 1), dim=-1)
        samples = nn.functional.grid_sample(
            plane[None].detach().to(dtype),
            grid[None, None],
            mode="bilinear",
            padding_mode="zeros" if border == "zeros" else "border",
            align_corners=False,
        )[0, :, 0]
        if border != "zeros":
            inside = ((xy[:, 0] >= -1) & (xy[:, 0] <= width) & (xy[:, 1] >= -1) & (xy[:, 1] <= height)).detach()
            samples = samples * inside.to(dtype)
        squared = xy.new_zeros(xy.shape[0])
        for j, value_grad in enumerate(value_grads):
            (grad,) = torch.autograd.grad(samples, xy, value_grad.to(dtype), retain_graph=j + 1 < len(value_grads))
            squared = squared + grad.square().sum(-1)
    return squared.sqrt().detach().to(plane.dtype)


def _conv_output_size(module: nn.Module, x: Tensor) -> Tuple[int, int]:
    sizes = []
    for dim, size in enumerate(x.shape[-2:]):
        k, s, p, d = (as_pair(getattr(module, a))[dim] for a in ("kernel_size", "stride", "padding", "dilation"))
        sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(sizes)


# ------------------------------------------------------------------------------------- RoI layers


def roi_offsets_and_masks(module: nn.Module, features: Tensor, rois: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """(R, 2, ph, pw) normalised bin offsets (x, y) and (R, ph, pw) bin modulations: recomputed from
    the layer's ``offset_fc`` / ``mask_fc`` on the plainly pooled features, as ours and mmcv's
    (Modulated)DeformRoIPoolPack do; zeros and ones for RoIAlign."""
    from mmdet_dcnv2.ops import deform_roi_pool

    out_h, out_w = as_pair(module.output_size)
    count = rois.shape[0]
    if not hasattr(module, "offset_fc"):
        return rois.new_zeros(count, 2, out_h, out_w), rois.new_ones(count, out_h, out_w)
    plain = deform_roi_pool(
        features, rois, None, (out_h, out_w), scale, int(module.sampling_ratio), float(module.gamma)
    ).flatten(1)
    offset = module.offset_fc(plain).view(count, 2, out_h, out_w)
    if not hasattr(module, "mask_fc"):  # DCNv1's DPool
        return offset, torch.ones_like(offset[:, 0])
    mask = module.mask_fc(plain).view(count, out_h, out_w)
    return offset, mask


def roi_sample_points(
    roi: Tensor,
    offset: Tensor,
    output_size: Tuple[int, int],
    scale: float,
    sampling_ratio: int,
    gamma: float,
    aligned: bool = True,
) -> Tensor:
    """(ph, pw, ny, nx, 2) x, y feature-map coordinates of every bilinear sample of every bin, as
    RoIAlign (``offset`` zero) and deformable RoI pooling place them."""
    out_h, out_w = output_size
    shift = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) for v in roi[1:5])
    start_x, start_y = x1 * scale - shift, y1 * scale - shift
    roi_w, roi_h = (x2 - x1) * scale, (y2 - y1) * scale
    if not aligned:  # mmcv's legacy convention: RoIs at least one feature pixel
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    samples_y = sampling_ratio if sampling_ratio > 0 else max(math.ceil(roi_h / out_h), 1)
    samples_x = sampling_ratio if sampling_ratio > 0 else max(math.ceil(roi_w / out_w), 1)
    dtype, device = offset.dtype, offset.device
    within_y = (torch.arange(samples_y, dtype=dtype, device=device) + 0.5) * bin_h / samples_y
    within_x = (torch.arange(samples_x, dtype=dtype, device=device) + 0.5) * bin_w / samples_x
    bin_y = start_y + torch.arange(out_h, dtype=dtype, device=device) * bin_h
    bin_x = start_x + torch.arange(out_w, dtype=dtype, device=device) * bin_w
    ys = (bin_y[:, None] + gamma * roi_h * offset[1])[:, :, None, None] + within_y[None, None, :, None]
    xs = (bin_x[None, :] + gamma * roi_w * offset[0])[:, :, None, None] + within_x[None, None, None, :]
    ys, xs = torch.broadcast_tensors(ys, xs)
    return torch.stack((xs, ys), dim=-1)


def _roi_samples(name: str, module: nn.Module, args, kwargs, grads: List[Tensor]) -> LayerSamples:
    features, rois = args[0], args[1]
    scale = kwargs.get("spatial_scale", args[2] if len(args) > 2 else None)
    scale = float(module.spatial_scale if scale is None else scale)
    if getattr(module, "pool_mode", "avg") != "avg":
        raise ValueError(f"effective bin locations need an averaging RoI layer; {name} pools by {module.pool_mode!r}")
    offset, mask = roi_offsets_and_masks(module, features, rois[:1], scale)
    output_size = as_pair(module.output_size)
    points = roi_sample_points(
        rois[0],
        offset[0],
        output_size,
        scale,
        int(module.sampling_ratio),
        float(getattr(module, "gamma", 0.1)),
        bool(getattr(module, "aligned", True)),
    )
    out_h, out_w, samples_y, samples_x, _ = points.shape
    count = samples_y * samples_x
    # d n / d (value of one sample of bin b) = m_b * d n / d y_b / n_b (the bin averages its samples).
    value_grads = [(mask[0] * grad[0]) / count for grad in grads]  # (C, ph, pw) each
    strength = sum(g.square().sum(0) for g in value_grads).sqrt()[:, :, None, None].expand(-1, -1, samples_y, samples_x)
    feature_points = points.reshape(-1, 2)
    plane = features[int(rois[0, 0])].detach()
    location = _location_gradient(
        plane,
        feature_points,
        [g[:, :, :, None, None].expand(-1, -1, -1, samples_y, samples_x).reshape(g.shape[0], -1) for g in value_grads],
        border="clamp",
    )
    stride = 1.0 / scale
    return LayerSamples(
        name,
        type(module).__name__,
        "roi",
        feature_points,
        (feature_points + 0.5) * stride - 0.5,
        strength.reshape(-1),
        location,
        tuple(points.shape[:4]),
        stride,
    )
