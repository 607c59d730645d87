"""Modulated deformable convolution: our op vs dense conv2d and torchvision, side by side, with floors.

Every row times all contenders on the same inputs in one process, taking turns run by run (timing.py),
and prints ratios to the dense convolution of the same shape, each the fastest of --repeat runs (a
shared machine is noisy; ratios measured together are much less so).
Shapes are ResNet-50 3x3 layers at an 800x1216 image: c3 (128 ch, 100x152), c4 (256, 50x76),
c5 (512, 25x38).

On CPU each shape also gets floor rows, timed in the same run, in the "ours" columns: what our op
cannot go below at that shape --
  floor: torch.mm     its column GEMMs (forward: output; backward: grad of columns and of weight) by
                      torch.mm on pixel-major columns, as the mm route runs them (MKL in x86 torch);
  floor: oneDNN 1x1   the same GEMMs as oneDNN 1x1 convolutions (forward and backward), as the
                      onednn route runs them (MMDET_DCNV2_CPU_GEMM in docs/performance.md);
  floor: F.unfold     regular-grid im2col of the input (forward) and its adjoint F.fold (backward):
                      the sampling's floor, with no offsets to follow.
With --tiled, the column "ours tiled" runs our op's forward on the tiled route its backward takes
(MMDET_DCNV2_CPU_GEMM=mm or onednn instead of the fused brgemm forward), for a side-by-side look at
what the fused forward changes.
The header says which machine, libraries, thread count and GEMM route the numbers are from.
(No mmcv here: a GPU machine may not have it; bench_faster_rcnn.py compares against mmcv.)

    python benchmarks/bench_deform_conv.py                  # CPU, the current thread count
    python benchmarks/bench_deform_conv.py --threads 1 2    # thread scaling
    python benchmarks/bench_deform_conv.py --device cuda    # GPU (TF32 settings printed)
"""

import argparse
import os

import torch
import torch.nn.functional as F
from machine import describe  # benchmarks/machine.py
from timing import timed_interleaved  # benchmarks/timing.py (the script's folder is on sys.path)

from mmdet_dcnv2.ops import modulated_deform_conv2d

SHAPES = {"c3": (128, 100, 152), "c4": (256, 50, 76), "c5": (512, 25, 38)}


def tiled_forward(x, *args):
    """Our op with the forward on the tiled route the backward takes (float32: mm or onednn)."""
    route = torch.ops.mmdet_dcnv2._cpu_gemm_route(x.dtype).split(", backward ")[1]
    old = os.environ.get("MMDET_DCNV2_CPU_GEMM")
    os.environ["MMDET_DCNV2_CPU_GEMM"] = route
    try:
        return modulated_deform_conv2d(x, *args)
    finally:
        if old is None:
            del os.environ["MMDET_DCNV2_CPU_GEMM"]
        else:
            os.environ["MMDET_DCNV2_CPU_GEMM"] = old


def contenders(only_ours, tiled=False):
    found = {"ours": modulated_deform_conv2d}
    if tiled:
        found["ours tiled"] = tiled_forward
    if only_ours:
        return found
    try:
        import torchvision

        found["torchvision"] = lambda x, off, m, w, b, s, p, d, groups, dg: torchvision.ops.deform_conv2d(
            x, off, w, b, stride=s, padding=p, dilation=d, mask=m
        )
    except ImportError:
        pass
    return found


FLOORS = ("floor: torch.mm", "floor: oneDNN 1x1", "floor: F.unfold")


def floor_steps(x, w, grad):
    """name -> step for the floors of a shape (see the module docstring), forward or forward+backward."""
    batch, channels, height, width = x.shape
    cols_n, k = batch * height * width, channels * 9
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype=x.dtype)

    cols, rows, gout = rand(cols_n, k), rand(channels, k), rand(channels, cols_n)  # pixel-major columns
    gout_pm = gout.t().contiguous()

    def nhwc(m):  # a pixel-major (pixels, C) matrix as the channels-last (1, C, 1, pixels) image
        return m.as_strided((1, m.size(1), 1, m.size(0)), (m.numel(), 1, m.numel(), m.size(1)))

    kernel = rows.as_strided((channels, k, 1, 1), (k, 1, k, k))

    def mm():
        torch.mm(rows, cols.t())
        if grad:
            torch.mm(rows.t(), gout)
            torch.mm(gout, cols)

    def onednn():
        torch.mkldnn_convolution(nhwc(cols), kernel, None, [0, 0], [1, 1], [1, 1], 1)
        if grad:  # dilation 2 as our driver asks (the same arithmetic for a 1x1 kernel; see deform_conv.cpp)
            torch.ops.aten.convolution_backward(
                nhwc(gout_pm), nhwc(cols), kernel, None, [1, 1], [0, 0], [2, 2], False, [0, 0], 1, [True, True, False]
            )

    xd = x.detach()

    def unfold():
        u = F.unfold(xd, 3, padding=1)
        if grad:
            F.fold(u, (height, width), 3, padding=1)

    steps = {"floor: torch.mm": mm, "floor: F.unfold": unfold}
    if torch.backends.mkldnn.is_available():
        steps["floor: oneDNN 1x1"] = onednn
    return steps


def make_inputs(channels, height, width, batch, deform_groups, dtype, device, grad):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    x = rand(batch, channels, height, width)
    w = rand(channels, channels, 3, 3, scale=0.02)
    off = rand(batch, 2 * deform_groups * 9, height, width, scale=2.0)
    mask = torch.rand(batch, deform_groups * 9, height, width, generator=g).to(device=device, dtype=dtype)
    return x, off, mask.requires_grad_(grad), w


def bench_row(name, batch, deform_groups, dtype, device, repeat, funcs, floors):
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

        steps = {"dense": run(lambda: F.conv2d(x, w, padding=1))}
        for label, op in funcs.items():
            step = run(lambda op=op: op(x, off, mask, w, None, 1, 1, 1, 1, deform_groups))
            try:
                step()
            except RuntimeError:  # e.g. torchvision has no CPU bfloat16 kernel
                continue
            steps[label] = step
        if floors:
            for label, step in floor_steps(x, w, grad).items():
                step = torch.no_grad()(step)
                try:
                    step()
                except RuntimeError:  # e.g. oneDNN's bfloat16 path needs AVX-512 (ONEDNN_MAX_CPU_ISA=AVX2)
                    continue
                steps[label] = step
        times = timed_interleaved(steps, sync, repeat)
        results[(mode, "dense ms")] = times["dense"] * 1e3
        for label, t in times.items():
            if label != "dense":
                results[(mode, label)] = t / times["dense"]
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="CPU thread counts to compare")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="batch 1 float32 rows only")
    parser.add_argument("--only-ours", action="store_true", help="no torchvision columns (faster)")
    parser.add_argument("--no-floors", action="store_true", help="no floor rows (CPU)")
    parser.add_argument("--tiled", action="store_true", help="also our op with the tiled forward (CPU)")
    parser.add_argument(
        "--rows",
        nargs="*",
        default=None,
        metavar="SHAPE:BATCH:DTYPE",
        help="rows to run instead of the default set, e.g. c3:1:float32 c4:1:bfloat16",
    )
    args = parser.parse_args()

    if args.device == "cuda":
        print(
            f"GPU: {torch.cuda.get_device_name()}; TF32: matmul={torch.backends.cuda.matmul.allow_tf32}, "
            f"cudnn={torch.backends.cudnn.allow_tf32}"
        )
    funcs = contenders(args.only_ours, tiled=args.tiled and args.device == "cpu")
    floors = args.device == "cpu" and not args.no_floors
    rows = [(name, 1, 1, torch.float32) for name in SHAPES]
    if args.rows:
        rows = [(n, int(b), 1, getattr(torch, d)) for n, b, d in (r.split(":") for r in args.rows)]
    elif not args.quick:
        rows += [(name, 2, 1, torch.float32) for name in SHAPES]
        rows += [("c4", 1, 4, torch.float32)]
        rows += [(name, 1, 1, torch.float16 if args.device == "cuda" else torch.bfloat16) for name in SHAPES]
        rows += [("c4", 1, 1, torch.bfloat16)]
        rows = list(dict.fromkeys(rows))
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        if args.device == "cpu":
            print("\n" + "\n".join(describe(threads)))
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
            r = bench_row(name, batch, dg, dtype, args.device, args.repeat, funcs, floors)
            dt = str(dtype).replace("torch.", "")
            cells = [name, str(batch), str(dg), dt, f"{r[('fwd', 'dense ms')]:.1f}"]
            cells += [f"{r[('fwd', lb)]:.2f}x" if ("fwd", lb) in r else "-" for lb in labels]
            cells += [f"{r[('fwd+bwd', 'dense ms')]:.1f}"]
            cells += [f"{r[('fwd+bwd', lb)]:.2f}x" if ("fwd+bwd", lb) in r else "-" for lb in labels]
            print("| " + " | ".join(cells) + " |", flush=True)
            for floor in FLOORS if floors else ():
                if ("fwd", floor) not in r:
                    continue
                others = ["-"] * (len(labels) - 1)  # the floor's ratio sits in the "ours" column
                cells = [f"{name} {floor}", str(batch), str(dg), dt, ""]
                cells += [f"{r[('fwd', floor)]:.2f}x"] + others + [""] + [f"{r[('fwd+bwd', floor)]:.2f}x"] + others
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
