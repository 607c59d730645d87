"""Modulated deformable RoI pooling: kernels against the float64 reference, gradcheck, opcheck,
torchvision's RoIAlign, low precision, determinism, torch.compile, corner cases and errors."""

import math

import pytest
import torch
import torchvision

from cases import (
    ROI_CASES,
    RoICase,
    assert_same_results,
    case_params,
    corner_row,
    evaluate,
    leaves,
    make_rois,
    num_threads,
    present_names,
    uniform,
)
from conftest import DEVICES, requires_cuda
from mmdet_dcnv2.ops import deform_roi_pool
from reference import deform_roi_pool_ref, pair

FORWARD_OP = torch.ops.mmdet_dcnv2.deform_roi_pool.default
BACKWARD_OP = torch.ops.mmdet_dcnv2.deform_roi_pool_backward.default
GRADS = RoICase.differentiable  # input and offset; the boxes get none


def assert_matches_reference(case, tensors, gen, device="cpu"):
    """Forward and the gradients of input and offset on ``device`` equal the float64 reference's."""
    grad_output = torch.randn(case.output_shape(tensors[1].shape[0]), generator=gen, dtype=torch.float64)
    expected = evaluate(deform_roi_pool_ref, leaves(tensors, differentiable=GRADS), case.params, grad_output)
    output, grads = evaluate(
        deform_roi_pool, leaves(tensors, device, differentiable=GRADS), case.params, grad_output.to(device)
    )
    assert_same_results((output.cpu(), [g.cpu() for g in grads]), expected, present_names(case, tensors))


# --------------------------------------------------------------------------------------------------
# The kernels against the reference (float64)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", case_params(ROI_CASES))
def test_matches_reference(case, device, gen):
    """Forward and both gradients, RoIs outside / degenerate / reversed / tiny / larger than the map."""
    assert_matches_reference(case, case.tensors(gen), gen, device)


@pytest.mark.parametrize("device", DEVICES)
def test_corner_case_rois(device, gen):
    """Adaptive sampling: RoIs outside the map, of zero width or area, or reversed pool to 0. A
    fixed grid still samples a zero-width or reversed RoI (as mmcv and torchvision do)."""
    case = RoICase(2, 3, (9, 11), 7, 1.0, 0, "near", count=0)
    input, rois, offset = case.tensors(gen)
    outside, zero_width, zero_area, reversed_ = (
        corner_row(name) for name in ("outside", "zero_width", "zero_area", "reversed")
    )
    adaptive = deform_roi_pool(input.to(device), rois.to(device), offset.to(device), *case.params).cpu()
    for row in (outside, zero_width, zero_area, reversed_):
        assert adaptive[row].eq(0).all(), row
    fixed = deform_roi_pool(input.to(device), rois.to(device), offset.to(device), 7, 1.0, 2).cpu()
    assert fixed[outside].eq(0).all()
    assert fixed[zero_width].ne(0).any() and fixed[reversed_].ne(0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_no_rois(device):
    input = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    rois = torch.zeros(0, 5, dtype=torch.float64, device=device)
    offset = torch.zeros(0, 2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    output = deform_roi_pool(input, rois, offset, (3, 4))
    assert output.shape == (0, 3, 3, 4)
    output.sum().backward()
    assert input.grad.eq(0).all() and input.grad.shape == input.shape and offset.grad.shape == offset.shape
    assert deform_roi_pool(input[:0], rois, None, 2).shape == (0, 3, 2, 2)  # no images either


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_nonfinite_roi_coordinates_pool_to_zero(sampling_ratio, device, gen):
    """A RoI with a NaN or infinite coordinate pools to 0 and passes no gradient (never UB); the
    other RoIs are unaffected."""
    case = RoICase(2, 3, (9, 11), (3, 5), 0.5, sampling_ratio, "near", count=4)
    input, rois, offset = case.tensors(gen)
    good = rois[:4]
    bad = good[:3].clone()
    bad[0, 1] = math.nan
    bad[1, 4] = math.inf
    bad[2, 2] = -math.inf
    rois = torch.cat([good, bad])
    offset = torch.cat([offset[:4], offset[:3]])
    grad_output = torch.randn(case.output_shape(rois.shape[0]), generator=gen, dtype=torch.float64)
    output, (grad_input, grad_offset) = evaluate(
        deform_roi_pool,
        leaves((input, rois, offset), device, differentiable=GRADS),
        case.params,
        grad_output.to(device),
    )
    assert output[4:].eq(0).all()
    assert torch.isfinite(grad_input).all() and grad_offset[4:].eq(0).all()
    expected, (expected_input, expected_offset) = evaluate(
        deform_roi_pool_ref, leaves((input, good, offset[:4]), differentiable=GRADS), case.params, grad_output[:4]
    )
    torch.testing.assert_close(output[:4].cpu(), expected)
    torch.testing.assert_close(grad_input.cpu(), expected_input)
    torch.testing.assert_close(grad_offset[:4].cpu(), expected_offset)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_offsets_zero_their_bin(device, gen):
    """A NaN or infinite offset sends its bin's samples nowhere: that bin pools to 0, no NaN leaks."""
    input = torch.randn(1, 2, 6, 6, generator=gen, dtype=torch.float64)
    rois = torch.tensor([[0, 0.5, 1.0, 5.0, 4.5]], dtype=torch.float64)
    offset = uniform((1, 2, 2, 2), -0.5, 0.5, gen)
    offset[0, 0, 0, 1] = math.nan
    offset[0, 1, 1, 0] = math.inf
    output, (grad_input, grad_offset) = evaluate(
        deform_roi_pool,
        leaves((input, rois, offset), device, differentiable=GRADS),
        (2, 1.0, 2, 0.1),
        torch.randn(1, 2, 2, 2, generator=gen, dtype=torch.float64).to(device),
    )
    assert output[0, :, 0, 1].eq(0).all() and output[0, :, 1, 0].eq(0).all() and output[0, :, 0, 0].ne(0).all()
    assert torch.isfinite(grad_input).all() and torch.isfinite(grad_offset).all()
    assert grad_offset[0, :, 0, 1].eq(0).all() and grad_offset[0, :, 1, 0].eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_offset_gradient_is_zero_in_the_clamped_band(device):
    """Samples in the band [-1, 0] along x read the clamped border column: the value does not move
    with x, so d/d(offset x) is exactly 0 (mmcv's backward would not say so), while y stays live."""
    input = torch.arange(1.0, 17.0, dtype=torch.float64).view(1, 1, 4, 4) ** 2
    rois = torch.tensor([[0, 0.0, 1.1, 0.4, 2.7]], dtype=torch.float64)  # x samples at -0.5 + 0.2 = -0.3
    offset = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    _, (_, grad_offset) = evaluate(
        deform_roi_pool, leaves((input, rois, offset), device, differentiable=GRADS), (1, 1.0, 1, 0.1)
    )  # upstream gradient 1
    assert grad_offset[0, 0].eq(0).all() and grad_offset[0, 1].ne(0).all()


# --------------------------------------------------------------------------------------------------
# gradcheck and opcheck
# --------------------------------------------------------------------------------------------------


def sample_coordinates(rois, offset, output_size, spatial_scale, sampling_ratio, gamma):
    """(ys, xs) of the samples of every bin, keyed by (r, i, j): the forward's formula in Python floats
    (double precision, like the float64 kernel), used only to vet gradcheck cases."""
    pooled_h, pooled_w = pair(output_size)
    coords = {}
    for r, (_, x1, y1, x2, y2) in enumerate(rois.tolist()):
        start_x, start_y = x1 * spatial_scale - 0.5, y1 * spatial_scale - 0.5
        roi_w, roi_h = x2 * spatial_scale - 0.5 - start_x, y2 * spatial_scale - 0.5 - start_y
        bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
        grid_h = sampling_ratio if sampling_ratio > 0 else max(math.ceil(bin_h), 0)
        grid_w = sampling_ratio if sampling_ratio > 0 else max(math.ceil(bin_w), 0)
        off_x, off_y = offset[r].tolist()
        for i in range(pooled_h):
            for j in range(pooled_w):
                y0 = start_y + gamma * roi_h * off_y[i][j] + i * bin_h
                x0 = start_x + gamma * roi_w * off_x[i][j] + j * bin_w
                coords[r, i, j] = (
                    [y0 + (k + 0.5) * bin_h / grid_h for k in range(grid_h)],
                    [x0 + (k + 0.5) * bin_w / grid_w for k in range(grid_w)],
                )
    return coords


def off_grid_roi_offsets(gen, rois, output_size, spatial_scale, sampling_ratio, gamma, spread, margin=0.02):
    """Offsets in [-spread, spread], redrawn bin by bin until every sample lies at least `margin` from
    an integer. Grid lines and the edges of the clamped band (-1, 0, H - 1, H) all lie on integers:
    away from them the forward is smooth, so finite differences and the kernels' derivatives agree."""
    offset = uniform((rois.shape[0], 2) + pair(output_size), -spread, spread, gen)
    for _ in range(200):
        coords = sample_coordinates(rois, offset, output_size, spatial_scale, sampling_ratio, gamma)
        bad = [key for key, (ys, xs) in coords.items() if any(abs(v - round(v)) < margin for v in ys + xs)]
        if not bad:
            return offset
        for r, i, j in bad:
            offset[r, :, i, j] = uniform((2,), -spread, spread, gen)
    raise AssertionError("could not draw offsets that keep every sample away from the integer grid")


GRADCHECK_CONFIGS = [
    pytest.param((2, 3), 0.5, 0, 2.0, id="2x3-scale0.5-adaptive"),
    pytest.param(2, 1.0, 2, 12.0, id="2x2-scale1-ratio2-far"),
    pytest.param((3, 1), 0.25, 1, 6.0, id="3x1-scale0.25-ratio1"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_size, spatial_scale, sampling_ratio, spread", GRADCHECK_CONFIGS)
def test_gradcheck(output_size, spatial_scale, sampling_ratio, spread, device, gen):
    """float64 finite differences, samples inside, in the clamped band and off the map."""
    gamma = 0.2
    height, width = 5, 6
    rois = make_rois(gen, 2, height, width, spatial_scale, count=2)
    rois = rois[[0, 1] + [corner_row(name) for name in ("outside", "zero_width", "reversed", "larger_than_map")]]
    offset = off_grid_roi_offsets(gen, rois, output_size, spatial_scale, sampling_ratio, gamma, spread)
    input = torch.randn(2, 2, height, width, generator=gen, dtype=torch.float64, device=device)
    rois, offset = rois.to(device), offset.to(device)
    assert torch.autograd.gradcheck(
        lambda x, o: deform_roi_pool(x, rois, o, output_size, spatial_scale, sampling_ratio, gamma),
        (input.requires_grad_(), offset.requires_grad_()),
        nondet_tol=1e-12 if device == "cuda" else 0.0,
    )  # CUDA's atomic backward: see docs/cuda.md


def opcheck_samples(device, gen):
    """(forward args, backward args) of the raw ops: with and without offset, and no RoIs."""
    samples = []
    for case, count in ((ROI_CASES[1], 2), (ROI_CASES[5], 2), (ROI_CASES[4], 0)):
        input, rois, offset = RoICase(
            case.batch, case.channels, case.size, *case.params[:3], case.offsets, count=count
        ).tensors(gen)
        if count == 0:
            rois = rois[:0]
            offset = offset[:0]
        input, rois = input.to(device), rois.to(device)
        offset = None if offset is None else offset.to(device)
        grad_output = torch.randn(case.output_shape(rois.shape[0]), generator=gen, dtype=torch.float64).to(device)
        forward = (input.requires_grad_(), rois, None if offset is None else offset.requires_grad_(), *case.op_params)
        backward = (grad_output, input.detach(), rois, None if offset is None else offset.detach(), *case.op_params)
        samples.append((forward, backward))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    for k, (forward, backward) in enumerate(opcheck_samples(device, gen)):
        torch.library.opcheck(FORWARD_OP, forward)
        masks = ([True, True], [False, True], [True, False]) if k == 0 else ([True, True],)
        for output_mask in masks:
            torch.library.opcheck(BACKWARD_OP, backward + (output_mask,))


# --------------------------------------------------------------------------------------------------
# Cross-checks, precision, dtype policy, strides
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "output_size, spatial_scale, sampling_ratio", [(7, 1.0, 0), (7, 0.25, 2), ((3, 5), 0.25, 0), ((14, 14), 0.5, 2)]
)
def test_without_offset_equals_torchvision_roi_align(output_size, spatial_scale, sampling_ratio, dtype, device, gen):
    input = torch.randn(2, 3, 10, 13, generator=gen, dtype=torch.float64).to(device, dtype)
    rois = make_rois(gen, 2, 10, 13, spatial_scale, count=8).to(device, dtype)
    grad_output = torch.randn((rois.shape[0], 3) + pair(output_size), generator=gen, dtype=torch.float64)
    expected = evaluate(
        lambda x, r, o: torchvision.ops.roi_align(x, r, output_size, spatial_scale, sampling_ratio, aligned=True),
        leaves((input, rois, None), differentiable=GRADS),
        (),
        grad_output,
    )
    actual = evaluate(
        deform_roi_pool,
        leaves((input, rois, None), differentiable=GRADS),
        (output_size, spatial_scale, sampling_ratio),
        grad_output,
    )
    assert_same_results(actual, expected, ["input"])


LOW_PRECISION = [
    pytest.param(torch.float16, 2e-3, id="f16"),
    pytest.param(torch.bfloat16, 1.6e-2, id="bf16"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, eps", LOW_PRECISION)
@pytest.mark.parametrize("case", case_params([ROI_CASES[0], ROI_CASES[4]]))
def test_low_precision_matches_reference(case, dtype, eps, device, gen):
    """Half types accumulate in float: against the float64 reference on the same (rounded) inputs,
    errors stay at the level of the result's own rounding."""
    tensors = [t.to(dtype) for t in case.tensors(gen)]
    grad_output = torch.randn(case.output_shape(tensors[1].shape[0]), generator=gen).to(dtype)
    output, grads = evaluate(
        deform_roi_pool, leaves(tensors, device, differentiable=GRADS), case.params, grad_output.to(device)
    )
    expected, expected_grads = evaluate(
        deform_roi_pool_ref,
        leaves(tensors, dtype=torch.float64, differentiable=GRADS),
        case.params,
        grad_output.double(),
    )
    for name, got, want in zip(
        ("output", "grad of input", "grad of offset"), [output] + grads, [expected] + expected_grads
    ):
        assert got.dtype == dtype
        scale = want.abs().max().item()
        torch.testing.assert_close(
            got.cpu().double(), want, rtol=4 * eps, atol=4 * eps * scale, msg=lambda m: f"{name}: {m}"
        )


def test_dtype_policy(gen):
    """input and rois follow offset's dtype; without offset rois follow input's (mmcv's policy)."""
    case = ROI_CASES[0]
    input, rois, offset = case.tensors(gen)
    input32 = input.float().requires_grad_()
    output = deform_roi_pool(input32, rois.float(), offset.requires_grad_(), *case.params)
    assert output.dtype == torch.float64
    output.sum().backward()
    assert input32.grad.dtype == torch.float32 and offset.grad.dtype == torch.float64
    assert deform_roi_pool(input32, rois, None, *case.params).dtype == torch.float32
    int_rois = torch.tensor([[1, 2, 3, 8, 7]])
    torch.testing.assert_close(
        deform_roi_pool(input, int_rois, None, 3), deform_roi_pool(input, int_rois.double(), None, 3)
    )


def test_non_contiguous_inputs(gen):
    case = ROI_CASES[1]
    input, rois, offset = case.tensors(gen)
    grad_output = torch.randn(case.output_shape(rois.shape[0]), generator=gen, dtype=torch.float64)
    expected = evaluate(deform_roi_pool, leaves((input, rois, offset), differentiable=GRADS), case.params, grad_output)
    strided = leaves(
        (
            input.to(memory_format=torch.channels_last),
            rois.t().contiguous().t(),
            offset.transpose(2, 3).contiguous().transpose(2, 3),
        ),
        differentiable=GRADS,
    )
    assert not any(t.is_contiguous() for t in strided)
    actual = evaluate(deform_roi_pool, strided, case.params, grad_output)
    assert_same_results(actual, expected, present_names(case, strided), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Determinism and torch.compile
# --------------------------------------------------------------------------------------------------


def test_cpu_backward_is_bitwise_deterministic(gen):
    """Run to run and across thread counts: each gradient element sums in a fixed order."""
    case = RoICase(2, 16, (20, 24), 7, 0.5, 0, "far", count=40)
    input, rois, offset = case.tensors(gen)
    grad_output = torch.randn((rois.shape[0], 16, 7, 7), generator=gen, dtype=torch.float64)
    runs = []
    for threads in (torch.get_num_threads(), torch.get_num_threads(), 1, 3):
        with num_threads(threads):
            runs.append(BACKWARD_OP(grad_output, input, rois, offset, *case.op_params, [True, True]))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def test_torch_compile_aot_eager(gen):
    case = ROI_CASES[4]
    tensors = case.tensors(gen)

    def loss(x, r, o):
        return deform_roi_pool(x, r, o, *case.params).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    expected = evaluate(loss, leaves(tensors, differentiable=GRADS), ())
    actual = evaluate(compiled, leaves(tensors, differentiable=GRADS), ())
    assert_same_results(actual, expected, present_names(case, tensors))


# --------------------------------------------------------------------------------------------------
# Errors name the argument
# --------------------------------------------------------------------------------------------------


def _rois_with_index(value):
    return torch.tensor([[0, 0.5, 0.5, 3.5, 4.0], [value, 1.0, 0.0, 4.0, 2.0]], dtype=torch.float64)


def _raw(input=None, rois=None, offset="zeros", output_size=(2, 2), spatial_scale=1.0, sampling_ratio=0, gamma=0.1):
    """A call of the raw forward op on two images, valid but for the argument given."""
    input = torch.randn(2, 3, 5, 5, dtype=torch.float64) if input is None else input
    rois = _rois_with_index(1) if rois is None else rois
    if isinstance(offset, str):
        offset = torch.zeros(rois.shape[0], 2, *output_size, dtype=torch.float64)
    return lambda: FORWARD_OP(input, rois, offset, list(output_size), spatial_scale, sampling_ratio, gamma)


BAD_ARGUMENTS = [
    pytest.param(_raw(input=torch.randn(3, 5, 5, dtype=torch.float64)), "input must be 4-D", id="input-3d"),
    pytest.param(_raw(rois=torch.zeros(2, 4, dtype=torch.float64)), r"rois must have shape \(R, 5\)", id="rois-4-cols"),
    pytest.param(_raw(rois=torch.zeros(5, dtype=torch.float64)), r"rois must have shape \(R, 5\)", id="rois-1d"),
    pytest.param(
        _raw(rois=torch.zeros(2, 5, dtype=torch.float32)), "rois must have the dtype of input", id="rois-dtype"
    ),
    pytest.param(_raw(rois=_rois_with_index(2)), r"rois\[:, 0\] must hold batch indices", id="batch-index-too-big"),
    pytest.param(_raw(rois=_rois_with_index(-1)), r"rois\[:, 0\] must hold batch indices", id="batch-index-negative"),
    pytest.param(_raw(rois=_rois_with_index(0.5)), r"rois\[:, 0\] must hold batch indices", id="batch-index-fraction"),
    pytest.param(_raw(rois=_rois_with_index(math.nan)), r"rois\[:, 0\] must hold batch indices", id="batch-index-nan"),
    pytest.param(
        _raw(offset=torch.zeros(2, 2, 3, 2, dtype=torch.float64)), "offset must have shape", id="offset-shape"
    ),
    pytest.param(
        _raw(offset=torch.zeros(2, 2, 2, 2, dtype=torch.float32)),
        "offset must have the dtype of input",
        id="offset-dtype",
    ),
    pytest.param(_raw(output_size=(0, 2)), "output_size must be >= 1", id="output-size-zero"),
    pytest.param(_raw(output_size=(2, -3), offset=None), "output_size must be >= 1", id="output-size-negative"),
    pytest.param(_raw(spatial_scale=0.0), "spatial_scale must be a positive finite number", id="scale-zero"),
    pytest.param(_raw(spatial_scale=math.nan), "spatial_scale must be a positive finite number", id="scale-nan"),
    pytest.param(_raw(sampling_ratio=1 << 20), "sampling_ratio must be <= 4096", id="sampling-ratio-huge"),
    pytest.param(_raw(gamma=math.inf), "gamma must be finite", id="gamma-inf"),
]


@pytest.mark.parametrize("call, message", BAD_ARGUMENTS)
def test_bad_arguments_raise_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_grad_output_raises():
    input = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    rois = torch.tensor([[0, 0.5, 0.5, 3.5, 4.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        BACKWARD_OP(torch.zeros(1, 3, 2, 3, dtype=torch.float64), input, rois, None, [2, 2], 1.0, 0, 0.1, [True, True])


def test_functional_api_argument_errors():
    input = torch.randn(1, 2, 5, 5)
    rois = torch.tensor([[0, 0.5, 0.5, 3.5, 4.0]])
    with pytest.raises(ValueError, match="output_size must be an int or a pair"):
        deform_roi_pool(input, rois, None, (2, 2, 2))
    with pytest.raises(TypeError, match="rois must be a torch.Tensor"):
        deform_roi_pool(input, [[0, 1, 1, 3, 3]])
    with pytest.raises(TypeError, match="offset must be a floating-point tensor"):
        deform_roi_pool(input, rois, torch.zeros(1, 2, 7, 7, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=["f64", "f32", "f16", "bf16"]
)
@pytest.mark.parametrize("case", case_params([ROI_CASES[1], ROI_CASES[3], ROI_CASES[5]]))
def test_cuda_matches_cpu(case, dtype, gen):
    tensors = [None if t is None else t.to(dtype) for t in case.tensors(gen)]
    grad_output = torch.randn(case.output_shape(tensors[1].shape[0]), generator=gen).to(dtype)
    on_cpu = evaluate(deform_roi_pool, leaves(tensors, differentiable=GRADS), case.params, grad_output)
    on_cuda = evaluate(deform_roi_pool, leaves(tensors, "cuda", differentiable=GRADS), case.params, grad_output.cuda())
    for got, want in zip([on_cuda[0]] + on_cuda[1], [on_cpu[0]] + on_cpu[1]):
        scale = max(want.abs().max().item(), 1.0)
        tolerance = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(got.cpu().double(), want.double(), rtol=tolerance, atol=tolerance * scale)


@requires_cuda
def test_cuda_invalid_batch_index_pools_to_zero(gen):
    """Documented: CUDA does not sync to validate batch indices; an invalid one pools to 0, no grad."""
    input = torch.randn(2, 3, 5, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    rois = torch.tensor(
        [[2, 0.5, 0.5, 3.5, 4.0], [math.nan, 0.5, 0.5, 3.5, 4.0], [0.5, 0.5, 0.5, 3.5, 4.0]],
        dtype=torch.float64,
        device="cuda",
    )
    offset = torch.full((3, 2, 2, 2), 0.1, dtype=torch.float64, device="cuda", requires_grad=True)
    output = deform_roi_pool(input, rois, offset, 2)
    assert output.eq(0).all()
    output.sum().backward()
    assert input.grad.eq(0).all() and offset.grad.eq(0).all()


@requires_cuda
def test_cuda_backward_is_deterministic_under_deterministic_algorithms(gen):
    """Under torch.use_deterministic_algorithms(True) the backward takes its deterministic path
    (docs/cuda.md) instead of raising: two runs agree bitwise."""
    input = torch.randn(1, 9, 5, 5, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 3.5, 4.0], [0, 0.7, 0.2, 3.1, 4.4]], device="cuda")
    offset = torch.full((2, 2, 2, 2), 0.1, device="cuda", requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [
            torch.autograd.grad(deform_roi_pool(input, rois, offset, 2).square().sum(), (input, offset))
            for _ in range(2)
        ]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_double_backward_is_refused_plainly(gen):
    """No second derivative is implemented: asking for one says so instead of returning zeros."""
    input = torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0.0, 1.3, 1.7, 6.2, 5.9]], dtype=torch.float64)
    offset = (0.1 * torch.randn(1, 2, 2, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    out = deform_roi_pool(input, rois, offset, 2)
    (g_offset,) = torch.autograd.grad(out.square().sum(), (offset,), create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g_offset.sum().backward()
