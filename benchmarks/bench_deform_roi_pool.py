"""Modulated deformable RoI pooling: our op vs RoIAlign (mmcv's, torchvision's) of the same output.

Rows are the FPN heads of a Faster/Mask R-CNN: a box head (256 channels, 512 RoIs over 2 images on
a 200x304 level, 7x7) and a mask head (14x14, 128 RoIs). Every contender is timed in the same process,
interleaved, and reported relative to mmcv's RoIAlign (torchvision's where mmcv is missing).

    python benchmarks/bench_deform_roi_pool.py
    python benchmarks/bench_deform_roi_pool.py --device cuda
"""

import argparse

import torch
from timing import timed  # benchmarks/timing.py (the script's folder is on sys.path)

from mmdet_dcnv2.ops import deform_roi_pool

ROWS = {"box head 7x7": (512, 7), "mask head 14x14": (128, 14)}


def random_rois(count, images, height, width, stride, generator):
    """Boxes of 16-256 image pixels at random places, as an RPN would propose on this level."""
    size = torch.empty(count, 2).uniform_(16, 256, generator=generator)
    centre = torch.rand(count, 2, generator=generator) * torch.tensor([width * stride, height * stride])
    batch = torch.randint(0, images, (count, 1), generator=generator).float()
    return torch.cat([batch, centre - size / 2, centre + size / 2], dim=1)


def roi_align_contenders():
    found = {}
    try:
        from mmcv.ops import roi_align as mmcv_roi_align

        found["mmcv roi_align"] = lambda x, rois, size, scale: mmcv_roi_align(x, rois, size, scale, 0, "avg", True)
    except ImportError:
        pass
    try:
        import torchvision

        found["torchvision roi_align"] = lambda x, rois, size, scale: torchvision.ops.roi_align(
            x, rois, size, scale, 0, aligned=True
        )
    except ImportError:
        pass
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    channels, height, width, stride = 256, 200, 304, 4
    x = torch.randn(2, channels, height, width, generator=g).to(device)
    others = roi_align_contenders()
    if device == "cuda":
        others.pop("mmcv roi_align", None)  # the GPU machine has no mmcv
    baseline = next(iter(others))
    print(f"{device}, {torch.get_num_threads()} thread(s); times relative to {baseline}")
    labels = ["ours (offset)", "ours (no offset)"] + list(others)
    header = (
        ["head", f"{baseline} fwd ms"]
        + [f"{lb} fwd" for lb in labels]
        + [f"{baseline} f+b ms"]
        + [f"{lb} f+b" for lb in labels]
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (count, size) in ROWS.items():
        rois = random_rois(count, 2, height, width, stride, g).to(device)
        offset = (0.1 * torch.randn(count, 2, size, size, generator=g)).to(device)
        fns = {
            "ours (offset)": lambda xi, oi: deform_roi_pool(xi, rois, oi, size, 1 / stride, 0, 0.1),
            "ours (no offset)": lambda xi, oi: deform_roi_pool(xi, rois, None, size, 1 / stride, 0, 0.1),
        }
        for label, fn in others.items():
            fns[label] = lambda xi, oi, fn=fn: fn(xi, rois, size, 1 / stride)
        results = {}
        for mode in ("fwd", "f+b"):
            grad = mode == "f+b"
            xi = x.detach().requires_grad_(grad)
            oi = offset.detach().requires_grad_(grad)
            for label, fn in fns.items():

                def step(fn=fn):
                    with torch.set_grad_enabled(grad):
                        out = fn(xi, oi)
                        if grad:
                            out.sum().backward()

                results[(mode, label)] = timed(step, sync, args.repeat)
        cells = [name]
        for mode in ("fwd", "f+b"):
            base = results[(mode, baseline)]
            cells.append(f"{base * 1e3:.1f}")
            cells += [f"{results[(mode, lb)] / base:.2f}x" for lb in labels]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
