"""mmdet_dcnv2.ops.modulated_deform_conv2d against the float64 reference (tests/reference.py),
torchvision, finite differences, torch.library.opcheck and torch.compile, on CPU and (where there is
one) CUDA.

Shapes are kept tiny (<= 4 channels per group, maps <= 7x7) so the file runs in seconds; breadth
comes from a hand-picked list of cases covering every hyper-parameter value (cases.CONV_CASES)
plus a hypothesis sweep of random combinations.
"""

import math

import pytest
import torch
import torch.nn as nn
import torchvision.ops
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mmdet_dcnv2.ops as ops
from cases import (
    CONV_CASES,
    ConvCase,
    assert_same_results,
    case_params,
    evaluate,
    far_offsets,
    leaves,
    num_threads,
    present_names,
)
from conftest import DEVICES, requires_cuda
from mmdet_dcnv2.ops import modulated_deform_conv2d
from reference import modulated_deform_conv2d_ref

FORWARD_OP = torch.ops.mmdet_dcnv2.modulated_deform_conv2d.default
BACKWARD_OP = torch.ops.mmdet_dcnv2.modulated_deform_conv2d_backward.default
NAMES = ConvCase.names
BAD_ARGUMENT = (ValueError, RuntimeError)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def random_like(output, gen):
    """A random upstream gradient: a ones-gradient would hide mistakes that permute output pixels."""
    return torch.randn(output.shape, generator=gen, dtype=torch.float64).to(output.dtype).to(output.device)


def check_against_reference(case, gen):
    """Compares forward and every gradient with the reference; returns (tensors, (output, grads))."""
    tensors = case.tensors(gen)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    actual = evaluate(modulated_deform_conv2d, leaves(tensors), case.params, grad_output)
    expected = evaluate(modulated_deform_conv2d_ref, leaves(tensors), case.params, grad_output)
    assert_same_results(actual, expected, names=present_names(case, tensors))
    return tensors, actual


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|: the error relative to the tensor's magnitude."""
    scale = expected.abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / (scale if scale > 0 else 1.0)


# --------------------------------------------------------------------------------------------------
# values and gradients against the reference (float64)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", case_params(CONV_CASES))
def test_matches_reference(case, gen):
    """Forward and the gradients of input, offset, mask, weight and bias equal the reference's."""
    tensors, (output, grads) = check_against_reference(case, gen)
    assert output.shape == (case.n, case.cout) + case.out_size
    assert output.dtype == torch.float64
    present = [t for t in tensors if t is not None]
    for name, t, grad in zip(present_names(case, tensors), present, grads):
        assert grad.shape == t.shape, name
    if case.n == 0:  # an empty batch: empty data gradients, zero parameter gradients
        assert all(g.abs().sum() == 0 for g in grads)


def test_far_offsets_reach_the_border_code(gen):
    """Guard against a vacuous 'far' case: about half of its samples must actually lie outside the
    map (and the rest inside), otherwise the far-outside tests would test nothing."""
    offset = far_offsets((2, 18, 6, 6), gen, 6)
    rows = torch.arange(6, dtype=torch.float64).view(1, 1, 6, 1)
    y = rows + offset[:, 0::2]
    outside = ((y <= -1) | (y >= 6)).double().mean().item()
    assert 0.25 < outside < 0.75


# Non-contiguous layouts, each a function: contiguous tensors -> (leaves, leaves -> the five args).
def _channels_last(t):
    input, offset, mask, weight, bias = t
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (input, offset, mask, weight)]
    return leaves(cl + [bias]), lambda x: x


def _offset_transposed(t):
    """offset and mask stored (N, H, W, C) and permuted back, weight stored (Cin/g, Cout, kh, kw)."""
    input, offset, mask, weight, bias = t
    stored = leaves(
        [
            input,
            offset.permute(0, 2, 3, 1).contiguous(),
            mask.permute(0, 2, 3, 1).contiguous(),
            weight.transpose(0, 1).contiguous(),
            bias,
        ]
    )
    return stored, lambda x: (x[0], x[1].permute(0, 3, 1, 2), x[2].permute(0, 3, 1, 2), x[3].transpose(0, 1), x[4])


def _sliced(t):
    """mmcv's pattern: offset and mask are channel slices of one (N, 3GK, Ho, Wo) conv output; the
    input is a strided window of a larger map; the bias a strided slice."""
    input, offset, mask, weight, bias = t
    n, c, h, w = input.shape
    big = torch.zeros((n, c, h + 2, 2 * w), dtype=input.dtype)
    big[:, :, 1 : h + 1, ::2] = input
    packed = torch.cat([offset, mask], dim=1)
    spread_bias = torch.zeros(2 * bias.shape[0], dtype=bias.dtype)
    spread_bias[::2] = bias
    split = offset.shape[1]
    stored = leaves([big, packed, weight, spread_bias])
    return stored, lambda x: (x[0][:, :, 1 : h + 1, ::2], x[1][:, :split], x[1][:, split:], x[2], x[3][::2])


def _expanded(t):
    """A per-image mask broadcast over the output map (stride 0) and a broadcast batch of inputs."""
    input, offset, mask, weight, bias = t
    stored = leaves([input[:1], offset, mask[:, :, :1, :1], weight, bias])
    return stored, lambda x: (x[0].expand(offset.shape[0], -1, -1, -1), x[1], x[2].expand_as(mask), x[3], x[4])


LAYOUTS = {
    "channels_last": _channels_last,
    "offset_transposed": _offset_transposed,
    "sliced": _sliced,
    "expanded": _expanded,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_noncontiguous_inputs(layout, gen):
    """Any strides in: results and gradients equal the reference's on the same views."""
    case = ConvCase(
        n=2, cin=4, cout=4, size=(6, 7), kernel=(3, 2), stride=(1, 2), padding=(1, 0), groups=2, deform_groups=2
    )
    stored, make_args = LAYOUTS[layout](case.tensors(gen))
    assert not all(a.is_contiguous() for a in make_args(stored) if a is not None), "layout must be non-contiguous"
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    actual = evaluate(modulated_deform_conv2d, stored, case.params, grad_output, make_args)
    expected = evaluate(modulated_deform_conv2d_ref, leaves(stored), case.params, grad_output, make_args)
    assert_same_results(actual, expected, names=[f"stored tensor {i}" for i in range(len(stored))])


@pytest.mark.parametrize("wanted", ["input", "offset", "mask", "weight", "bias", "offset+weight", "nothing"])
def test_partial_requires_grad(wanted, gen):
    """The backward computes only the gradient groups asked for (output_mask): whichever subset
    requires grad, those gradients are still right."""
    case = ConvCase(n=2, cin=4, cout=4, size=6, groups=2, deform_groups=2, offsets="far")
    tensors = case.tensors(gen)
    chosen = [name for name in wanted.split("+") if name in NAMES]  # 'nothing': none
    copies = [t.clone().requires_grad_(name in chosen) for name, t in zip(NAMES, tensors)]
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    output, grads = evaluate(modulated_deform_conv2d, copies, case.params, grad_output)
    assert output.requires_grad == (wanted != "nothing")
    ref_copies = [t.clone().requires_grad_(name in chosen) for name, t in zip(NAMES, tensors)]
    expected = evaluate(modulated_deform_conv2d_ref, ref_copies, case.params, grad_output)
    assert_same_results((output, grads), expected, names=chosen)


@pytest.mark.parametrize("offsets", ["zero", "integer"])
def test_integer_offsets_follow_mmcv_convention(offsets, gen):
    """At integer sample coordinates (zero offsets: every DCN layer at initialisation) bilinear
    interpolation has no derivative. The contract is mmcv's one-sided convention, which the
    reference shares (test_mmcv_parity checks mmcv itself): right derivative, and 0 at exactly -1."""
    case = ConvCase(n=2, cin=4, cout=4, size=5, stride=(1, 2), groups=2, deform_groups=2)
    input, offset, mask, weight, bias = case.tensors(gen)
    if offsets == "zero":
        offset = torch.zeros_like(offset)
    else:  # with padding 1 these put samples exactly on rows/columns -1, 0, H - 1, H and beyond
        offset = torch.randint(-3, 4, offset.shape, generator=gen).to(offset.dtype)
    tensors = (input, offset, mask, weight, bias)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    assert_same_results(
        evaluate(modulated_deform_conv2d, leaves(tensors), case.params, grad_output),
        evaluate(modulated_deform_conv2d_ref, leaves(tensors), case.params, grad_output),
        NAMES,
    )


# ---- random sweep ----------------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2]))
    deform_groups = draw(st.sampled_from([1, 2]))
    cin = math.lcm(groups, deform_groups) * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    size = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    assume(all(size[d] + 2 * padding[d] >= dilation[d] * (kernel[d] - 1) + 1 for d in range(2)))
    return ConvCase(
        n=draw(st.integers(0, 3)),
        cin=cin,
        cout=groups * draw(st.integers(1, 2)),
        size=size,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        deform_groups=deform_groups,
        mask=draw(st.booleans()),
        bias=draw(st.booleans()),
        offsets=draw(st.sampled_from(["off_grid", "far"])),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_random_sweep(case, seed):
    check_against_reference(case, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# finite differences, opcheck
# --------------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    ConvCase(n=1, cin=4, cout=2, size=(4, 4), kernel=(3, 2), stride=(1, 2), padding=(1, 0), groups=2, deform_groups=2),
    ConvCase(n=1, cin=2, cout=2, size=5, mask=False, bias=False),
    ConvCase(n=1, cin=2, cout=3, size=6, stride=2, dilation=2, padding=2, mask=False, offsets="far"),
    ConvCase(n=2, cin=2, cout=2, size=4, kernel=1, padding=1, deform_groups=2, bias=False, offsets="far"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", case_params(GRADCHECK_CASES))
def test_gradcheck(case, device, gen):
    """Analytic gradients are the derivatives of the forward (finite differences, float64), through
    the public function, for all five inputs at once (mask / bias None: the other three)."""
    all_five = leaves(case.tensors(gen), device)
    present = [i for i, t in enumerate(all_five) if t is not None]

    def fn(*inputs):
        args = [None] * 5
        for i, t in zip(present, inputs):
            args[i] = t
        return modulated_deform_conv2d(*args, *case.params)

    # CUDA's atomic backward is not bitwise reentrant: a tolerance for that (docs/cuda.md).
    assert torch.autograd.gradcheck(fn, [all_five[i] for i in present], nondet_tol=1e-12 if device == "cuda" else 0.0)


OPCHECK_CASES = [
    ConvCase(n=2, cin=4, cout=4, size=5, groups=2, deform_groups=2),
    ConvCase(n=1, cin=2, cout=3, size=(6, 5), kernel=(3, 2), stride=(2, 1), padding=(1, 0), mask=False),
    ConvCase(n=2, cin=2, cout=2, size=5, padding=0, bias=False, offsets="far"),
    ConvCase(n=1, cin=2, cout=2, size=4, kernel=1, mask=False, bias=False),
]


def _op_args(case, tensors):
    return tuple(tensors) + case.op_params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("case", case_params(OPCHECK_CASES))
def test_opcheck_forward(case, requires_grad, device, gen):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of the raw forward op."""
    tensors = [None if t is None else t.to(device).requires_grad_(requires_grad) for t in case.tensors(gen)]
    torch.library.opcheck(FORWARD_OP, _op_args(case, tensors))


BACKWARD_MASKS = [
    pytest.param([True, True, True], id="all"),
    pytest.param([False, True, False], id="offset_mask_only"),
    pytest.param([True, False, True], id="input_weight"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_mask", BACKWARD_MASKS)
@pytest.mark.parametrize("case", case_params(OPCHECK_CASES))
def test_opcheck_backward(case, output_mask, device, gen):
    tensors = [None if t is None else t.to(device) for t in case.tensors(gen)]
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64).to(device)
    torch.library.opcheck(BACKWARD_OP, (grad_output,) + _op_args(case, tensors) + (output_mask,))


@pytest.mark.parametrize("output_mask", BACKWARD_MASKS)
@pytest.mark.parametrize("case", case_params(OPCHECK_CASES))
def test_backward_op_contract(case, output_mask, gen):
    """The raw backward op returns (grad_input, grad_offset, grad_mask, grad_weight, grad_bias):
    requested ones equal the reference gradients, the others (and grad_mask / grad_bias when mask /
    bias is None) are empty tensors of shape (0,)."""
    tensors = case.tensors(gen)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    result = BACKWARD_OP(grad_output, *_op_args(case, tensors), output_mask)
    assert isinstance(result, (tuple, list)) and len(result) == 5
    _, expected = evaluate(modulated_deform_conv2d_ref, leaves(tensors), case.params, grad_output)
    expected = iter(expected)
    groups = (0, 1, 1, 2, 2)  # which output_mask entry each gradient belongs to
    for name, t, group, grad in zip(NAMES, tensors, groups, result):
        reference_grad = next(expected) if t is not None else None
        if t is None or not output_mask[group]:
            assert grad.shape == (0,), f"grad of {name} was not requested / has no tensor: expected shape (0,)"
        else:
            torch.testing.assert_close(grad, reference_grad, msg=lambda m, name=name: f"grad of {name}: {m}")


# --------------------------------------------------------------------------------------------------
# an independent implementation: torchvision (float32)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    case_params(
        [
            ConvCase(n=2, cin=4, cout=6, size=7, stride=2, deform_groups=2),
            ConvCase(
                n=2,
                cin=4,
                cout=4,
                size=(7, 6),
                kernel=(3, 2),
                stride=(2, 1),
                padding=(2, 0),
                dilation=2,
                groups=2,
                offsets="far",
            ),
            ConvCase(n=3, cin=4, cout=2, size=6, kernel=1, deform_groups=4, mask=False, bias=False),
        ]
    ),
)
def test_matches_torchvision_float32(case, gen):
    """Forward and gradients agree with torchvision.ops.deform_conv2d in float32: a check that
    does not go through our reference."""
    tensors = case.tensors(gen, torch.float32)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, padding, dilation = (pair(p) for p in case.params[:3])

    def torchvision_fn(input, offset, mask, weight, bias):
        return torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)

    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen)
    actual = evaluate(modulated_deform_conv2d, leaves(tensors), case.params, grad_output)
    expected = evaluate(lambda *t: torchvision_fn(*t), leaves(tensors), (), grad_output)
    # float32 sums of <= 36 products of O(1) numbers: 1e-4 leaves room for a different summation
    # order, not for a wrong term.
    assert_same_results(actual, expected, names=present_names(case, tensors), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# reduced precision, dtype policy
# --------------------------------------------------------------------------------------------------

# A larger channel count than elsewhere: reductions of 16 x 9 terms make a half-precision accumulator
# show (its error grows with the sum's length), while float accumulation stays at output rounding.
LOW_PRECISION_CASE = ConvCase(n=2, cin=32, cout=8, size=7, groups=2, deform_groups=2, offsets="far")


def check_low_precision(dtype, device, gen):
    """Forward and gradients in ``dtype`` against the float64 reference evaluated on the very same
    (already rounded) inputs, so that only the kernel's own rounding is measured. Allowed: 4 units
    of the dtype's epsilon relative to the tensor's magnitude — several times what float (opmath)
    accumulation with a final rounding gives (about 0.5 eps), and less than a half-precision
    accumulator or half-precision sampling coordinates would."""
    case = LOW_PRECISION_CASE
    tensors = case.tensors(gen, dtype)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen).to(dtype)
    output, grads = evaluate(modulated_deform_conv2d, leaves(tensors, device), case.params, grad_output.to(device))
    expected, expected_grads = evaluate(
        modulated_deform_conv2d_ref, leaves(tensors, dtype=torch.float64), case.params, grad_output.double()
    )
    assert output.dtype == dtype and all(g.dtype == dtype for g in grads)
    tolerance = 4 * torch.finfo(dtype).eps
    for name, a, e in zip(("output",) + NAMES, [output] + grads, [expected] + expected_grads):
        assert torch.isfinite(a).all(), name
        error = relative_error(a.cpu(), e)
        assert error <= tolerance, f"{name}: error {error:.3g} of its magnitude > {tolerance:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_cpu(dtype, gen):
    check_low_precision(dtype, "cpu", gen)


def test_float32_matches_reference(gen):
    case = LOW_PRECISION_CASE
    tensors = case.tensors(gen, torch.float32)
    output, grads = evaluate(modulated_deform_conv2d, leaves(tensors), case.params)
    expected, expected_grads = evaluate(modulated_deform_conv2d_ref, leaves(tensors, dtype=torch.float64), case.params)
    for name, a, e in zip(("output",) + NAMES, [output] + grads, [expected] + expected_grads):
        assert relative_error(a, e) <= 4 * torch.finfo(torch.float32).eps, name


F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPE_MIXES = [
    # (input, offset, mask, weight, bias) dtypes; the result has the offset's dtype (mmcv's policy)
    pytest.param((F32, F64, F32, F32, F32), id="f32-offset_f64"),
    pytest.param((F64, F32, F64, F64, F64), id="f64-offset_f32"),
    pytest.param((F16, F32, F16, F32, F32), id="f16_input-offset_f32"),
    pytest.param((F32, F32, BF16, F64, F16), id="mixed-offset_f32"),
    pytest.param((F32, F16, F32, F32, None), id="f32-offset_f16"),
]


@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
def test_dtype_policy(dtypes, gen):
    """input, mask, weight and bias are cast to the offset's dtype; the result has that dtype and
    equals the reference on the cast tensors; each gradient comes back in its tensor's own dtype."""
    case = ConvCase(n=2, cin=4, cout=4, size=5, deform_groups=2, bias=dtypes[4] is not None)
    tensors = [None if t is None else t.to(d) for t, d in zip(case.tensors(gen), dtypes)]
    target = dtypes[1]
    output, grads = evaluate(modulated_deform_conv2d, leaves(tensors), case.params)
    assert output.dtype == target
    for name, t, grad in zip(NAMES, [t for t in tensors if t is not None], grads):
        assert grad.dtype == t.dtype, name
    cast = [None if t is None else t.to(target) for t in tensors]
    expected, expected_grads = evaluate(modulated_deform_conv2d_ref, leaves(cast, dtype=torch.float64), case.params)
    # the kernel rounds in the offset's dtype; a gradient is then rounded once more to its tensor's dtype
    eps = torch.finfo(target).eps
    assert relative_error(output, expected) <= 4 * eps
    for name, t, a, e in zip(NAMES, [t for t in tensors if t is not None], grads, expected_grads):
        assert relative_error(a, e) <= 4 * max(eps, torch.finfo(t.dtype).eps), name


def test_integer_input_follows_offset_dtype(gen):
    """The casting policy is mmcv's ``type_as(offset)``: an integer input is converted, not refused."""
    case = ConvCase(n=1, cin=2, cout=2, size=5)
    input, offset, mask, weight, bias = case.tensors(gen)
    integer = (input * 4).round().to(torch.int64)
    output = modulated_deform_conv2d(integer, offset, mask, weight, bias, *case.params)
    torch.testing.assert_close(
        output, modulated_deform_conv2d_ref(integer.double(), offset, mask, weight, bias, *case.params)
    )


# --------------------------------------------------------------------------------------------------
# non-finite and huge offsets
# --------------------------------------------------------------------------------------------------

BAD_VALUES = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("component", ["dy", "dx", "both"])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf", "1e30", "-1e30"])
def test_nonfinite_offset_contributes_zero(bad, component, dtype, gen):
    """A NaN, infinite or absurd offset removes its sample: the output is finite and equals the
    reference; every gradient is finite; that sample's offset and mask gradients are exactly 0."""
    case = ConvCase(n=2, cin=4, cout=3, size=5, deform_groups=2)
    input, offset, mask, weight, bias = case.tensors(gen, dtype)
    hits = [(1, 1, 4, 2, 3), (0, 0, 0, 0, 0), (0, 1, 8, 4, 4), (1, 0, 2, 0, 4)]  # (n, group, tap, y, x)
    for n, g, k, y, x in hits:
        base = (g * case.taps + k) * 2
        if component in ("dy", "both"):
            offset[n, base, y, x] = bad
        if component in ("dx", "both"):
            offset[n, base + 1, y, x] = bad
    tensors = (input, offset, mask, weight, bias)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen).to(dtype)
    output, grads = evaluate(modulated_deform_conv2d, leaves(tensors), case.params, grad_output)
    expected, expected_grads = evaluate(
        modulated_deform_conv2d_ref, leaves(tensors, dtype=torch.float64), case.params, grad_output.double()
    )
    assert torch.isfinite(output).all()
    tolerance = 4 * torch.finfo(dtype).eps
    assert relative_error(output, expected) <= tolerance
    for name, grad, expected_grad in zip(NAMES, grads, expected_grads):
        assert torch.isfinite(grad).all(), f"grad of {name} not finite"
        assert relative_error(grad, expected_grad) <= tolerance, name
    grad_offset, grad_mask = grads[1], grads[2]
    for n, g, k, y, x in hits:
        base = (g * case.taps + k) * 2
        assert grad_offset[n, base, y, x] == 0 and grad_offset[n, base + 1, y, x] == 0, (n, g, k, y, x)
        assert grad_mask[n, g * case.taps + k, y, x] == 0, (n, g, k, y, x)


def test_all_offsets_nan_gives_bias(gen):
    case = ConvCase(n=2, cin=4, cout=3, size=5, deform_groups=2)
    input, offset, mask, weight, bias = leaves(case.tensors(gen))
    output = modulated_deform_conv2d(input, torch.full_like(offset, float("nan")), mask, weight, bias, *case.params)
    torch.testing.assert_close(output, bias.detach().view(1, -1, 1, 1).expand_as(output))
    output.sum().backward()
    assert input.grad.eq(0).all() and mask.grad.eq(0).all() and weight.grad.eq(0).all()


# --------------------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------------------


def _valid():
    """A valid call (N=2, C=4, 5x5, 3x3 kernel, padding 1, groups 2, deform_groups 2), as a dict."""
    gen = torch.Generator().manual_seed(0)
    case = ConvCase(n=2, cin=4, cout=4, size=5, groups=2, deform_groups=2)
    input, offset, mask, weight, bias = case.tensors(gen, torch.float32)
    return dict(
        input=input,
        offset=offset,
        mask=mask,
        weight=weight,
        bias=bias,
        stride=1,
        padding=1,
        dilation=1,
        groups=2,
        deform_groups=2,
    )


def _with(**changes):
    def build():
        args = _valid()
        for key, value in changes.items():
            args[key] = value(args) if callable(value) else value
        return args

    return build


def _too_small(stride):
    """A 2x2 input under a 3x3 kernel without padding has no output pixel. With stride 2, C-style
    truncating division computes (2 - 3) / 2 + 1 = 1 instead of 0 (floor): a classic bug."""

    def change(a):
        a.update(
            input=a["input"][:, :, :2, :2],
            padding=0,
            stride=stride,
            offset=a["offset"][:, :, :1, :1],
            mask=a["mask"][:, :, :1, :1],
        )
        return a

    return change


BAD_INPUTS = [
    ("input_rank3", _with(input=lambda a: a["input"][0]), "input"),
    ("offset_channels", _with(offset=lambda a: a["offset"][:, :-2]), "offset"),
    ("offset_height", _with(offset=lambda a: a["offset"][:, :, :-1]), "offset"),
    ("offset_width", _with(offset=lambda a: torch.cat([a["offset"], a["offset"][..., :1]], dim=3)), "offset"),
    ("offset_batch", _with(offset=lambda a: a["offset"][:1]), "offset"),
    ("offset_rank", _with(offset=lambda a: a["offset"][0]), "offset"),
    ("mask_channels", _with(mask=lambda a: a["mask"][:, :-1]), "mask"),
    ("mask_height", _with(mask=lambda a: a["mask"][:, :, 1:]), "mask"),
    ("mask_batch", _with(mask=lambda a: a["mask"][:1]), "mask"),
    ("channels_not_divisible_by_groups", _with(groups=3, weight=lambda a: a["weight"][:3, :1]), "groups"),
    (
        "channels_not_divisible_by_deform_groups",
        _with(deform_groups=3, offset=lambda a: torch.zeros(2, 54, 5, 5), mask=lambda a: torch.zeros(2, 27, 5, 5)),
        "deform_groups",
    ),
    ("out_channels_not_divisible_by_groups", _with(weight=lambda a: a["weight"][:3]), "weight|groups"),
    ("weight_in_channels", _with(weight=lambda a: torch.zeros(4, 3, 3, 3)), "weight"),
    ("weight_rank", _with(weight=lambda a: a["weight"][..., 0]), "weight"),
    ("weight_empty_kernel", _with(weight=lambda a: a["weight"][:, :, :0]), "weight"),
    ("bias_length", _with(bias=lambda a: torch.zeros(5)), "bias"),
    ("bias_rank", _with(bias=lambda a: torch.zeros(4, 1)), "bias"),
    ("stride_zero", _with(stride=0), "stride"),
    ("stride_negative", _with(stride=(1, -1)), "stride"),
    ("stride_triple", _with(stride=(1, 1, 1)), "stride"),
    ("dilation_zero", _with(dilation=(0, 1)), "dilation"),
    ("padding_negative", _with(padding=-1), "padding"),
    ("groups_zero", _with(groups=0), "groups"),
    ("deform_groups_zero", _with(deform_groups=0), "deform_groups"),
    ("deform_groups_negative", _with(deform_groups=-2), "deform_groups"),
    # the output-size cases change several arguments at once
    ("output_size_zero", lambda: _too_small(1)(_valid()), r"(?i)input|output|kernel"),
    ("output_size_zero_truncating_division", lambda: _too_small(2)(_valid()), r"(?i)input|output|kernel"),
    (
        "output_size_negative",
        lambda: dict(_too_small(1)(_valid()), input=_valid()["input"][:, :, :1, :1]),
        r"(?i)input|output|kernel",
    ),
]


@pytest.mark.parametrize("build, match", [pytest.param(b, m, id=i) for i, b, m in BAD_INPUTS])
def test_bad_input_is_refused_by_name(build, match):
    """Each bad call raises an error naming the offending argument, never a crash or garbage."""
    with pytest.raises(BAD_ARGUMENT, match=match):
        modulated_deform_conv2d(**build())


def test_integer_offset_is_refused():
    """The offset decides the computation dtype, so it must be floating point."""
    args = _valid()
    args["offset"] = args["offset"].round().to(torch.int32)
    with pytest.raises((TypeError,) + BAD_ARGUMENT, match="offset"):
        modulated_deform_conv2d(**args)


def test_raw_op_refuses_mixed_dtypes():
    """The raw op does not cast: a dtype mismatch is an error naming the odd tensor."""
    a = _valid()
    args = (a["input"], a["offset"].double(), a["mask"], a["weight"], a["bias"], [1, 1], [1, 1], [1, 1], 2, 2)
    with pytest.raises(BAD_ARGUMENT, match="offset"):
        FORWARD_OP(*args)
    args = (a["input"], a["offset"], a["mask"], a["weight"].half(), a["bias"], [1, 1], [1, 1], [1, 1], 2, 2)
    with pytest.raises(BAD_ARGUMENT, match="weight"):
        FORWARD_OP(*args)


def test_raw_op_refuses_integer_tensors():
    a = _valid()
    ints = [a[k].round().to(torch.int64) for k in ("input", "offset", "mask", "weight", "bias")]
    with pytest.raises(BAD_ARGUMENT, match="input"):
        FORWARD_OP(*ints, [1, 1], [1, 1], [1, 1], 2, 2)


@requires_cuda
@pytest.mark.parametrize("odd_one", ["offset", "mask", "weight", "bias"])
def test_mismatched_devices_are_refused(odd_one):
    a = _valid()
    for key in ("input", "offset", "mask", "weight", "bias"):
        if key != odd_one:
            a[key] = a[key].cuda()
    with pytest.raises(BAD_ARGUMENT, match=odd_one):
        modulated_deform_conv2d(**a)


# --------------------------------------------------------------------------------------------------
# torch.compile, determinism, chunking
# --------------------------------------------------------------------------------------------------


class TinyMDConv(nn.Module):
    """The shape of mmcv's ModulatedDeformConv2dPack: a plain conv predicts offsets and masks."""

    def __init__(self, channels=4, out_channels=4, deform_groups=2):
        super().__init__()
        self.deform_groups = deform_groups
        self.conv_offset = nn.Conv2d(channels, 3 * deform_groups * 9, 3, padding=1)
        # not zero-initialised (as mmcv does): the offsets must be non-trivial to test anything
        nn.init.normal_(self.conv_offset.weight, std=0.3)
        self.weight = nn.Parameter(torch.randn(out_channels, channels, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(out_channels))

    def forward(self, x):
        o1, o2, m = self.conv_offset(x).chunk(3, dim=1)
        offset = torch.cat([o1, o2], dim=1)
        return modulated_deform_conv2d(x, offset, m.sigmoid(), self.weight, self.bias, 1, 1, 1, 1, self.deform_groups)


def _run_module(module, x):
    x = x.detach().clone().requires_grad_()
    output = module(x)
    grads = torch.autograd.grad(output, [x] + list(module.parameters()), torch.cos(output.detach()))
    return output, list(grads)


@pytest.mark.parametrize(
    "backend, dynamic",
    [
        pytest.param("eager", False, id="eager"),
        pytest.param("aot_eager", False, id="aot_eager"),
        pytest.param("aot_eager", True, id="aot_eager-dynamic"),
        pytest.param("inductor", False, id="inductor", marks=pytest.mark.slow),
    ],
)
def test_torch_compile(backend, dynamic):
    """The op traces into one graph (fullgraph: no graph break) and the compiled module computes
    what eager does, forward and backward; with dynamic shapes, for two batch sizes."""
    torch.manual_seed(0)
    module = TinyMDConv().double()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=dynamic)
    for batch in (2, 3) if dynamic else (2,):
        x = torch.randn(batch, 4, 6, 7, dtype=torch.float64)
        assert_same_results(
            _run_module(compiled, x), _run_module(module, x), names=["x"] + [n for n, _ in module.named_parameters()]
        )


def test_deterministic_at_fixed_thread_count():
    """Bitwise identical forward and backward, run to run, at a given thread count (design §4): the
    CPU backward must not race on its scatter."""
    gen = torch.Generator().manual_seed(1)
    case = ConvCase(n=2, cin=8, cout=8, size=16, deform_groups=2, groups=2)
    tensors = case.tensors(gen, torch.float32)
    tensors = (tensors[0], 4 * torch.randn(tensors[1].shape, generator=gen)) + tensors[2:]  # overlapping samples
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen)
    with num_threads(2):
        runs = [evaluate(modulated_deform_conv2d, leaves(tensors), case.params, grad_output) for _ in range(3)]
    for output, grads in runs[1:]:
        assert torch.equal(output, runs[0][0])
        for name, grad, first in zip(NAMES, grads, runs[0][1]):
            assert torch.equal(grad, first), name


@pytest.fixture
def column_budget():
    """Restores the column budget whatever the test does to it."""
    if not hasattr(ops, "set_column_budget"):
        pytest.skip("mmdet_dcnv2.ops.set_column_budget is not available")
    previous = ops.set_column_budget(1 << 30)
    ops.set_column_budget(previous)
    yield previous
    ops.set_column_budget(previous)


def test_set_column_budget_returns_previous(column_budget):
    assert ops.set_column_budget(12345) == column_budget
    assert ops.set_column_budget(column_budget) == 12345


@pytest.mark.parametrize("images_per_chunk", [0, 1, 2.5], ids=["budget0", "one_image", "two_and_a_half_images"])
def test_chunked_batch_matches_unchunked(images_per_chunk, column_budget, gen):
    """A budget smaller than the batch's columns splits the batch (here 5 images into chunks of
    1 or 2 + 2 + 1): results and gradients equal the single-chunk run and the reference."""
    case = ConvCase(n=5, cin=4, cout=6, size=9, deform_groups=2, groups=2, offsets="far")
    tensors = case.tensors(gen)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    columns_per_image = case.cin * case.taps * case.out_size[0] * case.out_size[1] * 8  # float64 bytes
    ops.set_column_budget(1 << 30)
    whole = evaluate(modulated_deform_conv2d, leaves(tensors), case.params, grad_output)
    ops.set_column_budget(int(images_per_chunk * columns_per_image))
    chunked = evaluate(modulated_deform_conv2d, leaves(tensors), case.params, grad_output)
    assert_same_results(chunked, whole, NAMES)
    assert_same_results(
        chunked, evaluate(modulated_deform_conv2d_ref, leaves(tensors), case.params, grad_output), NAMES
    )


# --------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU and a CUDA build)
# --------------------------------------------------------------------------------------------------

CUDA_CASES = [
    ConvCase(n=3, cin=4, cout=6, size=7, stride=2, deform_groups=2, offsets="far"),
    ConvCase(n=2, cin=4, cout=4, size=(7, 6), kernel=(3, 2), stride=(2, 1), padding=(2, 0), dilation=2, groups=2),
    ConvCase(n=0, cin=4, cout=4, size=5, groups=2, deform_groups=2),
    ConvCase(n=2, cin=4, cout=2, size=5, kernel=1, mask=False, bias=False, offsets="far"),
]


@pytest.fixture
def strict_float32():
    """TF32 matmuls would round float32 GEMMs to 10 mantissa bits: compare true float32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", case_params(CUDA_CASES))
def test_cuda_matches_cpu(case, dtype, gen, strict_float32):
    """Forward and gradients on CUDA equal the CPU kernel's (which the tests above tie to the
    reference). Tolerances: float64 the default; float32 allows for atomic-add ordering."""
    tensors = case.tensors(gen, dtype)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen).to(dtype)
    on_cuda = evaluate(modulated_deform_conv2d, leaves(tensors, "cuda"), case.params, grad_output.cuda())
    on_cpu = evaluate(modulated_deform_conv2d, leaves(tensors), case.params, grad_output)
    assert on_cuda[0].device.type == "cuda"
    to_cpu = (on_cuda[0].cpu(), [g.cpu() for g in on_cuda[1]])
    tolerances = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_same_results(to_cpu, on_cpu, names=present_names(case, tensors), **tolerances)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_cuda(dtype, gen):
    check_low_precision(dtype, "cuda", gen)


@requires_cuda
def test_cuda_noncontiguous_and_nonfinite(gen):
    """channels_last and sliced tensors, with NaN / inf offsets in them, on CUDA."""
    case = ConvCase(
        n=2, cin=4, cout=4, size=(6, 7), kernel=(3, 2), stride=(1, 2), padding=(1, 0), groups=2, deform_groups=2
    )
    input, offset, mask, weight, bias = case.tensors(gen)
    offset[0, 3, 1, 1] = float("nan")
    offset[1, 8, 2, 0] = float("inf")
    for layout in ("channels_last", "sliced"):
        stored, make_args = LAYOUTS[layout]((input, offset, mask, weight, bias))
        grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
        expected = evaluate(modulated_deform_conv2d, stored, case.params, grad_output, make_args)
        on_cuda = [t.detach().cuda().requires_grad_() for t in stored]  # .cuda() keeps channels_last strides
        output, grads = evaluate(modulated_deform_conv2d, on_cuda, case.params, grad_output.cuda(), make_args)
        assert_same_results(
            (output.cpu(), [g.cpu() for g in grads]),
            expected,
            names=[f"{layout} tensor {i}" for i in range(len(stored))],
        )
        assert torch.isfinite(output).all()


@requires_cuda
@pytest.mark.parametrize("case", case_params(GRADCHECK_CASES[:2]))
def test_cuda_gradcheck(case, gen):
    test_gradcheck(case, "cuda", gen)


@requires_cuda
def test_cuda_opcheck(gen):
    for case in OPCHECK_CASES[:2]:
        tensors = [None if t is None else t.cuda().requires_grad_() for t in case.tensors(gen)]
        torch.library.opcheck(FORWARD_OP, _op_args(case, tensors))
        grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64).cuda()
        detached = [None if t is None else t.detach() for t in tensors]
        torch.library.opcheck(BACKWARD_OP, (grad_output,) + _op_args(case, detached) + ([True, True, True],))


@requires_cuda
def test_cuda_deterministic_algorithms(gen):
    """Under torch.use_deterministic_algorithms(True) the CUDA backward is either bitwise
    reproducible or refuses with an error saying so (design §4) — never silently racy."""
    case = ConvCase(n=2, cin=8, cout=8, size=16, deform_groups=2, groups=2)
    tensors = case.tensors(gen, torch.float32)
    tensors = (tensors[0], 4 * torch.randn(tensors[1].shape, generator=gen)) + tensors[2:]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        try:
            runs = [evaluate(modulated_deform_conv2d, leaves(tensors, "cuda"), case.params) for _ in range(2)]
        except RuntimeError as error:
            assert "determinis" in str(error)
            return
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(runs[0][0], runs[1][0])
    for grad_a, grad_b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(grad_a, grad_b)


@requires_cuda
@pytest.mark.slow
def test_cuda_indices_beyond_int32():
    """An input of more than 2**31 elements: the last image's result must equal a run on that image
    alone (32-bit index arithmetic would wrap and read another image's data)."""
    n, c, h, w = 9, 64, 2048, 2048  # 2.4e9 elements, bfloat16: 4.8 GB
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    input = torch.empty((n, c, h, w), device="cuda", dtype=torch.bfloat16).normal_()
    assert input.numel() > 2**31
    weight = torch.randn((1, c, 1, 1), device="cuda", dtype=torch.bfloat16)
    offset = torch.rand((n, 2, h, w), device="cuda", dtype=torch.bfloat16)
    mask = torch.rand((n, 1, h, w), device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        whole = modulated_deform_conv2d(input, offset, mask, weight)
        last = modulated_deform_conv2d(input[-1:], offset[-1:], mask[-1:], weight)
    torch.testing.assert_close(whole[-1:], last)


@requires_cuda
def test_cuda_deterministic_offset_grads_without_input_grad(gen):
    """With only offset and mask requiring grad (a detached feature map) the backward has no scatter
    into the input; under deterministic algorithms it must then run, and reproduce bitwise."""
    case = ConvCase(n=2, cin=64, cout=8, size=16, deform_groups=1)
    x, offset, mask, weight, bias = (t.to("cuda") for t in case.tensors(gen, torch.float32))
    offset = (4 * offset).requires_grad_()
    mask = mask.requires_grad_()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            y = modulated_deform_conv2d(x, offset, mask, weight, bias, *case.params)
            grads.append(torch.autograd.grad(y.square().sum(), (offset, mask)))
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_input_channels_give_the_bias(device, gen):
    """An empty sum over input channels: the output is the bias, every gradient but the bias' is zero."""
    x = torch.randn(2, 0, 5, 5, device=device, requires_grad=True)
    offset = torch.randn(2, 18, 3, 3, generator=gen).to(device).requires_grad_()
    mask = torch.rand(2, 9, 3, 3, generator=gen).to(device).requires_grad_()
    weight = torch.randn(4, 0, 3, 3, device=device, requires_grad=True)
    bias = torch.randn(4, generator=gen).to(device).requires_grad_()
    y = modulated_deform_conv2d(x, offset, mask, weight, bias)
    assert torch.equal(y, bias.detach().view(1, 4, 1, 1).expand(2, 4, 3, 3))
    g_x, g_off, g_mask, g_w, g_b = torch.autograd.grad(y.sum(), (x, offset, mask, weight, bias))
    assert g_x.shape == x.shape and g_w.shape == weight.shape
    assert not g_off.any() and not g_mask.any()
    assert torch.equal(g_b, torch.full((4,), 18.0, device=device))


def test_double_backward_is_refused_plainly(gen):
    """No second derivative is implemented: asking for one says so instead of failing obscurely."""
    case = ConvCase(n=1, cin=2, cout=2, size=5)
    x, offset, mask, weight, bias = (t.requires_grad_() for t in case.tensors(gen, torch.float64))
    y = modulated_deform_conv2d(x, offset, mask, weight, bias, *case.params)
    (g_x,) = torch.autograd.grad(y.sum(), (x,), create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g_x.sum().backward()
