"""The host-run build of the CUDA kernels, for tests (docs/cuda.md).

``csrc/cuda/*.cu`` compiled as C++ with the stand-ins of ``csrc/cuda/host_emulation.h`` (a launch runs
every block and thread in turn, blocks in an order shuffled by a seed), together with the shared
driver (``csrc/deform_conv.cpp``, ``csrc/deform_roi_pool.cpp``) and the schemas (``csrc/ops.cpp``).
The whole build is compiled with ``-Dmmdet_dcnv2=mmdet_dcnv2_hostcuda``: its C++ namespace and its op
namespace are ``mmdet_dcnv2_hostcuda``, so it never clashes with the shipped extension loaded in the
same process. Its ops take CPU tensors (the emulated GPU is the CPU device).

Built once per source change with ``torch.utils.cpp_extension.load`` (ninja tracks the headers), in
the checkout's own ``build/hostcuda`` (not torch's per-user cache, which every clone and worktree would
share under the same name, rebuilding and racing each other). ``MMDET_DCNV2_SANITIZE=1`` builds a
separate copy with AddressSanitizer and UndefinedBehaviorSanitizer (``make sanitize``).
"""

import contextlib
import functools
import os
import pathlib
import re

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
NAMESPACE = "mmdet_dcnv2_hostcuda"

SOURCES = [
    CSRC / "ops.cpp",
    CSRC / "deform_conv.cpp",
    CSRC / "deform_roi_pool.cpp",
    CSRC / "cpu" / "cpu_isa.cpp",  # the shared driver asks it which CPU GEMM route to take
    CSRC / "cpu" / "transpose_f32.cpp",  # the shared driver's float transposes (cpu/transpose.h)
    CSRC / "cuda" / "host_run" / "deform_conv_kernel.cpp",
    CSRC / "cuda" / "host_run" / "deform_roi_pool_kernel.cpp",
    CSRC / "cuda" / "host_run" / "knobs.cpp",
]

# UBSan's float-cast-overflow catches a NaN or huge float converted to an integer (the kernels'
# floor() -> index conversions must only ever see in-range coordinates).
SANITIZE_FLAGS = [
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-g",
]


def sanitized() -> bool:
    return os.environ.get("MMDET_DCNV2_SANITIZE", "0") == "1"


@functools.lru_cache(maxsize=None)
def library():
    """torch.ops.mmdet_dcnv2_hostcuda, building the library first if its sources changed."""
    from torch.utils import cpp_extension

    import mmdet_dcnv2.ops  # noqa: F401  the shipped library first: a namespace clash would then fail loudly

    missing = [str(s) for s in SOURCES if not s.exists()]
    if missing:
        raise FileNotFoundError(f"the host-run build needs the source tree (csrc/); missing: {missing}")
    torch_version = torch.__version__.split("+")[0]
    flags = [
        "-O1",
        "-DMMDET_DCNV2_HOST_EMULATION",
        f"-Dmmdet_dcnv2={NAMESPACE}",
        f'-DMMDET_DCNV2_TORCH_VERSION=\\"{torch_version}\\"',
        "-Wno-unknown-pragmas",
    ]
    name = NAMESPACE
    if sanitized():
        flags += SANITIZE_FLAGS
        name += "_sanitized"
    build_directory = REPO / "build" / name
    build_directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        build_directory=str(build_directory),
        sources=[str(s) for s in SOURCES],
        extra_cflags=flags,
        extra_ldflags=SANITIZE_FLAGS[:1] if sanitized() else [],
        is_python_module=False,
        verbose=os.environ.get("MMDET_DCNV2_HOSTCUDA_VERBOSE") == "1",
    )
    ops = getattr(torch.ops, NAMESPACE)
    if not hasattr(ops, "modulated_deform_conv2d"):
        raise RuntimeError(f"the host-run library loaded but registered no {NAMESPACE} ops")
    return ops


DEFAULT_KNOBS = dict(seed=0, max_blocks=0, multiprocessors=132, force_wide_index=False)


@contextlib.contextmanager
def emulation(**knobs):
    """Runs the block with the emulation's knobs set (seed, max_blocks, multiprocessors,
    force_wide_index; see host_emulation.h), then puts the defaults back."""
    settings = dict(DEFAULT_KNOBS, **knobs)
    ops = library()
    ops._emulation(settings["seed"], settings["max_blocks"], settings["multiprocessors"], settings["force_wide_index"])
    try:
        yield
    finally:
        ops._emulation(**DEFAULT_KNOBS)


def launches():
    """The launches since the knobs were last set: dicts of kernel, grid, items, index_bits."""
    result = []
    for line in library()._emulation_log():
        kernel, grid, items, bits = line.split(" ")
        result.append(dict(kernel=kernel, grid=int(grid), items=int(items), index_bits=int(bits)))
    return result


def column_budget(num_bytes=-1):
    """The host-run build's own column budget (separate from the shipped extension's)."""
    return library()._column_budget(num_bytes)


# --------------------------------------------------------------------------------------------------
# autograd over the raw ops (the shipped package registers autograd for its own namespace only)
# --------------------------------------------------------------------------------------------------


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, offset, mask, weight, bias, params):
        ctx.save_for_backward(input, offset, mask, weight, bias)
        ctx.params = params
        return library().modulated_deform_conv2d(input, offset, mask, weight, bias, *params)

    @staticmethod
    def backward(ctx, grad_output):
        input, offset, mask, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = library().modulated_deform_conv2d_backward(
            grad_output.contiguous(),
            input,
            offset,
            mask,
            weight,
            bias,
            *ctx.params,
            [need[0], need[1] or need[2], need[3] or need[4]],
        )
        return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None,)


def _pair(value):
    return [value, value] if isinstance(value, int) else list(value)


def modulated_deform_conv2d(
    input, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, deform_groups=1
):
    """The functional API's signature, on the host-run CUDA kernels (same dtype for every tensor)."""
    params = (_pair(stride), _pair(padding), _pair(dilation), groups, deform_groups)
    return _Conv.apply(input, offset, mask, weight, bias, params)


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, offset, params):
        ctx.save_for_backward(input, rois, offset)
        ctx.params = params
        return library().deform_roi_pool(input, rois, offset, *params)

    @staticmethod
    def backward(ctx, grad_output):
        input, rois, offset = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_input, grad_offset = library().deform_roi_pool_backward(
            grad_output.contiguous(), input, rois, offset, *ctx.params, [need[0], need[2]]
        )
        return (grad_input if need[0] else None, None, grad_offset if need[2] else None, None)


def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0, gamma=0.1):
    """The functional API's signature, on the host-run CUDA kernels (same dtype for every tensor)."""
    params = (_pair(output_size), float(spatial_scale), int(sampling_ratio), float(gamma))
    return _Pool.apply(input, rois, offset, params)


def schema_text(op) -> str:
    """An op's schema without its namespace, for comparing the two libraries' schemas."""
    return re.sub(r"^\w+::", "", str(op.default._schema))
