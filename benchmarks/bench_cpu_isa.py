"""The sampling loops of our CPU op per ISA build (MMDET_DCNV2_CPU_ISA = baseline, avx2, avx512), side
by side: each part of the backward alone, with ONE output channel so that the GEMMs cost next to
nothing and what is timed is the padding copy, the sampling plan and the loop itself --
  input:  grad of input  (the scatter),
  offset: grads of offset and mask (the dot products),
  weight: grad of weight (the column fill; the forward runs the same fill).
Milliseconds, fastest of --rounds, the builds taking turns. Builds the CPU lacks are skipped.

    python benchmarks/bench_cpu_isa.py --threads 1 --shapes c3 c4 c5
"""

import argparse
import os
import time

import torch
from bench_deform_conv import SHAPES, make_inputs  # benchmarks/ is on sys.path
from machine import describe

import mmdet_dcnv2.ops  # noqa: F401  (loads the extension)

PARTS = {"input": [True, False, False], "offset": [False, True, False], "weight": [False, False, True]}
LEVELS = ("baseline", "avx2", "avx512")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    top = torch.ops.mmdet_dcnv2._cpu_isa().split("cpu=")[1]
    levels = LEVELS[: LEVELS.index(top) + 1]
    print("\n".join(describe()))
    print(f"\n| layer | part ({args.dtype}) | " + " | ".join(f"{lv} ms" for lv in levels) + " |")
    print("|---|---|" + "---|" * len(levels))
    backward = torch.ops.mmdet_dcnv2.modulated_deform_conv2d_backward
    old = os.environ.get("MMDET_DCNV2_CPU_ISA")
    try:
        for name in args.shapes:
            channels, height, width = SHAPES[name]
            x, off, mask, w = make_inputs(channels, height, width, 1, 1, dtype, "cpu", False)
            w1 = w[:1].clone()
            grad = torch.ones(1, 1, height, width, dtype=dtype)
            best = {}
            for round_ in range(args.rounds + 1):
                for level in levels:
                    os.environ["MMDET_DCNV2_CPU_ISA"] = level
                    for part, output_mask in PARTS.items():
                        start = time.perf_counter()
                        backward(grad, x, off, mask, w1, None, [1, 1], [1, 1], [1, 1], 1, 1, output_mask)
                        t = time.perf_counter() - start
                        if round_ > 0:  # round 0 warms up
                            best[(level, part)] = min(best.get((level, part), float("inf")), t)
            for part in PARTS:
                print(
                    f"| {name} | {part} | " + " | ".join(f"{best[(lv, part)] * 1e3:.1f}" for lv in levels) + " |",
                    flush=True,
                )
    finally:
        if old is None:
            os.environ.pop("MMDET_DCNV2_CPU_ISA", None)
        else:
            os.environ["MMDET_DCNV2_CPU_ISA"] = old


if __name__ == "__main__":
    main()
