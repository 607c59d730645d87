"""Modulated deformable convolution: our op vs dense conv2d, torchvision and mmcv, side by side.

Every row times all contenders on the same inputs in one process, interleaved, and prints ratios to
the dense convolution of the same shape (this machine is noisy; ratios measured together are not).
Shapes are ResNet-50 3x3 layers at an 800x1216 image: c3 (128 ch, 100x152), c4 (256, 50x76),
c5 (512, 25x38).

    python benchmarks/bench_deform_conv.py                  # CPU, the current thread count
    python benchmarks/bench_deform_conv.py --threads 1 2    # thread scaling
    python benchmarks/bench_deform_conv.py --device cuda    # GPU (TF32 settings printed)
"""

import argparse

import torch
import torch.nn.functional as F
from timing import timed  # benchmarks/timing.py (the script's folder is on sys.path)

from mmdet_dcnv2.ops import modulated_deform_conv2d

SHAPES = {"c3": (128, 100, 152), "c4": (256, 50, 76), "c5": (512, 25, 38)}


def contenders(device):
    found = {"ours": modulated_deform_conv2d}
    try:
        import torchvision

        found["torchvision"] = lambda x, off, m, w, b, s, p, d, groups, dg: torchvision.ops.deform_conv2d(
            x, off, w, b, stride=s, padding=p, dilation=d, mask=m
        )
    except ImportError:
        pass
    if device == "cpu":
        try:
            from mmcv.ops import modulated_deform_conv2d as mmcv_op

            found["mmcv"] = mmcv_op
        except ImportError:
            pass
    return found


def make_inputs(channels, height, width, batch, deform_groups, dtype, device, grad):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    x = rand(batch, channels, height, width)
    w = rand(channels, channels, 3, 3, scale=0.02)
    off = rand(batch, 2 * deform_groups * 9, height, width, scale=2.0)
    mask = torch.rand(batch, deform_groups * 9, height, width, generator=g).to(device=device, dtype=dtype)
    return x, off, mask.requires_grad_(grad), w


def bench_row(name, batch, deform_groups, dtype, device, repeat, funcs):
    channels, height, width = SHAPES[name]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {}
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"
        x, off, mask, w = make_inputs(channels, height, width, batch, deform_groups, dtype, device, grad)

        def run(fn):
            def step():
                with torch.set_grad_enabled(grad):
                    y = fn()
                    if grad:
                        y.sum().backward()

            return step

        dense = timed(run(lambda: F.conv2d(x, w, padding=1)), sync, repeat)
        results[(mode, "dense ms")] = dense * 1e3
        for label, op in funcs.items():
            if label == "mmcv" and (dtype != torch.float32 or deform_groups != 1):
                continue
            try:
                t = timed(run(lambda: op(x, off, mask, w, None, 1, 1, 1, 1, deform_groups)), sync, repeat)
            except RuntimeError:  # e.g. torchvision has no CPU bfloat16 kernel
                continue
            results[(mode, label)] = t / dense
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="CPU thread counts to compare")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="batch 1 float32 rows only")
    args = parser.parse_args()

    if args.device == "cuda":
        print(
            f"GPU: {torch.cuda.get_device_name()}; TF32: matmul={torch.backends.cuda.matmul.allow_tf32}, "
            f"cudnn={torch.backends.cudnn.allow_tf32}"
        )
    funcs = contenders(args.device)
    rows = [(name, 1, 1, torch.float32) for name in SHAPES]
    if not args.quick:
        rows += [(name, 2, 1, torch.float32) for name in SHAPES]
        rows += [
            ("c4", 1, 4, torch.float32),
            ("c4", 1, 1, torch.bfloat16),
            ("c4", 1, 1, torch.float16 if args.device == "cuda" else torch.bfloat16),
        ]
        rows = list(dict.fromkeys(rows))
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        print(f"\n{args.device}, {threads} thread(s); times relative to dense conv2d of the same shape")
        labels = list(funcs)
        header = (
            ["layer", "batch", "dg", "dtype", "dense fwd ms"]
            + [f"{lb} fwd" for lb in labels]
            + ["dense f+b ms"]
            + [f"{lb} f+b" for lb in labels]
        )
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for name, batch, dg, dtype in rows:
            r = bench_row(name, batch, dg, dtype, args.device, args.repeat, funcs)
            cells = [name, str(batch), str(dg), str(dtype).replace("torch.", ""), f"{r[('fwd', 'dense ms')]:.1f}"]
            cells += [f"{r[('fwd', lb)]:.2f}x" if ("fwd", lb) in r else "-" for lb in labels]
            cells += [f"{r[('fwd+bwd', 'dense ms')]:.1f}"]
            cells += [f"{r[('fwd+bwd', lb)]:.2f}x" if ("fwd+bwd", lb) in r else "-" for lb in labels]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
