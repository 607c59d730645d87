"""A short run of every CUDA kernel for `compute-sanitizer --tool memcheck` (make gpu-check).

Small shapes, each kernel in each path once: convolution forward and backward (split channel blocks
with atomics, deterministic gather, tiles of pixel ranges, float32 and float16), RoI pooling forward
and backward (atomic and deterministic; RoIs past the border, degenerate, with invalid batch indices
and non-finite offsets). Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own
allocation and an out-of-bounds access lands outside it.
"""

import math
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic mode's condition for cuBLAS

import torch  # noqa: E402

from mmdet_dcnv2.ops import deform_roi_pool, modulated_deform_conv2d, set_column_budget  # noqa: E402


def conv(dtype, deterministic, budget):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 9, 11, generator=g)
    offset = 4 * torch.randn(2, 2 * 2 * 9, 9, 11, generator=g)
    offset[0, 3, 2, 2] = math.nan
    mask = torch.rand(2, 2 * 9, 9, 11, generator=g)
    weight = torch.randn(8, 8, 3, 3, generator=g)
    bias = torch.randn(8, generator=g)
    tensors = [t.to("cuda", dtype).requires_grad_() for t in (x, offset, mask, weight, bias)]
    previous = set_column_budget(budget)
    torch.use_deterministic_algorithms(deterministic)
    try:
        y = modulated_deform_conv2d(*tensors, 1, 1, 1, 2, 2)
        torch.autograd.grad(y.float().square().sum(), tensors)
    finally:
        torch.use_deterministic_algorithms(False)
        set_column_budget(previous)


def pool(dtype, deterministic):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 12, 14, generator=g)
    rois = torch.tensor(
        [
            [0, 1.5, 2.0, 9.0, 10.0],
            [1, -5.0, -4.0, 20.0, 30.0],
            [1, 3.0, 3.0, 3.0, 7.0],
            [0, 8.0, 7.0, 2.0, 1.0],
            [math.nan, 1.0, 1.0, 5.0, 5.0],
            [2, 1.0, 1.0, 5.0, 5.0],
            [-1, 1.0, 1.0, 5.0, 5.0],
            [0.5, 1.0, 1.0, 5.0, 5.0],
        ]
    )
    offset = torch.randn(rois.shape[0], 2, 3, 3, generator=g)
    offset[1, 0, 1, 1] = math.inf
    x, offset = (t.to("cuda", dtype).requires_grad_() for t in (x, offset))
    torch.use_deterministic_algorithms(deterministic)
    try:
        for ratio in (0, 2):
            y = deform_roi_pool(x, rois.to("cuda", dtype), offset, (3, 3), 1.0, ratio, 0.1)
            torch.autograd.grad(y.float().square().sum(), (x, offset))
    finally:
        torch.use_deterministic_algorithms(False)


def main():
    for dtype in (torch.float32, torch.float16):
        for deterministic in (False, True):
            for budget in (256 << 20, 5000):  # whole batch; tiles of a few pixel columns
                conv(dtype, deterministic, budget)
            pool(dtype, deterministic)
    torch.cuda.synchronize()
    print("gpu_memcheck: every kernel ran")


if __name__ == "__main__":
    main()
