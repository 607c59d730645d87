"""The references themselves, checked against independent implementations (torchvision) and against
identities that must hold. Needs no compiled extension: these run even when the build is broken, so
a red kernel test can be told apart from a wrong reference."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops

from cases import (
    CONV_CASES,
    ConvCase,
    assert_same_results,
    case_params,
    corner_row,
    evaluate,
    leaves,
    make_rois,
    present_names,
    uniform,
)
from reference import deform_roi_pool_ref, modulated_deform_conv2d_ref, pair


def _torchvision_conv(case, input, offset, mask, weight, bias):
    stride, padding, dilation, _, _ = case.params
    # torchvision infers groups and deform_groups from the weight and offset shapes.
    return torchvision.ops.deform_conv2d(input, offset, weight, bias, pair(stride), pair(padding), pair(dilation), mask)


# torchvision has no empty-batch support in some versions and, like us, does not define gradients
# at integer sample coordinates: it gets the off-grid cases with a non-empty batch.
TORCHVISION_CASES = [case for case in CONV_CASES if case.n > 0] + [
    ConvCase(n=2, size=(6, 5), kernel=(2, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2), offsets="smooth"),
    ConvCase(n=2, cin=4, cout=2, size=6, groups=2, deform_groups=2, offsets="smooth", mask=False),
]


@pytest.mark.parametrize("case", case_params(TORCHVISION_CASES))
def test_conv_reference_matches_torchvision(case, gen):
    """Forward and all five gradients equal torchvision's deform_conv2d (float64)."""
    tensors = case.tensors(gen)
    if case.offsets == "smooth":  # arbitrary offsets may sit on a kink of the interpolation: forward only
        torch.testing.assert_close(
            modulated_deform_conv2d_ref(*tensors, *case.params), _torchvision_conv(case, *tensors)
        )
        return
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    assert_same_results(
        evaluate(modulated_deform_conv2d_ref, leaves(tensors), case.params, grad_output),
        evaluate(lambda *t: _torchvision_conv(case, *t), leaves(tensors), (), grad_output),
        present_names(case, tensors),
    )


@pytest.mark.parametrize(
    "where, nonzero",
    [
        pytest.param(-1.0, False, id="y=-1"),
        pytest.param(-1.0 + 1e-3, True, id="y=-1+eps"),
        pytest.param(5.0, False, id="y=H"),
        pytest.param(5.0 - 1e-3, True, id="y=H-eps"),
        pytest.param(1e3, False, id="y=1e3"),
        pytest.param(-1e6, False, id="y=-1e6"),
    ],
)
def test_conv_reference_border(where, nonzero, gen):
    """A sample is valid iff -1 < y < H (strictly): put every sample's row at ``where`` on a 5x5
    map. Invalid everywhere leaves the bias alone; just inside, one corner contributes a little."""
    case = ConvCase(n=2, deform_groups=2)
    input, offset, mask, weight, bias = case.tensors(gen)
    rows = torch.arange(case.out_size[0], dtype=torch.float64).view(1, 1, -1, 1)
    taps_row = (torch.arange(case.taps) // case.kernel[1]).repeat(case.deform_groups).view(1, -1, 1, 1)
    # undeformed row of a sample = i * stride - padding + a * dilation = i - 1 + a
    offset[:, 0::2] = where - (rows - 1 + taps_row)
    tensors = leaves((input, offset, mask, weight, bias))
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    output, actual_grads = evaluate(modulated_deform_conv2d_ref, tensors, case.params, grad_output)
    expected, expected_grads = evaluate(
        lambda x, o, m, w, b: torchvision.ops.deform_conv2d(x, o, w, b, padding=(1, 1), mask=m),
        tensors,
        (),
        grad_output,
    )
    torch.testing.assert_close(output, expected)
    if where == -1.0:
        # y = -1 is a kink: the value is 0 there and to its left, but its right derivative is not.
        # mmcv (whose behaviour we keep) applies its strict validity test to the gradient too and
        # returns 0; torchvision returns the right derivative. The reference follows mmcv.
        assert actual_grads[1][:, 0::2].eq(0).all()
        assert expected_grads[1][:, 0::2].ne(0).any()
        actual_grads[1], expected_grads[1] = actual_grads[1][:, 1::2], expected_grads[1][:, 1::2]
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)
    only_bias = bias.view(1, -1, 1, 1).expand_as(output)
    assert not torch.allclose(output, only_bias) if nonzero else torch.equal(output, only_bias)


def test_conv_reference_zero_offset_is_conv2d(gen):
    """With zero offsets and a mask of ones the operator is an ordinary (grouped, strided, dilated)
    convolution: an anchor that does not depend on torchvision."""
    case = ConvCase(
        n=2,
        cin=4,
        cout=6,
        size=(7, 6),
        kernel=(3, 2),
        stride=(2, 1),
        padding=(2, 1),
        dilation=(1, 2),
        groups=2,
        deform_groups=2,
    )
    input, offset, mask, weight, bias = case.tensors(gen)
    offset = torch.zeros_like(offset)
    expected = F.conv2d(input, weight, bias, stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2)
    torch.testing.assert_close(
        modulated_deform_conv2d_ref(input, offset, torch.ones_like(mask), weight, bias, *case.params), expected
    )
    torch.testing.assert_close(modulated_deform_conv2d_ref(input, offset, None, weight, bias, *case.params), expected)
    # A mask scales each tap: a constant mask m scales the bias-free output by m.
    half = modulated_deform_conv2d_ref(input, offset, torch.full_like(mask, 0.5), weight, None, *case.params)
    torch.testing.assert_close(half, 0.5 * F.conv2d(input, weight, None, (2, 1), (2, 1), (1, 2), 2))


def test_conv_reference_integer_offset_shifts_input(gen):
    """An offset of exactly (dy, dx) = (1, -2) everywhere samples x[h + 1, w - 2]: same as a dense
    conv of the shifted (zero-filled) input. Pins the (dy, dx) order of the offset channels."""
    case = ConvCase(n=1, cin=2, cout=3, size=(6, 7), padding=1)
    input, offset, _, weight, bias = case.tensors(gen)
    offset = torch.zeros_like(offset)
    offset[:, 0::2] = 1.0
    offset[:, 1::2] = -2.0
    # shift the zero-padded input: shifted[u, v] = padded[u + 1, v - 2], zero where that is outside
    padded = F.pad(input, (1, 1, 1, 1))
    shifted = torch.zeros_like(padded)
    shifted[:, :, :-1, 2:] = padded[:, :, 1:, :-2]
    expected = F.conv2d(shifted, weight, bias)
    torch.testing.assert_close(modulated_deform_conv2d_ref(input, offset, None, weight, bias, *case.params), expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30, -1e30])
@pytest.mark.parametrize("component", ["dy", "dx"])
def test_conv_reference_nonfinite_offset_contributes_zero(bad, component, gen):
    """A non-finite (or absurdly large) offset component removes that one sample: the result equals
    the same call with that sample's mask set to 0, and no NaN leaks into any gradient."""
    case = ConvCase(n=2, cin=4, cout=3, deform_groups=2)
    input, offset, mask, weight, bias = [t.requires_grad_() for t in case.tensors(gen)]
    poisoned = offset.detach().clone()
    # sample (batch 1, deform group 1, kernel point 4, output pixel (2, 3)), and a border pixel
    k, g = 4, 1
    channel = (g * case.taps + k) * 2 + (0 if component == "dy" else 1)
    poisoned[1, channel, 2, 3] = bad
    poisoned[0, channel, 0, 4] = bad
    poisoned.requires_grad_()
    output = modulated_deform_conv2d_ref(input, poisoned, mask, weight, bias, *case.params)

    masked = mask.detach().clone()
    masked[1, g * case.taps + k, 2, 3] = 0
    masked[0, g * case.taps + k, 0, 4] = 0
    expected = modulated_deform_conv2d_ref(
        input.detach(), offset.detach(), masked, weight.detach(), bias.detach(), *case.params
    )
    torch.testing.assert_close(output, expected)

    grad_output = torch.randn(output.shape, generator=gen, dtype=output.dtype)
    grads = torch.autograd.grad(output, (input, poisoned, mask, weight, bias), grad_output)
    for grad in grads:
        assert torch.isfinite(grad).all()
    grad_offset, grad_mask = grads[1], grads[2]
    pair = slice((g * case.taps + k) * 2, (g * case.taps + k) * 2 + 2)
    assert (grad_offset[1, pair, 2, 3] == 0).all() and (grad_offset[0, pair, 0, 4] == 0).all()
    assert grad_mask[1, g * case.taps + k, 2, 3] == 0 and grad_mask[0, g * case.taps + k, 0, 4] == 0
    # ...and only those: the neighbouring samples keep their (non-zero) offset gradient.
    assert (grad_offset[1, pair, 2, 2] != 0).all()


def test_conv_reference_gradients_are_derivatives(gen):
    """The reference's autograd is the true derivative (finite differences), so it may serve as the
    gradient oracle for the kernels."""
    case = ConvCase(
        n=1,
        cin=4,
        cout=2,
        size=(4, 5),
        kernel=(3, 2),
        stride=(1, 2),
        padding=(1, 0),
        dilation=(2, 1),
        groups=2,
        deform_groups=2,
        offsets="far",
    )
    tensors = [t.requires_grad_() for t in case.tensors(gen)]
    assert torch.autograd.gradcheck(lambda *t: modulated_deform_conv2d_ref(*t, *case.params), tensors)


# --------------------------------------------------------------------------------------------------
# deform_roi_pool
# --------------------------------------------------------------------------------------------------

ROI_CONFIGS = [
    # (batch, channels, height, width, output_size, spatial_scale, sampling_ratio)
    pytest.param(2, 3, 9, 11, 7, 1.0, 0, id="7x7-scale1-adaptive"),
    pytest.param(2, 3, 9, 11, 7, 0.25, 2, id="7x7-scale0.25-ratio2"),
    pytest.param(1, 2, 12, 8, (3, 2), 0.5, 0, id="3x2-scale0.5-adaptive"),
    pytest.param(3, 1, 6, 6, (2, 4), 0.125, 1, id="2x4-scale0.125-ratio1"),
    pytest.param(1, 2, 1, 7, 2, 1.0, 0, id="2x2-height1-adaptive"),
]


@pytest.mark.parametrize("batch, channels, height, width, output_size, spatial_scale, sampling_ratio", ROI_CONFIGS)
def test_roi_pool_reference_without_offset_is_roi_align(
    batch, channels, height, width, output_size, spatial_scale, sampling_ratio, gen
):
    """offset=None is RoIAlign with aligned=True: forward and gradient w.r.t. the input."""
    input = torch.randn((batch, channels, height, width), generator=gen, dtype=torch.float64, requires_grad=True)
    rois = make_rois(gen, batch, height, width, spatial_scale, count=6)
    expected = torchvision.ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned=True)
    actual = deform_roi_pool_ref(input, rois, None, output_size, spatial_scale, sampling_ratio)
    torch.testing.assert_close(actual, expected)
    assert (actual[corner_row("outside")] == 0).all(), "a RoI outside the map pools to 0"
    if sampling_ratio <= 0:  # an adaptive grid of a reversed or empty RoI has no samples
        assert (actual[corner_row("zero_width")] == 0).all() and (actual[corner_row("reversed")] == 0).all()
    else:  # a fixed grid samples even a reversed RoI (mmcv/torchvision agree): not all zero
        assert (actual[corner_row("reversed")] != 0).any()
    grad_output = torch.randn(expected.shape, generator=gen, dtype=expected.dtype)
    (expected_grad,) = torch.autograd.grad(expected, input, grad_output)
    (actual_grad,) = torch.autograd.grad(actual, input, grad_output)
    torch.testing.assert_close(actual_grad, expected_grad)


def test_roi_pool_reference_no_rois(gen):
    input = torch.randn((1, 3, 5, 5), generator=gen, dtype=torch.float64)
    assert deform_roi_pool_ref(input, torch.zeros((0, 5), dtype=torch.float64), None, 3).shape == (0, 3, 3, 3)


@pytest.mark.parametrize(
    "spatial_scale, sampling_ratio", [(1.0, 0), (0.5, 2)], ids=["scale1-adaptive", "scale0.5-ratio2"]
)
def test_roi_pool_reference_uniform_offset_shifts_roi(spatial_scale, sampling_ratio, gen):
    """The same offset in every bin shifts the whole RoI by gamma * offset * RoI size, channel 0
    along x and channel 1 along y: equal to RoIAlign of the shifted box. Pins the offset layout."""
    batch, channels, height, width, pooled, gamma = 2, 3, 10, 9, (3, 4), 0.1
    input = torch.randn((batch, channels, height, width), generator=gen, dtype=torch.float64)
    rois = make_rois(gen, batch, height, width, spatial_scale, count=6, corners=False)
    shift = uniform((rois.shape[0], 2), -2.0, 2.0, gen)
    offset = shift.view(-1, 2, 1, 1).expand(-1, 2, *pooled).contiguous()
    roi_w = rois[:, 3] - rois[:, 1]  # in image coordinates (the scale multiplies both ends alike)
    roi_h = rois[:, 4] - rois[:, 2]
    moved = rois.clone()
    moved[:, [1, 3]] += (gamma * shift[:, 0] * roi_w).unsqueeze(1)
    moved[:, [2, 4]] += (gamma * shift[:, 1] * roi_h).unsqueeze(1)
    expected = torchvision.ops.roi_align(input, moved, pooled, spatial_scale, sampling_ratio, aligned=True)
    actual = deform_roi_pool_ref(input, rois, offset, pooled, spatial_scale, sampling_ratio, gamma)
    torch.testing.assert_close(actual, expected)


def test_roi_pool_reference_gradients_are_derivatives(gen):
    """Autograd of the reference w.r.t. input and offset is the true derivative of its forward,
    including samples pushed into the clamped border band and beyond (derivative 0 there)."""
    input = torch.randn((2, 1, 6, 7), generator=gen, dtype=torch.float64, requires_grad=True)
    rois = make_rois(gen, 2, 6, 7, 0.5, count=2)
    rois = rois[[0, 1] + [corner_row(name) for name in ("outside", "zero_width", "reversed")]]
    offset = uniform((rois.shape[0], 2, 2, 3), -3.0, 3.0, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, o: deform_roi_pool_ref(x, rois, o, (2, 3), 0.5, 0, 0.2), (input, offset))


def test_roi_pool_reference_nonfinite_offset_zeroes_the_bin(gen):
    """A NaN or infinite offset sends every sample of its bin off the map: that bin pools to 0 and
    no NaN reaches any gradient."""
    input = torch.randn((1, 2, 6, 6), generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 1.0, 5.0, 4.5]], dtype=torch.float64)
    offset = uniform((1, 2, 2, 2), -0.5, 0.5, gen)
    offset[0, 0, 0, 1] = float("nan")
    offset[0, 1, 1, 0] = float("inf")
    offset.requires_grad_()
    output = deform_roi_pool_ref(input, rois, offset, 2, 1.0, 2, 0.1)
    assert output[0, :, 0, 1].eq(0).all() and output[0, :, 1, 0].eq(0).all()
    assert output[0, :, 0, 0].ne(0).all()
    grad_input, grad_offset = torch.autograd.grad(output.sum(), (input, offset))
    assert torch.isfinite(grad_input).all() and torch.isfinite(grad_offset).all()
    assert grad_offset[0, :, 0, 1].eq(0).all() and grad_offset[0, :, 1, 0].eq(0).all()
