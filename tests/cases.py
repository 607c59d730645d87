"""One case protocol for both ops, as torchvision's ``RoIOpTester`` has for its RoI ops.

A case (``ConvCase``, ``RoICase``) holds the shapes and hyper-parameters of one call and provides:
``id`` (the pytest id), ``params`` (the functional API's arguments after the tensors), ``op_params``
(the same as the raw op's schema wants them), ``tensors(gen, dtype)`` (the tensor arguments, None
where the case has none) and ``differentiable`` (which of those get gradients). The same case then
feeds the reference tests, the kernel tests, gradcheck and opcheck through :func:`leaves`,
:func:`evaluate` and :func:`assert_same_results`.

Nothing here imports the compiled extension, so the reference-only tests run without a build.
"""

import contextlib
from typing import Optional, Sequence, Tuple

import pytest
import torch

from reference import conv_output_size, pair


def case_params(cases):
    """``pytest.param`` per case, named by its id."""
    return [pytest.param(case, id=case.id) for case in cases]


# --------------------------------------------------------------------------------------------------
# Running a function on a case's tensors and comparing results
# --------------------------------------------------------------------------------------------------


def leaves(tensors, device="cpu", dtype=None, differentiable: Optional[Sequence[bool]] = None):
    """Fresh leaf copies of the non-None tensors, on ``device`` (in ``dtype``), requiring grad where
    ``differentiable`` says so (all by default); None stays None."""
    differentiable = differentiable or [True] * len(tensors)
    return [
        None if t is None else t.detach().to(device=device, dtype=dtype or t.dtype).clone().requires_grad_(wants_grad)
        for t, wants_grad in zip(tensors, differentiable)
    ]


def evaluate(fn, tensors, params, grad_output=None, make_args=None):
    """``fn(*make_args(tensors), *params)`` and its gradients w.r.t. every tensor requiring grad.

    Gradients are taken w.r.t. ``tensors`` (the leaves), so that layouts built as views of a leaf
    (``make_args``) are compared on the same footing as contiguous inputs.
    """
    args = make_args(tensors) if make_args else tensors
    output = fn(*args, *params)
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    if not wanted:
        return output, []
    if grad_output is None:
        grad_output = torch.ones_like(output)
    return output, list(torch.autograd.grad(output, wanted, grad_output.to(output)))


def assert_same_results(actual, expected, names, **tolerances):
    """assert_close on (output, grads) pairs from :func:`evaluate`, saying which tensor differs."""
    (out_a, grads_a), (out_e, grads_e) = actual, expected
    torch.testing.assert_close(out_a, out_e, **tolerances)
    assert len(grads_a) == len(grads_e) == len(names)
    for name, grad_a, grad_e in zip(names, grads_a, grads_e):
        torch.testing.assert_close(grad_a, grad_e, **tolerances, msg=lambda m, name=name: f"grad of {name}: {m}")


@contextlib.contextmanager
def num_threads(count):
    """torch's intra-op thread count set to ``count`` for the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def present_names(case, tensors):
    """The names of the tensors that are there and get gradients, in :func:`evaluate`'s order."""
    return [
        name for name, t, wants_grad in zip(case.names, tensors, case.differentiable) if t is not None and wants_grad
    ]


# --------------------------------------------------------------------------------------------------
# Random values
# --------------------------------------------------------------------------------------------------


def uniform(shape, low, high, gen, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64).mul_(high - low).add_(low).to(dtype)


def off_grid_offsets(shape, gen, spread=2, dtype=torch.float64) -> torch.Tensor:
    """Convolution offsets whose fractional part lies in [0.1, 0.9].

    With integer stride/padding/dilation the undeformed sampling grid lies on integers, and so do
    the borders of the valid region (-1 and H / W). Bilinear interpolation is not differentiable at
    integer coordinates, so finite differences (gradcheck) and one-sided kernel derivatives are only
    comparable when every sample stays at least 0.1 away from them. ``spread`` bounds the integer
    part (|offset| < spread + 1).
    """
    integer = torch.randint(-spread, spread + 1, shape, generator=gen).to(torch.float64)
    fraction = uniform(shape, 0.1, 0.9, gen)
    return (integer + fraction).to(dtype)


def far_offsets(shape, gen, size, dtype=torch.float64) -> torch.Tensor:
    """Off-grid offsets, about half of them pushing the sample well outside a map of side ``size``
    (up to 3 map sizes away), the rest within it: both the zero border and its gradient get used."""
    near = off_grid_offsets(shape, gen, spread=2)
    far = off_grid_offsets(shape, gen, spread=3 * size)
    pick = torch.rand(shape, generator=gen) < 0.5
    return torch.where(pick, far, near).to(dtype)


# --------------------------------------------------------------------------------------------------
# Modulated deformable convolution
# --------------------------------------------------------------------------------------------------


def _fmt(value):
    height, width = pair(value)
    return str(height) if height == width else f"{height}x{width}"


class ConvCase:
    """Shapes and hyper-parameters of one modulated-deformable-convolution call.

    ``offsets``: 'off_grid' (|offset| < 3, fractional part in [0.1, 0.9]: safe for gradients),
    'far' (half of the samples land up to three map sizes outside the map, still off-grid),
    'smooth' (plain Gaussian offsets, arbitrary fractional parts: for forward-only checks).
    """

    names = ("input", "offset", "mask", "weight", "bias")
    differentiable = (True, True, True, True, True)

    def __init__(
        self,
        n=1,
        cin=4,
        cout=4,
        size=(5, 5),
        kernel=(3, 3),
        stride=1,
        padding=1,
        dilation=1,
        groups=1,
        deform_groups=1,
        mask=True,
        bias=True,
        offsets="off_grid",
    ):
        self.n, self.cin, self.cout = n, cin, cout
        self.size, self.kernel = pair(size), pair(kernel)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.deform_groups = groups, deform_groups
        self.mask, self.bias, self.offsets = mask, bias, offsets
        assert cin % groups == 0 and cout % groups == 0 and cin % deform_groups == 0
        assert self.out_size[0] > 0 and self.out_size[1] > 0, self.id

    @property
    def out_size(self):
        return tuple(
            conv_output_size(
                self.size[d], self.kernel[d], pair(self.stride)[d], pair(self.padding)[d], pair(self.dilation)[d]
            )
            for d in range(2)
        )

    @property
    def taps(self):
        return self.kernel[0] * self.kernel[1]

    @property
    def id(self):
        parts = [
            f"n{self.n}",
            f"c{self.cin}o{self.cout}",
            f"{self.size[0]}x{self.size[1]}",
            f"k{self.kernel[0]}x{self.kernel[1]}",
            f"s{_fmt(self.stride)}",
            f"p{_fmt(self.padding)}",
            f"d{_fmt(self.dilation)}",
            f"g{self.groups}",
            f"dg{self.deform_groups}",
            "mask" if self.mask else "nomask",
            "bias" if self.bias else "nobias",
            self.offsets,
        ]
        return "-".join(parts)

    def __repr__(self):
        return f"ConvCase({self.id})"

    def tensors(self, gen, dtype=torch.float64):
        """(input, offset, mask, weight, bias), mask/bias None when the case has none."""
        out_h, out_w = self.out_size
        offset_shape = (self.n, 2 * self.deform_groups * self.taps, out_h, out_w)
        input = torch.randn((self.n, self.cin) + self.size, generator=gen, dtype=torch.float64)
        if self.offsets == "off_grid":
            offset = off_grid_offsets(offset_shape, gen)
        elif self.offsets == "far":
            offset = far_offsets(offset_shape, gen, max(self.size))
        elif self.offsets == "smooth":
            offset = 1.5 * torch.randn(offset_shape, generator=gen, dtype=torch.float64)
        else:
            raise ValueError(self.offsets)
        mask = uniform((self.n, self.deform_groups * self.taps, out_h, out_w), 0.0, 1.0, gen) if self.mask else None
        weight = torch.randn((self.cout, self.cin // self.groups) + self.kernel, generator=gen, dtype=torch.float64)
        bias = torch.randn((self.cout,), generator=gen, dtype=torch.float64) if self.bias else None
        return tuple(None if t is None else t.to(dtype) for t in (input, offset, mask, weight, bias))

    @property
    def params(self):
        """(stride, padding, dilation, groups, deform_groups) as the functional API takes them."""
        return self.stride, self.padding, self.dilation, self.groups, self.deform_groups

    @property
    def op_params(self):
        """The same, with int[2] lists as the raw torch.library op's schema wants them."""
        return (
            list(pair(self.stride)),
            list(pair(self.padding)),
            list(pair(self.dilation)),
            self.groups,
            self.deform_groups,
        )


# A hand-picked cover of every value the op tests are asked to exercise (stride 1 / 2 / (2, 1),
# padding 0 / 1 / (2, 0), dilation 1 / 2 / (2, 1), groups 1 / 2 / 4, deform_groups 1 / 2 / 4,
# kernels 1x1 / 3x3 / 3x2, batch 0 / 1 / 3, mask and bias present or not, samples far outside),
# rather than their cartesian product; the hypothesis sweep covers random combinations.
CONV_CASES = [
    ConvCase(),
    ConvCase(n=3, cin=4, cout=6, size=7, stride=2, padding=1, deform_groups=2),
    ConvCase(cin=4, cout=4, size=(7, 6), kernel=(3, 2), stride=(2, 1), padding=(2, 0), groups=2),
    ConvCase(size=7, padding=2, dilation=2, groups=2, deform_groups=2),
    ConvCase(n=3, cin=2, cout=3, kernel=1, padding=0),
    ConvCase(cin=4, cout=2, size=(6, 5), kernel=1, stride=2, padding=1, groups=2, deform_groups=2),
    ConvCase(n=0, groups=2, deform_groups=2),
    ConvCase(n=0, size=(6, 5), kernel=(3, 2), stride=2, padding=0, mask=False, bias=False),
    ConvCase(padding=0, mask=False, bias=False),
    ConvCase(n=3, cin=4, cout=3, deform_groups=2, mask=False),
    ConvCase(n=2, size=(7, 6), kernel=(3, 2), stride=(2, 1), padding=(2, 0), dilation=2, deform_groups=4),
    ConvCase(n=2, size=6, offsets="far"),
    ConvCase(n=2, cin=4, cout=4, size=5, deform_groups=2, mask=False, offsets="far"),
    ConvCase(n=2, cin=4, cout=4, size=6, groups=4, deform_groups=4, padding=(2, 0), dilation=(2, 1), offsets="far"),
    ConvCase(cin=2, cout=1, size=(1, 7), padding=1, bias=False),
    ConvCase(n=2, cin=3, cout=2, size=(3, 7), kernel=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
]


# --------------------------------------------------------------------------------------------------
# Modulated deformable RoI pooling
# --------------------------------------------------------------------------------------------------

# The RoIs make_rois appends after the random ones, in this order (fractions of the image).
ROI_CORNERS = {
    "outside": (0, 1.31, 1.23, 1.62, 1.54),
    "zero_width": (-1, 0.33, 0.21, 0.33, 0.72),  # batch index -1: the last image
    "zero_area": (0, 0.47, 0.52, 0.47, 0.52),
    "reversed": (-1, 0.71, 0.62, 0.23, 0.11),
    "tiny": (0, 0.413, 0.337, 0.452, 0.361),  # smaller than a bin
    "larger_than_map": (-1, -0.31, -0.42, 1.26, 1.33),
}


def corner_row(name: str) -> int:
    """The row of corner RoI ``name`` in make_rois' result, counted from the end (a negative index)."""
    return list(ROI_CORNERS).index(name) - len(ROI_CORNERS)


def make_rois(gen, batch, height, width, spatial_scale, count, corners=True):
    """(count [+ len(ROI_CORNERS)], 5) RoIs in image coordinates (the map times 1 / spatial_scale):
    random boxes, some reaching past the border, then (``corners``) the ROI_CORNERS."""
    image_h, image_w = height / spatial_scale, width / spatial_scale
    x1 = uniform((count,), -0.2 * image_w, 0.8 * image_w, gen)
    y1 = uniform((count,), -0.2 * image_h, 0.8 * image_h, gen)
    x2 = x1 + uniform((count,), 0.1 * image_w, 0.9 * image_w, gen)
    y2 = y1 + uniform((count,), 0.1 * image_h, 0.9 * image_h, gen)
    index = torch.randint(0, batch, (count,), generator=gen).to(torch.float64)
    rois = torch.stack([index, x1, y1, x2, y2], dim=1)
    if not corners:
        return rois
    corner_rois = torch.tensor(list(ROI_CORNERS.values()), dtype=torch.float64)
    corner_rois[:, 0] %= batch
    corner_rois[:, [1, 3]] *= image_w
    corner_rois[:, [2, 4]] *= image_h
    return torch.cat([rois, corner_rois])


def roi_offsets(gen, num_rois, output_size, kind):
    """Normalised offsets (R, 2, out_h, out_w). 'near' moves samples by up to ~ a tenth of the RoI
    (gamma 0.1); 'far' sends about half of the bins one to three RoI sizes away, off the map."""
    shape = (num_rois, 2) + pair(output_size)
    near = uniform(shape, -1.0, 1.0, gen)
    if kind == "near":
        return near
    far = uniform(shape, 10.0, 30.0, gen) * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, far, near)


class RoICase:
    """Shapes and hyper-parameters of one deformable-RoI-pooling call: ``count`` random RoIs plus the
    ROI_CORNERS on ``batch`` maps of ``size``; ``offsets`` 'near', 'far' (see roi_offsets) or 'none'."""

    names = ("input", "rois", "offset")
    differentiable = (True, False, True)  # the op defines no gradient for the boxes

    def __init__(self, batch, channels, size, output_size, spatial_scale, sampling_ratio, offsets, count=5, gamma=0.1):
        self.batch, self.channels, self.size = batch, channels, pair(size)
        self.output_size, self.spatial_scale, self.sampling_ratio = output_size, spatial_scale, sampling_ratio
        self.offsets, self.count, self.gamma = offsets, count, gamma

    @property
    def id(self):
        out_h, out_w = pair(self.output_size)
        return (
            f"n{self.batch}c{self.channels}-{self.size[0]}x{self.size[1]}-out{out_h}x{out_w}"
            f"-scale{self.spatial_scale}-ratio{self.sampling_ratio}-{self.offsets}"
        )

    def __repr__(self):
        return f"RoICase({self.id})"

    @property
    def params(self):
        """(output_size, spatial_scale, sampling_ratio, gamma), as the functional API takes them."""
        return self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma

    @property
    def op_params(self):
        """The same with output_size as the raw op's int[2]."""
        return list(pair(self.output_size)), self.spatial_scale, self.sampling_ratio, self.gamma

    def output_shape(self, num_rois) -> Tuple[int, ...]:
        return (num_rois, self.channels) + pair(self.output_size)

    def tensors(self, gen, dtype=torch.float64):
        """(input, rois, offset); offset is None for offsets='none'."""
        input = torch.randn((self.batch, self.channels) + self.size, generator=gen, dtype=torch.float64)
        rois = make_rois(gen, self.batch, *self.size, self.spatial_scale, self.count)
        offset = None if self.offsets == "none" else roi_offsets(gen, rois.shape[0], self.output_size, self.offsets)
        return tuple(None if t is None else t.to(dtype) for t in (input, rois, offset))


ROI_CASES = [
    RoICase(2, 3, (9, 11), 7, 1.0, 0, "near"),
    RoICase(2, 3, (9, 11), 7, 1.0, 2, "far"),
    RoICase(1, 2, (12, 10), 14, 0.25, 2, "near", count=3),
    RoICase(2, 2, (12, 10), 14, 0.25, 0, "far", count=3),
    RoICase(2, 2, (8, 13), (3, 5), 0.25, 0, "far"),
    RoICase(3, 2, (8, 13), (3, 5), 1.0, 2, "none"),
]
