"""Train, evaluate and look at a DCNv2 detector on the embedded shapes dataset, in one command.

    python -P -m mmdet_dcnv2.tools.demo --work-dir work_dirs/shapes_demo            # DCNv2 only
    python -P -m mmdet_dcnv2.tools.demo --work-dir work_dirs/shapes_demo --baseline # + regular ConvNet

(``-P`` keeps the current directory off ``sys.path``, so that inside the source tree the installed
package, which has the compiled extension, is imported.)

Steps: generate the data if it is missing (``mmdet_dcnv2.datasets.shapes``, deterministic, once);
for each model and seed, train with mmengine's ``Runner`` on the shipped config
(``configs/shapes/*.py``, losses and progress logged as it goes), evaluate bbox AP on the val split
with mmdet's ``CocoMetric`` (pycocotools' COCO evaluation), plot the loss curve from the Runner's
scalars, and draw detections on validation images with mmdet's ``DetLocalVisualizer``.

Writes, under ``WORK_DIR/<model>/seed<S>/``: ``metrics.json`` (COCO bbox metrics, per-class AP,
timings), ``train.log`` (the Runner's log), ``scalars.json`` (its logged scalars),
``loss_curve.png``, ``vis/*.png`` (predictions, with the ground truth beside them) and the final
checkpoint; and ``WORK_DIR/summary.json`` (+ ``loss_curves.png`` comparing all runs).

Distributed (2 CPU processes, gloo): ``PYTHONSAFEPATH=1 torchrun --nproc_per_node 2 -m
mmdet_dcnv2.tools.demo ...`` -- the process group is initialised here before the Runner, as
mmengine 0.10.7 cannot do it on a CPU-only machine.
"""

import argparse
import json
import os
import os.path as osp
import shutil
import statistics
import time
from typing import Dict, List, Optional

# Not MODELS: that is the registry's name everywhere else in mmdet code.
DEMO_CONFIGS = {
    "dcnv2": "faster_rcnn_r50_fpn_mdconv_c3-c5_shapes.py",
    "baseline": "faster_rcnn_r50_fpn_shapes.py",
}
METRIC_KEYS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")
DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL = 600, 150


def config_path(name: str) -> str:
    """A shapes config, from the installed package (``.mim/configs``) or, failing that, the source tree."""
    import mmdet_dcnv2

    package = osp.dirname(mmdet_dcnv2.__file__)
    for root in (osp.join(package, ".mim", "configs"), osp.join(osp.dirname(package), "configs")):
        path = osp.join(root, "shapes", name)
        if osp.exists(path):
            return path
    raise FileNotFoundError(f"config shapes/{name} not found in {package}/.mim/configs: reinstall mmdet_dcnv2")


def _dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1): a gloo process group, set up before any Runner exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group("gloo")
    return True


def build_config(
    model: str,
    data_root: str,
    run_dir: str,
    seed: int,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    distributed: bool = False,
    cfg_options: Optional[Dict] = None,
    config: Optional[str] = None,
):
    from mmengine.config import Config

    cfg = Config.fromfile(config or config_path(DEMO_CONFIGS[model]))
    data_root = osp.abspath(data_root).rstrip("/") + "/"
    for split in ("train", "val", "test"):
        cfg[f"{split}_dataloader"].dataset.data_root = data_root
        if batch_size is not None:
            cfg[f"{split}_dataloader"].batch_size = batch_size
    for evaluator in ("val_evaluator", "test_evaluator"):
        cfg[evaluator].ann_file = osp.join(data_root, "annotations", "instances_val.json")
    if epochs is not None:
        cfg.train_cfg.max_epochs = epochs
        for scheduler in cfg.param_scheduler:
            if scheduler.get("by_epoch", True):
                scheduler.end = epochs
                if "T_max" in scheduler:
                    scheduler.T_max = epochs
        cfg.default_hooks.checkpoint.interval = epochs
    # Evaluate once, after training (runner.test() on the val split), not inside the training loop
    # (mmengine's epoch loop always validates after the last epoch when a val loop exists).
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.work_dir = run_dir
    cfg.randomness = dict(seed=seed, deterministic=False)
    # Unique names: the Runner's logger, message hub and visualizer are process-wide singletons by name.
    name = f"{model}_seed{seed}_{time.strftime('%Y%m%d_%H%M%S')}"
    cfg.experiment_name = name
    cfg.visualizer.name = name
    if distributed:
        cfg.launcher = "pytorch"
        cfg.env_cfg.dist_cfg = dict(backend="gloo")
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def train_scalars(path: str) -> List[Dict]:
    """The training records of the Runner's ``vis_data/scalars.json`` (one JSON object per line)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                if "loss" in record:
                    records.append(record)
    return records


def plot_losses(curves: Dict[str, List[Dict]], out_file: str, title: str, components: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, records in curves.items():
        steps = [r["step"] for r in records]
        marker = "o" if len(steps) < 30 else None  # a handful of points (a short run) stay visible
        ax.plot(steps, [r["loss"] for r in records], label=f"{label} loss", linewidth=2, marker=marker)
        if components:
            for key in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"):
                if records and key in records[0]:
                    ax.plot(steps, [r[key] for r in records], label=key, linewidth=1, alpha=0.8, marker=marker)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def _upscale(data_sample, factor: int):
    """A copy of a DetDataSample with its gt and predicted boxes scaled by ``factor`` (for drawing)."""
    data_sample = data_sample.clone()
    for field in ("gt_instances", "pred_instances"):
        if field in data_sample:
            instances = data_sample.get(field)
            if hasattr(instances.bboxes, "rescale_"):  # mmdet's HorizontalBoxes
                instances.bboxes.rescale_([factor, factor])
            else:
                instances.bboxes = instances.bboxes * factor
    return data_sample


def draw_detections(runner, out_dir: str, num_images: int, score_thr: float, scale: int = 4) -> List[str]:
    """Ground truth (left) beside predictions (right) on the first val images, by mmdet's
    DetLocalVisualizer; images are enlarged ``scale`` times so that labels stay legible."""
    import mmcv
    import torch
    from mmengine.dataset import pseudo_collate

    from mmdet_dcnv2.engine import unwrap_model

    model = unwrap_model(runner.model)
    model.eval()
    dataset = runner.test_dataloader.dataset
    visualizer = runner.visualizer
    visualizer.dataset_meta = dataset.metainfo
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for index in range(min(num_images, len(dataset))):
        with torch.no_grad():
            result = model.test_step(pseudo_collate([dataset[index]]))[0]
        image = mmcv.imread(result.img_path, channel_order="rgb")
        image = mmcv.imrescale(image, scale, interpolation="nearest")
        out_file = osp.join(out_dir, osp.basename(result.img_path))
        visualizer.add_datasample(
            osp.basename(result.img_path),
            image,
            data_sample=_upscale(result, scale),
            draw_gt=True,
            draw_pred=True,
            show=False,
            pred_score_thr=score_thr,
            out_file=out_file,
        )
        written.append(out_file)
    return written


def run_one(model: str, seed: int, args, distributed: bool) -> Dict:
    from mmengine.runner import Runner

    rank, _ = _dist_info()
    run_dir = osp.abspath(osp.join(args.work_dir, model, f"seed{seed}"))
    cfg = build_config(
        model, args.data_root, run_dir, seed, args.epochs, args.batch_size, distributed, args.cfg_options
    )
    runner = Runner.from_cfg(cfg)
    start = time.perf_counter()
    runner.train()
    train_time = time.perf_counter() - start
    start = time.perf_counter()
    metrics = runner.test()
    test_time = time.perf_counter() - start
    if rank != 0:
        return {}

    log_dir = runner.log_dir
    shutil.copy(osp.join(log_dir, f"{runner.timestamp}.log"), osp.join(run_dir, "train.log"))
    scalars = osp.join(log_dir, "vis_data", "scalars.json")
    shutil.copy(scalars, osp.join(run_dir, "scalars.json"))
    records = train_scalars(scalars)
    plot_losses(
        {model: records}, osp.join(run_dir, "loss_curve.png"), f"{model} ({osp.basename(cfg.filename)}), seed {seed}"
    )
    images = draw_detections(runner, osp.join(run_dir, "vis"), args.num_vis, args.score_thr)

    from mmdet_dcnv2.engine import unwrap_model

    model_module = unwrap_model(runner.model)
    deformable = sorted({type(m).__name__ for m in model_module.modules() if hasattr(m, "conv_offset")})
    num_deformable = sum(1 for m in model_module.modules() if hasattr(m, "conv_offset"))
    coco = {key.split("/", 1)[1]: float(value) for key, value in metrics.items() if key.startswith("coco/")}
    result = {
        "model": model,
        "config": osp.basename(cfg.filename),
        "seed": seed,
        "epochs": cfg.train_cfg.max_epochs,
        "iterations": runner.iter,
        "train_images": len(runner.train_dataloader.dataset),
        "val_images": len(runner.test_dataloader.dataset),
        "world_size": _dist_info()[1],
        "deformable_layers": {"types": deformable, "count": num_deformable},
        "train_time_s": round(train_time, 1),
        "test_time_s": round(test_time, 1),
        "bbox": {key: coco[key] for key in METRIC_KEYS if key in coco},
        "bbox_per_class": {
            key[: -len("_precision")]: value for key, value in coco.items() if key.endswith("_precision")
        },
        "final_loss": records[-1]["loss"] if records else None,
        "loss_curve": [{"step": r["step"], "loss": r["loss"]} for r in records],
        "visualisations": [osp.relpath(p, run_dir) for p in images],
        "work_dir": run_dir,
    }
    with open(osp.join(run_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def summarise(results: List[Dict]) -> Dict:
    summary = {}
    for model in DEMO_CONFIGS:
        runs = [r for r in results if r["model"] == model]
        if not runs:
            continue
        aps = [100 * r["bbox"]["bbox_mAP"] for r in runs]
        ap50s = [100 * r["bbox"]["bbox_mAP_50"] for r in runs]
        summary[model] = {
            "config": runs[0]["config"],
            "seeds": [r["seed"] for r in runs],
            "bbox_mAP": round(statistics.mean(aps), 2),
            "bbox_mAP_std": round(statistics.stdev(aps), 2) if len(aps) > 1 else None,
            "bbox_mAP_50": round(statistics.mean(ap50s), 2),
            "per_seed_bbox_mAP": [round(a, 2) for a in aps],
            "train_time_s": round(statistics.mean(r["train_time_s"] for r in runs), 1),
            "test_time_s": round(statistics.mean(r["test_time_s"] for r in runs), 1),
        }
    return summary


def format_summary(summary: Dict) -> str:
    lines = [f"{'model':<9} {'config':<42} {'seeds':>5} {'AP':>13} {'AP50':>6} {'train s':>8} {'test s':>7}"]
    for model, s in summary.items():
        ap = f"{s['bbox_mAP']:.1f}" + (f" +- {s['bbox_mAP_std']:.1f}" if s["bbox_mAP_std"] is not None else "")
        lines.append(
            f"{model:<9} {s['config']:<42} {len(s['seeds']):>5} {ap:>13} {s['bbox_mAP_50']:>6.1f} "
            f"{s['train_time_s']:>8.0f} {s['test_time_s']:>7.0f}"
        )
    if "dcnv2" in summary and "baseline" in summary:
        delta = summary["dcnv2"]["bbox_mAP"] - summary["baseline"]["bbox_mAP"]
        lines.append(f"DCNv2 - baseline: {delta:+.1f} AP (COCO bbox mAP@[.5:.95], val split)")
    return "\n".join(lines)


def parse_args(argv=None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description="Train, evaluate and draw a DCNv2 detector on embedded shapes data.")
    parser.add_argument("--work-dir", default="work_dirs/shapes_demo")
    parser.add_argument("--data-root", default="data/shapes", help="generated here if missing")
    parser.add_argument(
        "--baseline", action="store_true", help="also train the same model without DCN and print both APs side by side"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(DEMO_CONFIGS),
        default=None,
        help="which models to run (default: dcnv2, or baseline and dcnv2 with --baseline)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="override the config's max_epochs")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN, help="images to generate for train")
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL, help="images to generate for val")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated dataset")
    parser.add_argument("--num-vis", type=int, default=8, help="validation images to draw")
    parser.add_argument("--score-thr", type=float, default=0.5, help="score threshold of the drawings")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a 2-core machine that is busy with anything else, "
        "2 OpenMP threads run several times slower; 0 keeps torch's default)",
    )
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="mmengine config overrides")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = ["baseline", "dcnv2"] if args.baseline else ["dcnv2"]
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    distributed = _init_distributed()
    rank, _ = _dist_info()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from mmdet_dcnv2.datasets import shapes

    if rank == 0:
        if shapes.is_generated(args.data_root, args.num_train, args.num_val, seed=args.data_seed):
            print(f"shapes dataset: using {args.data_root}", flush=True)
        else:
            start = time.perf_counter()
            shapes.generate(args.data_root, args.num_train, args.num_val, seed=args.data_seed, verbose=True)
            print(f"shapes dataset: generated in {time.perf_counter() - start:.1f} s", flush=True)
    if distributed:
        import torch.distributed as dist

        dist.barrier()

    import mmdet_dcnv2  # noqa: F401  (registers our layers; the configs' custom_imports would too)

    started = time.perf_counter()
    results = [run_one(model, seed, args, distributed) for model in args.models for seed in args.seeds]
    if rank != 0:
        return {}
    summary = summarise(results)
    summary_file = {
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "loss_curve"} for r in results],
        "total_time_s": round(time.perf_counter() - started, 1),
        "data_root": osp.abspath(args.data_root),
        "num_train": args.num_train,
        "num_val": args.num_val,
    }
    os.makedirs(args.work_dir, exist_ok=True)
    with open(osp.join(args.work_dir, "summary.json"), "w") as f:
        json.dump(summary_file, f, indent=1)
    plot_losses(
        {f"{r['model']} seed {r['seed']}": r["loss_curve"] for r in results},
        osp.join(args.work_dir, "loss_curves.png"),
        "training loss",
        components=False,
    )
    table = format_summary(summary)
    with open(osp.join(args.work_dir, "summary.txt"), "w") as f:
        f.write(table + "\n")
    print("\n" + table + f"\n\nwritten under {osp.abspath(args.work_dir)}", flush=True)
    return summary_file


if __name__ == "__main__":
    main()
