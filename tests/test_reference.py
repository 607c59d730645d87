"""The references themselves, checked against independent implementations (torchvision) and against
identities that must hold. Needs no compiled extension: these run even when the build is broken, so
a red kernel test can be told apart from a wrong reference."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops
from conftest import CONV_CASES, ConvCase, conv_case_params, uniform
from reference import deform_roi_pool_ref, modulated_deform_conv2d_ref


def _torchvision_conv(case, input, offset, mask, weight, bias):
    stride, padding, dilation, _, _ = case.params
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    # torchvision infers groups and deform_groups from the weight and offset shapes.
    return torchvision.ops.deform_conv2d(input, offset, weight, bias, pair(stride), pair(padding), pair(dilation), mask)


def _grads(output, inputs, grad_output):
    wanted = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(output, wanted, grad_output, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads)]


# torchvision has no empty-batch support in some versions and, like us, does not define gradients
# at integer sample coordinates: it gets the off-grid cases with a non-empty batch.
TORCHVISION_CASES = [case for case in CONV_CASES if case.n > 0] + [
    ConvCase(n=2, size=(6, 5), kernel=(2, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2), offsets="smooth"),
    ConvCase(n=2, cin=4, cout=2, size=6, groups=2, deform_groups=2, offsets="smooth", mask=False),
]


@pytest.mark.parametrize("case", conv_case_params(TORCHVISION_CASES))
def test_conv_reference_matches_torchvision(case, gen):
    """Forward and all five gradients equal torchvision's deform_conv2d (float64)."""
    tensors = [None if t is None else t.requires_grad_() for t in case.tensors(gen)]
    expected = _torchvision_conv(case, *tensors)
    actual = modulated_deform_conv2d_ref(*tensors, *case.params)
    torch.testing.assert_close(actual, expected)
    if case.offsets == "smooth":
        return  # arbitrary offsets may sit on a kink of the interpolation: forward only
    grad_output = torch.randn(expected.shape, generator=gen, dtype=expected.dtype)
    for name, a, e in zip(("input", "offset", "mask", "weight", "bias"),
                          _grads(actual, tensors, grad_output), _grads(expected, tensors, grad_output)):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("where, nonzero", [
    pytest.param(-1.0, False, id="y=-1"),
    pytest.param(-1.0 + 1e-3, True, id="y=-1+eps"),
    pytest.param(5.0, False, id="y=H"),
    pytest.param(5.0 - 1e-3, True, id="y=H-eps"),
    pytest.param(1e3, False, id="y=1e3"),
    pytest.param(-1e6, False, id="y=-1e6"),
])
def test_conv_reference_border(where, nonzero, gen):
    """A sample is valid iff -1 < y < H (strictly): put every sample's row at ``where`` on a 5x5
    map. Invalid everywhere leaves the bias alone; just inside, one corner contributes a little."""
    case = ConvCase(n=2, deform_groups=2)
    input, offset, mask, weight, bias = case.tensors(gen)
    rows = torch.arange(case.out_size[0], dtype=torch.float64).view(1, 1, -1, 1)
    taps_row = (torch.arange(case.taps) // case.kernel[1]).repeat(case.deform_groups).view(1, -1, 1, 1)
    # undeformed row of a sample = i * stride - padding + a * dilation = i - 1 + a
    offset[:, 0::2] = where - (rows - 1 + taps_row)
    tensors = [t.requires_grad_() for t in (input, offset, mask, weight, bias)]
    output = modulated_deform_conv2d_ref(*tensors, *case.params)
    expected = torchvision.ops.deform_conv2d(input, offset, weight, bias, padding=(1, 1), mask=mask)
    torch.testing.assert_close(output, expected)
    grad_output = torch.randn(output.shape, generator=gen, dtype=output.dtype)
    actual_grads = _grads(output, tensors, grad_output)
    expected_grads = _grads(expected, tensors, grad_output)
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
    case = ConvCase(n=2, cin=4, cout=6, size=(7, 6), kernel=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2),
                    groups=2, deform_groups=2)
    input, offset, mask, weight, bias = case.tensors(gen)
    offset = torch.zeros_like(offset)
    expected = F.conv2d(input, weight, bias, stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2)
    torch.testing.assert_close(modulated_deform_conv2d_ref(input, offset, torch.ones_like(mask), weight, bias,
                                                           *case.params), expected)
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
    expected = modulated_deform_conv2d_ref(input.detach(), offset.detach(), masked, weight.detach(),
                                           bias.detach(), *case.params)
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
    case = ConvCase(n=1, cin=4, cout=2, size=(4, 5), kernel=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1),
                    groups=2, deform_groups=2, offsets="far")
    tensors = [t.requires_grad_() for t in case.tensors(gen)]
    assert torch.autograd.gradcheck(lambda *t: modulated_deform_conv2d_ref(*t, *case.params), tensors)


# --------------------------------------------------------------------------------------------------
# deform_roi_pool
# --------------------------------------------------------------------------------------------------

def _rois(gen, batch, height, width, scale, count=6):
    """RoIs in input-image coordinates (feature map times 1 / scale): random boxes, some reaching
    past the border, plus the corner cases: a box entirely outside, a zero-width one, a reversed one,
    one smaller than a bin, one covering more than the map."""
    image_h, image_w = height / scale, width / scale
    x1 = uniform((count,), -0.2 * image_w, 0.8 * image_w, gen)
    y1 = uniform((count,), -0.2 * image_h, 0.8 * image_h, gen)
    x2 = x1 + uniform((count,), 0.1 * image_w, 0.9 * image_w, gen)
    y2 = y1 + uniform((count,), 0.1 * image_h, 0.9 * image_h, gen)
    index = torch.randint(0, batch, (count,), generator=gen).to(torch.float64)
    random = torch.stack([index, x1, y1, x2, y2], dim=1)
    special = torch.tensor([
        [0, 1.3 * image_w, 1.2 * image_h, 1.6 * image_w, 1.5 * image_h],  # outside
        [batch - 1, 0.3 * image_w, 0.2 * image_h, 0.3 * image_w, 0.7 * image_h],  # zero width
        [0, 0.7 * image_w, 0.6 * image_h, 0.2 * image_w, 0.1 * image_h],  # reversed
        [batch - 1, 0.41 * image_w, 0.33 * image_h, 0.45 * image_w, 0.36 * image_h],  # tiny
        [0, -0.3 * image_w, -0.4 * image_h, 1.25 * image_w, 1.3 * image_h],  # larger than the map
    ], dtype=torch.float64)
    return torch.cat([random, special])


ROI_CONFIGS = [
    # (batch, channels, height, width, output_size, spatial_scale, sampling_ratio)
    pytest.param(2, 3, 9, 11, 7, 1.0, 0, id="7x7-scale1-adaptive"),
    pytest.param(2, 3, 9, 11, 7, 0.25, 2, id="7x7-scale0.25-ratio2"),
    pytest.param(1, 2, 12, 8, (3, 2), 0.5, 0, id="3x2-scale0.5-adaptive"),
    pytest.param(3, 1, 6, 6, (2, 4), 0.125, 1, id="2x4-scale0.125-ratio1"),
    pytest.param(1, 2, 1, 7, 2, 1.0, 0, id="2x2-height1-adaptive"),
]


@pytest.mark.parametrize("batch, channels, height, width, output_size, spatial_scale, sampling_ratio", ROI_CONFIGS)
def test_roi_pool_reference_without_offset_is_roi_align(batch, channels, height, width, output_size, spatial_scale,
                                                        sampling_ratio, gen):
    """offset=None is RoIAlign with aligned=True: forward and gradient w.r.t. the input."""
    input = torch.randn((batch, channels, height, width), generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _rois(gen, batch, height, width, spatial_scale)
    expected = torchvision.ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned=True)
    actual = deform_roi_pool_ref(input, rois, None, output_size, spatial_scale, sampling_ratio)
    torch.testing.assert_close(actual, expected)
    assert (actual[-5] == 0).all(), "a RoI outside the map pools to 0"
    if sampling_ratio <= 0:  # an adaptive grid of a reversed or empty RoI has no samples
        assert (actual[-4] == 0).all() and (actual[-3] == 0).all()
    else:  # a fixed grid samples even a reversed RoI (mmcv/torchvision agree): not all zero
        assert (actual[-3] != 0).any()
    grad_output = torch.randn(expected.shape, generator=gen, dtype=expected.dtype)
    (expected_grad,) = torch.autograd.grad(expected, input, grad_output)
    (actual_grad,) = torch.autograd.grad(actual, input, grad_output)
    torch.testing.assert_close(actual_grad, expected_grad)


def test_roi_pool_reference_no_rois(gen):
    input = torch.randn((1, 3, 5, 5), generator=gen, dtype=torch.float64)
    assert deform_roi_pool_ref(input, torch.zeros((0, 5), dtype=torch.float64), None, 3).shape == (0, 3, 3, 3)


@pytest.mark.parametrize("spatial_scale, sampling_ratio", [(1.0, 0), (0.5, 2)],
                         ids=["scale1-adaptive", "scale0.5-ratio2"])
def test_roi_pool_reference_uniform_offset_shifts_roi(spatial_scale, sampling_ratio, gen):
    """The same offset in every bin shifts the whole RoI by gamma * offset * RoI size, channel 0
    along x and channel 1 along y: equal to RoIAlign of the shifted box. Pins the offset layout."""
    batch, channels, height, width, pooled, gamma = 2, 3, 10, 9, (3, 4), 0.1
    input = torch.randn((batch, channels, height, width), generator=gen, dtype=torch.float64)
    rois = _rois(gen, batch, height, width, spatial_scale)[:-5]  # ordinary boxes only
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
    rois = _rois(gen, 2, 6, 7, 0.5, count=2)[:-2]  # drops the tiny and the oversized special RoIs
    offset = uniform((rois.shape[0], 2, 2, 3), -3.0, 3.0, gen).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, o: deform_roi_pool_ref(x, rois, o, (2, 3), 0.5, 0, 0.2), (input, offset))


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
