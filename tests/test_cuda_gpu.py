"""CUDA-only checks of the ops that need a real GPU (skipped without one; `make gpu-check` runs them):
tiled and chunked batches with gradients, a non-default stream, more than 2^31 elements, the
deterministic backward's bitwise repeatability, CUDA against the CPU kernels on the same inputs, and
issue 15's findings on the device. Needs neither torchvision nor mmcv/mmdet.
"""

import math
import os

import pytest
import torch

import mmdet_dcnv2.ops as ops
from cases import ConvCase, uniform
from conftest import CUDA_MARKS
from mmdet_dcnv2.ops import deform_roi_pool, modulated_deform_conv2d

# Deterministic mode makes PyTorch refuse cuBLAS GEMMs (the convolution's) without a fixed workspace.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = list(CUDA_MARKS)  # tagged `cuda`, skipped without a GPU and a CUDA build


@pytest.fixture(autouse=True)
def strict_float32():
    """TF32 would round float32 GEMMs to 10 mantissa bits: compare true float32."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def column_budget():
    previous = ops.column_budget()
    yield previous
    ops.set_column_budget(previous)


def conv_run(tensors, params, grad_output, device):
    leaves = [None if t is None else t.detach().to(device).clone().requires_grad_() for t in tensors]
    output = modulated_deform_conv2d(*leaves, *params)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(output, wanted, grad_output.to(device))
    return [output.detach().cpu()] + [g.cpu() for g in grads]


def pool_run(input, rois, offset, params, grad_output, device):
    x = input.detach().to(device).clone().requires_grad_()
    o = None if offset is None else offset.detach().to(device).clone().requires_grad_()
    output = deform_roi_pool(x, rois.to(device), o, *params)
    grads = torch.autograd.grad(output, [x] if o is None else [x, o], grad_output.to(device))
    return [output.detach().cpu()] + [g.cpu() for g in grads]


def assert_all_close(actual, expected, **tolerance):
    for i, (got, want) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(got, want, **tolerance, msg=lambda m, i=i: f"result {i}: {m}")


def pool_inputs(gen, dtype=torch.float64, channels=9, count=40):
    input = torch.randn(2, channels, 12, 14, generator=gen, dtype=torch.float64)
    x1 = uniform((count,), -2.0, 10.0, gen)
    y1 = uniform((count,), -2.0, 8.0, gen)
    rois = torch.stack(
        [
            torch.randint(0, 2, (count,), generator=gen).double(),
            x1,
            y1,
            x1 + uniform((count,), 0.5, 8.0, gen),
            y1 + uniform((count,), 0.5, 8.0, gen),
        ],
        dim=1,
    )
    offset = uniform((count, 2, 3, 3), -1.0, 1.0, gen)
    return input.to(dtype), rois.to(dtype), offset.to(dtype), ((3, 3), 1.0, 0, 0.1)


CONV = ConvCase(n=3, cin=8, cout=6, size=9, stride=1, groups=2, deform_groups=2, offsets="far")


@pytest.mark.parametrize("mode", ["default", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_conv_cuda_matches_cpu(dtype, mode, gen):
    tensors = CONV.tensors(gen, dtype)
    grad_output = torch.randn((CONV.n, CONV.cout) + CONV.out_size, generator=gen).to(dtype)
    on_cpu = conv_run(tensors, CONV.params, grad_output, "cpu")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode == "deterministic")
    try:
        on_cuda = conv_run(tensors, CONV.params, grad_output, "cuda")
    finally:
        torch.use_deterministic_algorithms(previous)
    tolerance = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_all_close(on_cuda, on_cpu, **tolerance)


@pytest.mark.parametrize("images_per_tile", [0.0, 1.0, 2.5], ids=["one_column", "one_image", "2.5_images"])
@pytest.mark.parametrize("mode", ["default", "deterministic"])
def test_conv_cuda_tiled_batches_with_gradients(images_per_tile, mode, column_budget, gen):
    """A column budget below the batch's columns: tiles of one column, one image, 2.5 images (pixel
    ranges). Forward and every gradient equal the untiled CUDA run and the CPU kernel."""
    tensors = CONV.tensors(gen)
    grad_output = torch.randn((CONV.n, CONV.cout) + CONV.out_size, generator=gen, dtype=torch.float64)
    per_image = CONV.cin * CONV.taps * CONV.out_size[0] * CONV.out_size[1] * 8
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode == "deterministic")
    try:
        whole = conv_run(tensors, CONV.params, grad_output, "cuda")
        ops.set_column_budget(int(images_per_tile * per_image))
        tiled = conv_run(tensors, CONV.params, grad_output, "cuda")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_all_close(tiled, whole)
    assert_all_close(tiled, conv_run(tensors, CONV.params, grad_output, "cpu"))


def test_ops_run_on_the_current_stream(gen):
    """On a non-default stream, after a slow producer on that stream: kernels launched on another
    stream would read the input before it is written."""
    tensors = CONV.tensors(gen, torch.float32)
    grad_output = torch.randn((CONV.n, CONV.cout) + CONV.out_size, generator=gen)
    expected = conv_run(tensors, CONV.params, grad_output, "cuda")
    p_input, p_rois, p_offset, p_params = pool_inputs(gen, torch.float32)
    p_grad = torch.randn((p_rois.shape[0], p_input.shape[1], 3, 3), generator=gen)
    p_expected = pool_run(p_input, p_rois, p_offset, p_params, p_grad, "cuda")
    stream = torch.cuda.Stream()
    on_device = [None if t is None else t.cuda() for t in tensors]
    p_on_device = p_input.cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # a few tens of milliseconds of busy work on this stream first
        x = on_device[0] * 1.0  # written on `stream` after the sleep
        px = p_on_device * 1.0
        result = conv_run([x] + on_device[1:], CONV.params, grad_output.cuda(), "cuda")
        p_result = pool_run(px, p_rois.cuda(), p_offset.cuda(), p_params, p_grad.cuda(), "cuda")
    stream.synchronize()
    # (The atomic backward rounds differently run to run; a race would be off by far more.)
    assert_all_close(result, expected, rtol=1e-5, atol=1e-5)
    assert_all_close(p_result, p_expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", ["default", "deterministic"])
def test_pool_cuda_matches_cpu(dtype, mode, gen):
    input, rois, offset, params = pool_inputs(gen, dtype)
    grad_output = torch.randn((rois.shape[0], input.shape[1], 3, 3), generator=gen).to(dtype)
    on_cpu = pool_run(input, rois, offset, params, grad_output, "cpu")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode == "deterministic")
    try:
        on_cuda = pool_run(input, rois, offset, params, grad_output, "cuda")
    finally:
        torch.use_deterministic_algorithms(previous)
    tolerance = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_all_close(on_cuda, on_cpu, **tolerance)


def test_deterministic_backward_is_bitwise_repeatable(gen, deterministic):
    """float32, samples piling up on few pixels: three backward passes are bitwise identical."""
    case = ConvCase(n=2, cin=64, cout=16, size=16, groups=2, deform_groups=2)
    tensors = list(case.tensors(gen, torch.float32))
    tensors[1] = 6 * torch.randn(tensors[1].shape, generator=gen)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen)
    runs = [conv_run(tensors, case.params, grad_output, "cuda") for _ in range(3)]
    input, rois, offset, params = pool_inputs(gen, torch.float32, channels=64, count=200)
    p_grad = torch.randn((rois.shape[0], 64, 3, 3), generator=gen)
    p_runs = [pool_run(input, rois, offset, params, p_grad, "cuda") for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, runs[0]))
    for other in p_runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, p_runs[0]))


@pytest.mark.parametrize("op", ["conv", "pool"])
def test_gradcheck_cuda_with_nondet_tolerance(op, gen):
    """Issue 15, finding 4: the atomic backward is not bitwise reentrant, so CUDA gradcheck needs a
    nondet_tol (torchvision uses one too); the deterministic path needs none (next test)."""
    if op == "conv":
        case = ConvCase(n=2, cin=4, cout=2, size=5, deform_groups=2, offsets="far")
        tensors = [t.cuda().requires_grad_() for t in case.tensors(gen)]
        assert torch.autograd.gradcheck(lambda *t: modulated_deform_conv2d(*t, *case.params), tensors, nondet_tol=1e-12)
    else:
        input, rois, offset, params = pool_inputs(gen, count=4)
        rois = rois.cuda()
        assert torch.autograd.gradcheck(
            lambda x, o: deform_roi_pool(x, rois, o, *params),
            (input.cuda().requires_grad_(), offset.cuda().requires_grad_()),
            nondet_tol=1e-12,
        )


def test_gradcheck_cuda_deterministic(gen, deterministic):
    case = ConvCase(n=2, cin=4, cout=2, size=5, deform_groups=2, offsets="far")
    tensors = [t.cuda().requires_grad_() for t in case.tensors(gen)]
    assert torch.autograd.gradcheck(lambda *t: modulated_deform_conv2d(*t, *case.params), tensors)
    input, rois, offset, params = pool_inputs(gen, count=4)
    rois = rois.cuda()
    assert torch.autograd.gradcheck(
        lambda x, o: deform_roi_pool(x, rois, o, *params),
        (input.cuda().requires_grad_(), offset.cuda().requires_grad_()),
    )


def test_wrong_device_named_before_the_guard(gen):
    """Issue 15, finding 3: a CPU input with a CUDA offset is refused by name, not by the guard."""
    case = ConvCase(n=1, cin=2, cout=2, size=5)
    x, offset, mask, weight, bias = case.tensors(gen)
    op = torch.ops.mmdet_dcnv2.modulated_deform_conv2d.default
    with pytest.raises((ValueError, RuntimeError), match="must be on the device of input"):
        op(x, offset.cuda(), mask, weight, bias, *case.op_params)


def test_nan_mask_outside_the_map_is_nan_on_cuda():
    """Issue 15, finding 1 on the device: 0 * NaN = NaN, as on the CPU."""
    x = torch.ones(1, 1, 3, 3, dtype=torch.float64, device="cuda")
    offset = torch.full((1, 2, 3, 3), 100.0, dtype=torch.float64, device="cuda")
    mask = torch.ones(1, 1, 3, 3, dtype=torch.float64, device="cuda")
    mask[0, 0, 1, 1] = math.nan
    out = modulated_deform_conv2d(x, offset, mask, torch.ones(1, 1, 1, 1, dtype=torch.float64, device="cuda"))
    assert out[0, 0, 1, 1].isnan() and out.nan_to_num().eq(0).all()


@pytest.mark.slow
def test_indices_beyond_int32_with_gradients():
    """More than 2^31 elements: conv (offset/mask gradients) and RoI pooling (input gradient) on the
    last image equal a run on that image alone (32-bit offsets would wrap into another image)."""
    n, c, h, w = 9, 64, 2048, 2048  # 2.4e9 elements, 4.8 GB in bfloat16
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    input = torch.empty((n, c, h, w), device="cuda", dtype=torch.bfloat16).normal_(generator=gen)
    assert input.numel() > 2**31
    weight = torch.randn((1, c, 1, 1), device="cuda", dtype=torch.bfloat16, generator=gen)
    offset = torch.rand((n, 2, h, w), device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    mask = torch.rand((n, 1, h, w), device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    whole = modulated_deform_conv2d(input, offset, mask, weight)
    g_offset, g_mask = torch.autograd.grad(whole[-1:].float().sum(), (offset, mask))
    last_offset = offset[-1:].detach().requires_grad_()
    last_mask = mask[-1:].detach().requires_grad_()
    last = modulated_deform_conv2d(input[-1:], last_offset, last_mask, weight)
    l_offset, l_mask = torch.autograd.grad(last.float().sum(), (last_offset, last_mask))
    torch.testing.assert_close(whole[-1:], last)
    torch.testing.assert_close(g_offset[-1:], l_offset)
    torch.testing.assert_close(g_mask[-1:], l_mask)
    del whole, g_offset, g_mask, last, offset, mask

    x = input.requires_grad_()
    rois = torch.tensor([[n - 1, 1000.5, 1500.25, 1900.0, 2040.0]], device="cuda", dtype=torch.bfloat16)
    pooled = deform_roi_pool(x, rois, None, 7, 1.0, 2)
    (g_x,) = torch.autograd.grad(pooled.float().sum(), (x,))
    x_last = input[-1:].detach().requires_grad_()
    pooled_last = deform_roi_pool(x_last, rois * torch.tensor([0, 1, 1, 1, 1], device="cuda"), None, 7, 1.0, 2)
    (g_last,) = torch.autograd.grad(pooled_last.float().sum(), (x_last,))
    torch.testing.assert_close(pooled, pooled_last)
    torch.testing.assert_close(g_x[-1:], g_last)  # float atomics: the order of the adds may differ
    assert not g_x[:-1].any()
