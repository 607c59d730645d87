"""The CUDA kernels (csrc/cuda/*.cu), run on the host: every CI run exercises them without a GPU.

The host-run build (tests/hostcuda.py, csrc/cuda/host_emulation.h) compiles the unmodified kernel
bodies as C++ and runs each launch block by block, thread by thread, blocks and threads in an order
shuffled by a seed, under the same driver as the CUDA build (csrc/deform_conv.cpp). Its ops are
torch.ops.mmdet_dcnv2_hostcuda.* and take CPU tensors.

Covered: forward and every gradient against tests/reference.py (float64 tight, float32), in every
launch configuration the CUDA code has (channel blocks split with atomics, one block per group,
64-bit indices, a grid small enough that grid-stride loops repeat, column tiles of one column and of
2.5 images, deterministic mode); half types and their float accumulators; empty batches, zero RoIs,
invalid batch indices, non-finite offsets and masks; the deterministic backward (bitwise identical for
every block order, where the atomic one is not); the argument checks before the device guard.
"""

import functools
import math

import pytest
import torch

import hostcuda
import mmdet_dcnv2.ops as shipped
from cases import CONV_CASES, ConvCase, uniform
from conftest import SEED
from reference import deform_roi_pool_ref, modulated_deform_conv2d_ref

CONV_NAMES = ("input", "offset", "mask", "weight", "bias")


@pytest.fixture(scope="module", autouse=True)
def host_library():
    """Builds (once per source change) and loads the host-run library."""
    return hostcuda.library()


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def host_budget():
    """Restores the host-run build's column budget."""
    previous = hostcuda.column_budget()
    yield previous
    hostcuda.column_budget(previous)


def leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def conv_results(fn, tensors, params, grad_output):
    """(output, [grads of the tensors that are not None])."""
    args = leaves(tensors)
    output = fn(*args, *params)
    wanted = [t for t in args if t is not None]
    return output.detach(), list(torch.autograd.grad(output, wanted, grad_output.to(output.dtype)))


def assert_results_close(actual, expected, names, **tolerance):
    torch.testing.assert_close(actual[0], expected[0], **tolerance, msg=lambda m: f"output: {m}")
    for name, got, want in zip(names, actual[1], expected[1]):
        torch.testing.assert_close(got, want, **tolerance, msg=lambda m, name=name: f"grad of {name}: {m}")


def assert_results_equal(actual, expected, names, what):
    assert torch.equal(actual[0], expected[0]), f"output differs {what}"
    for name, got, want in zip(names, actual[1], expected[1]):
        assert torch.equal(got, want), f"grad of {name} differs {what}"


def present(tensors, names=CONV_NAMES):
    return [name for name, t in zip(names, tensors) if t is not None]


# --------------------------------------------------------------------------------------------------
# the library itself
# --------------------------------------------------------------------------------------------------


def test_schemas_match_the_shipped_library():
    """The host-run library is the shipped sources under another namespace: same schemas."""
    for name in (
        "modulated_deform_conv2d",
        "modulated_deform_conv2d_backward",
        "deform_roi_pool",
        "deform_roi_pool_backward",
    ):
        ours = hostcuda.schema_text(getattr(hostcuda.library(), name))
        theirs = hostcuda.schema_text(getattr(torch.ops.mmdet_dcnv2, name))
        assert ours == theirs


def test_block_order_follows_the_seed(gen):
    """Sanity of the emulation: a float32 atomic scatter with many adds per element rounds
    differently under different block orders, and identically under the same seed."""
    tensors, params, grad_output = overlapping_conv(gen)
    runs = {}
    for seed in (1, 1, 2, 3):
        with hostcuda.emulation(seed=seed):
            runs.setdefault(seed, []).append(
                conv_results(hostcuda.modulated_deform_conv2d, tensors, params, grad_output)
            )
    assert_results_equal(runs[1][0], runs[1][1], CONV_NAMES, "between two runs with the same seed")
    assert any(not torch.equal(runs[1][0][1][0], runs[s][0][1][0]) for s in (2, 3)), (
        "grad_input of the atomic path did not depend on the block order: the test could not tell"
    )


# --------------------------------------------------------------------------------------------------
# convolution against the reference
# --------------------------------------------------------------------------------------------------

# Launch configurations: knobs of the emulation, deterministic mode, and the column budget in images.
CONV_SETTINGS = {
    "default": dict(knobs={}),  # 132 "SMs": small layers split every group's channels over blocks (atomics)
    "few_sms": dict(knobs=dict(multiprocessors=1)),  # larger channel blocks
    "tiny_grid": dict(knobs=dict(max_blocks=1)),  # one block: every grid-stride loop repeats
    "wide_index": dict(knobs=dict(force_wide_index=True)),  # the 64-bit index instantiation
    "deterministic": dict(knobs={}, deterministic=True),  # gather-form grad_input, one block per group
    "one_column_tiles": dict(knobs={}, images_per_tile=0.0),  # a budget of 0: tiles of one column
    "fractional_tiles": dict(knobs=dict(max_blocks=2), images_per_tile=2.5),  # 2 images, then pixel ranges
}


@functools.lru_cache(maxsize=None)
def conv_reference(case_index, dtype):
    """(tensors, grad_output, reference results) of CONV_CASES[case_index], inputs rounded to dtype and
    the reference evaluated on them in float64."""
    case = CONV_CASES[case_index]
    gen = torch.Generator().manual_seed(SEED + case_index)
    tensors = [None if t is None else t.to(dtype) for t in case.tensors(gen)]
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64).to(dtype)
    as64 = [None if t is None else t.double() for t in tensors]
    expected = conv_results(modulated_deform_conv2d_ref, as64, case.params, grad_output.double())
    return tensors, grad_output, expected


def run_conv(setting, tensors, params, grad_output, budget_case=None):
    config = CONV_SETTINGS[setting]
    if "images_per_tile" in config:
        case = budget_case
        element = tensors[0].element_size()
        per_image = case.cin * case.taps * case.out_size[0] * case.out_size[1] * element
        hostcuda.column_budget(int(config["images_per_tile"] * per_image))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(config.get("deterministic", False))
    try:
        with hostcuda.emulation(**config["knobs"]):
            result = conv_results(hostcuda.modulated_deform_conv2d, tensors, params, grad_output)
            log = hostcuda.launches()
    finally:
        torch.use_deterministic_algorithms(previous)
    return result, log


def check_setting_took_effect(setting, log, case):
    if case.n == 0 or not log:
        return
    if setting == "wide_index":
        assert all(launch["index_bits"] == 64 for launch in log)
    else:
        assert all(launch["index_bits"] == 32 for launch in log)
    if setting == "tiny_grid":
        assert all(launch["grid"] == 1 for launch in log)
        if case.n * case.taps * case.out_size[0] * case.out_size[1] > 256:
            assert any(launch["items"] > 256 for launch in log), "no grid-stride loop repeated"
    if setting == "deterministic":
        assert any(launch["kernel"] == "gather_grad_input_kernel" for launch in log)
    if setting == "one_column_tiles":
        fills = [launch for launch in log if launch["kernel"] == "fill_columns_kernel"]
        assert len(fills) >= 2 * case.n * case.out_size[0] * case.out_size[1]  # forward + weight grad


@pytest.mark.parametrize("setting", list(CONV_SETTINGS))
@pytest.mark.parametrize("case_index", range(len(CONV_CASES)), ids=[c.id for c in CONV_CASES])
def test_conv_matches_reference_float64(case_index, setting, host_budget):
    """Forward and the gradients of input, offset, mask, weight and bias equal the reference's to
    1e-10, in every launch configuration."""
    case = CONV_CASES[case_index]
    tensors, grad_output, expected = conv_reference(case_index, torch.float64)
    actual, log = run_conv(setting, tensors, case.params, grad_output, case)
    assert_results_close(actual, expected, present(tensors), rtol=1e-10, atol=1e-10)
    check_setting_took_effect(setting, log, case)


@pytest.mark.parametrize("setting", ["default", "deterministic", "fractional_tiles"])
@pytest.mark.parametrize("case_index", [1, 2, 3, 10, 13])
def test_conv_matches_reference_float32(case_index, setting, host_budget):
    case = CONV_CASES[case_index]
    tensors, grad_output, expected = conv_reference(case_index, torch.float32)
    actual, _ = run_conv(setting, tensors, case.params, grad_output, case)
    actual = (actual[0].double(), [g.double() for g in actual[1]])
    assert_results_close(actual, expected, present(tensors), rtol=1e-4, atol=1e-4)


def test_conv_split_channel_blocks_with_atomics(gen):
    """A group of 16 channels split into 2 blocks of 8 (one "SM": 4096 items wanted, 2592 per block):
    the blocks share the group's offset and mask gradients through atomics."""
    case = ConvCase(n=2, cin=16, cout=4, size=12, deform_groups=1, offsets="far")
    tensors = case.tensors(gen)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    expected = conv_results(modulated_deform_conv2d_ref, tensors, case.params, grad_output)
    with hostcuda.emulation(multiprocessors=1):
        actual = conv_results(hostcuda.modulated_deform_conv2d, tensors, case.params, grad_output)
        log = hostcuda.launches()
    assert_results_close(actual, expected, present(tensors), rtol=1e-10, atol=1e-10)
    base = case.deform_groups * case.taps * case.n * case.out_size[0] * case.out_size[1]
    backprop = [launch for launch in log if launch["kernel"] == "backprop_columns_kernel"]
    assert backprop and backprop[0]["items"] == 2 * base  # two blocks per group


def test_conv_matches_the_cpu_kernel(gen):
    """The two backends on the same inputs (float64): the shipped CPU kernel and the CUDA kernels."""
    case = ConvCase(n=3, cin=4, cout=6, size=7, stride=2, deform_groups=2, offsets="far")
    tensors = case.tensors(gen)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    on_cpu = conv_results(shipped.modulated_deform_conv2d, tensors, case.params, grad_output)
    with hostcuda.emulation(seed=7):
        host_run = conv_results(hostcuda.modulated_deform_conv2d, tensors, case.params, grad_output)
    assert_results_close(host_run, on_cpu, present(tensors), rtol=1e-12, atol=1e-12)


def test_conv_gradcheck(gen):
    """Finite differences (float64) through the host-run kernels, on the atomic path and with a
    fresh block order per launch."""
    case = ConvCase(n=2, cin=4, cout=2, size=5, deform_groups=2, offsets="far")
    tensors = leaves(case.tensors(gen))
    with hostcuda.emulation(seed=3):
        assert torch.autograd.gradcheck(
            lambda *t: hostcuda.modulated_deform_conv2d(*t, *case.params), tensors, nondet_tol=1e-12
        )


def test_conv_gradcheck_deterministic(gen, deterministic):
    """The deterministic path: reentrant to the bit (gradcheck's default nondet_tol=0)."""
    case = ConvCase(n=2, cin=4, cout=2, size=5, deform_groups=2, offsets="far")
    tensors = leaves(case.tensors(gen))
    with hostcuda.emulation(seed=3):
        assert torch.autograd.gradcheck(lambda *t: hostcuda.modulated_deform_conv2d(*t, *case.params), tensors)


def test_atomic_float64_backward_needs_a_nondet_tolerance(gen):
    """Why CUDA gradcheck passes a nondet_tol (issue 15, finding 4): even in float64 the atomic
    scatter's result depends on the order of the adds, so two backward passes are not bitwise equal,
    though equal far below 1e-12."""
    tensors, params, grad_output = overlapping_conv(gen, torch.float64)
    runs = []
    for seed in range(4):
        with hostcuda.emulation(seed=seed):
            runs.append(conv_results(hostcuda.modulated_deform_conv2d, tensors, params, grad_output)[1][0])
    assert any(not torch.equal(runs[0], other) for other in runs[1:])
    for other in runs[1:]:
        assert (other - runs[0]).abs().max().item() <= 1e-12 * runs[0].abs().max().item()


# --------------------------------------------------------------------------------------------------
# convolution: half types, empty and odd inputs, non-finite values
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)], ids=["f16", "bf16"])
@pytest.mark.parametrize("setting", ["default", "deterministic"])
def test_conv_half_types(dtype, tolerance, setting, host_budget):
    case_index = 1
    case = CONV_CASES[case_index]
    tensors, grad_output, expected = conv_reference(case_index, dtype)
    actual, _ = run_conv(setting, tensors, case.params, grad_output, case)
    assert actual[0].dtype == dtype and all(g.dtype == dtype for g in actual[1])
    for name, got, want in zip(("output",) + CONV_NAMES, [actual[0]] + actual[1], [expected[0]] + expected[1]):
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(
            got.double(), want, rtol=tolerance, atol=tolerance * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
def test_conv_half_gradients_accumulate_in_float(dtype, deterministic_mode):
    """36864 contributions of 1 to one input pixel: a half accumulator would stall at 2048 (bf16: 256);
    the float one reaches 36864, which both types represent exactly."""
    out = 64
    input = torch.zeros(1, 1, out + 2, out + 2, dtype=dtype)
    weight = torch.ones(1, 1, 3, 3, dtype=dtype)
    # Every sample lands exactly on pixel (0, 0): offset = -(its base position), integers in [-65, 0],
    # which both types hold exactly.
    rows = torch.arange(out, dtype=torch.float64).view(out, 1).expand(out, out)
    cols = torch.arange(out, dtype=torch.float64).view(1, out).expand(out, out)
    offset = torch.empty(1, 18, out, out, dtype=torch.float64)
    for k in range(9):
        ki, kj = divmod(k, 3)
        offset[0, 2 * k] = -(rows + ki)
        offset[0, 2 * k + 1] = -(cols + kj)
    offset = offset.to(dtype)
    mask = torch.ones(1, 9, out, out, dtype=dtype)
    grad_output = torch.ones(1, 1, out, out, dtype=dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        grads = hostcuda.library().modulated_deform_conv2d_backward(
            grad_output, input, offset, mask, weight, None, [1, 1], [0, 0], [1, 1], 1, 1, [True, False, False]
        )
    finally:
        torch.use_deterministic_algorithms(previous)
    assert grads[0][0, 0, 0, 0].item() == 9 * out * out


def test_conv_empty_batch_and_channels(gen):
    for n, cin in ((0, 4), (2, 0)):
        x = torch.randn(n, cin, 5, 5, dtype=torch.float64)
        offset = torch.randn(n, 18, 5, 5, generator=gen, dtype=torch.float64)
        mask = torch.rand(n, 9, 5, 5, generator=gen, dtype=torch.float64)
        weight = torch.randn(3, cin, 3, 3, dtype=torch.float64)
        bias = torch.randn(3, generator=gen, dtype=torch.float64)
        tensors = (x, offset, mask, weight, bias)
        grad_output = torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64)
        params = (1, 1, 1, 1, 1)
        actual = conv_results(hostcuda.modulated_deform_conv2d, tensors, params, grad_output)
        expected = conv_results(shipped.modulated_deform_conv2d, tensors, params, grad_output)
        assert_results_equal(actual, expected, CONV_NAMES, f"for n={n}, C_in={cin}")


def nonfinite_conv_case(gen, where, value):
    """Inputs with `value` put into the offsets or the masks of a few samples, some of which lie far
    outside the map (offsets 'far'), some inside."""
    case = ConvCase(n=2, cin=4, cout=4, size=6, deform_groups=2, offsets="far")
    tensors = list(case.tensors(gen))
    target = tensors[1] if where == "offset" else tensors[2]
    flat = target.view(-1)
    picks = torch.randperm(flat.numel(), generator=gen)[:12]
    flat[picks] = value
    return case, tensors


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["offset", "mask"])
@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
def test_conv_nonfinite_offsets_and_masks_match_the_cpu_kernel(where, value, deterministic_mode, gen):
    """A non-finite offset samples zero and gets zero gradient; a non-finite mask makes its sample
    0 * m = NaN even outside the map (issue 15, finding 1: CUDA returned 0 there), as the CPU kernel,
    mmcv and torchvision do. The CUDA kernels equal the CPU kernel value for value, NaNs included."""
    case, tensors = nonfinite_conv_case(gen, where, value)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    on_cpu = conv_results(shipped.modulated_deform_conv2d, tensors, case.params, grad_output)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        host_run = conv_results(hostcuda.modulated_deform_conv2d, tensors, case.params, grad_output)
    finally:
        torch.use_deterministic_algorithms(previous)
    names = ("output",) + tuple(present(tensors))
    expected = dict(zip(names, [on_cpu[0]] + on_cpu[1]))
    if where == "mask":
        assert expected["output"].isnan().any()
    if where == "mask" and abs(value) == math.inf:
        # An infinite mask on a sample with a corner outside the map: the reference, mmcv and the CUDA
        # kernels give sample * inf = +-inf; the CPU kernel folds the mask into the corner weights and
        # multiplies the border's zero by inf (NaN). So the forward (and the weight gradient, made of
        # the same samples) are compared with the reference here.
        reference = conv_results(modulated_deform_conv2d_ref, tensors, case.params, grad_output)
        expected["output"], expected["weight"] = reference[0], reference[1][names.index("weight") - 1]
        if not deterministic_mode:
            # Split channel blocks each add (their partial sum) * m: +inf and -inf parts make NaN where
            # the CPU's (whole sum) * m is +-inf. Compare the finite values, and require the others
            # to be non-finite too.
            got, want = host_run[1][names.index("offset") - 1], expected["offset"]
            assert not torch.isfinite(got[~torch.isfinite(want)]).any()
            torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)], rtol=1e-12, atol=1e-12)
            expected["offset"] = got
    for name, got in zip(names, [host_run[0]] + host_run[1]):
        torch.testing.assert_close(
            got, expected[name], rtol=1e-12, atol=1e-12, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_conv_nonfinite_mask_outside_the_map_is_nan():
    """The smallest case of finding 1: one sample, far outside the map, with a NaN mask."""
    x = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    offset = torch.full((1, 2, 3, 3), 100.0, dtype=torch.float64)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    mask[0, 0, 1, 1] = math.nan
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out = hostcuda.library().modulated_deform_conv2d(x, offset, mask, weight, None, [1, 1], [0, 0], [1, 1], 1, 1)
    assert out[0, 0, 1, 1].isnan() and out.nan_to_num().eq(0).all()
    grads = hostcuda.library().modulated_deform_conv2d_backward(
        torch.ones_like(out), x, offset, mask, weight, None, [1, 1], [0, 0], [1, 1], 1, 1, [True, True, True]
    )
    assert grads[1][0, :, 1, 1].isnan().all()  # grad_offset = 0 * NaN, as on the CPU and in mmcv
    assert grads[2].eq(0).all() and grads[0].eq(0).all()


# --------------------------------------------------------------------------------------------------
# convolution: deterministic mode and launch configuration (findings 2 and 5)
# --------------------------------------------------------------------------------------------------


def overlapping_conv(gen, dtype=torch.float32):
    """A case whose samples pile up on few pixels (large offsets into a small map), with enough
    channels per group to be split over blocks: many atomic adds per element, from different blocks."""
    case = ConvCase(n=2, cin=16, cout=8, size=6, groups=2, deform_groups=2)
    tensors = list(case.tensors(gen, dtype))
    tensors[1] = (3 * torch.randn(tensors[1].shape, generator=gen)).to(dtype)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen).to(dtype)
    return tensors, case.params, grad_output


def test_conv_deterministic_backward_is_bitwise_identical_for_every_block_order(gen, deterministic):
    tensors, params, grad_output = overlapping_conv(gen)
    runs = []
    for seed, max_blocks in ((0, 0), (1, 0), (2, 1), (3, 3), (4, 0)):
        with hostcuda.emulation(seed=seed, max_blocks=max_blocks, multiprocessors=1 + seed):
            runs.append(conv_results(hostcuda.modulated_deform_conv2d, tensors, params, grad_output))
    for i, run in enumerate(runs[1:], 1):
        assert_results_equal(run, runs[0], CONV_NAMES, f"between block orders 0 and {i}")


def test_conv_deterministic_mode_raises_nothing_and_matches_reference(gen, deterministic):
    """Issue 15, finding 5 / mmdet#8478: grad_input under deterministic algorithms runs (gather form)."""
    case = ConvCase(n=2, cin=4, cout=4, size=6, deform_groups=2, offsets="far")
    tensors = case.tensors(gen)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen, dtype=torch.float64)
    actual = conv_results(hostcuda.modulated_deform_conv2d, tensors, case.params, grad_output)
    expected = conv_results(modulated_deform_conv2d_ref, tensors, case.params, grad_output)
    assert_results_close(actual, expected, present(tensors), rtol=1e-10, atol=1e-10)


def test_conv_deterministic_mode_keeps_the_forward_split(gen):
    """Issue 15, finding 2: deterministic mode used to force one channel block per group on the
    forward and weight-gradient columns too, which have no atomics. Only the backprop kernel may
    change its grid."""
    case = ConvCase(n=2, cin=16, cout=4, size=6, deform_groups=1)
    tensors = case.tensors(gen, torch.float32)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen)
    logs = {}
    for mode in (False, True):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(mode)
        try:
            with hostcuda.emulation():
                conv_results(hostcuda.modulated_deform_conv2d, tensors, case.params, grad_output)
                logs[mode] = hostcuda.launches()
        finally:
            torch.use_deterministic_algorithms(previous)
    fills = {
        mode: [launch for launch in log if launch["kernel"] == "fill_columns_kernel"] for mode, log in logs.items()
    }
    assert fills[True] == fills[False] and fills[False][0]["items"] > case.taps * case.n * 36
    base = case.taps * case.n * case.out_size[0] * case.out_size[1]
    backprop = [launch for launch in logs[True] if launch["kernel"] == "backprop_columns_kernel"]
    assert backprop and all(launch["items"] == base for launch in backprop)  # one block per group


def test_conv_deterministic_offset_grads_without_input_grad(gen, deterministic):
    """Only offset and mask require grad: no gather is needed, and the result is still bitwise stable."""
    case = ConvCase(n=2, cin=16, cout=4, size=6, deform_groups=1)
    x, offset, mask, weight, bias = case.tensors(gen, torch.float32)
    grad_output = torch.randn((case.n, case.cout) + case.out_size, generator=gen)
    results = []
    for seed in range(3):
        with hostcuda.emulation(seed=seed):
            grads = hostcuda.library().modulated_deform_conv2d_backward(
                grad_output, x, 4 * offset, mask, weight, bias, *case.op_params, [False, True, False]
            )
            assert not any(launch["kernel"] == "gather_grad_input_kernel" for launch in hostcuda.launches())
        results.append(grads)
    for other in results[1:]:
        assert torch.equal(other[1], results[0][1]) and torch.equal(other[2], results[0][2])


# --------------------------------------------------------------------------------------------------
# the device guard comes after the argument checks (finding 3)
# --------------------------------------------------------------------------------------------------


def test_conv_wrong_device_is_reported_by_argument_name(gen):
    """A tensor on another device than input is named by the argument checks, not reported by the
    device guard ("CUDAGuardImpl initialized with non-CUDA DeviceType"). In the host-run build the
    emulated GPU is the CPU, so the odd one out is an input on the meta device."""
    case = ConvCase(n=1, cin=2, cout=2, size=5)
    x, offset, mask, weight, bias = case.tensors(gen)
    lib = hostcuda.library()
    meta = [t.to("meta") for t in (x, mask, weight, bias)]
    with pytest.raises((ValueError, RuntimeError), match="offset must be on the device of input"):
        lib.modulated_deform_conv2d(meta[0], offset, meta[1], meta[2], meta[3], *case.op_params)
    grad_output = torch.zeros((1, 2) + case.out_size, dtype=torch.float64, device="meta")
    with pytest.raises((ValueError, RuntimeError), match="offset must be on the device of input"):
        lib.modulated_deform_conv2d_backward(
            grad_output, meta[0], offset, meta[1], meta[2], meta[3], *case.op_params, [True, True, True]
        )


def test_pool_wrong_device_is_reported_by_argument_name(gen):
    lib = hostcuda.library()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device="meta")
    rois = torch.tensor([[0.0, 1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    with pytest.raises((ValueError, RuntimeError), match="rois must be on the device of input"):
        lib.deform_roi_pool(x, rois, None, [2, 2], 1.0, 0, 0.1)


# --------------------------------------------------------------------------------------------------
# RoI pooling
# --------------------------------------------------------------------------------------------------


def make_rois(gen, batch, height, width, count):
    """Random RoIs (some past the border) plus the corner cases: outside, zero width, zero area,
    reversed, tiny, larger than the map."""
    x1 = uniform((count,), -0.2 * width, 0.8 * width, gen)
    y1 = uniform((count,), -0.2 * height, 0.8 * height, gen)
    x2 = x1 + uniform((count,), 0.1 * width, 0.9 * width, gen)
    y2 = y1 + uniform((count,), 0.1 * height, 0.9 * height, gen)
    index = torch.randint(0, batch, (count,), generator=gen).double()
    last = batch - 1
    special = torch.tensor(
        [
            [0, 1.31, 1.23, 1.62, 1.54],
            [last, 0.33, 0.21, 0.33, 0.72],
            [0, 0.47, 0.52, 0.47, 0.52],
            [last, 0.71, 0.62, 0.23, 0.11],
            [0, 0.413, 0.337, 0.452, 0.361],
            [last, -0.31, -0.42, 1.26, 1.33],
        ],
        dtype=torch.float64,
    )
    special[:, [1, 3]] *= width
    special[:, [2, 4]] *= height
    return torch.cat([torch.stack([index, x1, y1, x2, y2], dim=1), special])


POOL_CASES = {
    # (batch, channels, (H, W), output_size, spatial_scale, sampling_ratio, offsets, gamma)
    "c3-adaptive-near": (2, 3, (9, 11), (3, 3), 1.0, 0, "near", 0.1),
    "c9-ratio2-far": (2, 9, (9, 11), (2, 3), 1.0, 2, "far", 0.1),  # 3 channel blocks: grad_offset atomics
    "c5-scale0.5-adaptive-far": (2, 5, (8, 13), (3, 5), 0.5, 0, "far", 0.2),
    "c2-no-offset": (3, 2, (8, 13), (3, 2), 1.0, 2, "none", 0.1),
}


def pool_inputs(name, gen, dtype=torch.float64):
    batch, channels, size, output_size, scale, ratio, offsets, gamma = POOL_CASES[name]
    input = torch.randn((batch, channels) + size, generator=gen, dtype=torch.float64)
    rois = make_rois(gen, batch, size[0] / scale, size[1] / scale, 5)
    offset = None
    if offsets != "none":
        shape = (rois.shape[0], 2) + output_size
        offset = uniform(shape, -1.0, 1.0, gen)
        if offsets == "far":
            far = uniform(shape, 10.0, 30.0, gen) * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
            offset = torch.where(torch.rand(shape, generator=gen) < 0.5, far, offset)
    params = (output_size, scale, ratio, gamma)
    return [None if t is None else t.to(dtype) for t in (input, rois, offset)], params


def pool_results(fn, input, rois, offset, params, grad_output=None, gen=None):
    """(output, [grad of input] + [grad of offset, if any])."""
    x = input.detach().clone().requires_grad_()
    o = None if offset is None else offset.detach().clone().requires_grad_()
    output = fn(x, rois, o, *params)
    if grad_output is None:
        grad_output = torch.randn(output.shape, generator=gen, dtype=torch.float64)
    wanted = [x] if o is None else [x, o]
    return output.detach(), list(torch.autograd.grad(output, wanted, grad_output.to(output.dtype))), grad_output


POOL_SETTINGS = {
    "default": {},
    "tiny_grid": dict(knobs=dict(max_blocks=1)),
    "wide_index": dict(knobs=dict(force_wide_index=True)),
    "deterministic": dict(deterministic=True),
    "deterministic_tiny_grid": dict(knobs=dict(max_blocks=1), deterministic=True),
}


def run_pool(setting, inputs, params, grad_output):
    config = POOL_SETTINGS[setting]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(config.get("deterministic", False))
    try:
        with hostcuda.emulation(**config.get("knobs", {})):
            result = pool_results(hostcuda.deform_roi_pool, *inputs, params, grad_output)[:2]
            log = hostcuda.launches()
    finally:
        torch.use_deterministic_algorithms(previous)
    return result, log


@pytest.mark.parametrize("setting", list(POOL_SETTINGS))
@pytest.mark.parametrize("name", list(POOL_CASES))
def test_pool_matches_reference_float64(name, setting, gen):
    inputs, params = pool_inputs(name, gen)
    *expected, grad_output = pool_results(deform_roi_pool_ref, *inputs, params, gen=gen)
    actual, log = run_pool(setting, inputs, params, grad_output)
    assert_results_close(actual, expected, ["input", "offset"], rtol=1e-10, atol=1e-10)
    bits = 64 if setting == "wide_index" else 32
    assert log and all(launch["index_bits"] == bits for launch in log)
    if "tiny_grid" in setting:
        assert all(launch["grid"] == 1 for launch in log)
    if "deterministic" in setting:
        assert any(launch["kernel"] == "gather_grad_input_kernel" for launch in log)


@pytest.mark.parametrize("setting", ["default", "deterministic"])
@pytest.mark.parametrize("name", ["c3-adaptive-near", "c9-ratio2-far"])
def test_pool_matches_reference_float32(name, setting, gen):
    inputs, params = pool_inputs(name, gen, torch.float32)
    as64 = [None if t is None else t.double() for t in inputs]
    *expected, grad_output = pool_results(deform_roi_pool_ref, *as64, params, gen=gen)
    actual, _ = run_pool(setting, inputs, params, grad_output)
    actual = (actual[0].double(), [g.double() for g in actual[1]])
    assert_results_close(actual, expected, ["input", "offset"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)], ids=["f16", "bf16"])
@pytest.mark.parametrize("setting", ["default", "deterministic"])
def test_pool_half_types(dtype, tolerance, setting, gen):
    inputs, params = pool_inputs("c9-ratio2-far", gen, dtype)
    as64 = [None if t is None else t.double() for t in inputs]
    *expected, grad_output = pool_results(deform_roi_pool_ref, *as64, params, gen=gen)
    actual, _ = run_pool(setting, inputs, params, grad_output)
    assert actual[0].dtype == dtype and all(g.dtype == dtype for g in actual[1])
    for name, got, want in zip(("output", "input", "offset"), [actual[0]] + actual[1], [expected[0]] + expected[1]):
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(
            got.double(), want, rtol=tolerance, atol=tolerance * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
def test_pool_half_gradients_accumulate_in_float(dtype, deterministic_mode):
    """4096 one-pixel RoIs on the same pixel, each bin adding 1 to it: a half accumulator would stall
    at 2048 (bf16: 256); the float one reaches 4096, exact in both."""
    count = 4096
    input = torch.zeros(1, 1, 4, 4, dtype=dtype)
    # One bin, one sample at (1, 1) exactly: x1 = y1 = 1, x2 = y2 = 2 (aligned: start 0.5, size 1).
    rois = torch.tensor([[0.0, 1.0, 1.0, 2.0, 2.0]], dtype=dtype).repeat(count, 1)
    grad_output = torch.ones(count, 1, 1, 1, dtype=dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        grad_input, _ = hostcuda.library().deform_roi_pool_backward(
            grad_output, input, rois, None, [1, 1], 1.0, 1, 0.1, [True, False]
        )
    finally:
        torch.use_deterministic_algorithms(previous)
    assert grad_input[0, 0, 1, 1].item() == count and grad_input.sum().item() == count


@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
def test_pool_zero_rois_and_invalid_batch_indices(deterministic_mode, gen):
    """No RoIs: empty output, zero gradients. A batch index that is not an integer in [0, N) (NaN,
    fractional, negative, too large): the CUDA kernels pool it to zeros and give it no gradient (the
    CPU kernel raises instead; a host-side check would cost CUDA a sync per call)."""
    lib = hostcuda.library()
    input = torch.randn(2, 5, 6, 7, generator=gen, dtype=torch.float64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        rois = torch.zeros(0, 5, dtype=torch.float64)
        offset = torch.zeros(0, 2, 2, 2, dtype=torch.float64)
        out = lib.deform_roi_pool(input, rois, offset, [2, 2], 1.0, 0, 0.1)
        assert out.shape == (0, 5, 2, 2)
        grad_input, grad_offset = lib.deform_roi_pool_backward(
            out, input, rois, offset, [2, 2], 1.0, 0, 0.1, [True, True]
        )
        assert grad_input.shape == input.shape and not grad_input.any() and grad_offset.shape == offset.shape

        good = [1.0, 0.5, 0.5, 4.5, 4.0]
        bad = [[math.nan] + good[1:], [0.5] + good[1:], [-1.0] + good[1:], [2.0] + good[1:], [math.inf] + good[1:]]
        rois = torch.tensor([good] + bad, dtype=torch.float64)
        offset = torch.full((len(bad) + 1, 2, 2, 2), 0.1, dtype=torch.float64)
        params = ([2, 2], 1.0, 0, 0.1)
        out, grads, grad_output = pool_results(hostcuda.deform_roi_pool, input, rois, offset, params, gen=gen)
        assert out[1:].eq(0).all() and out[0].ne(0).any()
        assert grads[1][1:].eq(0).all()
        # Everything else comes from the valid RoI alone.
        alone = pool_results(hostcuda.deform_roi_pool, input, rois[:1], offset[:1], params, grad_output[:1])
        torch.testing.assert_close(out[:1], alone[0], rtol=0, atol=0)
        torch.testing.assert_close(grads[0], alone[1][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[1][:1], alone[1][1], rtol=1e-12, atol=1e-12)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
def test_pool_nonfinite_offsets_and_rois(deterministic_mode, gen):
    """Non-finite offsets or RoI coordinates: their bins pool to zero and get zero gradient, as on
    the CPU kernel (compared value for value)."""
    inputs, params = pool_inputs("c5-scale0.5-adaptive-far", gen)
    input, rois, offset = inputs
    offset[0, 0, 1, 1] = math.nan
    offset[1, 1, 0, 2] = math.inf
    rois[2, 3] = math.inf
    rois[3, 1] = math.nan
    *on_cpu, grad_output = pool_results(shipped.deform_roi_pool, input, rois, offset, params, gen=gen)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        host_run = pool_results(hostcuda.deform_roi_pool, input, rois, offset, params, grad_output)[:2]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_results_close(host_run, on_cpu, ["input", "offset"], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(host_run[0]).all() and all(torch.isfinite(g).all() for g in host_run[1])


def test_pool_matches_the_cpu_kernel(gen):
    inputs, params = pool_inputs("c9-ratio2-far", gen)
    *on_cpu, grad_output = pool_results(shipped.deform_roi_pool, *inputs, params, gen=gen)
    with hostcuda.emulation(seed=5):
        host_run = pool_results(hostcuda.deform_roi_pool, *inputs, params, grad_output)[:2]
    assert_results_close(host_run, on_cpu, ["input", "offset"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
def test_pool_gradcheck(deterministic_mode, gen):
    inputs, params = pool_inputs("c9-ratio2-far", gen)
    input, rois, offset = inputs
    input, offset = input[:, :, :6, :7].contiguous(), offset[:4].contiguous()
    rois = rois[:4]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        with hostcuda.emulation(seed=11):
            assert torch.autograd.gradcheck(
                lambda x, o: hostcuda.deform_roi_pool(x, rois, o, *params),
                (input.requires_grad_(), offset.requires_grad_()),
                nondet_tol=0.0 if deterministic_mode else 1e-12,
            )
    finally:
        torch.use_deterministic_algorithms(previous)


def overlapping_pool(gen, dtype=torch.float32):
    """Many RoIs over the same few pixels, 9 channels (3 channel blocks)."""
    input = torch.randn(2, 9, 5, 6, generator=gen).to(dtype)
    count = 40
    x1 = uniform((count,), 0.0, 2.0, gen)
    y1 = uniform((count,), 0.0, 2.0, gen)
    rois = torch.stack([torch.randint(0, 2, (count,), generator=gen).double(), x1, y1, x1 + 2.5, y1 + 2.2], dim=1)
    offset = uniform((count, 2, 3, 3), -1.0, 1.0, gen)
    return input, rois.to(dtype), offset.to(dtype), ((3, 3), 1.0, 2, 0.3)


def test_pool_deterministic_backward_is_bitwise_identical_for_every_block_order(gen, deterministic):
    input, rois, offset, params = overlapping_pool(gen)
    grad_output = torch.randn((rois.shape[0], 9, 3, 3), generator=gen)
    runs = []
    for seed, max_blocks in ((0, 0), (1, 0), (2, 1), (3, 2)):
        with hostcuda.emulation(seed=seed, max_blocks=max_blocks):
            runs.append(pool_results(hostcuda.deform_roi_pool, input, rois, offset, params, grad_output)[:2])
    for i, run in enumerate(runs[1:], 1):
        assert_results_equal(run, runs[0], ["input", "offset"], f"between block orders 0 and {i}")


def test_pool_atomic_backward_depends_on_the_block_order(gen):
    """The test above can tell: without deterministic mode the float32 sums differ between orders."""
    input, rois, offset, params = overlapping_pool(gen)
    grad_output = torch.randn((rois.shape[0], 9, 3, 3), generator=gen)
    runs = []
    for seed in range(4):
        with hostcuda.emulation(seed=seed, max_blocks=1):
            runs.append(pool_results(hostcuda.deform_roi_pool, input, rois, offset, params, grad_output)[:2])
    assert any(not torch.equal(run[1][0], runs[0][1][0]) for run in runs[1:]), "grad_input"
    assert any(not torch.equal(run[1][1], runs[0][1][1]) for run in runs[1:]), "grad_offset"
