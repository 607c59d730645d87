"""End to end: Faster R-CNN R50-FPN, inference and one training step at a fixed image size, and peak memory.

Two sets of variants (``--set``):

- ``dcn`` (default): the stock mmdet configs, plain vs mdconv-c3-c5 on our kernels vs mdconv-c3-c5 on mmcv's.
- ``mimic``: the cost of R-CNN feature mimicking: our paper-setting config (mdconv c3-c5 + MDPool) with
  and without mimicking, 32 crops of 224x224 per image (``mimic_on='all'`` so that an untrained RPN
  still yields the 32 RoIs a trained one gives the paper's foreground-only setting). Inference is the
  same model either way; the training step is what mimicking costs.

Each variant runs in its own process (the registry override is chosen at import, and peak memory is a
per-process number); the variants are run in alternating rounds and each keeps its fastest time, so
the ratios printed at the end are measured side by side.

    python benchmarks/bench_faster_rcnn.py --size 800 1216 --rounds 2
    python benchmarks/bench_faster_rcnn.py --set mimic --size 512 512 --threads 1
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# name -> (config: "mmdet:<path>" or "ours:<path>", MMDET_DCNV2_OVERRIDE, config overrides); the
# first variant of a set is the baseline the ratios are taken against.
PAPER = "ours:dcnv2/faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_1x_coco.py"
MIMIC = "ours:dcnv2/faster_rcnn_r50_fpn_mdconv_c3-c5_mdpool_mimic_1x_coco.py"
VARIANT_SETS = {
    "dcn": {
        "plain": ("mmdet:faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", "1", {}),
        "mdconv (ours)": ("mmdet:dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py", "1", {}),
        "mdconv (mmcv)": ("mmdet:dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py", "0", {}),
    },
    "mimic": {
        "mdconv+mdpool": (PAPER, "1", {}),
        "mdconv+mdpool+mimic (32 crops/image)": (MIMIC, "1", {"model.roi_head.mimic_on": "all"}),
    },
}


def config_file(config):
    where, path = config.split(":", 1)
    package = __import__("mmdet" if where == "mmdet" else "mmdet_dcnv2")
    return os.path.join(os.path.dirname(package.__file__), ".mim", "configs", path)


def measure(config, options, height, width, iters, threads):
    """Runs inside the variant's process: fastest inference and training step, peak RSS."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    from mmengine import Config
    from mmengine.structures import InstanceData

    import mmdet_dcnv2  # noqa: F401  (the override follows MMDET_DCNV2_OVERRIDE)

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(config_file(config))
    cfg.merge_from_dict(options)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    dcn_types = sorted(
        {
            type(m).__module__.split(".")[0]
            for m in model.modules()
            if "Deform" in type(m).__name__ or type(m).__name__ in ("MDConv", "DConv", "MDPool", "DPool")
        }
    )
    torch.manual_seed(0)
    images = torch.rand(1, 3, height, width) * 255
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(height, width),
            ori_shape=(height, width),
            scale_factor=(1.0, 1.0),
            pad_shape=(height, width),
            batch_input_shape=(height, width),
        )
    )
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[50.0, 60.0, 300.0, 400.0], [400, 100, 700, 500]]), labels=torch.tensor([1, 7])
    )
    data = model.data_preprocessor({"inputs": [images[0]], "data_samples": [sample]}, training=True)

    def fastest(fn):
        fn()
        best = float("inf")
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    model.eval()
    with torch.no_grad():
        infer = fastest(lambda: model.predict(data["inputs"], data["data_samples"]))
    model.train()

    def train_step():
        losses = model.loss(data["inputs"], data["data_samples"])
        sum(
            v.sum() if torch.is_tensor(v) else sum(x.sum() for x in v) for k, v in losses.items() if "loss" in k
        ).backward()
        model.zero_grad(set_to_none=True)

    train = fastest(train_step)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"infer_s": infer, "train_s": train, "peak_mb": peak_mb, "dcn_from": dcn_types}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per round (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--set", choices=sorted(VARIANT_SETS), default="dcn", help="which variants (see above)")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        config, options = args._child
        print(json.dumps(measure(config, json.loads(options), *args.size, args.iters, args.threads)))
        return

    variants = VARIANT_SETS[args.set]
    results = {}
    for _ in range(args.rounds):
        for name, (config, override, options) in variants.items():
            env = dict(os.environ, MMDET_DCNV2_OVERRIDE=override)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_child",
                    config,
                    json.dumps(options),
                    "--size",
                    *map(str, args.size),
                    "--iters",
                    str(args.iters),
                    "--threads",
                    str(args.threads),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            best = results.setdefault(name, r)
            for key in ("infer_s", "train_s", "peak_mb"):
                best[key] = min(best[key], r[key]) if key != "peak_mb" else max(best[key], r[key])
    base_name = next(iter(variants))
    base = results[base_name]
    threads = args.threads or "torch's default"
    from machine import describe  # benchmarks/machine.py (the script's folder is on sys.path)

    print("\n".join(describe(args.threads or None)))
    print(f"Faster R-CNN R50-FPN, one {args.size[0]}x{args.size[1]} image, CPU, threads: {threads}")
    print(
        f"| variant | deformable layers from | inference s | vs {base_name} | train step s | vs {base_name} "
        "| peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {', '.join(r['dcn_from']) or '-'} | {r['infer_s']:.2f} | {r['infer_s'] / base['infer_s']:.2f}x"
            f" | {r['train_s']:.2f} | {r['train_s'] / base['train_s']:.2f}x | {r['peak_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
