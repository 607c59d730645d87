"""Two (or more) models' spatial support of the same node side by side, as in the paper's Figure 1:

    python -P -m mmdet_dcnv2.tools.spatial_support_compare A/conv_x64_y64.npz B/conv_x64_y64.npz \\
        --labels "regular ConvNet" DCNv2 --out compare.png

Rows are the models, columns every panel of the three views (receptive field, one panel per sampling
layer, saliency region), drawn from the npz files ``mmdet_dcnv2.tools.spatial_support`` writes. The
title is the first record's node; a warning (stderr) says when the records are of different nodes
(their labels differ -- e.g. a different class, or a position falling on another c5 unit) or images.
"""

import argparse
import os.path as osp
import sys


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description="Compare the spatial support of one node across models.")
    parser.add_argument("records", nargs="+", help="<node>.npz files written by mmdet_dcnv2.tools.spatial_support")
    parser.add_argument("--labels", nargs="+", default=None, help="one row label per file (default: file paths)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--dpi", type=int, default=90)
    parser.add_argument(
        "--colors",
        type=int,
        default=0,
        help="save as a palette PNG of this many colours (about 3x smaller; for docs); 0: full colour",
    )
    args = parser.parse_args(argv)
    labels = args.labels or args.records
    if len(labels) != len(args.records):
        parser.error(f"--labels: expected {len(args.records)} labels (one per file), got {len(labels)}")
    import numpy as np

    from mmdet_dcnv2.analysis.drawing import save_comparison

    records = []
    for path in args.records:
        if not osp.isfile(path):
            parser.error(f"record {path!r} does not exist")
        with np.load(path) as data:
            records.append(dict(data))
    for key, what in (("node_label", "node"), ("image_path", "image")):
        values = [str(record[key]) for record in records]
        if len(set(values)) > 1:
            listing = "; ".join(f"{path}: {value}" for path, value in zip(args.records, values))
            print(
                f"warning: the records are not of the same {what} ({listing}); the panels are not comparable "
                f"one to one",
                file=sys.stderr,
            )
    save_comparison(records, labels, args.out, dpi=args.dpi)
    if args.colors:
        from PIL import Image  # matplotlib's own dependency

        Image.open(args.out).convert("RGB").quantize(args.colors, method=Image.Quantize.MEDIANCUT).save(
            args.out, optimize=True
        )
    print(f"written {args.out}")
    return args.out


if __name__ == "__main__":
    main()
