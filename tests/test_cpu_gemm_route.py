"""The CPU GEMM routes (the fused brgemm forward, tiled at::mm or oneDNN 1x1 convolutions;
MMDET_DCNV2_CPU_GEMM) and the ISA builds of the sampling loops (MMDET_DCNV2_CPU_ISA): every path gives
the reference's results, each is bitwise repeatable at a fixed thread count (the fused forward at any
thread count), and the overrides do what they say.

Shapes are small but above ATen's size threshold for oneDNN (K * pixels > 20480 elements of columns),
so the oneDNN route's backward really runs on oneDNN here.
"""

import contextlib
import os

import pytest
import torch

import mmdet_dcnv2.ops as ops
from cases import ConvCase
from mmdet_dcnv2.ops import modulated_deform_conv2d
from reference import modulated_deform_conv2d_ref

ROUTES = torch.ops.mmdet_dcnv2._cpu_gemm_route


def ROUTE(dtype):
    """The tiled GEMM route ('mm' or 'onednn'): the backward's, and the forward's where not fused."""
    forward, backward = (part.split()[1] for part in ROUTES(dtype).split(", "))
    return backward


def FORWARD(dtype):
    """The forward's route: 'brgemm' (fused) or the tiled route."""
    return ROUTES(dtype).split(", ")[0].split()[1]


ISA = torch.ops.mmdet_dcnv2._cpu_isa
NAMES = ("output", "input", "offset", "mask", "weight", "bias")
ISAS = ("baseline", "avx2", "avx512")
ISA_RANK = {name: i for i, name in enumerate(ISAS)}


@contextlib.contextmanager
def env(name, value):
    """Sets (or with None unsets) an environment variable for the block; our C++ reads it per call."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def onednn_possible(dtype):
    with env("MMDET_DCNV2_CPU_GEMM", "onednn"):
        return ROUTE(dtype) == "onednn"


def cpu_supports():
    """The ISA levels this CPU has, from what the op reports ('... cpu=avx512')."""
    top = ISA().split("cpu=")[1]
    return [isa for isa in ISAS if ISA_RANK[isa] <= ISA_RANK[top]]


def make_case(gen, dtype=torch.float32, n=2, c=16, size=12, groups=1, deform_groups=1, bias=True):
    """Inputs with offsets of a few pixels (samples overlap and reach past the border)."""
    x = torch.randn(n, c, size, size, generator=gen)
    offset = 3 * torch.randn(n, 2 * deform_groups * 9, size, size, generator=gen)
    mask = torch.rand(n, deform_groups * 9, size, size, generator=gen)
    weight = 0.1 * torch.randn(c, c // groups, 3, 3, generator=gen)
    b = torch.randn(c, generator=gen) if bias else None
    grad = torch.randn(n, c, size, size, generator=gen)
    tensors = [t.to(dtype) if t is not None else None for t in (x, offset, mask, weight, b)]
    return tensors, grad.to(dtype), dict(groups=groups, deform_groups=deform_groups)


def run(fn, tensors, grad, params):
    """Output and the gradients of every input (None where there is no such input)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    x, offset, mask, weight, bias = leaves
    out = fn(x, offset, mask, weight, bias, 1, 1, 1, params["groups"], params["deform_groups"])
    out.backward(grad)
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


def ours(tensors, grad, params):
    return run(modulated_deform_conv2d, tensors, grad, params)


def reference(tensors, grad, params):
    return run(
        modulated_deform_conv2d_ref, [t.double() if t is not None else None for t in tensors], grad.double(), params
    )


def assert_close(got, want, rtol, atol, what=""):
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, name
            continue
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


def assert_equal(got, want, what=""):
    for name, g, w in zip(NAMES, got, want):
        assert (g is None and w is None) or torch.equal(g, w), f"{what} {name} differs bitwise"


# ---- the route rule and its override ----


def test_route_override_and_rule():
    with env("MMDET_DCNV2_CPU_GEMM", "mm"):
        assert ROUTES(torch.float32) == "forward mm, backward mm"
    for choice in (None, "auto", "brgemm"):
        with env("MMDET_DCNV2_CPU_GEMM", choice):
            assert FORWARD(torch.float32) == "brgemm"
            assert ROUTE(torch.float32) in ("mm", "onednn")
            assert ROUTES(torch.float64) == "forward mm, backward mm"  # float64 never leaves at::mm
            assert ROUTES(torch.float16) == "forward mm, backward mm"
            assert FORWARD(torch.bfloat16) == ROUTE(torch.bfloat16)  # the fused forward is float32 only
    if torch.backends.mkldnn.is_available():
        with env("MMDET_DCNV2_CPU_GEMM", "onednn"):
            assert ROUTES(torch.float32) == "forward onednn, backward onednn"
            assert ROUTE(torch.float64) == "mm"
            with torch.backends.mkldnn.flags(enabled=False):  # the user switched oneDNN off
                assert ROUTE(torch.float32) == "mm"


def test_bad_override_is_refused_by_name(gen):
    with env("MMDET_DCNV2_CPU_GEMM", "blas"), pytest.raises(ValueError, match="MMDET_DCNV2_CPU_GEMM"):
        ROUTE(torch.float32)
    tensors, _, params = make_case(gen, n=1, c=4, size=5)
    with env("MMDET_DCNV2_CPU_ISA", "sse9"), pytest.raises(ValueError, match="MMDET_DCNV2_CPU_ISA"):
        modulated_deform_conv2d(*tensors, 1, 1, 1, 1, 1)


def test_onednn_backward_is_not_sent_to_the_blas_fallback():
    """The driver asks for dilation 2 on the 1x1 backward so that ATen picks oneDNN even for one image
    on one thread (its heuristic sends that case to im2col + BLAS); if a torch release changes the
    heuristic, this says so."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    k, pixels, cout = 16 * 9, 144, 16
    cols = torch.randn(pixels, k).as_strided((1, k, 1, pixels), (pixels * k, 1, pixels * k, k))
    kernel = torch.randn(cout, k).as_strided((cout, k, 1, 1), (k, 1, k, k))
    with num_threads(1):
        backend = torch._C._select_conv_backend(cols, kernel, None, [1, 1], [0, 0], [2, 2], False, [0, 0], 1, None)
    assert backend == torch._C._ConvBackend.Mkldnn


# ---- results ----

CASES = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(groups=2, deform_groups=2), id="groups2_dg2"),
    pytest.param(dict(bias=False, n=3, size=14), id="nobias_batch3"),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_onednn_route_matches_mm_route_and_reference(kwargs, gen):
    if not onednn_possible(torch.float32):
        pytest.skip("the oneDNN route is not available here")
    tensors, grad, params = make_case(gen, **kwargs)
    with env("MMDET_DCNV2_CPU_GEMM", "mm"):
        via_mm = ours(tensors, grad, params)
    with env("MMDET_DCNV2_CPU_GEMM", "onednn"):
        via_onednn = ours(tensors, grad, params)
    assert_close(via_onednn, via_mm, rtol=1e-4, atol=1e-4, what="onednn vs mm")
    assert_close(via_onednn, reference(tensors, grad, params), rtol=1e-4, atol=1e-4, what="onednn vs reference")


@pytest.fixture
def column_budget():
    previous = ops.set_column_budget(1 << 30)
    yield
    ops.set_column_budget(previous)


@pytest.mark.parametrize("route", ["mm", "onednn"])
def test_routes_under_a_small_column_budget(route, column_budget, gen):
    """Tiles of part of an image (the budget below one image's columns) on either route."""
    if route == "onednn" and not onednn_possible(torch.float32):
        pytest.skip("the oneDNN route is not available here")
    tensors, grad, params = make_case(gen, n=2, c=16, size=12)
    ops.set_column_budget(16 * 9 * 4 * 50)  # 50 columns of float32: 3 tiles per image
    with env("MMDET_DCNV2_CPU_GEMM", route):
        tiled = ours(tensors, grad, params)
    assert_close(tiled, reference(tensors, grad, params), rtol=1e-4, atol=1e-4, what=f"{route}, tiled")


def test_onednn_route_bfloat16(gen):
    if not onednn_possible(torch.bfloat16):
        pytest.skip("no oneDNN bfloat16 route on this CPU")
    tensors, grad, params = make_case(gen, dtype=torch.bfloat16)
    with env("MMDET_DCNV2_CPU_GEMM", "mm"):
        via_mm = ours(tensors, grad, params)
    with env("MMDET_DCNV2_CPU_GEMM", "onednn"):
        via_onednn = ours(tensors, grad, params)
        again = ours(tensors, grad, params)
    assert_equal(again, via_onednn, "bfloat16 onednn run to run")
    assert_close(via_onednn, via_mm, rtol=5e-2, atol=5e-2, what="bfloat16 onednn vs mm")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("route", ["mm", "onednn"])
def test_route_bitwise_repeatable_at_fixed_thread_count(route, threads, gen):
    if route == "onednn" and not onednn_possible(torch.float32):
        pytest.skip("the oneDNN route is not available here")
    tensors, grad, params = make_case(gen, groups=2, deform_groups=2)
    with env("MMDET_DCNV2_CPU_GEMM", route), num_threads(threads):
        runs = [ours(tensors, grad, params) for _ in range(3)]
    for again in runs[1:]:
        assert_equal(again, runs[0], f"{route}, {threads} threads")


# ---- the ISA builds of the sampling loops ----


def loops_isa():
    used = dict(part.split("=") for part in ISA().split())
    return {loop: used[loop] for loop in ("fill", "plan", "scatter", "dots")}


def test_isa_override_selects_the_build():
    top = cpu_supports()[-1]
    with env("MMDET_DCNV2_CPU_ISA", None):
        default = loops_isa()
    assert all(ISA_RANK[isa] <= ISA_RANK[top] for isa in default.values()), default
    for isa in ISAS:
        with env("MMDET_DCNV2_CPU_ISA", isa):
            # Exactly the level asked for -- even one not selected by default -- up to what the CPU has.
            expected = isa if ISA_RANK[isa] <= ISA_RANK[top] else top
            assert set(loops_isa().values()) == {expected}, (isa, loops_isa())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_every_isa_matches_reference_and_repeats(dtype, gen):
    tensors, grad, params = make_case(gen, dtype=dtype, groups=2, deform_groups=2)
    want = reference(tensors, grad, params)
    tol = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float64: 1e-10}[dtype]
    with env("MMDET_DCNV2_CPU_GEMM", "mm"):  # the loops alone differ between the runs below
        with env("MMDET_DCNV2_CPU_ISA", "baseline"):
            baseline = ours(tensors, grad, params)
        for isa in cpu_supports():
            with env("MMDET_DCNV2_CPU_ISA", isa), num_threads(2):
                first, second = ours(tensors, grad, params), ours(tensors, grad, params)
            assert_equal(second, first, f"{isa} run to run")
            assert_close(first, want, rtol=tol, atol=tol, what=f"{isa} vs reference")
            # Across ISAs only FMA contraction may differ: far tighter than the reference tolerance.
            assert_close(first, baseline, rtol=tol, atol=tol, what=f"{isa} vs baseline")


# ---- the fused forward (oneDNN's brgemm microkernel per block of output pixels) ----


def fused_case(gen, case):
    """float32 inputs and params of a ConvCase for one call."""
    return case.tensors(gen, dtype=torch.float32), case.params


# Offsets "far": about half the samples land well outside the map.
FUSED_CASES = [
    # pixels not a multiple of the 64-row blocks, channels not a multiple of 8
    pytest.param(ConvCase(n=2, cin=12, cout=12, size=13, offsets="far"), id="tails"),
    pytest.param(
        ConvCase(n=3, cin=16, cout=16, size=12, groups=2, deform_groups=4, bias=False, offsets="far"),
        id="groups2_dg4_nobias",
    ),
    pytest.param(
        ConvCase(n=2, cin=12, cout=12, size=11, groups=2, deform_groups=3, offsets="far"),
        id="groups_across_deform_groups",
    ),
    # 80 * 9 = 720 values per pixel: two chunks of kernel points; 300 outputs: two blocks of 256
    pytest.param(ConvCase(n=1, cin=80, cout=300, size=19, offsets="far"), id="chunks_outblocks"),
    # per group: 80 channels (two chunks) and 300 outputs (two blocks), for both groups
    pytest.param(ConvCase(n=1, cin=160, cout=600, size=9, groups=2, offsets="far"), id="groups2_chunks_outblocks"),
    # 600 channels per kernel point: each point's channels in two pieces
    pytest.param(ConvCase(n=2, cin=600, cout=40, size=7, kernel=1, padding=0, offsets="far"), id="1x1_channel_pieces"),
    pytest.param(
        ConvCase(n=1, cin=24, cout=24, size=17, kernel=5, stride=2, padding=0, dilation=2, offsets="far"),
        id="5x5_stride2_dil2",
    ),
    pytest.param(
        ConvCase(n=2, cin=8, cout=8, size=10, kernel=(3, 2), padding=0, deform_groups=2, offsets="far"),
        id="3x2_kernel",
    ),
    pytest.param(ConvCase(n=2, cin=64, cout=64, size=5, deform_groups=4, offsets="far"), id="tiny_map"),
]


def forward_with(fn, tensors, params):
    return fn(*tensors, *params)


def forward(tensors, params):
    return forward_with(modulated_deform_conv2d, tensors, params)


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_forward_matches_reference_and_tiled_route(case, gen):
    tensors, params = fused_case(gen, case)
    with env("MMDET_DCNV2_CPU_GEMM", "brgemm"):
        assert FORWARD(torch.float32) == "brgemm"
        fused = forward(tensors, params)
    with env("MMDET_DCNV2_CPU_GEMM", "mm"):
        tiled = forward(tensors, params)
    want = forward_with(modulated_deform_conv2d_ref, [t.double() if t is not None else None for t in tensors], params)
    torch.testing.assert_close(fused.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused, tiled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", FUSED_CASES[:4])
def test_fused_forward_is_bitwise_the_same_at_any_thread_count(case, gen):
    """Every output element comes from one task with the same kernel shapes, whatever the number of
    threads (which changes the pixels per task): the same bits on 1, 2 and 3 threads, run to run."""
    tensors, params = fused_case(gen, case)
    with env("MMDET_DCNV2_CPU_GEMM", "brgemm"):
        runs = []
        for threads in (1, 2, 3, 1):
            with num_threads(threads):
                runs.append(forward(tensors, params))
    for threads, again in zip((2, 3, 1), runs[1:]):
        assert torch.equal(again, runs[0]), f"{threads} threads"


def test_fused_forward_passes_a_non_finite_mask_through(gen):
    """A sample outside the map contributes 0 * mask: NaN for a NaN or infinite mask, as in the
    reference (mmcv, torchvision and the CUDA kernel agree); elsewhere the result is unchanged."""
    tensors, params = fused_case(gen, ConvCase(n=1, cin=8, cout=8, size=9, offsets="smooth"))
    x, offset, mask, weight, b = tensors
    offset, mask = offset.clone(), mask.clone()
    offset[0, 0, 4, 4] = 1e30  # kernel point 0 of pixel (4, 4) lands far outside the map
    mask[0, 0, 4, 4] = float("nan")
    mask[0, 0, 2, 2] = float("inf")  # in the map: an infinite sample weight
    tensors = [x, offset, mask, weight, b]
    want = forward_with(modulated_deform_conv2d_ref, [t.double() for t in tensors], params)
    with env("MMDET_DCNV2_CPU_GEMM", "brgemm"):
        got = forward(tensors, params)
    assert torch.isnan(got[0, :, 4, 4]).all() and torch.isnan(want[0, :, 4, 4]).all()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_fused_forward_empty_batch_and_channels(gen):
    tensors, params = fused_case(gen, ConvCase(n=2, cin=8, cout=8, size=6))
    x, offset, mask, weight, b = tensors
    with env("MMDET_DCNV2_CPU_GEMM", "brgemm"):
        empty = forward([x[:0], offset[:0], mask[:0], weight, b], params)
        assert empty.shape == (0, 8, 6, 6)
        no_inputs = forward([x[:, :0], offset, mask, weight[:, :0], b], params)
    torch.testing.assert_close(no_inputs, b.view(1, -1, 1, 1).expand(2, -1, 6, 6))


def test_fused_forward_only_where_onednn_is_on(gen):
    """With torch.backends.mkldnn off the forward takes the tiled mm route (ATen's brgemm would fall
    back to one BLAS call per block): the same results within float tolerance."""
    tensors, params = fused_case(gen, ConvCase(n=2, cin=12, cout=12, size=13, offsets="far"))
    with env("MMDET_DCNV2_CPU_GEMM", "brgemm"):
        want = forward(tensors, params)
        with torch.backends.mkldnn.flags(enabled=False):
            assert ROUTES(torch.float32) == "forward mm, backward mm"
            got = forward(tensors, params)
        with env("ONEDNN_MAX_CPU_ISA", "SSE41"):
            assert FORWARD(torch.float32) != "brgemm"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_forward_in_every_isa_build(gen):
    """The plan, fill and transposes of each build, under the fused forward."""
    tensors, params = fused_case(gen, ConvCase(n=2, cin=12, cout=12, size=13, deform_groups=2, offsets="far"))
    with env("MMDET_DCNV2_CPU_GEMM", "brgemm"):
        with env("MMDET_DCNV2_CPU_ISA", "baseline"):
            baseline = forward(tensors, params)
        for isa in cpu_supports():
            with env("MMDET_DCNV2_CPU_ISA", isa):
                torch.testing.assert_close(forward(tensors, params), baseline, rtol=1e-5, atol=1e-5)
