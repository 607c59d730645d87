"""Shared fixtures and helpers.

Test modules import the helpers with ``from conftest import ...`` (pytest's ``pythonpath`` puts
tests/ on sys.path). Nothing here imports the compiled extension at import time, so the
reference-only tests run even before (or without) a build of it.
"""

import functools

import pytest
import torch

SEED = 20190218  # fixed: a failure must reproduce


@functools.lru_cache(maxsize=None)
def cuda_usable() -> bool:
    """A CUDA device is visible *and* the extension was compiled with CUDA kernels."""
    if not torch.cuda.is_available():
        return False
    try:
        from mmdet_dcnv2.ops import build_info
    except ImportError:
        return False
    return bool(build_info()["cuda"])


_CUDA_REASON = "needs a CUDA device and a CUDA build of mmdet_dcnv2"
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not cuda_usable(), reason=_CUDA_REASON))


def requires_cuda(test):
    """Marks ``test`` (function or class) as a CUDA test: tagged `cuda`, skipped without CUDA."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


# Parametrisation over devices: `@pytest.mark.parametrize("device", DEVICES)`.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS, id="cuda")]


@pytest.fixture
def mmdet_scope():
    """mmdet's modules registered and its default scope current, as under the Runner and mmdet's tools
    (so that stock names resolve through mmdet's registry, where mmdet_dcnv2 registers its layers)."""
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope("mmdet"):
        yield


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, fresh for every test (tests do not depend on their order)."""
    return torch.Generator().manual_seed(SEED)


def uniform(shape, low, high, gen, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64).mul_(high - low).add_(low).to(dtype)


def off_grid_offsets(shape, gen, spread=2, dtype=torch.float64) -> torch.Tensor:
    """Offsets whose fractional part lies in [0.1, 0.9].

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
# Convolution cases: one description feeds the reference tests, the kernel tests, gradcheck, opcheck
# --------------------------------------------------------------------------------------------------

def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _fmt(value):
    height, width = _pair(value)
    return str(height) if height == width else f"{height}x{width}"


class ConvCase:
    """Shapes and hyper-parameters of one modulated-deformable-convolution call.

    ``offsets``: 'off_grid' (|offset| < 3, fractional part in [0.1, 0.9]: safe for gradients),
    'far' (half of the samples land up to three map sizes outside the map, still off-grid),
    'smooth' (plain Gaussian offsets, arbitrary fractional parts: for forward-only checks).
    """

    def __init__(self, n=1, cin=4, cout=4, size=(5, 5), kernel=(3, 3), stride=1, padding=1, dilation=1,
                 groups=1, deform_groups=1, mask=True, bias=True, offsets="off_grid"):
        self.n, self.cin, self.cout = n, cin, cout
        self.size, self.kernel = _pair(size), _pair(kernel)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.deform_groups = groups, deform_groups
        self.mask, self.bias, self.offsets = mask, bias, offsets
        assert cin % groups == 0 and cout % groups == 0 and cin % deform_groups == 0
        assert self.out_size[0] > 0 and self.out_size[1] > 0, self.id

    @property
    def out_size(self):
        return tuple(
            (self.size[d] + 2 * _pair(self.padding)[d] - _pair(self.dilation)[d] * (self.kernel[d] - 1) - 1)
            // _pair(self.stride)[d] + 1 for d in range(2))

    @property
    def taps(self):
        return self.kernel[0] * self.kernel[1]

    @property
    def id(self):
        parts = [f"n{self.n}", f"c{self.cin}o{self.cout}", f"{self.size[0]}x{self.size[1]}",
                 f"k{self.kernel[0]}x{self.kernel[1]}", f"s{_fmt(self.stride)}", f"p{_fmt(self.padding)}",
                 f"d{_fmt(self.dilation)}", f"g{self.groups}", f"dg{self.deform_groups}",
                 "mask" if self.mask else "nomask", "bias" if self.bias else "nobias", self.offsets]
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
        return (list(_pair(self.stride)), list(_pair(self.padding)), list(_pair(self.dilation)),
                self.groups, self.deform_groups)


def conv_case_params(cases):
    return [pytest.param(case, id=case.id) for case in cases]


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
