"""Spatial-support analysis of a detector's nodes (DCNv2 paper, Sec. 2.1, Figs. 1-2), in one command.

    python -P -m mmdet_dcnv2.tools.spatial_support CONFIG CHECKPOINT IMAGE [--out-dir DIR]
        [--nodes conv:det0 cls:det0 reg:det0] [--max-error 0.1] [--cell 4] [--score-thr 0.3]

For every node, writes ``DIR/<node>_receptive_field.png``, ``<node>_sampling_locations.png``,
``<node>_saliency.png`` and ``<node>.npz`` (the raw arrays: image, Jacobian and heat map, every
sampling point with its strength, the saliency mask and every probe of its search), plus
``DIR/summary.json``. Node specs (see :mod:`mmdet_dcnv2.analysis.nodes`): ``conv:det0`` is the c5
unit at the centre of the best detection, ``cls:det0`` / ``reg:det0`` its classification and
box-regression nodes; ``conv:X,Y[#CHANNEL]`` and ``cls|reg:X1,Y1,X2,Y2[#CLASS]`` take original-image
pixels. ``<node>`` carries the position or box and the channel or class (e.g. ``conv_x64_y32``,
``cls_det0_c4``); two specs resolving to the same node are an error. Two runs with the same explicit
nodes (e.g. a regular and a DCNv2 model) compare with
``python -P -m mmdet_dcnv2.tools.spatial_support_compare A.npz B.npz``.
"""

import argparse
import json
import math
import os
import os.path as osp
import sys
import time
from typing import Dict, List

DEFAULT_NODES = ("conv:det0", "cls:det0", "reg:det0")


def parse_args(argv=None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(
        description="Effective receptive fields, effective sampling/bin locations and error-bounded saliency "
        "regions of a detector's nodes (DCNv2 paper, Sec. 2.1)."
    )
    parser.add_argument("config", help="mmdet config (with custom_imports=['mmdet_dcnv2'] for DCNv2 models)")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("image", help="image file")
    parser.add_argument("--out-dir", default=None, help="default: work_dirs/spatial_support/<image name>")
    parser.add_argument(
        "--nodes",
        nargs="+",
        default=list(DEFAULT_NODES),
        metavar="KIND:WHERE[#INDEX]",
        help="conv:det0 | conv:X,Y[#CHANNEL] | cls:det0 | cls:X1,Y1,X2,Y2[#CLASS] | reg:... "
        f"(original-image pixels; default: {' '.join(DEFAULT_NODES)})",
    )
    parser.add_argument("--max-error", type=float, default=0.1, help="relative error bound of the saliency region")
    parser.add_argument("--cell", type=int, default=4, help="saliency search granularity, in pixels")
    parser.add_argument("--batch-size", type=int, default=16, help="masked images per batched forward pass")
    parser.add_argument("--score-thr", type=float, default=0.3, help="detections that count for det<N>")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's own choice)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="mmengine config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    import numpy as np
    import torch
    from tqdm import tqdm

    from mmdet_dcnv2.analysis import analyse_node, detect, load_detector, load_image, parse_spec, resolve_nodes
    from mmdet_dcnv2.analysis.drawing import VIEWS, save_view
    from mmdet_dcnv2.analysis.record import summary

    for spec in args.nodes:  # fail on a malformed spec before loading anything
        parse_spec(spec)
    if not osp.isfile(args.image):
        raise FileNotFoundError(f"image {args.image!r} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out_dir or osp.join("work_dirs", "spatial_support", osp.splitext(osp.basename(args.image))[0])
    started = time.perf_counter()
    model = load_detector(args.config, args.checkpoint, args.device, args.cfg_options)
    image = load_image(model, args.image)
    detections = detect(model, image, args.score_thr)
    nodes = resolve_nodes(args.nodes, model, image, detections)
    os.makedirs(out_dir, exist_ok=True)

    results: List[Dict] = []
    for node in nodes:
        cells = math.ceil(image.size[0] / args.cell) * math.ceil(image.size[1] / args.cell)
        rounds = max(1, math.ceil(math.log(cells + 1) / math.log(args.batch_size + 1)))
        with tqdm(total=rounds * args.batch_size, desc=f"saliency search {node.name}", unit="img") as bar:
            record = analyse_node(model, image, node, args.max_error, args.cell, args.batch_size, bar)
            bar.total = bar.n  # the estimate was an upper bound
            bar.refresh()
        np.savez_compressed(osp.join(out_dir, f"{node.name}.npz"), **record)
        for view in VIEWS:
            save_view(record, view, osp.join(out_dir, f"{node.name}_{view}.png"))
        results.append(summary(record))
        saliency = results[-1]["saliency"]
        print(
            f"{node.name}: {node.label}; saliency region {100 * saliency['area_fraction']:.1f}% of the image, "
            f"error {saliency['error']:.3f}, {saliency['masked_images']} masked images in "
            f"{saliency['forward_passes']} batched forward passes (the full image's included)",
            flush=True,
        )

    report = {
        "config": args.config,
        "checkpoint": args.checkpoint,
        "image": args.image,
        "network_input_size": list(image.size),
        "scale_factor": list(image.scale_factor),
        "detections": [
            {"box": [round(float(v), 2) for v in box], "score": float(score), "label": int(label)}
            for box, score, label in zip(*detections)
        ],
        "nodes": results,
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    with open(osp.join(out_dir, "summary.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"written under {osp.abspath(out_dir)}", flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # bad arguments: one line, not a traceback
        sys.exit(f"spatial_support: {error}")
