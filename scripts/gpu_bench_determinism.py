"""What the deterministic CUDA backward costs (make gpu-check): forward + backward of every input, with
torch.use_deterministic_algorithms off (atomic scatter) and on (gather-form grad_input), side by side.

Conv: ResNet-50 3x3 layers of an 800x1216 image (c3, c4, c5), batch 2. Pool: 512 RoIs on a stride-16
map of 256 channels, 7x7 bins. Fastest of --repeat runs after a warm-up (benchmarks/timing.py).
"""

import argparse
import os
import pathlib
import sys

# Deterministic mode makes PyTorch refuse cuBLAS GEMMs (ours included) without a fixed workspace.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from timing import timed  # noqa: E402

from mmdet_dcnv2.ops import deform_roi_pool, modulated_deform_conv2d  # noqa: E402

CONV_SHAPES = {"c3": (128, 100, 152), "c4": (256, 50, 76), "c5": (512, 25, 38)}


def conv_step(channels, height, width, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, height, width, generator=g).to("cuda", dtype).requires_grad_()
    w = (0.02 * torch.randn(channels, channels, 3, 3, generator=g)).to("cuda", dtype).requires_grad_()
    offset = (2 * torch.randn(2, 18, height, width, generator=g)).to("cuda", dtype).requires_grad_()
    mask = torch.rand(2, 9, height, width, generator=g).to("cuda", dtype).requires_grad_()

    def step():
        modulated_deform_conv2d(x, offset, mask, w, None, 1, 1).sum().backward()

    return step


def pool_step(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 50, 76, generator=g).to("cuda", dtype).requires_grad_()
    count = 512
    xy = torch.rand(count, 2, generator=g) * torch.tensor([1216.0, 800.0])
    wh = 16 + torch.rand(count, 2, generator=g) * 300
    rois = torch.cat([torch.randint(0, 2, (count, 1), generator=g).float(), xy, xy + wh], dim=1).to("cuda", dtype)
    offset = (0.1 * torch.randn(count, 2, 7, 7, generator=g)).to("cuda", dtype).requires_grad_()

    def step():
        deform_roi_pool(x, rois, offset, 7, 1 / 16, 0, 0.1).sum().backward()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(
        f"GPU: {torch.cuda.get_device_name()}; TF32: matmul={torch.backends.cuda.matmul.allow_tf32}, "
        f"cudnn={torch.backends.cudnn.allow_tf32}"
    )
    print("| op | dtype | fwd+bwd ms (atomic) | fwd+bwd ms (deterministic) | ratio |")
    print("|---|---|---|---|---|")
    rows = [
        (f"conv {name}", dtype, lambda s=shape, d=dtype: conv_step(*s, d))
        for name, shape in CONV_SHAPES.items()
        for dtype in (torch.float32, torch.float16)
    ]
    rows += [("pool 512x256x7x7", dtype, lambda d=dtype: pool_step(d)) for dtype in (torch.float32, torch.float16)]
    for label, dtype, make in rows:
        step = make()
        times = []
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            try:
                times.append(timed(step, torch.cuda.synchronize, args.repeat))
            finally:
                torch.use_deterministic_algorithms(False)
        print(
            f"| {label} | {str(dtype).replace('torch.', '')} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} | "
            f"{times[1] / times[0]:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
