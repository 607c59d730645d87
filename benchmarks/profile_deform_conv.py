"""Where our CPU op's time goes, per part, against dense conv2d of the same shape: the column GEMMs
(ATen's mm/addmm or oneDNN convolutions), ATen copies and fills (zeroing and copying buffers), and
our own code (the op's self time: padding copy, sampling plan, column fill, scatter, dot products,
blocked transposes). Measured with torch.profiler (which adds a little overhead to every part), the
fastest of --repeat steps per part, our op's and the dense conv's steps taking turns.

    python benchmarks/profile_deform_conv.py --threads 1 --shapes c3 c4 c5

The float32 forward is fused by default (its GEMM runs inside our op, so the profiler books it as
ours): its split by part is perf_forward_split.py's; with MMDET_DCNV2_CPU_GEMM=mm (or onednn) this
script splits the tiled forward instead. The backward is always tiled.
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from bench_deform_conv import SHAPES, make_inputs  # benchmarks/ is on sys.path
from machine import describe
from torch.profiler import ProfilerActivity, profile

from mmdet_dcnv2.ops import modulated_deform_conv2d

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::mkldnn_convolution", "aten::convolution_backward"}
COPY_OPS = {"aten::copy_", "aten::fill_", "aten::zero_", "aten::add_", "aten::clone", "aten::contiguous"}


def split(step):
    """part -> ms in one profiled step."""
    if True:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        parts = {"GEMM": 0.0, "ATen copies/fills": 0.0, "ours (sampling, transposes)": 0.0}
        for e in prof.key_averages():
            ms = e.self_cpu_time_total / 1e3
            if e.key in GEMM_OPS:
                parts["GEMM"] += ms
            elif e.key in COPY_OPS:
                parts["ATen copies/fills"] += ms
            elif e.key.startswith("mmdet_dcnv2::"):
                parts["ours (sampling, transposes)"] += ms
        parts["total"] = sum(parts.values())
    return parts


def interleaved_splits(steps, repeat):
    """name -> part -> fastest ms over `repeat` profiled steps, the steps taking turns (one warm-up each)."""
    for step in steps.values():
        step()
    best = {name: {} for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            for part, ms in split(step).items():
                best[name][part] = min(best[name].get(part, float("inf")), ms)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print("\n".join(describe()))
    print("\n| layer | mode | dense ms | ours total | GEMM | ATen copies/fills | ours (sampling, transposes) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes:
        channels, height, width = SHAPES[name]
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"
            x, off, mask, w = make_inputs(channels, height, width, args.batch, 1, dtype, "cpu", grad)

            def run(fn):
                def step():
                    with torch.set_grad_enabled(grad):
                        y = fn()
                        if grad:
                            y.sum().backward()

                return step

            r = interleaved_splits(
                {
                    "dense": run(lambda: F.conv2d(x, w, padding=1)),
                    "ours": run(lambda: modulated_deform_conv2d(x, off, mask, w, None, 1, 1, 1, 1, 1)),
                },
                args.repeat,
            )
            dense, parts = r["dense"]["total"], r["ours"]
            cells = [name, mode, f"{dense:.1f}"] + [
                f"{parts[k] / dense:.2f}x"
                for k in ("total", "GEMM", "ATen copies/fills", "ours (sampling, transposes)")
            ]
            print("| " + " | ".join(cells) + " |", flush=True)
    print("\n(ratios to the dense conv's profiled total; the profiled times are each part's fastest step)")


if __name__ == "__main__":
    sys.exit(main())
