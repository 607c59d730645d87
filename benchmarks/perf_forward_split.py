"""Where the fused CPU forward's time goes, by `perf` samples: oneDNN's JIT brgemm kernels (the GEMM),
the column fill, the sampling plan, the float transposes (input into the padded channels-last
buffer, the weight into the columns' order, the output blocks into place) and the rest of our
code. The torch profiler cannot split the fused forward (its GEMM runs inside our op), so this
samples the op with Linux `perf` (which must be installed and allowed: perf_event_paranoid <= 2)
and sorts the samples by symbol. A second child times the op and dense conv2d side by side, for the
ratio the shares are taken of. The shares are of the samples in the JIT code and in our extension:
time spent in ATen, libc and the kernel on the op's behalf (allocations, page faults) is spread over
the parts in proportion -- it cannot be told from the interpreter's own there.

    python benchmarks/perf_forward_split.py --threads 1 --shapes c3 c4 c5
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = """
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, {bench!r})
from bench_deform_conv import SHAPES, make_inputs
from mmdet_dcnv2.ops import modulated_deform_conv2d
torch.set_num_threads({threads})
x, off, mask, w = make_inputs(*SHAPES[{shape!r}], 1, 1, torch.float32, "cpu", False)
ours = lambda: modulated_deform_conv2d(x, off, mask, w, None, 1, 1, 1, 1, 1)
dense = lambda: F.conv2d(x, w, padding=1)
if {timing}:
    best = {{"ours": 1e9, "dense": 1e9}}
    for _ in range(7):
        for name, fn in (("ours", ours), ("dense", dense)):
            t = time.perf_counter(); fn(); best[name] = min(best[name], time.perf_counter() - t)
    print(best["ours"] * 1e3, best["dense"] * 1e3)
else:
    for _ in range({iterations}):
        ours()
"""

PARTS = (  # (part, substring of the symbol); the first match wins
    ("GEMM (oneDNN brgemm JIT)", "[JIT]"),
    ("column fill", "fill_range"),
    ("sampling plan", "plan_run"),
    ("transposes", "transpose"),
)


def child(shape, threads, timing, iterations=0):
    bench = os.path.dirname(os.path.abspath(__file__))
    return CHILD.format(bench=bench, shape=shape, threads=threads, timing=timing, iterations=iterations)


def split(shape, threads, iterations):
    """part -> share of the op's samples (libpython and the interpreter's start excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        code = child(shape, threads, False, iterations)
        subprocess.run(
            ["perf", "record", "-q", "-o", data, sys.executable, "-P", "-c", code],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        report = subprocess.run(
            ["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "-n", "--stdio"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    samples = {part: 0 for part, _ in PARTS}
    samples["rest of our op"] = 0
    for line in report.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].endswith("%") or line.lstrip().startswith("#"):
            continue
        n, dso, sym = int(fields[1]), fields[2], " ".join(fields[3:])
        if "JIT" in dso or "[JIT]" in line:
            samples["GEMM (oneDNN brgemm JIT)"] += n
        elif "_C" in dso:
            part = next((p for p, key in PARTS[1:] if key in sym), "rest of our op")
            samples[part] += n
    total = sum(samples.values())
    return {part: n / max(1, total) for part, n in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", nargs="*", default=["c3", "c4", "c5"])
    parser.add_argument("--iterations", type=int, default=150)
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("perf_forward_split.py needs Linux perf (`perf record`) on PATH")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe

    print("\n".join(describe(args.threads)))
    print("\n| layer | dense fwd ms | ours fwd | " + " | ".join(p for p, _ in PARTS) + " | rest of our op |")
    print("|" + "---|" * (len(PARTS) + 4))
    for shape in args.shapes:
        out = subprocess.run(
            [sys.executable, "-P", "-c", child(shape, args.threads, True)], check=True, capture_output=True, text=True
        ).stdout.split()
        ours_ms, dense_ms = float(out[-2]), float(out[-1])
        ratio = ours_ms / dense_ms
        shares = split(shape, args.threads, args.iterations)
        cells = [f"{ratio * share:.2f}x" for share in shares.values()]
        print(f"| {shape} | {dense_ms:.1f} | {ratio:.2f}x | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
