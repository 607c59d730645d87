"""Our modulated deformable convolution against mmcv's CPU op, whose behaviour we promise to keep
(design §2): model-zoo checkpoints were trained on it. Skipped where mmcv is not installed (a GPU
machine with torch alone, say)."""

import pytest
import torch

from cases import ConvCase, assert_same_results, case_params, evaluate, leaves, present_names

mmcv = pytest.importorskip("mmcv")
mmcv_ops = pytest.importorskip("mmcv.ops")
mmcv_mdconv = mmcv_ops.modulated_deform_conv2d

from mmdet_dcnv2.ops import modulated_deform_conv2d  # noqa: E402

CASES = [
    ConvCase(n=2, cin=4, cout=4, size=6, offsets="far"),
    ConvCase(n=2, cin=4, cout=6, size=7, deform_groups=2, offsets="far"),
    ConvCase(n=2, cin=4, cout=4, size=7, groups=2, deform_groups=2, stride=2, bias=False, offsets="far"),
    ConvCase(n=3, cin=4, cout=2, size=(7, 6), kernel=(3, 2), stride=(2, 1), padding=(2, 0), dilation=2, groups=2),
]


def _compare(case, tensors, gen, **tolerances):
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen).to(tensors[0].dtype)
    ours = evaluate(modulated_deform_conv2d, leaves(tensors), case.params, grad_output)
    theirs = evaluate(mmcv_mdconv, leaves(tensors), case.params, grad_output)
    assert_same_results(ours, theirs, present_names(case, tensors), **tolerances)


# float32 (what mmcv's models run in): sums of <= 36 O(1) products, summed in another order.
DTYPES = [
    pytest.param(torch.float32, {"rtol": 1e-4, "atol": 1e-4}, id="float32"),
    pytest.param(torch.float64, {}, id="float64"),
]


@pytest.mark.parametrize("dtype, tolerances", DTYPES)
@pytest.mark.parametrize("case", case_params(CASES))
def test_matches_mmcv(case, dtype, tolerances, gen):
    """Random finite offsets (half of the samples far outside the map for the 'far' cases)."""
    _compare(case, case.tensors(gen, dtype), gen, **tolerances)


@pytest.mark.parametrize("dtype, tolerances", DTYPES)
@pytest.mark.parametrize("offsets", ["zero", "integer"])
@pytest.mark.parametrize(
    "case",
    case_params(
        [
            ConvCase(n=2, cin=4, cout=6, size=7, deform_groups=2),
            ConvCase(n=2, cin=4, cout=4, size=7, groups=2, deform_groups=2, stride=2, bias=False),
        ]
    ),
)
def test_matches_mmcv_on_integer_offsets(case, offsets, dtype, tolerances, gen):
    """At integer sample coordinates bilinear interpolation has no derivative; mmcv returns the
    one-sided (right) derivative and zero at y or x = -1 exactly. Zero offsets are every DCN layer's
    state at initialisation (its offset conv is zero-initialised), so training from scratch follows
    mmcv only if these gradients agree."""
    input, offset, mask, weight, bias = case.tensors(gen, dtype)
    if offsets == "zero":
        offset = torch.zeros_like(offset)
    else:  # includes samples exactly on the border rows/columns -1 and H - 1 / W - 1, and beyond
        offset = torch.randint(-3, 4, offset.shape, generator=gen).to(dtype)
    _compare(case, (input, offset, mask, weight, bias), gen, **tolerances)
